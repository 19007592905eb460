"""Readers that turn public data sets and event files into lake-ready Arrow tables.

Each reader yields chunks: ``dict[str, pa.Table]`` keyed by lake table name (``"users"``,
``"items"``, ``"edges"``, ``"events"``), every table in the schema of :mod:`core.tables`. Readers
are pure: they write nothing; :func:`training.data_import.run_import` does. A reader reads and
checks its whole input when called, so bad input is refused before anything is written; the
ratings or events are held in memory meanwhile (about 0.5 GB for ml-25m). The first chunk holds
the catalog (users and items), the following chunks hold events sorted by time, so each event
chunk touches few date partitions of the lake. The returned iterator's ``total_events`` gives the
number of event rows, for progress reporting.

Every id, event id and catalog timestamp is derived from the input alone, so importing the same
input twice gives the same rows; with the chunk names of ``run_import`` the second import
replaces the first instead of doubling it.

MovieLens mapping (:func:`read_movielens`)
------------------------------------------
Layouts: ``ml-100k`` (``u.data``, ``u.item``, ``u.user``, ``u.genre``) and ``ml-latest``,
``ml-latest-small``, ``ml-25m``, ``ml-32m`` (``ratings.csv``, ``movies.csv``, optional ``tags.csv``
and ``links.csv``), detected from the files present.

- Ids: users ``ml-u{userId}``, items ``ml-i{movieId}``.
- Events: every rating is a ``view`` event with ``rating`` kept and event id
  ``ml-{userId}-{movieId}-view``; a rating of 4 or more is also a ``like`` event
  (``ml-{userId}-{movieId}-like``, no rating) at the same time. Timestamps are the file's unix
  seconds. Surface, device and context are empty.
- Items: ``item_type`` ``movie``; ``title`` from the file; ``category`` the first genre in
  lower case (``unknown`` when the movie has none); ``tags`` all genres in lower case, then, for
  ``ml-latest``, the movie's most frequent user tags from ``tags.csv`` (lower case, at most 64
  characters, 32 tags in all). MovieLens has no creators, so ``creator_id`` stands for a virtual
  studio of the first genre and the release decade, e.g. ``studio-drama-1990s`` (``…-undated``
  without a year): it groups similar movies the way a creator groups similar content, which is
  what creator-based sources and caps need. ``created_at`` is the release date (``ml-100k``),
  else January 1st of the year in the title, else the movie's first rating.
  ``metadata_json`` holds ``movielens_id``, ``year`` and ``imdb_url`` (and ``tmdb_id``) when known.
- Users: ``ml-100k`` ages become ``age_group`` bands; ``region`` is ``us-{d}`` from the first
  digit of the zip code (null for non-numeric, e.g. Canadian, codes); ``language`` ``en``;
  ``interests`` empty; gender and occupation are dropped (the user model has no place for them);
  ``personalization`` true, ``erased`` false. ``ml-latest`` has no user file: users are the raters,
  with ``age_group`` ``unknown`` and no region. ``created_at`` is the user's first rating.
- ``updated_at`` of every catalog row is the time of the last rating in the data set.

Generic event files (:func:`read_events_file`)
----------------------------------------------
CSV (``.csv``, ``.tsv``, optionally ``.gz``/``.bz2``) or Parquet, with a :class:`ColumnMapping`
saying which column is which. Refused files write nothing: null or malformed ids, null
timestamps and event types that are not in ``core.schema.EventType`` (after trimming and
lower-casing) raise ``ValueError`` naming the column, the bad values and how many rows hold them.
Without an event id column, the event id is ``{h}-{row}``: ``h`` the first 12 hex digits of the
BLAKE2b hash of the file name, ``row`` the 0-based data row. Items and users seen in the events
get placeholder catalog rows (category ``unknown``, no title, ``item_type`` from the mapping,
``creator_id`` the item id itself so that creator caps do not lump unrelated items together,
created and updated at their first event); these tables carry the schema metadata
:data:`PLACEHOLDER_META`, and ``run_import`` only writes them for ids the catalog does not
already hold.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.schema import MAX_ID_LEN, MAX_TAGS, AgeGroup, EventType, ItemStatus, ItemType
from core.tables import EVENTS, ITEMS, TS, USERS

Chunk = dict[str, pa.Table]
"""Tables of one import step, keyed by lake table name."""

DEFAULT_CHUNK_ROWS = 200_000
"""Source rows (ratings, file rows) per event chunk."""

PLACEHOLDER_META = {b"rayrec.placeholder": b"true"}
"""Schema metadata marking catalog rows made up from events, which must not overwrite real rows."""

_ID_RE = rf"^[A-Za-z0-9_\-:.@/+=]{{1,{MAX_ID_LEN}}}$"
_TITLE_YEAR_RE = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\)\s*$")
_ISO_OFFSET_RE = r"\d{2}:\d{2}(:\d{2}(\.\d*)?)?\s?(Z|z|[+-]\d{2}(:?\d{2})?)$"
"""A time of day followed by a UTC offset (a bare date's ``-01`` is not one)."""
_MAX_TAG_LEN = 64


class ImportChunks(Iterator[Chunk]):
    """An iterator over import chunks that also tells how many event rows they hold.

    Args:
        chunks: The chunks.
        total_events: Event rows across all chunks, when known.

    Attributes:
        total_events: Event rows across all chunks; ``None`` when unknown.
    """

    def __init__(self, chunks: Iterator[Chunk], total_events: int | None = None) -> None:
        self.total_events = total_events
        self._chunks = chunks

    def __iter__(self) -> ImportChunks:
        return self

    def __next__(self) -> Chunk:
        return next(self._chunks)


# -- shared helpers --------------------------------------------------------------------------


def _prefixed(prefix: str, values: pa.Array | pa.ChunkedArray, suffix: str = "") -> pa.ChunkedArray:
    joined = pc.binary_join_element_wise(prefix, pc.cast(values, pa.string()), suffix, "")
    return joined if isinstance(joined, pa.ChunkedArray) else pa.chunked_array([joined])


def _from_unix_s(seconds: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    micros = pc.multiply_checked(pc.cast(seconds, pa.int64()), 1_000_000)
    result = pc.cast(micros, TS)
    return result if isinstance(result, pa.ChunkedArray) else pa.chunked_array([result])


def _min_time_by(keys: pa.ChunkedArray, ts: pa.ChunkedArray) -> dict[Any, datetime]:
    grouped = pa.table({"k": keys, "ts": ts}).group_by("k").aggregate([("ts", "min")])
    return dict(zip(grouped.column("k").to_pylist(), grouped.column("ts_min").to_pylist(), strict=True))


def _sorted_by_time(table: pa.Table, ts_column: str, tiebreak: list[str]) -> pa.Table:
    keys = [(ts_column, "ascending"), *((c, "ascending") for c in tiebreak)]
    return table.take(pc.sort_indices(table, sort_keys=keys))


def _year_of(title: str | None) -> int | None:
    if not title:
        return None
    match = _TITLE_YEAR_RE.search(title)
    return int(match.group(1)) if match else None


def _slug(text: str) -> str:
    cleaned = re.sub(r"[^a-z0-9]+", "-", text.lower().replace("'", "")).strip("-")
    return cleaned or "unknown"


def _studio(category: str, year: int | None) -> str:
    decade = f"{year // 10 * 10}s" if year is not None else "undated"
    return f"studio-{_slug(category)}-{decade}"


def _age_group(age: int | None) -> str:
    if age is None or age <= 0:
        return AgeGroup.UNKNOWN.value
    bands = (
        (18, AgeGroup.UNDER_18),
        (25, AgeGroup.AGE_18_24),
        (35, AgeGroup.AGE_25_34),
        (45, AgeGroup.AGE_35_44),
        (55, AgeGroup.AGE_45_54),
    )
    for upper, band in bands:
        if age < upper:
            return band.value
    return AgeGroup.AGE_55_PLUS.value


def _region_of_zip(zip_code: str) -> str | None:
    zip_code = zip_code.strip()
    return f"us-{zip_code[0]}" if zip_code[:1].isdigit() else None


def _metadata_json(values: dict[str, Any]) -> str:
    return json.dumps(
        {k: v for k, v in values.items() if v is not None}, separators=(",", ":"), sort_keys=True
    )


@dataclass
class _Movie:
    movie_id: int
    title: str
    genres: list[str]
    release: datetime | None = None
    imdb_url: str | None = None
    tmdb_id: int | None = None
    user_tags: list[str] = field(default_factory=list)
    """Most frequent user tags first (``tags.csv``)."""


# -- MovieLens -------------------------------------------------------------------------------


def read_movielens(path: str | Path, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> ImportChunks:
    """Read a MovieLens data set directory (layout detected from its files).

    The mapping to the platform's tables is described in this module's docstring.

    Args:
        path: Directory holding ``u.data`` (ml-100k) or ``ratings.csv`` (ml-latest family).
        chunk_rows: Ratings per event chunk; a chunk holds up to twice as many events.

    Returns:
        The chunks: users and items first, then events in time order.

    Raises:
        FileNotFoundError: The directory or a required file is missing.
        ValueError: The directory holds no known MovieLens layout, or no ratings.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"MovieLens directory not found: {root}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
    if (root / "u.data").is_file():
        loader: Callable[[Path], tuple[pa.Table, dict[int, _Movie], dict[int, dict[str, Any]]]] = _load_ml100k
    elif (root / "ratings.csv").is_file():
        loader = _load_mllatest
    else:
        raise ValueError(
            f"{root} is not a MovieLens directory this reader knows: "
            "expected u.data (ml-100k) or ratings.csv (ml-latest, ml-latest-small, ml-25m)"
        )
    ratings, movies, profiles = loader(root)
    if ratings.num_rows == 0:
        raise ValueError(f"{root}: no ratings")
    ratings = _sorted_by_time(ratings, "ts", ["user", "item"])
    likes_total = int(pc.sum(pc.greater_equal(ratings.column("rating"), 4.0)).as_py() or 0)

    first_seen_user = _min_time_by(ratings.column("user"), ratings.column("ts"))
    first_seen_item = _min_time_by(ratings.column("item"), ratings.column("ts"))
    start = ratings.column("ts")[0].as_py()
    end = ratings.column("ts")[-1].as_py()
    catalog = {
        "users": _movielens_users(profiles, first_seen_user, start, end),
        "items": _movielens_items(movies, first_seen_item, start, end),
    }
    return ImportChunks(_movielens_chunks(catalog, ratings, chunk_rows), ratings.num_rows + likes_total)


def _movielens_chunks(catalog: Chunk, ratings: pa.Table, chunk_rows: int) -> Iterator[Chunk]:
    yield catalog
    for offset in range(0, ratings.num_rows, chunk_rows):
        yield {"events": _movielens_events(ratings.slice(offset, chunk_rows))}


def _movielens_events(ratings: pa.Table) -> pa.Table:
    users, items = ratings.column("user"), ratings.column("item")
    uid = _prefixed("ml-u", users)
    iid = _prefixed("ml-i", items)
    pair = pc.binary_join_element_wise(
        "ml-", pc.cast(users, pa.string()), "-", pc.cast(items, pa.string()), ""
    )
    n = ratings.num_rows
    views = pa.table(
        {
            "event_id": pc.binary_join_element_wise(pair, "-view", ""),
            "user_id": uid,
            "item_id": iid,
            "event_type": pa.array([EventType.VIEW.value] * n, pa.string()),
            "ts": ratings.column("ts"),
            "rating": ratings.column("rating"),
        }
    )
    liked = pc.greater_equal(ratings.column("rating"), 4.0)
    like_count = int(pc.sum(liked).as_py() or 0)
    likes = pa.table(
        {
            "event_id": pc.binary_join_element_wise(pc.filter(pair, liked), "-like", ""),
            "user_id": pc.filter(uid, liked),
            "item_id": pc.filter(iid, liked),
            "event_type": pa.array([EventType.LIKE.value] * like_count, pa.string()),
            "ts": pc.filter(ratings.column("ts"), liked),
            "rating": pa.nulls(like_count, pa.float32()),
        }
    )
    both = pa.concat_tables([views, likes])
    # A like follows its view: order by time, then by kind (views were concatenated first).
    order = pc.sort_indices(
        both.append_column("__pos", pa.array(np.arange(both.num_rows, dtype=np.int64))),
        sort_keys=[("ts", "ascending"), ("__pos", "ascending")],
    )
    return _events_table(both.take(order))


def _events_table(columns: pa.Table) -> pa.Table:
    n = columns.num_rows
    arrays = []
    for target in EVENTS.schema:
        if target.name in columns.column_names:
            arrays.append(pc.cast(columns.column(target.name), target.type))
        else:
            arrays.append(pa.chunked_array([pa.nulls(n, target.type)], target.type))
    return pa.Table.from_arrays(arrays, schema=EVENTS.schema)


def _movielens_users(
    profiles: dict[int, dict[str, Any]],
    first_seen: dict[int, datetime],
    start: datetime,
    end: datetime,
) -> pa.Table:
    rows = []
    for user in sorted(set(profiles) | set(first_seen)):
        profile = profiles.get(user, {})
        rows.append(
            {
                "user_id": f"ml-u{user}",
                "age_group": profile.get("age_group", AgeGroup.UNKNOWN.value),
                "region": profile.get("region"),
                "language": "en",
                "interests": [],
                "personalization": True,
                "erased": False,
                "created_at": first_seen.get(user, start),
                "updated_at": end,
            }
        )
    return pa.Table.from_pylist(rows, schema=USERS.schema)


def _movielens_items(
    movies: dict[int, _Movie],
    first_seen: dict[int, datetime],
    start: datetime,
    end: datetime,
) -> pa.Table:
    rows = []
    for movie_id in sorted(set(movies) | set(first_seen)):
        movie = movies.get(movie_id)
        if movie is None:
            # Rated but absent from the movie file: keep the events joinable with a bare row.
            rows.append(_bare_item(f"ml-i{movie_id}", ItemType.MOVIE, first_seen[movie_id], end))
            continue
        year = movie.release.year if movie.release is not None else _year_of(movie.title)
        if movie.release is not None:
            created = movie.release
        elif year is not None:
            created = datetime(year, 1, 1, tzinfo=UTC)
        else:
            created = first_seen.get(movie_id, start)
        genres = [g.lower() for g in movie.genres]
        category = genres[0] if genres else "unknown"
        rows.append(
            {
                "item_id": f"ml-i{movie_id}",
                "item_type": ItemType.MOVIE.value,
                "title": movie.title or None,
                "category": category,
                "tags": _item_tags(genres, movie.user_tags),
                "creator_id": _studio(category, year),
                "status": ItemStatus.ACTIVE.value,
                "created_at": created,
                "metadata_json": _metadata_json(
                    {
                        "movielens_id": movie_id,
                        "year": year,
                        "imdb_url": movie.imdb_url,
                        "tmdb_id": movie.tmdb_id,
                    }
                ),
                "updated_at": end,
            }
        )
    return pa.Table.from_pylist(rows, schema=ITEMS.schema)


def _item_tags(genres: list[str], user_tags: list[str]) -> list[str]:
    # Genres come first; user tags fill what is left of the tag budget.
    return list(dict.fromkeys([*genres, *user_tags]))[:MAX_TAGS]


def _bare_item(item_id: str, item_type: ItemType, created: datetime, updated: datetime) -> dict[str, Any]:
    return {
        "item_id": item_id,
        "item_type": item_type.value,
        "title": None,
        "category": "unknown",
        "tags": [],
        "creator_id": item_id,
        "status": ItemStatus.ACTIVE.value,
        "created_at": created,
        "metadata_json": None,
        "updated_at": updated,
    }


def _read_ratings(path: Path, delimiter: str, header: bool) -> pa.Table:
    names = ["user", "item", "rating", "timestamp"]
    read = pacsv.ReadOptions(column_names=None if header else names, block_size=1 << 24)
    parse = pacsv.ParseOptions(delimiter=delimiter)
    if header:
        # The ml-latest header is userId,movieId,rating,timestamp; renamed below.
        types = {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()}
    else:
        types = {"user": pa.int64(), "item": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()}
    table = pacsv.read_csv(
        path, read_options=read, parse_options=parse, convert_options=pacsv.ConvertOptions(column_types=types)
    )
    table = table.rename_columns(names)
    return pa.table(
        {
            "user": table.column("user"),
            "item": table.column("item"),
            "rating": table.column("rating"),
            "ts": _from_unix_s(table.column("timestamp")),
        }
    )


def _load_ml100k(root: Path) -> tuple[pa.Table, dict[int, _Movie], dict[int, dict[str, Any]]]:
    ratings = _read_ratings(root / "u.data", "\t", header=False)
    genre_names = ["unknown"] * 19
    genre_file = root / "u.genre"
    if genre_file.is_file():
        for line in genre_file.read_text(encoding="latin-1").splitlines():
            if "|" in line:
                name, _, index = line.rpartition("|")
                if index.strip().isdigit() and int(index) < len(genre_names):
                    genre_names[int(index)] = name.strip()
    movies: dict[int, _Movie] = {}
    for line in (root / "u.item").read_text(encoding="latin-1").splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        movie_id, title, release, _video, url = fields[:5]
        flags = fields[5:24]
        genres = [
            genre_names[i]
            for i, flag in enumerate(flags)
            if flag.strip() == "1" and genre_names[i] != "unknown"
        ]
        released = datetime.strptime(release, "%d-%b-%Y").replace(tzinfo=UTC) if release.strip() else None
        movies[int(movie_id)] = _Movie(int(movie_id), title.strip(), genres, released, url.strip() or None)
    profiles: dict[int, dict[str, Any]] = {}
    user_file = root / "u.user"
    if user_file.is_file():
        for line in user_file.read_text(encoding="latin-1").splitlines():
            if not line.strip():
                continue
            user_id, age, _gender, _occupation, zip_code = line.split("|")[:5]
            profiles[int(user_id)] = {
                "age_group": _age_group(int(age) if age.strip().isdigit() else None),
                "region": _region_of_zip(zip_code),
            }
    return ratings, movies, profiles


def _load_mllatest(root: Path) -> tuple[pa.Table, dict[int, _Movie], dict[int, dict[str, Any]]]:
    ratings = _read_ratings(root / "ratings.csv", ",", header=True)
    movies_file = root / "movies.csv"
    if not movies_file.is_file():
        raise FileNotFoundError(f"{root}: ratings.csv is there but movies.csv is missing")
    table = pacsv.read_csv(
        movies_file,
        convert_options=pacsv.ConvertOptions(
            column_types={"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()}
        ),
    )
    movies: dict[int, _Movie] = {}
    for movie_id, title, genres in zip(
        table.column("movieId").to_pylist(),
        table.column("title").to_pylist(),
        table.column("genres").to_pylist(),
        strict=True,
    ):
        names = [
            g.strip() for g in (genres or "").split("|") if g.strip() and g.strip() != "(no genres listed)"
        ]
        movies[movie_id] = _Movie(movie_id, (title or "").strip(), names)

    links_file = root / "links.csv"
    if links_file.is_file():
        # imdbId keeps its leading zeros only when read as text.
        links = pacsv.read_csv(
            links_file,
            convert_options=pacsv.ConvertOptions(
                column_types={"movieId": pa.int64(), "imdbId": pa.string(), "tmdbId": pa.string()}
            ),
        )
        for movie_id, imdb, tmdb in zip(
            links.column("movieId").to_pylist(),
            links.column("imdbId").to_pylist(),
            links.column("tmdbId").to_pylist(),
            strict=True,
        ):
            movie = movies.get(movie_id)
            if movie is None:
                continue
            if imdb:
                movie.imdb_url = f"https://www.imdb.com/title/tt{imdb.strip()}/"
            if tmdb and tmdb.strip().isdigit():
                movie.tmdb_id = int(tmdb)

    tags_file = root / "tags.csv"
    if tags_file.is_file():
        for movie_id, tags in _top_tags(tags_file).items():
            movie = movies.get(movie_id)
            if movie is not None:
                movie.user_tags = tags
    return ratings, movies, {}


def _top_tags(path: Path) -> dict[int, list[str]]:
    table = pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            include_columns=["movieId", "tag"], column_types={"movieId": pa.int64(), "tag": pa.string()}
        ),
    )
    tags = pc.utf8_trim_whitespace(
        pc.utf8_slice_codeunits(pc.utf8_lower(table.column("tag")), 0, _MAX_TAG_LEN)
    )
    pairs = pa.table({"movie": table.column("movieId"), "tag": tags}).filter(
        pc.greater(pc.utf8_length(tags), 0)
    )
    counted = pairs.group_by(["movie", "tag"]).aggregate([([], "count_all")])
    counted = counted.take(
        pc.sort_indices(
            counted, sort_keys=[("movie", "ascending"), ("count_all", "descending"), ("tag", "ascending")]
        )
    )
    result: dict[int, list[str]] = defaultdict(list)
    for movie, tag in zip(
        counted.column("movie").to_pylist(), counted.column("tag").to_pylist(), strict=True
    ):
        if len(result[movie]) < MAX_TAGS:
            result[movie].append(tag)
    return dict(result)


# -- generic event files ---------------------------------------------------------------------

TimestampUnit = Literal["s", "ms", "us", "iso"]
_UNITS: tuple[str, ...] = ("s", "ms", "us", "iso")
_SCALE = {"s": 1_000_000, "ms": 1_000, "us": 1}
_MAPPING_EXAMPLE = "user=uid,item=iid,timestamp=ts:s,event_type=action"


class ColumnMapping(BaseModel):
    """Which columns of an event file hold what.

    Attributes:
        user: Column of user ids.
        item: Column of item ids.
        timestamp: Column of event times.
        timestamp_unit: ``s``, ``ms`` or ``us`` since the Unix epoch for numbers; ``iso`` for
            ISO 8601 text (without an offset, UTC is assumed). Parquet timestamp columns are
            read as they are whatever the unit.
        event_type: Column of event types; its nulls take ``default_event_type``.
        default_event_type: The event type of rows without one (all rows when there is no
            ``event_type`` column).
        rating: Optional column of explicit ratings.
        event_id: Optional column of event ids; rows without one get a generated id.
        item_type: ``item_type`` of the placeholder catalog rows of the items seen.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str = Field(min_length=1)
    item: str = Field(min_length=1)
    timestamp: str = Field(min_length=1)
    timestamp_unit: TimestampUnit = "s"
    event_type: str | None = None
    default_event_type: EventType | None = None
    rating: str | None = None
    event_id: str | None = None
    item_type: ItemType = ItemType.PRODUCT

    @model_validator(mode="after")
    def _event_type_source(self) -> ColumnMapping:
        if self.event_type is None and self.default_event_type is None:
            raise ValueError("give an event_type column or a default_event_type")
        return self

    def columns(self) -> list[str]:
        """The file columns this mapping reads, without repeats."""
        named = [self.user, self.item, self.timestamp, self.event_type, self.rating, self.event_id]
        return list(dict.fromkeys(c for c in named if c is not None))

    @classmethod
    def parse(cls, text: str) -> ColumnMapping:
        """Parse the command-line form, e.g. ``user=uid,item=iid,timestamp=ts:s,event_type=action``.

        Keys: ``user``, ``item``, ``timestamp`` (``column`` or ``column:unit``, unit ``s``, ``ms``,
        ``us`` or ``iso``, default ``s``), ``event_type``, ``default_event_type``, ``rating``,
        ``event_id``, ``item_type``. A column name that holds ``:`` needs an explicit unit.

        Args:
            text: Comma-separated ``key=value`` parts.

        Returns:
            The mapping.

        Raises:
            ValueError: A part is malformed, a key unknown or repeated, a value invalid, or a
                required key missing; the message names the part.
        """
        values: dict[str, str] = {}
        parts = [p.strip() for p in text.split(",")]
        if not any(parts):
            raise ValueError(f"the column mapping is empty; expected e.g. {_MAPPING_EXAMPLE!r}")
        known = list(cls.model_fields)
        for part in parts:
            if not part:
                raise ValueError(f"the column mapping {text!r} has an empty part (two commas in a row?)")
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep:
                raise ValueError(
                    f"mapping part {part!r} is not key=value; expected e.g. {_MAPPING_EXAMPLE!r}"
                )
            if key not in known or key == "timestamp_unit":
                allowed = ", ".join(k for k in known if k != "timestamp_unit")
                raise ValueError(f"mapping part {part!r}: unknown key {key!r}; known keys: {allowed}")
            if key in values:
                raise ValueError(f"mapping part {part!r}: key {key!r} is given twice")
            if not value:
                raise ValueError(f"mapping part {part!r}: the value is empty")
            if key == "timestamp" and ":" in value:
                column, _, unit = value.rpartition(":")
                if unit not in _UNITS:
                    raise ValueError(
                        f"mapping part {part!r}: unknown timestamp unit {unit!r}; "
                        f"use one of {', '.join(_UNITS)}"
                    )
                if not column:
                    raise ValueError(f"mapping part {part!r}: the timestamp column is empty")
                values["timestamp"], values["timestamp_unit"] = column, unit
                continue
            if key == "default_event_type" and value.lower() not in {t.value for t in EventType}:
                raise ValueError(
                    f"mapping part {part!r}: {value!r} is not an event type; "
                    f"known types: {', '.join(t.value for t in EventType)}"
                )
            if key == "item_type" and value.lower() not in {t.value for t in ItemType}:
                raise ValueError(
                    f"mapping part {part!r}: {value!r} is not an item type; "
                    f"known types: {', '.join(t.value for t in ItemType)}"
                )
            values[key] = value.lower() if key in ("default_event_type", "item_type") else value
        missing = [k for k in ("user", "item", "timestamp") if k not in values]
        if missing:
            raise ValueError(
                f"the column mapping {text!r} lacks {', '.join(missing)}; expected e.g. {_MAPPING_EXAMPLE!r}"
            )
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(str(err["msg"]) for err in exc.errors())
            raise ValueError(f"the column mapping {text!r} is invalid: {problems}") from exc


def _file_format(path: Path) -> tuple[str, str]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".zst"):
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in (".parquet", ".pq"):
        return "parquet", ""
    if last == ".csv":
        return "csv", ","
    if last == ".tsv":
        return "csv", "\t"
    raise ValueError(f"{path.name}: unknown file type; expected .csv, .tsv (optionally .gz/.bz2) or .parquet")


def _read_mapped(path: Path, mapping: ColumnMapping) -> pa.Table:
    kind, delimiter = _file_format(path)
    wanted = mapping.columns()
    if kind == "parquet":
        available = pq.read_schema(path).names
    else:
        parse = pacsv.ParseOptions(delimiter=delimiter)
        with pacsv.open_csv(path, parse_options=parse) as reader:
            available = reader.schema.names
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ValueError(f"{path.name}: no column {', '.join(map(repr, missing))}; the file has {available}")
    if kind == "parquet":
        return pq.read_table(path, columns=wanted)
    text_columns = [mapping.user, mapping.item, mapping.event_type, mapping.event_id]
    types: dict[str, pa.DataType] = {c: pa.string() for c in text_columns if c is not None}
    # Times are read as text and parsed by their unit, so integer epochs stay exact.
    types[mapping.timestamp] = pa.string()
    if mapping.rating is not None:
        types[mapping.rating] = pa.string()
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=1 << 24),
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
        convert_options=pacsv.ConvertOptions(
            include_columns=wanted, column_types=types, strings_can_be_null=True
        ),
    )


