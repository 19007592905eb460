from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from core.lake import Lake, conform, date_partition
from core.tables import EDGES, EVENTS, IMPRESSIONS, ITEMS, TABLES, USERS, TableSpec

DAY1 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
DAY2 = datetime(2024, 3, 2, 8, 30, tzinfo=UTC)


def events(ids: list[str], when: list[datetime], surface: str = "home") -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "event_id": ids,
            "user_id": [f"u{i % 3}" for i in range(n)],
            "item_id": [f"i{i}" for i in range(n)],
            "event_type": ["click"] * n,
            "ts": pa.array(when, pa.timestamp("us", tz="UTC")),
            "surface": [surface] * n,
            "position": pa.array(range(n), pa.int32()),
            "rating": pa.array([None] * n, pa.float32()),
        }
    )


def impressions() -> pa.Table:
    return pa.table(
        {
            "request_id": ["r1", "r1", "r2"],
            "user_id": ["u1", "u1", "u2"],
            "surface": ["home", "home", "feed"],
            "item_id": ["i1", "i2", "i1"],
            "position": pa.array([0, 1, 0], pa.int32()),
            "score": pa.array([0.9, 0.5, None], pa.float32()),
            "sources": [["two_tower", "popular"], ["popular"], None],
            "propensity": pa.array([0.5, 0.25, 1.0], pa.float32()),
            "model_version": ["m1", "m1", None],
            "experiment_id": [None, None, "exp1"],
            "arm": [None, None, "b"],
            "fallback": [None, None, "popular"],
            "served_at": pa.array([DAY1, DAY1, DAY2], pa.timestamp("us", tz="UTC")),
        }
    )


def items(ids: list[str], updated: list[datetime], status: str = "active") -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "item_id": ids,
            "item_type": ["video"] * n,
            "title": [f"title {i}" for i in ids],
            "category": ["music"] * n,
            "tags": [["a", "b"]] * n,
            "creator_id": ["c1"] * n,
            "status": [status] * n,
            "created_at": pa.array([DAY1] * n, pa.timestamp("us", tz="UTC")),
            "metadata_json": ['{"k": 1}'] * n,
            "updated_at": pa.array(updated, pa.timestamp("us", tz="UTC")),
        }
    )


def users() -> pa.Table:
    return pa.table(
        {
            "user_id": ["u1", "u2"],
            "age_group": ["25-34", None],
            "region": ["EU", "US"],
            "language": ["en", "de"],
            "interests": [["music"], []],
            "personalization": [True, False],
            "erased": [False, False],
            "created_at": pa.array([DAY1, DAY1], pa.timestamp("us", tz="UTC")),
            "updated_at": pa.array([DAY1, DAY2], pa.timestamp("us", tz="UTC")),
        }
    )


def edges(rows: list[tuple[str, str, bool, datetime]]) -> pa.Table:
    return pa.table(
        {
            "follower_id": [r[0] for r in rows],
            "followee_id": [r[1] for r in rows],
            "active": [r[2] for r in rows],
            "updated_at": pa.array([r[3] for r in rows], pa.timestamp("us", tz="UTC")),
        }
    )


SAMPLES: dict[str, Callable[[], pa.Table]] = {
    "events": lambda: events(["e1", "e2", "e3"], [DAY1, DAY1, DAY2]),
    "impressions": impressions,
    "items": lambda: items(["i1", "i2"], [DAY1, DAY2]),
    "users": users,
    "edges": lambda: edges([("u1", "u2", True, DAY1), ("u2", "u1", False, DAY2)]),
}


def sorted_rows(table: pa.Table, spec: TableSpec) -> list[dict[str, object]]:
    return sorted(table.to_pylist(), key=lambda r: (r[spec.time_column], repr(sorted(r.items()))))


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(str(tmp_path))


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TABLES))
def test_round_trip_every_table(lake: Lake, name: str) -> None:
    spec = TABLES[name]
    data = SAMPLES[name]()
    written = lake.append(name, data)

    assert written == lake.files(spec)
    result = lake.read(spec)
    assert result.schema == spec.schema
    assert sorted_rows(result, spec) == sorted_rows(conform(spec, data), spec)
    assert lake.count(name) == data.num_rows


