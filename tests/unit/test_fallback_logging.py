"""Which failed pipelines the recommendation service warns about."""

from __future__ import annotations

import pytest

from core.pipeline import FilterStateError, SkipReason, SourceFailedError
from deployments.recommender.service import _late


@pytest.mark.parametrize(
    ("error", "late"),
    [
        (TimeoutError(), True),
        (SourceFailedError("two_tower_ann", SkipReason.TIMEOUT), True),
        (FilterStateError("serving_state", SkipReason.TIMEOUT), True),
        (SourceFailedError("two_tower_ann", SkipReason.ERROR), False),
        (FilterStateError("serving_state", SkipReason.CONTRACT), False),
        (RuntimeError("boom"), False),
    ],
)
def test_only_lateness_is_routine(error: BaseException, late: bool) -> None:
    assert _late(error) is late
