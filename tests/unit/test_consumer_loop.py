"""The collector settings of a consumer's process."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from features.consumer_loop import GC_GEN0_THRESHOLD, relax_gc


@pytest.fixture(autouse=True)
def _restore_thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_relax_gc_raises_only_the_young_threshold() -> None:
    gc.set_threshold(700, 10, 10)
    relax_gc()
    assert gc.get_threshold() == (GC_GEN0_THRESHOLD, 10, 10)


def test_relax_gc_keeps_a_higher_threshold() -> None:
    gc.set_threshold(GC_GEN0_THRESHOLD * 2, 5, 20)
    relax_gc()
    assert gc.get_threshold() == (GC_GEN0_THRESHOLD * 2, 5, 20)