def test_read_columns_and_filter(lake: Lake) -> None:
    lake.append(EVENTS, events(["e1", "e2", "e3"], [DAY1, DAY1, DAY2]))

    result = lake.read(EVENTS, columns=["item_id", "event_id"], filter=pc.field("user_id") == "u1")

    assert result.column_names == ["item_id", "event_id"]
    assert result.schema.field("event_id").nullable is False
    assert result.to_pylist() == [{"item_id": "i1", "event_id": "e2"}]
    with pytest.raises(ValueError, match="nope"):
        lake.read(EVENTS, columns=["nope"])


def test_missing_table_reads_empty(lake: Lake) -> None:
    for spec in TABLES.values():
        assert lake.files(spec) == []
        assert lake.count(spec) == 0
        empty = lake.read(spec)
        assert empty.num_rows == 0
        assert empty.schema == spec.schema
    assert lake.read_latest(ITEMS).num_rows == 0
    assert lake.read_deduped(EVENTS).num_rows == 0


def test_empty_append_writes_nothing(lake: Lake, tmp_path: Path) -> None:
    assert lake.append(EVENTS, events([], [])) == []
    assert not (tmp_path / "lake" / "events").exists()


def test_unknown_table_name(lake: Lake) -> None:
    with pytest.raises(ValueError, match="unknown lake table 'nope'"):
        lake.read("nope")


def test_record_batch_is_accepted(lake: Lake) -> None:
    batch = events(["e1"], [DAY1]).to_batches()[0]
    lake.append(EVENTS, batch)
    assert lake.count(EVENTS) == 1


# -- partitioning ------------------------------------------------------------------------------


def test_rows_split_by_utc_date(lake: Lake, tmp_path: Path) -> None:
    written = lake.append(EVENTS, events(["e1", "e2", "e3"], [DAY1, DAY2, DAY1]))

    table_dir = tmp_path / "lake" / "events"
    assert sorted(p.name for p in table_dir.iterdir()) == ["date=2024-03-01", "date=2024-03-02"]
    assert [Path(p).parent.name for p in written] == ["date=2024-03-01", "date=2024-03-02"]
    assert lake.read(EVENTS, start=date(2024, 3, 2))["event_id"].to_pylist() == ["e2"]
    assert lake.read(EVENTS, end=date(2024, 3, 1))["event_id"].to_pylist() == ["e1", "e3"]
    both = lake.read(EVENTS, start=date(2024, 3, 1), end=date(2024, 3, 2))
    assert sorted(both["event_id"].to_pylist()) == ["e1", "e2", "e3"]
    assert lake.read(EVENTS, start=date(2024, 3, 3)).num_rows == 0


def test_date_range_prunes_partitions(lake: Lake) -> None:
    (day1_file, day2_file) = lake.append(EVENTS, events(["e1", "e2"], [DAY1, DAY2]))
    # A partition outside the range is never opened, so even a corrupt file there cannot fail the read.
    Path(day1_file).write_bytes(b"not parquet")

    assert lake.read(EVENTS, start=date(2024, 3, 2))["event_id"].to_pylist() == ["e2"]
    assert lake.read(EVENTS, start=datetime(2024, 3, 2, 23, tzinfo=UTC))["event_id"].to_pylist() == ["e2"]
    with pytest.raises(pa.ArrowInvalid):
        lake.read(EVENTS)
    assert Path(day2_file).exists()


