from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.schema import Item, UserProfile
from core.tables import EVENTS, ITEMS, USERS
from training.importers import ColumnMapping, is_placeholder, read_events_file, read_movielens


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def ml_latest(tmp_path: Path) -> Path:
    root = tmp_path / "ml-latest-small"
    root.mkdir()
    write(
        root / "ratings.csv",
        "userId,movieId,rating,timestamp\n"
        "1,1,4.0,964982703\n"
        "1,3,3.5,964981247\n"
        "2,1,5.0,964982224\n"
        "2,2,2.0,1445714835\n"
        "3,3,4.5,1100000000\n",
    )
    write(
        root / "movies.csv",
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '2,"American President, The (1995)",Comedy|Drama|Romance\n'
        "3,Some Film Without Year,(no genres listed)\n",
    )
    write(
        root / "tags.csv",
        "userId,movieId,tag,timestamp\n"
        "1,1,Pixar,964982000\n"
        "2,1,pixar ,964982001\n"
        "2,1,fun,964982002\n"
        "3,2,   ,964982003\n",
    )
    write(root / "links.csv", "movieId,imdbId,tmdbId\n1,0114709,862\n2,0112346,\n")
    return root


def test_ml_latest_layout(ml_latest: Path) -> None:
    chunks_iter = read_movielens(ml_latest, chunk_rows=2)
    assert chunks_iter.total_events == 5 + 3
    chunks = list(chunks_iter)
    assert set(chunks[0]) == {"users", "items"}
    assert all(set(c) == {"events"} for c in chunks[1:])
    assert len(chunks) == 1 + 3  # five ratings, two per chunk

    items = {row["item_id"]: row for row in chunks[0]["items"].to_pylist()}
    assert chunks[0]["items"].schema == ITEMS.schema
    toy = items["ml-i1"]
    assert toy["title"] == "Toy Story (1995)"
    assert toy["category"] == "adventure"
    assert toy["tags"] == ["adventure", "animation", "children", "comedy", "fantasy", "pixar", "fun"]
    assert toy["creator_id"] == "studio-adventure-1990s"
    assert toy["item_type"] == "movie"
    assert toy["created_at"] == datetime(1995, 1, 1, tzinfo=UTC)
    assert json.loads(toy["metadata_json"]) == {
        "imdb_url": "https://www.imdb.com/title/tt0114709/",
        "movielens_id": 1,
        "tmdb_id": 862,
        "year": 1995,
    }
    assert items["ml-i2"]["title"] == "American President, The (1995)"
    untitled = items["ml-i3"]
    assert untitled["category"] == "unknown" and untitled["tags"] == []
    assert untitled["creator_id"] == "studio-unknown-undated"
    # No year: created when first rated.
    assert untitled["created_at"] == datetime.fromtimestamp(964981247, UTC)
    last_rating = datetime.fromtimestamp(1445714835, UTC)
    assert {row["updated_at"] for row in items.values()} == {last_rating}

    users = {row["user_id"]: row for row in chunks[0]["users"].to_pylist()}
    assert chunks[0]["users"].schema == USERS.schema
    assert sorted(users) == ["ml-u1", "ml-u2", "ml-u3"]
    assert users["ml-u1"]["created_at"] == datetime.fromtimestamp(964981247, UTC)
    assert users["ml-u2"]["age_group"] == "unknown" and users["ml-u2"]["language"] == "en"

    # Every row validates as the boundary models.
    for row in chunks[0]["items"].to_pylist():
        meta = json.loads(row.pop("metadata_json"))
        row.pop("updated_at")
        Item.model_validate({**row, "metadata": meta})
    for row in chunks[0]["users"].to_pylist():
        row.pop("erased")
        UserProfile.model_validate(row)

    events = pa.concat_tables([c["events"] for c in chunks[1:]])
    assert events.schema == EVENTS.schema
    times = events.column("ts").to_pylist()
    assert times == sorted(times)
    by_id = {row["event_id"]: row for row in events.to_pylist()}
    assert sorted(by_id) == sorted(
        [
            "ml-1-1-view",
            "ml-1-1-like",
            "ml-1-3-view",
            "ml-2-1-view",
            "ml-2-1-like",
            "ml-2-2-view",
            "ml-3-3-view",
            "ml-3-3-like",
        ]
    )
    assert by_id["ml-1-3-view"]["rating"] == 3.5
    assert by_id["ml-1-1-like"]["rating"] is None
    assert by_id["ml-1-1-like"]["ts"] == by_id["ml-1-1-view"]["ts"]
    assert by_id["ml-2-2-view"]["user_id"] == "ml-u2" and by_id["ml-2-2-view"]["item_id"] == "ml-i2"


