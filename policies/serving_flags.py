"""Reading the ``serving:*`` flags that the serving-state hydrator puts on every candidate."""

from __future__ import annotations

from core.stages import StageContractError
from core.types import Candidate


def flag(stage: str, cand: Candidate, ref: str) -> bool:
    """The value of one serving flag of a candidate.

    A missing flag means the pipeline runs this filter without the serving-state hydrator before
    it; keeping the candidate would serve it unchecked, so that is refused instead.

    Args:
        stage: Name of the filter asking, for the error.
        cand: The candidate.
        ref: A ``serving:*`` reference.

    Returns:
        The flag.

    Raises:
        StageContractError: The candidate has no such flag.
    """
    value = cand.features.get(ref)
    if not isinstance(value, bool):
        raise StageContractError(
            stage,
            f"candidate {cand.item_id!r} has no {ref!r} flag; run the serving-state hydrator "
            "as a filter-state hydrator of this pipeline",
        )
    return value