def test_timestamps_become_utc_microseconds(lake: Lake) -> None:
    # 23:30 on 1 March in New York is 04:30 on 2 March in UTC: the row belongs to the later partition.
    new_york = pa.array([datetime(2024, 3, 2, 4, 30, 0, 123456)], pa.timestamp("ns", tz="America/New_York"))
    naive = pa.array([datetime(2024, 3, 1, 1, 0)], pa.timestamp("ns"))
    zoned = events(["e1"], [DAY1]).set_column(4, "ts", new_york)
    assert zoned["ts"].to_pylist()[0].hour == 23
    written = lake.append(EVENTS, zoned)
    written += lake.append(EVENTS, events(["e2"], [DAY1]).set_column(4, "ts", naive))

    assert [Path(p).parent.name for p in written] == ["date=2024-03-02", "date=2024-03-01"]
    result = lake.read(EVENTS)
    assert result.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    by_id = {r["event_id"]: r["ts"] for r in result.to_pylist()}
    assert by_id["e1"] == datetime(2024, 3, 2, 4, 30, 0, 123456, tzinfo=UTC)
    assert by_id["e2"] == datetime(2024, 3, 1, 1, 0, tzinfo=UTC)


def test_sub_microsecond_precision_is_dropped(lake: Lake) -> None:
    ts = pa.array([1_709_294_400_000_001_999], pa.timestamp("ns", tz="UTC"))
    lake.append(EVENTS, events(["e1"], [DAY1]).set_column(4, "ts", ts))
    assert lake.read(EVENTS)["ts"].cast(pa.int64()).to_pylist() == [1_709_294_400_000_001]


def test_date_partition_helper() -> None:
    assert date_partition(datetime(2024, 3, 1, 23, 30, tzinfo=timezone(timedelta(hours=-5)))) == (
        "date=2024-03-02"
    )
    assert date_partition(datetime(2024, 3, 1, 23, 30)) == "date=2024-03-01"
    assert date_partition(DAY2) == "date=2024-03-02"


# -- idempotent named appends ------------------------------------------------------------------


def test_named_append_replaces_instead_of_duplicating(lake: Lake) -> None:
    first = lake.append(EVENTS, events(["e1", "e2"], [DAY1, DAY2]), name="import-0001")
    again = lake.append(EVENTS, events(["e1", "e2"], [DAY1, DAY2], surface="feed"), name="import-0001")

    assert first == again
    assert [Path(p).name for p in first] == ["import-0001.parquet", "import-0001.parquet"]
    assert lake.files(EVENTS) == first
    assert lake.count(EVENTS) == 2
    assert set(lake.read(EVENTS)["surface"].to_pylist()) == {"feed"}


def test_unnamed_appends_add_files(lake: Lake) -> None:
    lake.append(EVENTS, events(["e1"], [DAY1]))
    lake.append(EVENTS, events(["e2"], [DAY1]))

    files = lake.files(EVENTS)
    assert len(files) == 2
    assert lake.count(EVENTS) == 2