def test_movielens_reads_are_deterministic(ml_latest: Path) -> None:
    first = [{k: t.to_pylist() for k, t in c.items()} for c in read_movielens(ml_latest)]
    second = [{k: t.to_pylist() for k, t in c.items()} for c in read_movielens(ml_latest)]
    assert first == second


def test_movielens_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"u\.data"):
        read_movielens(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_movielens(tmp_path / "missing")
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4,1\n")
    with pytest.raises(FileNotFoundError, match=r"movies\.csv"):
        read_movielens(tmp_path)


CSV_EVENTS = (
    "uid,iid,ts,action,stars\n"
    "u1,p1,1700000100,View,\n"
    "u2,p2,1700000000,purchase,5\n"
    "u1,p2,1700000050, click ,\n"
)


def test_generic_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "shop.csv", CSV_EVENTS)
    mapping = ColumnMapping.parse("user=uid,item=iid,timestamp=ts:s,event_type=action,rating=stars")
    chunks_iter = read_events_file(path, mapping)
    assert chunks_iter.total_events == 3
    chunks = list(chunks_iter)
    assert len(chunks) == 2
    events = chunks[1]["events"]
    assert events.schema == EVENTS.schema
    rows = events.to_pylist()
    assert [r["event_type"] for r in rows] == ["purchase", "click", "view"]  # time order
    digest = hashlib.blake2b(b"shop.csv", digest_size=6).hexdigest()
    assert [r["event_id"] for r in rows] == [f"{digest}-1", f"{digest}-2", f"{digest}-0"]
    assert rows[0]["ts"] == datetime.fromtimestamp(1700000000, UTC)
    assert rows[0]["rating"] == 5.0 and rows[1]["rating"] is None

    items = chunks[0]["items"]
    assert is_placeholder(items) and is_placeholder(chunks[0]["users"])
    assert items.to_pylist() == [
        {
            "item_id": "p1",
            "item_type": "product",
            "title": None,
            "category": "unknown",
            "tags": [],
            "creator_id": "p1",
            "status": "active",
            "created_at": datetime.fromtimestamp(1700000100, UTC),
            "metadata_json": None,
            "updated_at": datetime.fromtimestamp(1700000100, UTC),
        },
        {
            "item_id": "p2",
            "item_type": "product",
            "title": None,
            "category": "unknown",
            "tags": [],
            "creator_id": "p2",
            "status": "active",
            "created_at": datetime.fromtimestamp(1700000000, UTC),
            "metadata_json": None,
            "updated_at": datetime.fromtimestamp(1700000000, UTC),
        },
    ]
    users = {r["user_id"]: r for r in chunks[0]["users"].to_pylist()}
    assert users["u1"]["created_at"] == datetime.fromtimestamp(1700000050, UTC)
    assert users["u1"]["personalization"] is True and users["u1"]["erased"] is False


