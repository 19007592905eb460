"""Serving records: how an entity's served features are laid out in Redis.

A serving record is one JSON array per entity, positional::

    [layout id, updated_at (ISO), value 1, ..., value n]

The values follow a :class:`RecordLayout`: every feature reference of the entity's views, in
view order, then spec order. The layout id is a short hash of that sequence of references, so
a reader never pairs values with the wrong names: a record whose layout it does not know (one
written by a release with other feature definitions) reads as absent, and the entity is served
its features' defaults until the stream processor writes its record again.

Records were objects keyed by reference before (``{"view:feature": value, ..., "updated_at":
…}``) and such records still read. The positional layout is a third of the size: the user record
of a new user went from 870 to about 300 bytes, an item's from 1,055 to about 250. Every record
is written by a stream processor for every entity of every batch and read by the request path
for hundreds of candidates, so its size shows in both: the users processor's CPU per event fell
by 12 % and Redis' by 14 % (``benchmarks.stream_processor``).

Readers get the record as a mapping, whichever layout it was stored in: :func:`loads`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from features.spec import FeatureView

logger = logging.getLogger(__name__)

UPDATED_AT: Final = "updated_at"
"""Name of the write instant (ISO 8601, UTC) in a record read as a mapping."""


@dataclass(frozen=True)
class RecordLayout:
    """The positional layout of one entity type's serving record.

    Attributes:
        refs: Feature references, in the order their values are stored.
        id: Short hash of ``refs``; the record's first element.
    """

    refs: tuple[str, ...]
    id: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.blake2b("\n".join(self.refs).encode(), digest_size=4).hexdigest()
        object.__setattr__(self, "id", digest)

    def head(self, stamp: str) -> list[Any]:
        """The start of a record written at ``stamp``; the values are appended to it in order."""
        return [self.id, stamp]

    def encode(self, values: Mapping[str, Any]) -> bytes:
        """A record of a reference mapping that holds every reference and :data:`UPDATED_AT`.

        Args:
            values: Reference to value, plus the write instant under :data:`UPDATED_AT`.

        Returns:
            The record's JSON.

        Raises:
            KeyError: A reference of the layout, or the instant, is missing.
        """
        return orjson.dumps([self.id, values[UPDATED_AT], *(values[ref] for ref in self.refs)])

    def expand(self, doc: list[Any]) -> dict[str, Any]:
        """The reference mapping of a record of this layout (``doc`` as JSON-decoded)."""
        mapping = dict(zip(self.refs, doc[2:], strict=True))
        mapping[UPDATED_AT] = doc[1]
        return mapping


_LAYOUTS: dict[str, RecordLayout] = {}
_UNKNOWN_SEEN: set[str] = set()


def layout_of(views: Iterable[FeatureView]) -> RecordLayout:
    """The layout of a record holding ``views``, known from then on to :func:`loads` in this process.

    Args:
        views: The entity's views, in the order the writer serves them.

    Returns:
        The layout.
    """
    layout = RecordLayout(tuple(spec.ref for view in views for spec in view.specs))
    known = _LAYOUTS.setdefault(layout.id, layout)
    if known.refs != layout.refs:
        raise ValueError(f"record layouts {known.refs} and {layout.refs} share the id {layout.id}")
    return known


def expand(doc: Any) -> dict[str, Any] | None:
    """The reference mapping of a JSON-decoded record, in either layout.

    Args:
        doc: What the record's JSON decodes to.

    Returns:
        The mapping (with :data:`UPDATED_AT`); ``None`` for a positional record of a layout this
        process does not know (it is logged once per layout).

    Raises:
        ValueError: ``doc`` is neither a positional record nor a JSON object.
    """
    if type(doc) is list:
        if len(doc) < 2 or type(doc[0]) is not str:
            raise ValueError("a serving record must start with its layout id and write instant")
        layout = _LAYOUTS.get(doc[0])
        if layout is None:
            if doc[0] not in _UNKNOWN_SEEN:
                _UNKNOWN_SEEN.add(doc[0])
                logger.warning(
                    "serving records of layout %s are not known here (other feature definitions); "
                    "they read as absent until rewritten",
                    doc[0],
                )
            return None
        if len(doc) != len(layout.refs) + 2:
            raise ValueError(f"a serving record of layout {layout.id} has {len(doc) - 2} values")
        return layout.expand(doc)
    if isinstance(doc, dict):
        return doc  # a record of a release before the positional layout, or any other object
    raise ValueError(f"expected a serving record or a JSON object, found {type(doc).__name__}")


def loads(raw: str | bytes | None) -> dict[str, Any] | None:
    """Decode a value read from Redis: a serving record (either layout) or any JSON object.

    Args:
        raw: The stored text; ``None`` for a missing key.

    Returns:
        The mapping; ``None`` for a missing key or a record of an unknown layout.

    Raises:
        ValueError: The text is not JSON, or neither a serving record nor a JSON object.
    """
    if raw is None:
        return None
    return expand(orjson.loads(raw))
