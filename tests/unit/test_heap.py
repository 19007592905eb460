"""The serving process' heap freezer."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from deployments.recommender.heap import HeapFreezer


class Node:
    """An object that can hold a reference cycle."""

    other: object = None


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_a_pass_freezes_and_every_nth_collects_the_cycles_frozen_alive() -> None:
    freezer = HeapFreezer(full_every=2)
    node = Node()
    node.other = node
    alive = weakref.ref(node)
    freezer.run()
    assert gc.get_freeze_count() > 0
    del node
    gc.collect()
    assert alive() is not None, "a frozen cycle is out of the ordinary collections' reach"
    freezer.run()
    assert alive() is None, "the full pass collects it"
    assert freezer.passes == 2


def test_frozen_objects_are_still_freed_by_reference_counting() -> None:
    node = Node()
    alive = weakref.ref(node)
    HeapFreezer().run()
    del node
    assert alive() is None


def test_full_every_must_be_positive() -> None:
    with pytest.raises(ValueError):
        HeapFreezer(full_every=0)