def test_generic_parquet(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pq.write_table(
        pa.table(
            {
                "who": pa.array([10, 11, 10], pa.int64()),
                "what": pa.array([1.0, 2.0, None], pa.float64()),
                "when": pa.array([1_700_000_000_000, 1_700_000_001_500, 1_700_000_002_000], pa.int64()),
                "id": ["e1", None, "e3"],
            }
        ),
        path,
    )
    mapping = ColumnMapping.parse("user=who,item=what,timestamp=when:ms,default_event_type=like,event_id=id")
    with pytest.raises(ValueError, match=r"'what' is empty in 1 rows \(first at row 2\)"):
        read_events_file(path, mapping)

    pq.write_table(
        pa.table(
            {
                "who": pa.array([10, 11], pa.int64()),
                "what": pa.array([1.0, 2.0], pa.float64()),
                "when": pa.array([1_700_000_000_000, 1_700_000_001_500], pa.int64()),
                "id": ["e1", None],
            }
        ),
        path,
    )
    chunks = list(
        read_events_file(path, ColumnMapping.model_validate({**mapping.model_dump(), "item_type": "video"}))
    )
    rows = chunks[1]["events"].to_pylist()
    digest = hashlib.blake2b(b"events.parquet", digest_size=6).hexdigest()
    assert [r["event_id"] for r in rows] == ["e1", f"{digest}-1"]
    assert [r["user_id"] for r in rows] == ["10", "11"]
    assert [r["item_id"] for r in rows] == ["1", "2"]
    assert [r["event_type"] for r in rows] == ["like", "like"]
    assert rows[1]["ts"] == datetime(2023, 11, 14, 22, 13, 21, 500000, tzinfo=UTC)
    assert chunks[0]["items"].column("item_type").to_pylist() == ["video", "video"]


def test_parquet_timestamp_column_and_iso_text(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    stamps = [datetime(2024, 5, 1, 12, 0), datetime(2024, 5, 1, 13, 0)]
    pq.write_table(
        pa.table({"u": ["a", "b"], "i": ["x", "y"], "t": pa.array(stamps, pa.timestamp("ms"))}), path
    )
    chunks = list(
        read_events_file(path, ColumnMapping.parse("user=u,item=i,timestamp=t,default_event_type=view"))
    )
    assert chunks[1]["events"].column("ts").to_pylist() == [s.replace(tzinfo=UTC) for s in stamps]

    csv = write(
        tmp_path / "iso.tsv",
        "u\ti\tt\na\tx\t2024-05-01T12:00:00Z\nb\tx\t2024-05-01 15:00:00+02:00\nc\tx\t2024-05-01T11:00:00\n",
    )
    chunks = list(
        read_events_file(csv, ColumnMapping.parse("user=u,item=i,timestamp=t:iso,default_event_type=view"))
    )
    got = {r["user_id"]: r["ts"] for r in chunks[1]["events"].to_pylist()}
    assert got == {
        "a": datetime(2024, 5, 1, 12, tzinfo=UTC),
        "b": datetime(2024, 5, 1, 13, tzinfo=UTC),
        "c": datetime(2024, 5, 1, 11, tzinfo=UTC),
    }
    with pytest.raises(ValueError, match="timestamp=ts:iso"):
        read_events_file(csv, ColumnMapping.parse("user=u,item=i,timestamp=t:s,default_event_type=view"))


def test_unknown_event_types_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path / "e.csv", "u,i,t,a\nu1,i1,1,view\nu1,i2,2,addtocart\nu2,i2,3,addtocart\nu3,i1,4,\n"
    )
    mapping = ColumnMapping.parse("user=u,item=i,timestamp=t,event_type=a")
    with pytest.raises(ValueError, match=r"3 rows.*'addtocart' \(2 rows\).*None \(1 rows\)"):
        read_events_file(path, mapping)
    # A default fills the empty ones but never renames a wrong one.
    with pytest.raises(ValueError, match=r"2 rows"):
        read_events_file(
            path, ColumnMapping.parse("user=u,item=i,timestamp=t,event_type=a,default_event_type=click")
        )


def test_bad_files_are_refused_with_the_column_named(tmp_path: Path) -> None:
    path = write(tmp_path / "e.csv", "u,i,t\nu 1,i1,1\n")
    with pytest.raises(ValueError, match=r"no column 'ts'"):
        read_events_file(path, ColumnMapping.parse("user=u,item=i,timestamp=ts,default_event_type=view"))
    with pytest.raises(ValueError, match=r"column 'u' holds 1 malformed ids, e.g. 'u 1'"):
        read_events_file(path, ColumnMapping.parse("user=u,item=i,timestamp=t,default_event_type=view"))
    with pytest.raises(ValueError, match="unknown file type"):
        read_events_file(
            write(tmp_path / "e.json", "{}"),
            ColumnMapping.parse("user=u,item=i,timestamp=t,default_event_type=view"),
        )
    with pytest.raises(FileNotFoundError):
        read_events_file(
            tmp_path / "none.csv", ColumnMapping.parse("user=u,item=i,timestamp=t,default_event_type=view")
        )


def test_mapping_parse() -> None:
    mapping = ColumnMapping.parse(" user = uid , item=iid,timestamp=ts:ms,event_type=action,item_type=Video ")
    assert mapping.user == "uid" and mapping.item == "iid"
    assert mapping.timestamp == "ts" and mapping.timestamp_unit == "ms"
    assert mapping.event_type == "action" and mapping.item_type == "video"
    colon = ColumnMapping.parse("user=u,item=i,timestamp=event:time:iso,default_event_type=VIEW")
    assert colon.timestamp == "event:time" and colon.timestamp_unit == "iso"
    assert colon.default_event_type == "view"
    assert ColumnMapping.parse("user=u,item=i,timestamp=t,event_type=e").timestamp_unit == "s"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("user=u,item=i,timestamp", "'timestamp' is not key=value"),
        ("user=u,itm=i,timestamp=t,event_type=e", "unknown key 'itm'"),
        (
            "user=u,item=i,timestamp=t:hours,event_type=e",
            "'timestamp=t:hours': unknown timestamp unit 'hours'",
        ),
        ("user=u,item=i,timestamp=t", "event_type"),
        ("user=u,timestamp=t,event_type=e", "lacks item"),
        (
            "user=u,item=i,timestamp=t,default_event_type=buy",
            "'default_event_type=buy': 'buy' is not an event type",
        ),
        ("user=u,item=i,timestamp=t,event_type=e,item_type=car", "'item_type=car'"),
        ("user=u,user=v,item=i,timestamp=t,event_type=e", "'user=v': key 'user' is given twice"),
        ("user=,item=i,timestamp=t,event_type=e", "'user=': the value is empty"),
        ("user=u,,item=i", "empty part"),
    ],
)
def test_mapping_parse_errors_name_the_part(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ColumnMapping.parse(text)
