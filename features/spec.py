"""The vocabulary of feature definitions: :class:`FeatureSpec` values grouped in :class:`FeatureView` values.

A view owns one JSON state per entity and two pure functions over it:

- ``update(state, events, items, params) -> state`` folds events into the state. It never mutates
  its arguments and folds ``events`` in ``(ts, event_id)`` order whatever order they come in.
- ``serve(state, now, params) -> {feature name: value}`` turns a state into served values as of
  ``now``.

The offline path folds an entity's whole history in one call; the online path folds each stream
batch onto the state stored in Redis. Both give the same served values because states survive a
JSON round trip unchanged and folding in several calls equals folding in one (the parity property,
checked in ``tests/unit/test_feature_definitions.py``).

``update`` takes a batch rather than one event so it copies the state once per call instead of once
per event; folding one event is a batch of one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, TypeAlias

from core.schema import EntityType
from core.types import FeatureValue
from features.params import FeatureParams
from features.records import EventRecord, ItemInfo

State: TypeAlias = dict[str, Any]
"""A view's per-entity state: a JSON object (strings, numbers, lists, objects)."""

ItemLookup: TypeAlias = Mapping[str, ItemInfo]
"""Item id to catalog info; items missing from it are unknown to the catalog."""

UpdateFn: TypeAlias = Callable[[State, Sequence[EventRecord], ItemLookup, FeatureParams], State]
ServeFn: TypeAlias = Callable[[State, datetime, FeatureParams], dict[str, FeatureValue]]
EntityKeyFn: TypeAlias = Callable[[EventRecord, ItemInfo | None], str | None]

_NAME_RE: Final = re.compile(r"^[a-z][a-z0-9_]*$")


class Dtype(StrEnum):
    """Served value types; each maps onto a :data:`core.types.FeatureValue` type."""

    INT = "int"
    FLOAT = "float"
    STR = "str"
    STRINGS = "list[str]"
    FLOATS = "list[float]"


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One served feature.

    Attributes:
        name: Snake_case name, unique within its view.
        entity: The entity type the feature describes.
        view: Name of the view that computes it.
        dtype: Type of the served value.
        default: Value to use when the feature is absent (no record, or expired).
        ttl_s: How long a served value stays valid after its record's ``updated_at``; ``None``
            means until the next update. Readers treat an expired value as absent.
        description: What the value means, with its unit.
    """

    name: str
    entity: EntityType
    view: str
    dtype: Dtype
    default: FeatureValue
    ttl_s: float | None
    description: str

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name) or not _NAME_RE.match(self.view):
            raise ValueError(f"feature {self.view}:{self.name} must be snake_case on both sides")

    @property
    def ref(self) -> str:
        """The ``view:feature`` reference used everywhere downstream."""
        return f"{self.view}:{self.name}"


@dataclass(frozen=True, slots=True)
class FeatureView:
    """A group of features computed together from one per-entity state.

    Attributes:
        name: Snake_case view name; the first half of every feature reference.
        entity: The entity type whose instances own a state.
        specs: The features :attr:`serve` returns, exactly these names.
        update: The pure fold (see the module docstring).
        serve: The pure state-to-values function.
        entity_key: Which entity of this view an event updates (``None``: none, e.g. an item
            unknown to the catalog has no creator).
        state_ttl_s: Idle time after which an entity's online state and serving record expire.
        description: What the view is about.
    """

    name: str
    entity: EntityType
    specs: tuple[FeatureSpec, ...]
    update: UpdateFn
    serve: ServeFn
    entity_key: EntityKeyFn
    state_ttl_s: int
    description: str

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"view name {self.name!r} must be snake_case")
        names = [spec.name for spec in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"view {self.name}: duplicate feature names")
        wrong = [s.ref for s in self.specs if s.view != self.name or s.entity is not self.entity]
        if wrong:
            raise ValueError(f"view {self.name}: specs {wrong} name another view or entity")

    @property
    def refs(self) -> tuple[str, ...]:
        """The ``view:feature`` references of :attr:`specs`, in declaration order."""
        return tuple(spec.ref for spec in self.specs)

    def serve_refs(self, state: State, now: datetime, params: FeatureParams) -> dict[str, FeatureValue]:
        """:attr:`serve` with keys turned into ``view:feature`` references.

        Args:
            state: The entity's state.
            now: The instant the values are served for (timezone-aware).
            params: Fold constants.

        Returns:
            Reference to value, for every spec of the view.
        """
        return {f"{self.name}:{name}": value for name, value in self.serve(state, now, params).items()}
