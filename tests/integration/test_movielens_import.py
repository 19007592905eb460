from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

from core.lake import Lake
from core.schema import Item, ItemType
from features.catalog import CatalogStore
from features.redis_store import RedisStore
from training.data_import import ImportSummary, run_import
from training.importers import ColumnMapping, read_events_file, read_movielens

pytestmark = pytest.mark.integration


def _ml100k() -> Path:
    base = os.environ.get("RAYREC_DATASETS")
    root = Path(base) if base else Path(__file__).resolve().parents[3] / "shared" / "datasets"
    path = root / "ml-100k"
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens ml-100k not found at {path} (set RAYREC_DATASETS to its parent directory)")
    return path


def _import(path: Path, lake: Lake, catalog: CatalogStore) -> ImportSummary:
    started = time.perf_counter()
    summary = run_import(read_movielens(path), lake, catalog, source="ml-100k", progress=False)
    print(f"ml-100k import: {time.perf_counter() - started:.2f} s")
    return summary


def test_ml100k_import(tmp_path: Path, store: RedisStore) -> None:
    path = _ml100k()
    ratings = pacsv.read_csv(
        path / "u.data",
        read_options=pacsv.ReadOptions(column_names=["user", "item", "rating", "ts"]),
        parse_options=pacsv.ParseOptions(delimiter="\t"),
    )
    expected_likes = int(pc.sum(pc.greater_equal(ratings.column("rating"), 4)).as_py())
    lake = Lake(str(tmp_path))
    catalog = CatalogStore(store)

    summary = _import(path, lake, catalog)

    assert summary.users == 943
    assert summary.items == 1682
    assert summary.events_by_type == {"view": 100_000, "like": expected_likes}
    assert summary.first_event is not None and summary.first_event.year == 1997
    assert "view" in summary.render()

    events = lake.read("events", columns=["event_type", "rating", "event_id"])
    counts = {e["values"]: e["counts"] for e in pc.value_counts(events.column("event_type")).to_pylist()}
    assert counts == {"view": 100_000, "like": expected_likes}
    assert pc.count_distinct(events.column("event_id")).as_py() == events.num_rows
    views = events.filter(pc.equal(events.column("event_type"), "view"))
    assert views.column("rating").null_count == 0
    assert lake.count("users") == 943
    assert lake.count("items") == 1682

    assert catalog.counts() == {"items": 1682, "active_items": 1682, "users": 943, "edges": 0}
    toy_story = catalog.get_item("ml-i1")
    assert toy_story is not None
    assert toy_story["title"] == "Toy Story (1995)"
    assert toy_story["category"] == "animation"
    assert toy_story["tags"] == ["animation", "children's", "comedy"]
    assert toy_story["creator_id"] == "studio-animation-1990s"
    assert toy_story["metadata"]["year"] == 1995
    user = catalog.get_user("ml-u1")
    assert user is not None and user["age_group"] == "18_24" and user["region"] == "us-8"

    # Importing again replaces the same lake files and rewrites the same records.
    files_before = sorted(lake.files("events"))
    again = _import(path, lake, catalog)
    assert again.events == summary.events
    assert lake.count("events") == 100_000 + expected_likes
    assert lake.count("users") == 943
    assert lake.count("items") == 1682
    assert sorted(lake.files("events")) == files_before
    assert catalog.counts() == {"items": 1682, "active_items": 1682, "users": 943, "edges": 0}


def test_event_file_import_keeps_real_catalog_rows(tmp_path: Path, store: RedisStore) -> None:
    catalog = CatalogStore(store)
    catalog.put_item(
        Item(
            item_id="ml-i1",
            item_type=ItemType.MOVIE,
            title="Toy Story (1995)",
            category="animation",
            creator_id="c1",
        )
    )
    events = tmp_path / "clicks.csv"
    events.write_text("uid,iid,ts\nml-u1,ml-i1,1700000000\nml-u1,p9,1700000100\n", encoding="utf-8")
    mapping = ColumnMapping.parse("user=uid,item=iid,timestamp=ts:s,default_event_type=click")
    lake = Lake(str(tmp_path / "home"))

    summary = run_import(read_events_file(events, mapping), lake, catalog, source="clicks", progress=False)

    assert summary.events_by_type == {"click": 2}
    assert summary.items == 2 and summary.users == 1
    kept = catalog.get_item("ml-i1")
    assert kept is not None and kept["title"] == "Toy Story (1995)"
    placeholder = catalog.get_item("p9")
    assert placeholder is not None and placeholder["category"] == "unknown" and placeholder["title"] is None
    assert lake.read("items", columns=["item_id"]).column("item_id").to_pylist() == ["p9"]
    assert catalog.counts() == {"items": 2, "active_items": 2, "users": 1, "edges": 0}

    again = run_import(read_events_file(events, mapping), lake, catalog, source="clicks", progress=False)
    assert again.events == 2
    assert lake.count("events") == 2
    assert lake.count("items") == 1
    assert lake.count("users") == 1
