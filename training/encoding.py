"""Integer encoding of users and items, shared by training, evaluation and request-time serving.

Every categorical input of the models (item ids, item type, category, tags, creator, age group,
region, language, surface, device) goes through a :class:`Vocabulary`, in which index 0 means
"unknown or absent". That one convention is what lets a model trained yesterday embed an item
published today: its id is unknown (0), so the item tower sees only its content, which it was
trained to do through id-dropout.

User ids are not looked up but hashed into a fixed number of buckets (:func:`stable_bucket`), so a
user who signed up after training still gets a (shared) id embedding and no vocabulary has to grow
with the user base. The hash is BLAKE2b, not Python's ``hash``, because the bucket must be the same
in every process and on every run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

IntArray = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.str_]

UNKNOWN: Final = 0
"""Index of every value a vocabulary does not hold, and of padding."""

_DICT_LOOKUP_MAX: Final = 4096
"""Python sequences up to this length are looked up value by value, longer ones with Arrow."""

ITEM_CONTENT_FIELDS: Final = ("item_type", "category", "creator")
"""Single-valued item content fields, each with a vocabulary of the same name."""

USER_PROFILE_FIELDS: Final = ("age_group", "region", "language")
"""User profile fields, each with a vocabulary of the same name."""

CONTEXT_FIELDS: Final = ("surface", "device")
"""Request context fields the ranker reads, each with a vocabulary of the same name."""

VOCABULARY_NAMES: Final = (
    "item",
    "user",
    "item_type",
    "category",
    "tag",
    "creator",
    "age_group",
    "region",
    "language",
    "surface",
    "device",
)
"""The vocabularies of :class:`Vocabularies`, in storage order."""


def stable_bucket(ids: Iterable[str], buckets: int) -> IntArray:
    """Hash ids into ``[0, buckets)``, identically in every process and release.

    Args:
        ids: The ids (user ids).
        buckets: Number of buckets, 1 or more.

    Returns:
        One bucket per id.
    """
    assert buckets >= 1, f"need at least one bucket, got {buckets}"
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") % buckets
            for value in ids
        ),
        dtype=np.int64,
    )


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """A value -> index mapping where index 0 is reserved for unknown values.

    Attributes:
        name: What the values are (``item``, ``category``, …); used in messages and file names.
        values: The known values; ``values[i]`` has index ``i + 1``.
    """

    name: str
    values: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False)
    _value_set: pa.Array = field(init=False, repr=False)

    def __post_init__(self) -> None:
        index = {value: i + 1 for i, value in enumerate(self.values)}
        assert len(index) == len(self.values), f"vocabulary {self.name!r} holds duplicate values"
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_value_set", pa.array(self.values, type=pa.string()))

    def __len__(self) -> int:
        """Number of embedding rows the vocabulary needs: its values plus the unknown row."""
        return len(self.values) + 1

    def __repr__(self) -> str:
        return f"Vocabulary({self.name!r}, {len(self.values)} values)"

    @classmethod
    def build(cls, name: str, values: Iterable[str | None], *, min_count: int = 1) -> Vocabulary:
        """A vocabulary of the distinct non-empty values, sorted so it does not depend on row order.

        Args:
            name: The vocabulary's name.
            values: Observed values; ``None`` and empty strings are ignored.
            min_count: Fewest occurrences a value needs to get its own index.

        Returns:
            The vocabulary.
        """
        counts: dict[str, int] = {}
        for value in values:
            if value:
                counts[value] = counts.get(value, 0) + 1
        return cls(name, tuple(sorted(v for v, n in counts.items() if n >= min_count)))

    def index(self, value: str | None) -> int:
        """The index of one value (0 when unknown or ``None``)."""
        return UNKNOWN if value is None else self._index.get(value, UNKNOWN)

    def lookup(self, values: pa.Array | pa.ChunkedArray | Sequence[str | None] | StrArray) -> IntArray:
        """Indices of many values at once (0 for unknown and null values).

        Args:
            values: The values, as an Arrow string array or any sequence of strings.

        Returns:
            One index per value.
        """
        if not isinstance(values, pa.Array | pa.ChunkedArray):
            values = list(values)
            if len(values) <= _DICT_LOOKUP_MAX:
                # index_in hashes the whole value set on every call (0.6 ms for 100k items), so
                # the few values of a serving request are looked up in the dict instead.
                index = self._index
                return np.fromiter(
                    (index.get(v, UNKNOWN) if v is not None else UNKNOWN for v in values),
                    dtype=np.int64,
                    count=len(values),
                )
            values = pa.array(values, type=pa.string())
        elif not pa.types.is_string(values.type):
            values = values.cast(pa.string())
        found = pc.index_in(values, value_set=self._value_set)
        positions = np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
        return positions + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "values": list(self.values)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocabulary:
        """Inverse of :meth:`to_dict`."""
        return cls(str(data["name"]), tuple(str(v) for v in data["values"]))


@dataclass(frozen=True, eq=False)
class Vocabularies:
    """Every vocabulary one release of the models was trained with.

    Attributes:
        item: Items with their own id embedding: those with training positives.
        user: Users known at training time (for evaluation and joins; the models hash user ids).
        item_type: Item types.
        category: Item categories.
        tag: Item tags.
        creator: Item creators.
        age_group: User age groups.
        region: User regions.
        language: User languages.
        surface: Surfaces events and impressions came from.
        device: Device classes.
        user_buckets: Number of hash buckets of user ids.
        max_tags: Tags kept per item (the first ones).
        history_length: Previous positive items kept per user.
    """

    item: Vocabulary
    user: Vocabulary
    item_type: Vocabulary
    category: Vocabulary
    tag: Vocabulary
    creator: Vocabulary
    age_group: Vocabulary
    region: Vocabulary
    language: Vocabulary
    surface: Vocabulary
    device: Vocabulary
    user_buckets: int
    max_tags: int
    history_length: int

    def sizes(self) -> dict[str, int]:
        """Embedding rows per vocabulary (unknown row included), plus ``user_buckets``."""
        sizes = {name: len(getattr(self, name)) for name in VOCABULARY_NAMES}
        sizes["user_buckets"] = self.user_buckets
        return sizes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in release bundles as ``vocabularies.json``."""
        data: dict[str, Any] = {name: getattr(self, name).to_dict() for name in VOCABULARY_NAMES}
        data.update(
            user_buckets=self.user_buckets, max_tags=self.max_tags, history_length=self.history_length
        )
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocabularies:
        """Inverse of :meth:`to_dict`."""
        vocabularies = {name: Vocabulary.from_dict(data[name]) for name in VOCABULARY_NAMES}
        return cls(
            **vocabularies,
            user_buckets=int(data["user_buckets"]),
            max_tags=int(data["max_tags"]),
            history_length=int(data["history_length"]),
        )

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Vocabularies:
        """Read a file written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _metadata_field(items: pa.Table, name: str) -> list[str | None]:
    """One string field of each row's ``metadata_json`` (None where absent or unreadable)."""
    if "metadata_json" not in items.column_names:
        return [None] * items.num_rows
    out: list[str | None] = []
    for text in items.column("metadata_json").to_pylist():
        try:
            value = json.loads(text).get(name) if text else None
        except (ValueError, AttributeError):
            value = None
        out.append(value if isinstance(value, str) else None)
    return out