def _first_bad(column: pa.ChunkedArray, bad: pa.ChunkedArray) -> tuple[int, Any]:
    index = int(pc.index(bad, True).as_py())
    return index, column[index].as_py()


def _id_column(path: Path, name: str, column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_floating(column.type):
        # pandas stores integer ids with gaps as floats; whole numbers are still ids.
        try:
            column = pc.cast(column, pa.int64())
        except pa.ArrowInvalid as exc:
            raise ValueError(
                f"{path.name}: column {name!r} holds non-integer numbers, not ids: {exc}"
            ) from exc
    values = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
    if values.null_count:
        index, _ = _first_bad(values, pc.is_null(values))
        raise ValueError(
            f"{path.name}: column {name!r} is empty in {values.null_count} rows (first at row {index})"
        )
    bad = pc.invert(pc.match_substring_regex(values, _ID_RE))
    bad_count = int(pc.sum(bad).as_py() or 0)
    if bad_count:
        index, value = _first_bad(values, bad)
        raise ValueError(
            f"{path.name}: column {name!r} holds {bad_count} malformed ids, e.g. {value!r} at row {index}; "
            f"ids are 1-{MAX_ID_LEN} characters of letters, digits and _-:.@/+="
        )
    return values


def _timestamp_column(path: Path, name: str, column: pa.ChunkedArray, unit: TimestampUnit) -> pa.ChunkedArray:
    try:
        if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
            plain = column if pa.types.is_timestamp(column.type) else pc.cast(column, pa.timestamp("us"))
            # A naive timestamp counts as UTC, as everywhere in the platform.
            result = pc.cast(plain, TS, safe=False)
        elif unit == "iso":
            result = _parse_iso(pc.utf8_trim_whitespace(pc.cast(column, pa.string())))
        else:
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                stripped = pc.utf8_trim_whitespace(column)
                numbers = (
                    pc.cast(stripped, pa.int64())
                    if _all_integers(stripped)
                    else pc.cast(stripped, pa.float64())
                )
            else:
                numbers = column
            if pa.types.is_integer(numbers.type):
                micros = pc.multiply_checked(pc.cast(numbers, pa.int64()), _SCALE[unit])
            else:
                micros = pc.cast(
                    pc.round(pc.multiply(pc.cast(numbers, pa.float64()), float(_SCALE[unit]))), pa.int64()
                )
            result = pc.cast(micros, TS)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        hint = " (ISO text needs the unit 'iso', e.g. timestamp=ts:iso)" if unit != "iso" else ""
        raise ValueError(
            f"{path.name}: column {name!r} does not hold {unit} timestamps{hint}: {exc}"
        ) from exc
    result = result if isinstance(result, pa.ChunkedArray) else pa.chunked_array([result])
    if result.null_count:
        index, _ = _first_bad(result, pc.is_null(result))
        raise ValueError(
            f"{path.name}: column {name!r} is empty in {result.null_count} rows (first at row {index})"
        )
    return result


def _all_integers(values: pa.ChunkedArray) -> bool:
    return bool(pc.all(pc.match_substring_regex(values, r"^[+-]?\d+$"), skip_nulls=True).as_py() is not False)


def _parse_iso(values: pa.ChunkedArray) -> pa.ChunkedArray:
    # Arrow parses text with an offset straight into UTC, and text without one only as naive
    # time; each row goes the way its text allows, naive rows being taken as UTC.
    has_offset = pc.match_substring_regex(values, _ISO_OFFSET_RE)
    no_text = pa.scalar(None, pa.string())
    aware = pc.cast(pc.if_else(has_offset, values, no_text), TS)
    naive = pc.cast(pc.cast(pc.if_else(has_offset, no_text, values), pa.timestamp("us")), TS)
    return pc.coalesce(aware, naive)


def _event_type_column(
    path: Path, mapping: ColumnMapping, column: pa.ChunkedArray | None, rows: int
) -> pa.ChunkedArray:
    default = mapping.default_event_type.value if mapping.default_event_type is not None else None
    if column is None:
        return pa.chunked_array([pa.array([default] * rows, pa.string())])
    values = pc.utf8_lower(pc.utf8_trim_whitespace(pc.cast(column, pa.string())))
    if default is not None:
        values = pc.fill_null(values, default)
    known = pa.array([t.value for t in EventType], pa.string())
    unknown = pc.invert(pc.fill_null(pc.is_in(values, value_set=known), False))
    unknown_count = int(pc.sum(unknown).as_py() or 0)
    if unknown_count:
        counts = Counter(pc.filter(values, unknown).to_pylist())
        shown = ", ".join(f"{value!r} ({n} rows)" for value, n in counts.most_common(10))
        more = f" and {len(counts) - 10} more" if len(counts) > 10 else ""
        raise ValueError(
            f"{path.name}: column {mapping.event_type!r} holds {unknown_count} rows with unknown "
            f"event types: {shown}{more}; known types: {', '.join(t.value for t in EventType)}. "
            "Nothing was imported; convert or drop those rows first."
        )
    return values


def read_events_file(
    path: str | Path, mapping: ColumnMapping, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> ImportChunks:
    """Read a CSV or Parquet file of events through a column mapping.

    The whole file is read and validated before this returns, so a refused file imports
    nothing. The rules (event ids, placeholder catalog rows, refusals) are in this module's
    docstring.

    Args:
        path: The file (``.csv``, ``.tsv``, optionally compressed, or ``.parquet``).
        mapping: Which column is which.
        chunk_rows: Events per chunk.

    Returns:
        The chunks: placeholder users and items first, then events in time order.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file type is unknown, a mapped column is missing, or a value is invalid;
            the message names the column and the offending values.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"event file not found: {file}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
    raw = _read_mapped(file, mapping)
    n = raw.num_rows
    user = _id_column(file, mapping.user, raw.column(mapping.user))
    item = _id_column(file, mapping.item, raw.column(mapping.item))
    ts = _timestamp_column(file, mapping.timestamp, raw.column(mapping.timestamp), mapping.timestamp_unit)
    event_type = _event_type_column(
        file, mapping, raw.column(mapping.event_type) if mapping.event_type is not None else None, n
    )
    row = pa.array(np.arange(n, dtype=np.int64))
    file_hash = hashlib.blake2b(file.name.encode(), digest_size=6).hexdigest()
    event_id: pa.ChunkedArray = _prefixed(f"{file_hash}-", row)
    if mapping.event_id is not None:
        given = pc.utf8_trim_whitespace(pc.cast(raw.column(mapping.event_id), pa.string()))
        event_id = _id_column(file, mapping.event_id, pc.coalesce(given, event_id))
    columns: dict[str, Any] = {
        "event_id": event_id,
        "user_id": user,
        "item_id": item,
        "event_type": event_type,
        "ts": ts,
        "__row": row,
    }
    if mapping.rating is not None:
        try:
            columns["rating"] = pc.cast(raw.column(mapping.rating), pa.float32())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"{file.name}: column {mapping.rating!r} does not hold numbers: {exc}") from exc
    events = _sorted_by_time(pa.table(columns), "ts", ["__row"]).drop_columns(["__row"])
    catalog = {
        "users": _placeholder_users(events),
        "items": _placeholder_items(events, mapping.item_type),
    }
    return ImportChunks(_file_chunks(catalog, events, chunk_rows), n)


def _file_chunks(catalog: Chunk, events: pa.Table, chunk_rows: int) -> Iterator[Chunk]:
    if events.num_rows == 0:
        return
    yield catalog
    for offset in range(0, events.num_rows, chunk_rows):
        yield {"events": _events_table(events.slice(offset, chunk_rows))}


def _first_seen(events: pa.Table, key: str) -> pa.Table:
    grouped = events.select([key, "ts"]).group_by(key).aggregate([("ts", "min")])
    return grouped.take(pc.sort_indices(grouped, sort_keys=[(key, "ascending")]))


def _placeholder_users(events: pa.Table) -> pa.Table:
    seen = _first_seen(events, "user_id")
    k = seen.num_rows
    table = pa.table(
        {
            "user_id": seen.column("user_id"),
            "age_group": pa.array([AgeGroup.UNKNOWN.value] * k, pa.string()),
            "region": pa.nulls(k, pa.string()),
            "language": pa.nulls(k, pa.string()),
            "interests": pa.array([[]] * k, pa.list_(pa.string())),
            "personalization": pa.array([True] * k, pa.bool_()),
            "erased": pa.array([False] * k, pa.bool_()),
            "created_at": seen.column("ts_min"),
            "updated_at": seen.column("ts_min"),
        }
    )
    return table.cast(USERS.schema).replace_schema_metadata(PLACEHOLDER_META)


def _placeholder_items(events: pa.Table, item_type: ItemType) -> pa.Table:
    seen = _first_seen(events, "item_id")
    k = seen.num_rows
    table = pa.table(
        {
            "item_id": seen.column("item_id"),
            "item_type": pa.array([item_type.value] * k, pa.string()),
            "title": pa.nulls(k, pa.string()),
            "category": pa.array(["unknown"] * k, pa.string()),
            "tags": pa.array([[]] * k, pa.list_(pa.string())),
            "creator_id": seen.column("item_id"),
            "status": pa.array([ItemStatus.ACTIVE.value] * k, pa.string()),
            "created_at": seen.column("ts_min"),
            "metadata_json": pa.nulls(k, pa.string()),
            "updated_at": seen.column("ts_min"),
        }
    )
    return table.cast(ITEMS.schema).replace_schema_metadata(PLACEHOLDER_META)


def is_placeholder(table: pa.Table) -> bool:
    """Whether a catalog table holds placeholder rows made up from events (see module docstring)."""
    metadata = table.schema.metadata or {}
    return all(metadata.get(k) == v for k, v in PLACEHOLDER_META.items())
