"""The synthetic world: determinism, schemas, time rules and the hidden truth behind the events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from core.schema import EventType, ItemType
from core.tables import EDGES, EVENTS, ITEMS, USERS
from training.synthetic import (
    World,
    WorldConfig,
    WorldTruth,
    _EventGenerator,
    build_truth,
    click_probability,
    generate_world,
    like_probability,
    load_truth,
    outcome_probabilities,
    save_truth,
)

SPECS = {spec.name: spec for spec in (USERS, ITEMS, EDGES, EVENTS)}
CHUNK_ROWS = 4_000


def collect(chunks) -> dict[str, pa.Table]:
    parts: dict[str, list[pa.Table]] = {}
    for chunk in chunks:
        for name, table in chunk.items():
            parts.setdefault(name, []).append(table)
    return {name: pa.concat_tables(tables) for name, tables in parts.items()}


@pytest.fixture(scope="module")
def config() -> WorldConfig:
    return WorldConfig.tiny(seed=3, chunk_rows=CHUNK_ROWS)


@pytest.fixture(scope="module")
def world(config: WorldConfig) -> World:
    return World(config)


@pytest.fixture(scope="module")
def chunks(world: World) -> list[dict[str, pa.Table]]:
    return list(world.chunks())


@pytest.fixture(scope="module")
def tables(chunks: list[dict[str, pa.Table]]) -> dict[str, pa.Table]:
    return collect(chunks)


@pytest.fixture(scope="module")
def events(tables: dict[str, pa.Table]):
    return tables["events"].to_pandas()


def test_tables_match_their_schemas_in_bounded_chunks(chunks: list[dict[str, pa.Table]]) -> None:
    assert {name for chunk in chunks for name in chunk} == set(SPECS)
    for chunk in chunks:
        for name, table in chunk.items():
            assert table.schema == SPECS[name].schema
            table.cast(SPECS[name].schema)
            assert 0 < table.num_rows <= CHUNK_ROWS
    order = [name for chunk in chunks for name in chunk]
    assert order.index("events") > max(i for i, name in enumerate(order) if name != "events")


def test_sizes_follow_the_config(tables: dict[str, pa.Table], config: WorldConfig) -> None:
    assert tables["users"].num_rows == config.n_users
    assert tables["items"].num_rows == config.n_items
    assert tables["events"].num_rows == config.n_events
    assert tables["edges"].num_rows > 0


def test_same_seed_same_world_other_seed_other_world(
    tables: dict[str, pa.Table], config: WorldConfig
) -> None:
    again = collect(generate_world(config))
    for name in SPECS:
        assert again[name].equals(tables[name]), name
    other = collect(generate_world(config.model_copy(update={"seed": 4})))
    assert not other["events"].equals(tables["events"])
    assert not other["items"].equals(tables["items"])


def test_chunk_size_cuts_tables_without_changing_them(
    tables: dict[str, pa.Table], config: WorldConfig
) -> None:
    whole = collect(generate_world(config.model_copy(update={"chunk_rows": 250_000})))
    for name in SPECS:
        assert whole[name].equals(tables[name]), name


def test_event_batches_merge_into_one_time_order(world: World, config: WorldConfig) -> None:
    batches = list(_EventGenerator(world.truth, batch_events=3_000).batches())
    assert len(batches) > 3
    ts = np.concatenate([b.ts_us for b in batches])
    assert len(ts) == config.n_events
    assert (np.diff(ts) >= 0).all()
    items = np.concatenate([b.item for b in batches])
    assert (ts >= world.truth.item_created_s[items] * 1e6).all()


def test_ids_are_unique_and_well_formed(tables: dict[str, pa.Table], config: WorldConfig) -> None:
    users = tables["users"].column("user_id").to_pylist()
    items = tables["items"].column("item_id").to_pylist()
    assert users == [f"u{k}" for k in range(config.n_users)]
    assert items == [f"i{k}" for k in range(config.n_items)]
    event_ids = tables["events"].column("event_id").to_pylist()
    assert event_ids == [f"syn-{config.seed}-{k}" for k in range(config.n_events)]
    assert all(c.startswith("c") for c in tables["items"].column("creator_id").to_pylist())
    assert set(tables["events"].column("user_id").to_pylist()) <= set(users)
    assert set(tables["events"].column("item_id").to_pylist()) <= set(items)


def test_every_event_type_appears(events) -> None:
    assert set(events.event_type) == {t.value for t in EventType}


def test_events_lie_in_the_span_in_time_order_after_their_item_and_user(
    tables: dict[str, pa.Table], events, config: WorldConfig
) -> None:
    assert events.ts.is_monotonic_increasing
    assert events.ts.min() >= config.start
    assert events.ts.max() < config.end
    items = tables["items"].to_pandas().set_index("item_id")
    users = tables["users"].to_pandas().set_index("user_id")
    assert (events.ts.to_numpy() >= items.loc[events.item_id, "created_at"].to_numpy()).all()
    assert (events.ts.to_numpy() > users.loc[events.user_id, "created_at"].to_numpy()).all()
    assert (items.created_at > config.start).any(), "some items arrive during the span"
    assert (items.created_at <= config.start).any()


def test_sessions_are_bursts_separated_by_half_an_hour(events) -> None:
    sessions = events.groupby("context_json").agg(
        user=("user_id", "first"), start=("ts", "min"), end=("ts", "max")
    )
    assert (events.groupby("context_json").user_id.nunique() == 1).all()
    sessions = sessions.sort_values(["user", "start"])
    same_user = sessions.user.shift(-1) == sessions.user
    gaps = (sessions.start.shift(-1) - sessions.end)[same_user]
    assert len(gaps) > 0
    assert (gaps > timedelta(minutes=30)).all()
    assert len(sessions) < len(events) / 3


def test_served_lists_carry_context(events, config: WorldConfig) -> None:
    assert events.surface.isin(["home", "video", "product", "similar"]).all()
    assert events.device.notna().all() and events.region.notna().all()
    assert events.position.between(0, config.page_size - 1).all()
    assert events.request_id.str.fullmatch(rf"syn-{config.seed}-s\d+-p\d+").all()
    assert events.rating.isna().all()


def test_watch_time_only_on_watches_of_playable_items(tables: dict[str, pa.Table], events) -> None:
    items = tables["items"].to_pandas().set_index("item_id")
    watch = events.event_type == EventType.WATCH
    assert events.watch_time_s[watch].notna().all()
    assert (events.watch_time_s[watch] >= 0).all()
    assert events.watch_time_s[~watch].isna().all()
    playable = {ItemType.VIDEO, ItemType.MOVIE, ItemType.MUSIC}
    assert items.loc[events.item_id[watch], "item_type"].isin(playable).all()
    bought = items.loc[events.item_id[events.event_type == EventType.PURCHASE], "item_type"]
    assert (bought == ItemType.PRODUCT).mean() > 0.7


def test_video_and_product_surfaces_show_their_kind(tables: dict[str, pa.Table], events) -> None:
    items = tables["items"].to_pandas().set_index("item_id")
    kinds = items.loc[events.item_id, "item_type"].to_numpy()
    on_video = events.surface.to_numpy() == "video"
    on_product = events.surface.to_numpy() == "product"
    assert np.isin(kinds[on_video], ["video", "movie", "music"]).mean() > 0.95
    assert (kinds[on_product] == "product").mean() > 0.95


def test_a_served_list_never_repeats_an_item(events) -> None:
    shown = events.drop_duplicates(["request_id", "position"])
    assert not shown.duplicated(["request_id", "item_id"]).any()


def test_users_and_items_look_real(tables: dict[str, pa.Table], world: World) -> None:
    users = tables["users"].to_pandas()
    assert users.personalization.all() and not users.erased.any()
    sizes = users.interests.map(len)
    assert set(sizes) == {0, 3}
    assert 0.3 < (sizes == 3).mean() < 0.7
    assert set(users.interests.explode().dropna()) <= set(world.truth.category_names)
    items = tables["items"].to_pandas()
    assert items.title.str.fullmatch(r"[A-Z][\w-]* [\w-]+ \w+ #\d+").all()
    assert all(
        tag.startswith(f"{category}/")
        for tags, category in zip(items.tags, items.category, strict=True)
        for tag in tags
    )
    assert items.tags.map(len).between(1, 4).all()
    assert items.item_type.nunique() >= 4


def test_edges_follow_similar_tastes(tables: dict[str, pa.Table], world: World) -> None:
    edges = tables["edges"].to_pandas()
    assert not (edges.follower_id == edges.followee_id).any()
    active = edges[edges.active]
    assert not active.duplicated(["follower_id", "followee_id"]).any()
    assert (edges.active == False).any()  # noqa: E712
    truth = world.truth
    vectors = truth.user_vectors / np.linalg.norm(truth.user_vectors, axis=1, keepdims=True)
    f, e = truth.user_index(active.follower_id.tolist()), truth.user_index(active.followee_id.tolist())
    followed = (vectors[f] * vectors[e]).sum(1).mean()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, truth.n_users, (2, 5_000))
    assert followed > (vectors[a] * vectors[b]).sum(1).mean() + 0.1


def test_affinity_drives_likes_and_negative_feedback(world: World, events) -> None:
    truth = world.truth
    aff = truth.affinity(truth.user_index(events.user_id.tolist()), truth.item_index(events.item_id.tolist()))
    kind = events.event_type.to_numpy()
    liked = aff[kind == EventType.LIKE].mean()
    hidden = aff[np.isin(kind, [EventType.HIDE, EventType.NOT_INTERESTED, EventType.REPORT])].mean()
    assert liked > hidden + 0.5
    assert aff[kind == EventType.CLICK].mean() > aff[kind == EventType.SKIP].mean()


def test_affinity_broadcasts(world: World) -> None:
    truth = world.truth
    users, items = np.arange(5), np.arange(7)
    matrix = truth.affinity(users[:, None], items[None, :])
    assert matrix.shape == (5, 7)
    assert np.allclose(matrix[2, 3], truth.affinity(2, 3))


def test_click_and_like_probabilities(world: World) -> None:
    truth = world.truth
    rng = np.random.default_rng(1)
    u, i = rng.integers(0, truth.n_users, 2_000), rng.integers(0, truth.n_items, 2_000)
    users, items = [truth.user_ids[k] for k in u], [truth.item_ids[k] for k in i]
    click = click_probability(truth, users, items)
    like = like_probability(truth, users, items)
    assert click.shape == like.shape == (2_000,)
    assert ((click > 0) & (click < 1)).all() and ((like > 0) & (like < 1)).all()
    aff = truth.affinity(u, i)
    assert np.corrcoef(aff, click)[0, 1] > 0.5
    assert np.corrcoef(aff, like)[0, 1] > 0.5
    lower = click_probability(truth, users, items, positions=np.full(2_000, 9))
    assert (lower < click).all()
    everything = outcome_probabilities(truth, users, items)
    assert set(everything) == set(EventType)
    with pytest.raises(KeyError):
        click_probability(truth, ["u0"], [f"i{truth.n_items}"])


def test_truth_round_trips(world: World, tmp_path) -> None:
    truth = world.truth
    save_truth(truth, tmp_path / "truth")
    loaded = load_truth(tmp_path / "truth")
    assert isinstance(loaded, WorldTruth)
    assert loaded.config == truth.config
    assert loaded.category_names == truth.category_names and loaded.tag_names == truth.tag_names
    for name in ("user_vectors", "item_vectors", "creator_quality", "item_popularity", "item_created_s"):
        assert np.array_equal(getattr(loaded, name), getattr(truth, name)), name
    assert loaded.item_ids == truth.item_ids
    users, items = truth.user_ids[:50], truth.item_ids[:50]
    assert np.array_equal(click_probability(loaded, users, items), click_probability(truth, users, items))
    World(truth.config, loaded)  # accepted as the truth of that config


def test_truth_depends_only_on_the_config(config: WorldConfig, world: World) -> None:
    again = build_truth(config)
    assert np.array_equal(again.user_vectors, world.truth.user_vectors)
    assert np.array_equal(again.item_tags, world.truth.item_tags)


def test_config_is_strict() -> None:
    with pytest.raises(ValidationError):
        WorldConfig(n_users=10, n_items=10, n_events=10, colour="blue")  # type: ignore[call-arg]
    future = datetime.now(UTC) + timedelta(days=1)
    with pytest.raises(ValidationError, match="future"):
        WorldConfig(n_users=10, n_items=10, n_events=10, start=future)
    with pytest.raises(ValueError, match="unknown preset"):
        WorldConfig.preset("huge")  # type: ignore[arg-type]
    bench = WorldConfig.benchmark()
    assert (bench.n_users, bench.n_items, bench.n_events) == (10_000, 100_000, 1_000_000)
    assert WorldConfig.small().creator_count == 250


def test_degenerate_sizes_work() -> None:
    tables = collect(generate_world(WorldConfig(n_users=1, n_items=1, n_events=50, n_categories=3)))
    assert tables["events"].num_rows == 50
    assert "edges" not in tables
    assert collect(generate_world(WorldConfig(n_users=5, n_items=3, n_events=0))).keys() == {
        "users",
        "items",
        "edges",
    }