def _list_matrix(column: pa.ChunkedArray | pa.Array, vocabulary: Vocabulary, width: int) -> IntArray:
    """Encode a list<string> column as a ``(rows, width)`` index matrix, keeping the first ``width``."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=pa.list_(pa.string()))
    rows = len(column)
    matrix = np.zeros((rows, width), dtype=np.int64)
    if rows == 0 or width == 0:
        return matrix
    lengths = _ints(pc.list_value_length(column).fill_null(0))
    flat = vocabulary.lookup(pc.list_flatten(column))
    starts = np.cumsum(lengths) - lengths
    row_of = np.repeat(np.arange(rows), lengths)
    slot = np.arange(len(flat)) - np.repeat(starts, lengths)
    keep = slot < width
    matrix[row_of[keep], slot[keep]] = flat[keep]
    return matrix


@dataclass(frozen=True, eq=False)
class ItemFeatures:
    """The encoded content of a set of items, one row per item.

    This is what the item tower reads. ``id_index`` is 0 for items without their own id embedding
    (new or never positively engaged), whose embedding then comes from content alone.

    Attributes:
        item_ids: The items' ids.
        id_index: Index in the ``item`` vocabulary.
        item_type: Index in the ``item_type`` vocabulary.
        category: Index in the ``category`` vocabulary.
        tags: ``(rows, max_tags)`` indices in the ``tag`` vocabulary, 0-padded.
        creator: Index in the ``creator`` vocabulary.
        region: The item's region (``metadata_json``) as an index in the users' ``region``
            vocabulary, so it compares with a user's; 0 when unknown.
        language: Likewise, in the ``language`` vocabulary.
    """

    item_ids: StrArray
    id_index: IntArray
    item_type: IntArray
    category: IntArray
    tags: IntArray
    creator: IntArray
    region: IntArray
    language: IntArray

    def __post_init__(self) -> None:
        rows = len(self.item_ids)
        for name in ("id_index", "item_type", "category", "creator", "region", "language"):
            assert len(getattr(self, name)) == rows, f"{name} has {len(getattr(self, name))} rows, not {rows}"
        assert self.tags.ndim == 2 and len(self.tags) == rows, (
            f"tags must be (rows, max_tags), got {self.tags.shape}"
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_table(cls, items: pa.Table, vocabularies: Vocabularies) -> ItemFeatures:
        """Encode rows shaped like the lake's ``items`` table.

        Args:
            items: ``item_id``, ``item_type``, ``category``, ``tags`` and ``creator_id`` columns.
            vocabularies: The vocabularies to encode with.

        Returns:
            The encoded items, in the table's order.
        """
        return cls(
            item_ids=np.asarray(items.column("item_id").to_pylist(), dtype=np.str_),
            id_index=vocabularies.item.lookup(items.column("item_id")),
            item_type=vocabularies.item_type.lookup(items.column("item_type")),
            category=vocabularies.category.lookup(items.column("category")),
            tags=_list_matrix(items.column("tags"), vocabularies.tag, vocabularies.max_tags),
            creator=vocabularies.creator.lookup(items.column("creator_id")),
            region=vocabularies.region.lookup(_metadata_field(items, "region")),
            language=vocabularies.language.lookup(_metadata_field(items, "language")),
        )

    def take(self, positions: IntArray) -> ItemFeatures:
        """The given rows."""
        return ItemFeatures(
            item_ids=self.item_ids[positions],
            id_index=self.id_index[positions],
            item_type=self.item_type[positions],
            category=self.category[positions],
            tags=self.tags[positions],
            creator=self.creator[positions],
            region=self.region[positions],
            language=self.language[positions],
        )

    def positions(self, item_ids: Sequence[str] | StrArray | pa.Array) -> IntArray:
        """Row of each given item id, -1 for ids not in this set."""
        value_set = pa.array(self.item_ids.tolist(), type=pa.string())
        values = item_ids if isinstance(item_ids, pa.Array) else pa.array(list(item_ids), type=pa.string())
        found = pc.index_in(values, value_set=value_set)
        return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)

    def rows_of_id_index(self, vocabulary_size: int) -> IntArray:
        """Row of each item vocabulary index in this set (-1 for indices not in it, and for 0)."""
        rows = np.full(vocabulary_size, -1, dtype=np.int64)
        known = self.id_index > UNKNOWN
        rows[self.id_index[known]] = np.flatnonzero(known)
        return rows

    def arrays(self) -> dict[str, IntArray]:
        """The integer columns by name (the item tower's inputs)."""
        return {
            "item_index": self.id_index,
            "item_type": self.item_type,
            "category": self.category,
            "tags": self.tags,
            "creator": self.creator,
        }

    def to_table(self) -> pa.Table:
        """Arrow form, for bundles."""
        width = self.tags.shape[1]
        return pa.table(
            {
                "item_id": pa.array(self.item_ids.tolist(), type=pa.string()),
                "id_index": self.id_index,
                "item_type": self.item_type,
                "category": self.category,
                "tags": pa.FixedSizeListArray.from_arrays(pa.array(self.tags.reshape(-1)), width),
                "creator": self.creator,
                "region": self.region,
                "language": self.language,
            }
        )

    @classmethod
    def from_arrow(cls, table: pa.Table) -> ItemFeatures:
        """Inverse of :meth:`to_table`."""
        tags = table.column("tags").combine_chunks()
        width = tags.type.list_size
        flat = np.asarray(tags.flatten().to_numpy(zero_copy_only=False), dtype=np.int64)
        return cls(
            item_ids=np.asarray(table.column("item_id").to_pylist(), dtype=np.str_),
            id_index=_ints(table.column("id_index")),
            item_type=_ints(table.column("item_type")),
            category=_ints(table.column("category")),
            tags=flat.reshape(len(table), width),
            creator=_ints(table.column("creator")),
            region=_ints(table.column("region")),
            language=_ints(table.column("language")),
        )

    def save(self, path: str | Path) -> None:
        """Write as Parquet."""
        pq.write_table(self.to_table(), str(path))

    @classmethod
    def load(cls, path: str | Path) -> ItemFeatures:
        """Read a file written by :meth:`save`."""
        return cls.from_arrow(pq.read_table(str(path)))


MAX_INTERESTS: Final = 8
"""Onboarding interests kept per user (the first ones)."""


@dataclass(frozen=True, eq=False)
class UserFeatures:
    """The encoded profile of a set of users, one row per user.

    Attributes:
        user_ids: The users' ids.
        bucket: Hash bucket of the id (:func:`stable_bucket`).
        age_group: Index in the ``age_group`` vocabulary.
        region: Index in the ``region`` vocabulary.
        language: Index in the ``language`` vocabulary.
        interests: ``(rows, MAX_INTERESTS)`` onboarding interests as ``category`` vocabulary
            indices, 0-padded (the ranker reads them; the user tower does not).
    """

    user_ids: StrArray
    bucket: IntArray
    age_group: IntArray
    region: IntArray
    language: IntArray
    interests: IntArray

    def __len__(self) -> int:
        return len(self.user_ids)

    @classmethod
    def from_table(cls, users: pa.Table, vocabularies: Vocabularies) -> UserFeatures:
        """Encode rows shaped like the lake's ``users`` table (profile columns may be absent)."""
        rows = users.num_rows

        def column(name: str) -> pa.Array | pa.ChunkedArray:
            if name in users.column_names:
                return users.column(name)
            return pa.nulls(rows, type=pa.string())

        user_ids = users.column("user_id").to_pylist()
        interests = (
            users.column("interests")
            if "interests" in users.column_names
            else pa.nulls(rows, type=pa.list_(pa.string()))
        )
        return cls(
            user_ids=np.asarray(user_ids, dtype=np.str_),
            bucket=stable_bucket(user_ids, vocabularies.user_buckets),
            age_group=vocabularies.age_group.lookup(column("age_group")),
            region=vocabularies.region.lookup(column("region")),
            language=vocabularies.language.lookup(column("language")),
            interests=_list_matrix(interests, vocabularies.category, MAX_INTERESTS),
        )

    def take(self, positions: IntArray) -> UserFeatures:
        """The given rows."""
        return UserFeatures(
            user_ids=self.user_ids[positions],
            bucket=self.bucket[positions],
            age_group=self.age_group[positions],
            region=self.region[positions],
            language=self.language[positions],
            interests=self.interests[positions],
        )

    def arrays(self) -> dict[str, IntArray]:
        """The integer columns by name (the user tower's profile inputs)."""
        return {
            "user_bucket": self.bucket,
            "age_group": self.age_group,
            "region": self.region,
            "language": self.language,
        }


def _ints(column: pa.ChunkedArray | pa.Array) -> IntArray:
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)