@pytest.mark.parametrize("bad", ["", ".hidden", "_hidden", "a/b", "../up", "with space"])
def test_unsafe_file_names_are_refused(lake: Lake, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid file name"):
        lake.append(EVENTS, events(["e1"], [DAY1]), name=bad)


# -- crash safety ------------------------------------------------------------------------------


def test_leftover_temporary_file_is_invisible(lake: Lake) -> None:
    (written,) = lake.append(EVENTS, events(["e1"], [DAY1]))
    partition = Path(written).parent
    # What a writer that died mid-write leaves behind: a truncated file under the hidden name.
    good = Path(written).read_bytes()
    (partition / f".crashed.parquet.{'0' * 32}.tmp").write_bytes(good[: len(good) // 2])
    (partition / ".crashed.parquet").write_bytes(good[: len(good) // 2])

    assert lake.files(EVENTS) == [written]
    assert lake.count(EVENTS) == 1
    assert lake.read(EVENTS)["event_id"].to_pylist() == ["e1"]
    assert lake.dataset(EVENTS).files == [written]
    assert lake.read_deduped(EVENTS).num_rows == 1


def test_failed_write_leaves_no_visible_file(lake: Lake, monkeypatch: pytest.MonkeyPatch) -> None:
    lake.append(EVENTS, events(["e1"], [DAY1]), name="batch")

    def die_mid_write(table: pa.Table, sink: pa.NativeFile, **kwargs: object) -> None:
        sink.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", die_mid_write)
    with pytest.raises(OSError, match="disk full"):
        lake.append(EVENTS, events(["e2", "e3"], [DAY1, DAY1]), name="batch")
    monkeypatch.undo()

    assert lake.read(EVENTS)["event_id"].to_pylist() == ["e1"]
    partition = Path(lake.files(EVENTS)[0]).parent
    assert sorted(os.listdir(partition)) == ["batch.parquet"]


# -- change-logs and dedupe --------------------------------------------------------------------


def test_read_latest_picks_newest_row_per_key(lake: Lake) -> None:
    lake.append(ITEMS, items(["i1", "i2"], [DAY1, DAY1]))
    lake.append(ITEMS, items(["i1"], [DAY2], status="removed"))
    # Older than what the lake holds for i2: arriving later must not make it win.
    lake.append(ITEMS, items(["i2"], [DAY1 - timedelta(days=1)], status="draft"))

    latest = lake.read_latest(ITEMS)

    assert latest.schema == ITEMS.schema
    status = {r["item_id"]: r["status"] for r in latest.to_pylist()}
    assert status == {"i1": "removed", "i2": "active"}
    narrow = lake.read_latest(ITEMS, columns=["status"])
    assert narrow.column_names == ["status"]
    assert sorted(narrow["status"].to_pylist()) == ["active", "removed"]


def test_read_latest_ties_go_to_the_later_file(lake: Lake) -> None:
    lake.append(ITEMS, items(["i1"], [DAY1], status="first"))
    lake.append(ITEMS, items(["i1"], [DAY1], status="second"))

    assert lake.read_latest(ITEMS)["status"].to_pylist() == ["second"]


def test_read_latest_ties_within_one_file_go_to_the_later_row(lake: Lake) -> None:
    data = pa.concat_tables([items(["i1"], [DAY1], status="first"), items(["i1"], [DAY1], status="second")])
    lake.append(ITEMS, data)

    assert lake.read_latest(ITEMS)["status"].to_pylist() == ["second"]


def test_read_latest_composite_key_of_edges(lake: Lake) -> None:
    later = DAY1 + timedelta(hours=1)
    lake.append(
        EDGES,
        edges([("a", "b", True, DAY1), ("a", "c", True, DAY1), ("b", "a", True, DAY1)]),
    )
    lake.append(EDGES, edges([("a", "b", False, later), ("c", "a", True, DAY2)]))

    latest = {(r["follower_id"], r["followee_id"]): r["active"] for r in lake.read_latest(EDGES).to_pylist()}

    assert latest == {("a", "b"): False, ("a", "c"): True, ("b", "a"): True, ("c", "a"): True}


def test_read_latest_refuses_fact_tables(lake: Lake) -> None:
    with pytest.raises(ValueError, match="fact table"):
        lake.read_latest(EVENTS)


def test_read_deduped_keeps_first_seen(lake: Lake) -> None:
    lake.append(EVENTS, events(["e1", "e2"], [DAY1, DAY1], surface="home"))
    lake.append(EVENTS, events(["e2", "e3"], [DAY1, DAY2], surface="feed"))
    lake.append(EVENTS, events(["e1"], [DAY1], surface="search"))

    deduped = lake.read_deduped(EVENTS)

    assert deduped.schema == EVENTS.schema
    assert {r["event_id"]: r["surface"] for r in deduped.to_pylist()} == {
        "e1": "home",
        "e2": "home",
        "e3": "feed",
    }
    assert lake.count(EVENTS) == 5


def test_read_deduped_needs_a_dedupe_key(lake: Lake) -> None:
    with pytest.raises(ValueError, match="no dedupe_key"):
        lake.read_deduped(IMPRESSIONS)
    with pytest.raises(ValueError, match="read_latest"):
        lake.read_deduped(USERS)


# -- casting -----------------------------------------------------------------------------------


def test_columns_are_reordered_and_optional_ones_filled(lake: Lake) -> None:
    data = edges([("a", "b", True, DAY1)]).select(["updated_at", "active", "followee_id", "follower_id"])
    lake.append(EDGES, data)
    assert lake.read(EDGES).to_pylist() == [
        {"follower_id": "a", "followee_id": "b", "active": True, "updated_at": DAY1}
    ]

    minimal = events(["e1"], [DAY1]).select(["event_id", "user_id", "item_id", "event_type", "ts"])
    conformed = conform(EVENTS, minimal)
    assert conformed.schema == EVENTS.schema
    assert conformed["watch_time_s"].null_count == 1


def test_extra_column_is_named(lake: Lake) -> None:
    data = events(["e1"], [DAY1]).append_column("colour", pa.array(["red"]))
    with pytest.raises(ValueError, match="colour"):
        lake.append(EVENTS, data)


def test_missing_required_column_is_named(lake: Lake) -> None:
    data = events(["e1"], [DAY1]).drop_columns(["item_id"])
    with pytest.raises(ValueError, match="missing required column 'item_id'"):
        lake.append(EVENTS, data)


def test_null_in_required_column_is_named(lake: Lake) -> None:
    data = events(["e1", "e2"], [DAY1, DAY1]).set_column(1, "user_id", pa.array(["u1", None]))
    with pytest.raises(ValueError, match="'user_id' is not nullable"):
        lake.append(EVENTS, data)


def test_uncastable_column_is_named(lake: Lake) -> None:
    data = events(["e1"], [DAY1]).set_column(6, "position", pa.array(["first"]))
    with pytest.raises(ValueError, match="'position' cannot be cast"):
        lake.append(EVENTS, data)
    overflow = events(["e1"], [DAY1]).set_column(6, "position", pa.array([2**40], pa.int64()))
    with pytest.raises(ValueError, match="'position'"):
        lake.append(EVENTS, overflow)
    assert lake.files(EVENTS) == []


# -- homes and filesystems ---------------------------------------------------------------------


def test_relative_home_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    lake = Lake("var")
    assert lake.root == f"{tmp_path.as_posix()}/var/lake"
    assert lake.uri(EVENTS) == f"{tmp_path.as_posix()}/var/lake/events"
    assert isinstance(lake.filesystem, pafs.LocalFileSystem)


def test_file_uri_home_is_the_same_lake(tmp_path: Path) -> None:
    by_path = Lake(str(tmp_path))
    by_uri = Lake(f"file://{tmp_path.as_posix()}")

    assert by_uri.root == by_path.root
    assert by_uri.uri(ITEMS) == by_path.uri(ITEMS) == f"{tmp_path.as_posix()}/lake/items"
    written = by_uri.append(ITEMS, items(["i1"], [DAY1]), name="seed")
    assert by_path.files(ITEMS) == written
    assert by_path.read_latest(ITEMS)["item_id"].to_pylist() == ["i1"]
    assert by_uri.count(ITEMS) == 1


def test_any_pyarrow_filesystem(tmp_path: Path) -> None:
    subtree = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    lake = Lake("prefix", filesystem=subtree)

    assert lake.root == "prefix/lake"
    written = lake.append(EVENTS, events(["e1", "e2"], [DAY1, DAY2]), name="part-0")
    assert written == [
        "prefix/lake/events/date=2024-03-01/part-0.parquet",
        "prefix/lake/events/date=2024-03-02/part-0.parquet",
    ]
    assert lake.files(EVENTS) == written
    assert lake.count(EVENTS) == 2
    assert lake.read(EVENTS, start=date(2024, 3, 2))["event_id"].to_pylist() == ["e2"]
    assert lake.read_deduped(EVENTS).num_rows == 2
    # The same bytes seen through the plain local path: nothing was written outside the subtree.
    local = Lake(str(tmp_path / "bucket" / "prefix"))
    assert local.count(EVENTS) == 2
    assert lake.uri(EVENTS) == local.uri(EVENTS)
    assert pq.read_table(local.uri(EVENTS)).num_rows == 2


def test_object_store_uri_keeps_scheme_and_query() -> None:
    lake = Lake("s3://bucket/prefix/?region=us-east-1")

    assert lake.root == "bucket/prefix/lake"
    assert lake.uri("events") == "s3://bucket/prefix/lake/events?region=us-east-1"
