"""Reading the ``serving:*`` flags that the serving-state hydrator puts on every candidate."""

from __future__ import annotations

from collections.abc import Iterable

from core.stages import StageContractError
from core.types import Candidate, FilterResult


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


def partition_by_flags(stage: str, cands: Iterable[Candidate], *refs: str) -> FilterResult:
    """Split candidates into those with none of ``refs`` set and those with one set.

    What ``FilterResult.partition`` with :func:`flag` gives, flag by flag in the order given, in
    one loop: the filters run it over every merged candidate of every request.

    Args:
        stage: Name of the filter asking, for the error.
        cands: The filter's input.
        refs: ``serving:*`` references; a candidate with any of them true is removed.

    Returns:
        The split, input order kept on both sides.

    Raises:
        StageContractError: A candidate lacks a flag it was checked for.
    """
    kept: list[Candidate] = []
    removed: list[Candidate] = []
    for cand in cands:
        get = cand.features.get
        for ref in refs:
            value = get(ref)
            if value is True:
                removed.append(cand)
                break
            if value is not False:
                flag(stage, cand, ref)
        else:
            kept.append(cand)
    return FilterResult(kept=kept, removed=removed)
