"""Load importer chunks into the lake and the Redis catalog, and say what was loaded.

:func:`run_import` is the one loader behind ``rayrec import``: whatever the reader (see
:mod:`training.importers`), each chunk's tables are appended to the lake under a file name fixed
by the source name and the chunk's position, and its catalog tables are written to Redis. Running
the same import again therefore replaces its lake files and rewrites the same Redis records:
counts do not grow. A re-run must use the same ``source`` and chunk size to replace rather than
add files (readers dedupe events on ``event_id`` either way).

Placeholder catalog rows (items and users made up from an event file, see
:func:`training.importers.is_placeholder`) are written, to the lake and to Redis, only for ids the
catalog does not hold yet, so importing events never blanks out a real title or category.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from core.lake import Lake, table_spec
from features.catalog import CatalogStore
from training.importers import is_placeholder

_SOURCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,100}$")
_LOOKUP_CHUNK = 10_000
"""Ids per SMISMEMBER when checking which placeholder rows are new."""


@dataclass
class ImportSummary:
    """What one import loaded.

    Attributes:
        source: The source name the lake files are named after.
        users: Distinct user ids in the import (catalog rows and events together).
        items: Distinct item ids in the import (catalog rows and events together).
        edges: Follow-edge rows loaded.
        events_by_type: Event rows per event type.
        first_event: Time of the earliest event, if any.
        last_event: Time of the latest event, if any.
        chunks: Chunks read.
        files_written: Lake files written (or replaced).
        seconds: Wall-clock duration.
    """

    source: str
    users: int = 0
    items: int = 0
    edges: int = 0
    events_by_type: dict[str, int] = field(default_factory=dict)
    first_event: datetime | None = None
    last_event: datetime | None = None
    chunks: int = 0
    files_written: int = 0
    seconds: float = 0.0

    @property
    def events(self) -> int:
        """Event rows of every type."""
        return sum(self.events_by_type.values())

    def render(self) -> str:
        """A readable multi-line report."""
        width = max([len(t) for t in self.events_by_type] + [6])
        lines = [
            f"import {self.source!r}: {self.chunks} chunks, {self.files_written} lake files, "
            f"{self.seconds:.1f} s",
            f"  users   {self.users:>12,}",
            f"  items   {self.items:>12,}",
            f"  edges   {self.edges:>12,}",
            f"  events  {self.events:>12,}",
        ]
        lines += [f"    {kind:<{width}} {n:>12,}" for kind, n in sorted(self.events_by_type.items())]
        if self.first_event is not None and self.last_event is not None:
            lines.append(f"  events from {self.first_event.isoformat()} to {self.last_event.isoformat()}")
        return "\n".join(lines)


class _Tally:
    """Exact running counts over the chunks."""

    def __init__(self) -> None:
        self.users: set[str] = set()
        self.items: set[str] = set()
        self.edges = 0
        self.events: Counter[str] = Counter()
        self.first: datetime | None = None
        self.last: datetime | None = None

    def add(self, name: str, table: pa.Table) -> None:
        if name == "users":
            self.users.update(pc.unique(table.column("user_id")).to_pylist())
        elif name == "items":
            self.items.update(pc.unique(table.column("item_id")).to_pylist())
        elif name == "edges":
            self.edges += table.num_rows
        elif name == "events" and table.num_rows:
            self.users.update(pc.unique(table.column("user_id")).to_pylist())
            self.items.update(pc.unique(table.column("item_id")).to_pylist())
            counts = pc.value_counts(table.column("event_type")).to_pylist()
            self.events.update({entry["values"]: entry["counts"] for entry in counts})
            bounds = pc.min_max(table.column("ts")).as_py()
            low: datetime = bounds["min"]
            high: datetime = bounds["max"]
            self.first = low if self.first is None else min(self.first, low)
            self.last = high if self.last is None else max(self.last, high)


def _new_only(catalog: CatalogStore, name: str, table: pa.Table) -> pa.Table:
    """The rows of a placeholder table whose id the catalog does not hold (nor has erased)."""
    keys = catalog.keys
    if name == "items":
        ids = table.column("item_id").to_pylist()
        sets = [keys.items_all()]
    else:
        ids = table.column("user_id").to_pylist()
        sets = [keys.users_all(), keys.erased_users()]
    if not ids:
        return table
    known = [False] * len(ids)
    with catalog.store.guard():
        pipe = catalog.store.client.pipeline(transaction=False)
        for key in sets:
            for start in range(0, len(ids), _LOOKUP_CHUNK):
                pipe.smismember(key, ids[start : start + _LOOKUP_CHUNK])
        replies = pipe.execute()
    per_set = len(replies) // len(sets)
    for n in range(len(sets)):
        flags = [flag for reply in replies[n * per_set : (n + 1) * per_set] for flag in reply]
        known = [a or bool(b) for a, b in zip(known, flags, strict=True)]
    return table.filter(pa.array([not k for k in known], pa.bool_()))


def _apply_catalog(catalog: CatalogStore, name: str, table: pa.Table) -> None:
    if name == "items":
        catalog.put_items(table)
    elif name == "users":
        catalog.put_users(table)
    elif name == "edges":
        catalog.put_edges(table)


def run_import(
    chunks: Iterable[dict[str, pa.Table]],
    lake: Lake,
    catalog: CatalogStore,
    *,
    source: str,
    progress: bool = True,
    total_events: int | None = None,
) -> ImportSummary:
    """Append every chunk to the lake, load its catalog tables into Redis, and summarise.

    Each table of chunk ``i`` is appended with the file name ``import-{source}-{i:05d}``, so a
    re-run replaces its own files. Lake first, Redis second: an import cut short and run again
    ends in the same state as one run to the end.

    Args:
        chunks: Tables keyed by lake table name, as the readers of :mod:`training.importers` yield.
        lake: The lake to append to.
        catalog: The Redis catalog to load ``items``, ``users`` and ``edges`` into.
        source: Short name of the source (``movielens-ml-100k``, ``clicks``): letters, digits and
            ``_.-``, starting with a letter or digit.
        progress: Show a progress bar on stderr.
        total_events: Event rows to expect, for the progress bar; taken from the chunks'
            ``total_events`` attribute when omitted.

    Returns:
        The summary.

    Raises:
        ValueError: ``source`` is not a valid name, a chunk names an unknown table, or a table
            does not fit its schema.
        StoreUnavailable: Redis could not be reached.
    """
    if not _SOURCE_RE.match(source):
        raise ValueError(
            f"invalid source name {source!r}: use letters, digits and '_.-', starting with a letter or digit"
        )
    started = time.perf_counter()
    # Fail before the first lake write rather than after it when Redis is down.
    catalog.store.ping()
    tally = _Tally()
    files = 0
    iterator: Iterator[dict[str, pa.Table]] = iter(chunks)
    first = next(iterator, None)
    if total_events is None:
        hinted: Any = getattr(chunks, "total_events", None)
        total_events = hinted if isinstance(hinted, int) else None
    by_events = total_events is not None
    bar = tqdm(
        total=total_events,
        unit=" events" if by_events else " chunks",
        unit_scale=by_events,
        desc=f"import {source}",
        disable=not progress,
    )
    index = 0
    chunk = first
    try:
        while chunk is not None:
            name = f"import-{source}-{index:05d}"
            for table_name, table in chunk.items():
                spec = table_spec(table_name)
                data = table
                if is_placeholder(table) and table_name in ("items", "users"):
                    data = _new_only(catalog, table_name, table)
                files += len(lake.append(spec, data, name=name))
                _apply_catalog(catalog, table_name, data)
                tally.add(table_name, table)
            if not by_events:
                bar.update(1)
            elif "events" in chunk:
                bar.update(chunk["events"].num_rows)
            index += 1
            chunk = next(iterator, None)
    finally:
        bar.close()
    return ImportSummary(
        source=source,
        users=len(tally.users),
        items=len(tally.items),
        edges=tally.edges,
        events_by_type=dict(tally.events),
        first_event=tally.first,
        last_event=tally.last,
        chunks=index,
        files_written=files,
        seconds=time.perf_counter() - started,
    )
