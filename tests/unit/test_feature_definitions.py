"""The feature definitions on hand-made event sequences, and the online/offline parity property."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

from core.lake import conform
from core.schema import EntityType, EventContext, EventType, UserEvent
from core.tables import EVENTS
from core.types import FeatureMap
from features import trending
from features.definitions import (
    CREATOR_QUALITY,
    ITEM_ENGAGEMENT,
    SPECS,
    USER_ACTIVITY,
    VIEWS,
    defaults,
    serving_features,
)
from features.params import DEFAULT_PARAMS, FeatureParams
from features.records import EventRecord, ItemInfo
from features.spec import Dtype, FeatureView, State
from features.trending import TrendingScope

T0 = datetime(2025, 3, 3, 12, 0, 7, tzinfo=UTC)
P = DEFAULT_PARAMS
ITEMS = {
    "i1": ItemInfo("i1", "music", "c1"),
    "i2": ItemInfo("i2", "music", "c1"),
    "i3": ItemInfo("i3", "sports", "c2"),
    "i4": ItemInfo("i4", "news", "c2", region="eu"),
}

_counter = iter(range(10**9))


def ev(
    item: str,
    kind: EventType,
    at: datetime,
    *,
    user: str = "u1",
    watch_s: float | None = None,
    event_id: str | None = None,
    region: str | None = None,
) -> EventRecord:
    return EventRecord(
        event_id=event_id or f"e{next(_counter):09d}",
        user_id=user,
        item_id=item,
        event_type=kind,
        ts=at,
        watch_time_s=watch_s,
        region=region,
    )


def fold(view: FeatureView, events: Sequence[EventRecord], state: State | None = None) -> State:
    return view.update(state or {}, events, ITEMS, P)


def served(view: FeatureView, events: Sequence[EventRecord], now: datetime) -> dict[str, Any]:
    return dict(view.serve(fold(view, events), now, P))


def serve(view: FeatureView, state: State, now: datetime) -> dict[str, Any]:
    return dict(view.serve(state, now, P))


# -- user_activity -----------------------------------------------------------------------------


def test_affinity_halves_after_one_half_life() -> None:
    state = fold(USER_ACTIVITY, [ev("i1", EventType.LIKE, T0)])
    at_once = serve(USER_ACTIVITY, state, T0)
    later = serve(USER_ACTIVITY, state, T0 + timedelta(days=7))
    assert at_once["top_categories"] == ("music",)
    assert at_once["top_category_affinities"] == (pytest.approx(3.0),)
    assert later["top_category_affinities"] == (pytest.approx(1.5),)


def test_affinity_decays_older_events_more() -> None:
    values = served(
        USER_ACTIVITY,
        [ev("i1", EventType.CLICK, T0), ev("i3", EventType.CLICK, T0 + timedelta(days=7))],
        T0 + timedelta(days=7),
    )
    assert values["top_categories"] == ("sports", "music")
    assert values["top_category_affinities"] == (pytest.approx(1.0), pytest.approx(0.5))


def test_affinity_weights_by_type_and_watch_time() -> None:
    values = served(
        USER_ACTIVITY,
        [
            ev("i1", EventType.PURCHASE, T0),
            ev("i3", EventType.WATCH, T0, watch_s=240.0),
            ev("i4", EventType.WATCH, T0, watch_s=10_000.0),
        ],
        T0,
    )
    affinities = dict(zip(values["top_categories"], values["top_category_affinities"], strict=True))
    assert affinities["music"] == pytest.approx(5.0)
    assert affinities["sports"] == pytest.approx(2.0)  # 4 minutes at 0.5 per minute
    assert affinities["news"] == pytest.approx(P.watch_weight_max)


def test_negative_feedback_lowers_affinity() -> None:
    liked = [ev("i1", EventType.LIKE, T0), ev("i3", EventType.CLICK, T0)]
    before = served(USER_ACTIVITY, liked, T0 + timedelta(minutes=1))
    after = served(
        USER_ACTIVITY,
        [*liked, ev("i2", EventType.HIDE, T0 + timedelta(minutes=1))],
        T0 + timedelta(minutes=1),
    )
    assert before["top_categories"][0] == "music"
    # The like (3, decayed by one minute) minus the hide (3) leaves music just below zero.
    assert after["top_categories"] == ("sports",)
    reported = served(USER_ACTIVITY, [*liked, ev("i2", EventType.REPORT, T0)], T0)
    assert "music" not in reported["top_categories"]


def test_late_event_adds_its_decayed_weight() -> None:
    in_order = fold(
        USER_ACTIVITY, [ev("i1", EventType.CLICK, T0), ev("i1", EventType.CLICK, T0 + timedelta(days=7))]
    )
    late = fold(USER_ACTIVITY, [ev("i1", EventType.CLICK, T0 + timedelta(days=7))])
    late = fold(USER_ACTIVITY, [ev("i1", EventType.CLICK, T0)], late)
    now = T0 + timedelta(days=7)
    assert USER_ACTIVITY.serve(late, now, P)["top_category_affinities"] == pytest.approx(
        USER_ACTIVITY.serve(in_order, now, P)["top_category_affinities"]
    )


def test_session_resets_after_a_gap_longer_than_30_minutes() -> None:
    events = [
        ev("i1", EventType.CLICK, T0),
        ev("i2", EventType.VIEW, T0 + timedelta(minutes=10)),
        ev("i1", EventType.LIKE, T0 + timedelta(minutes=20)),
    ]
    values = served(USER_ACTIVITY, events, T0 + timedelta(minutes=21))
    assert values["session_item_ids"] == ("i1", "i2")  # distinct, newest first
    assert values["session_event_count"] == 3
    assert values["session_duration_s"] == pytest.approx(20 * 60)

    gap = [*events, ev("i3", EventType.CLICK, T0 + timedelta(minutes=51))]  # 31 minutes later
    values = served(USER_ACTIVITY, gap, T0 + timedelta(minutes=52))
    assert values["session_item_ids"] == ("i3",)
    assert values["session_event_count"] == 1

    idle = served(USER_ACTIVITY, events, T0 + timedelta(minutes=20 + 31))
    assert idle["session_item_ids"] == ()
    assert idle["session_event_count"] == 0


def test_session_within_gap_continues_and_skips_negative_items() -> None:
    events = [
        ev("i1", EventType.CLICK, T0),
        ev("i2", EventType.HIDE, T0 + timedelta(minutes=29)),
        ev("i3", EventType.VIEW, T0 + timedelta(minutes=58)),
    ]
    values = served(USER_ACTIVITY, events, T0 + timedelta(minutes=58))
    assert values["session_item_ids"] == ("i3", "i1")
    assert values["session_event_count"] == 3


def test_recent_items_keep_the_50_newest_first() -> None:
    events = [ev(f"x{n}", EventType.VIEW, T0 + timedelta(seconds=n)) for n in range(60)]
    random.Random(7).shuffle(events)
    state = fold(USER_ACTIVITY, events[30:], fold(USER_ACTIVITY, events[:30]))
    values = serve(USER_ACTIVITY, state, T0 + timedelta(minutes=5))
    assert values["recent_item_ids"] == tuple(f"x{n}" for n in range(59, 9, -1))
    assert len(values["recent_event_types"]) == len(values["recent_event_ts"]) == 50
    assert values["recent_event_ts"][0] == pytest.approx((T0 + timedelta(seconds=59)).timestamp())
    assert values["view_count"] == 60
    assert values["event_count"] == 60


def test_last_viewed_category_and_counts() -> None:
    values = served(
        USER_ACTIVITY,
        [
            ev("i1", EventType.VIEW, T0),
            ev("i3", EventType.CLICK, T0 + timedelta(seconds=5)),
            ev("i4", EventType.HIDE, T0 + timedelta(seconds=9)),  # not a view
            ev("unknown", EventType.VIEW, T0 + timedelta(seconds=10)),  # not in the catalog
        ],
        T0 + timedelta(seconds=10),
    )
    assert values["last_viewed_category"] == "sports"
    assert values["view_count"] == 2
    assert values["click_count"] == 1
    assert values["hide_count"] == 1
    assert values["last_event_ts"] == pytest.approx((T0 + timedelta(seconds=10)).timestamp())


def test_same_timestamp_ties_break_by_event_id() -> None:
    a = ev("i1", EventType.VIEW, T0, event_id="a")
    b = ev("i3", EventType.VIEW, T0, event_id="b")
    assert served(USER_ACTIVITY, [b, a], T0)["recent_item_ids"] == ("i3", "i1")
    assert served(USER_ACTIVITY, [a, b], T0)["last_viewed_category"] == "sports"


# -- item_engagement ---------------------------------------------------------------------------


def test_windowed_counts_drop_out_of_their_windows() -> None:
    state = fold(ITEM_ENGAGEMENT, [ev("i1", EventType.VIEW, T0), ev("i1", EventType.CLICK, T0)])

    def at(delta: timedelta) -> dict[str, Any]:
        return serve(ITEM_ENGAGEMENT, state, T0 + delta)

    assert at(timedelta(minutes=1))["view_count_1h"] == 1
    assert at(timedelta(minutes=59))["view_count_1h"] == 1
    # Five-minute buckets: gone from the 1 h window once its bucket ended over an hour ago.
    assert at(timedelta(minutes=66))["view_count_1h"] == 0
    assert at(timedelta(minutes=66))["view_count_24h"] == 1
    assert at(timedelta(hours=25))["click_count_24h"] == 0
    assert at(timedelta(days=6))["click_count_7d"] == 1
    assert at(timedelta(days=7, hours=2))["click_count_7d"] == 0
    assert at(timedelta(days=30))["event_count_total"] == 2


def test_buckets_are_pruned_relative_to_the_newest_event() -> None:
    events = [ev("i1", EventType.VIEW, T0 + timedelta(hours=h)) for h in range(0, 24 * 10, 3)]
    state = fold(ITEM_ENGAGEMENT, events)
    newest_hour = int(events[-1].ts_s // 3600)
    assert all(int(k) >= newest_hour - 7 * 24 for k in state["h"])
    assert len(state["m"]) == 1
    # An event older than everything kept is counted in totals only, whatever the order.
    late = fold(ITEM_ENGAGEMENT, [ev("i1", EventType.VIEW, T0 - timedelta(days=30))], state)
    assert late["h"] == state["h"]
    assert late["totals"]["view"] == state["totals"]["view"] + 1


def test_smoothed_ctr_and_like_rate() -> None:
    empty = ITEM_ENGAGEMENT.serve({}, T0, P)
    assert empty["ctr_7d"] == pytest.approx(P.ctr_prior_mean)
    assert empty["like_rate_7d"] == pytest.approx(P.like_prior_mean)
    events = [ev("i1", EventType.VIEW, T0 + timedelta(seconds=n)) for n in range(10)]
    events += [ev("i1", EventType.CLICK, T0), ev("i1", EventType.CLICK, T0), ev("i1", EventType.LIKE, T0)]
    values = served(ITEM_ENGAGEMENT, events, T0 + timedelta(minutes=1))
    # a = 0.05 * 20 = 1, b = 19: (2 + 1) / (10 + 20)
    assert values["ctr_7d"] == pytest.approx(0.1)
    assert values["like_rate_7d"] == pytest.approx((1 + 0.4) / 30)
    # Clicks without views never push the rate over one.
    clicks_only = served(ITEM_ENGAGEMENT, [ev("i1", EventType.CLICK, T0)] * 50, T0)
    assert 0 < clicks_only["ctr_7d"] < 1


def test_trending_score_halves_after_its_half_life() -> None:
    state = fold(ITEM_ENGAGEMENT, [ev("i1", EventType.SHARE, T0)])
    assert ITEM_ENGAGEMENT.serve(state, T0, P)["trending_score"] == pytest.approx(5.0)
    assert ITEM_ENGAGEMENT.serve(state, T0 + timedelta(hours=6), P)["trending_score"] == pytest.approx(2.5)
    hidden = fold(ITEM_ENGAGEMENT, [ev("i1", EventType.HIDE, T0)])
    assert ITEM_ENGAGEMENT.serve(hidden, T0, P)["trending_score"] == 0.0


# -- creator_quality ---------------------------------------------------------------------------


def test_negative_feedback_lowers_creator_quality() -> None:
    likes = [ev("i1", EventType.LIKE, T0 + timedelta(seconds=n)) for n in range(20)]
    good = served(CREATOR_QUALITY, likes, T0)
    hidden = served(CREATOR_QUALITY, [*likes, *(ev("i2", EventType.HIDE, T0) for _ in range(5))], T0)
    reported = served(CREATOR_QUALITY, [*likes, *(ev("i2", EventType.REPORT, T0) for _ in range(5))], T0)
    prior = CREATOR_QUALITY.serve({}, T0, P)["quality_score"]
    assert prior == pytest.approx(P.quality_prior_mean)
    assert good["quality_score"] > prior
    assert reported["quality_score"] < hidden["quality_score"] < good["quality_score"]
    assert reported["report_count"] == 5
    assert reported["event_count"] == 25


def test_creator_routing_needs_the_catalog() -> None:
    assert CREATOR_QUALITY.entity_key(ev("i3", EventType.LIKE, T0), ITEMS["i3"]) == "c2"
    assert CREATOR_QUALITY.entity_key(ev("nope", EventType.LIKE, T0), None) is None


# -- definitions, records, serving -------------------------------------------------------------


def _matches(dtype: Dtype, value: object) -> bool:
    if dtype is Dtype.INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if dtype is Dtype.FLOAT:
        return isinstance(value, float)
    if dtype is Dtype.STR:
        return isinstance(value, str)
    kind = str if dtype is Dtype.STRINGS else float
    return isinstance(value, tuple) and all(isinstance(v, kind) for v in value)


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.name)
def test_serve_returns_exactly_the_declared_features_with_their_types(view: FeatureView) -> None:
    events = [ev("i1", t, T0, watch_s=60.0 if t is EventType.WATCH else None) for t in EventType]
    for state in ({}, fold(view, events)):
        values = view.serve(state, T0, P)
        assert list(values) == [s.name for s in view.specs]
        for spec in view.specs:
            assert _matches(spec.dtype, values[spec.name]), spec.ref
            assert _matches(spec.dtype, spec.default), spec.ref
    assert FeatureMap(view.serve_refs({}, T0, P))  # every value is a valid FeatureValue


def test_defaults_match_an_empty_state() -> None:
    for view in VIEWS:
        assert view.serve_refs({}, T0, P) == {s.ref: s.default for s in view.specs}
    assert set(defaults(EntityType.ITEM)) == set(ITEM_ENGAGEMENT.refs)


def test_serving_features_drop_expired_values() -> None:
    values = ITEM_ENGAGEMENT.serve_refs(fold(ITEM_ENGAGEMENT, [ev("i1", EventType.VIEW, T0)]), T0, P)
    record = json.loads(json.dumps({**values, "updated_at": T0.isoformat(), "item_engagement:gone": 1}))
    fresh = serving_features(record, T0 + timedelta(minutes=5))
    assert fresh.get_int("item_engagement:view_count_1h", -1) == 1
    assert "item_engagement:gone" not in fresh
    stale = serving_features(record, T0 + timedelta(hours=2))
    assert "item_engagement:view_count_1h" not in stale
    assert stale.get_int("item_engagement:view_count_24h", -1) == 1
    assert serving_features(None, T0) == FeatureMap()
    assert all(ref.count(":") == 1 for ref in SPECS)


def test_event_record_round_trips_through_the_lake_schema() -> None:
    event = UserEvent(
        user_id="u1",
        item_id="i1",
        event_type=EventType.WATCH,
        timestamp=T0,
        watch_time_s=12.5,
        context=EventContext(surface="home", region="eu", position=3, extra={"b": 1, "a": "x"}),
    )
    record = EventRecord.from_event(event)
    row = record.to_row()
    assert list(row) == EVENTS.schema.names
    assert record.context_json == '{"a":"x","b":1}'
    table = conform(EVENTS, pa.Table.from_pylist([row]))
    assert EventRecord.from_row(table.to_pylist()[0]) == record
    pandas_row = table.to_pandas().iloc[0].to_dict()
    assert EventRecord.from_row(pandas_row) == record


def test_item_info_from_catalog_record_in_either_spelling() -> None:
    snake = {"item_id": "i1", "category": "music", "creator_id": "c1", "metadata": {"region": "eu"}}
    camel = {"itemId": "i1", "category": "music", "creatorId": "c1", "createdAt": "2025-01-01T00:00:00Z"}
    assert ItemInfo.from_catalog(snake).region == "eu"
    assert ItemInfo.from_catalog(camel).created_at == datetime(2025, 1, 1, tzinfo=UTC)
    with pytest.raises(KeyError):
        ItemInfo.from_catalog({"item_id": "i1"})


def test_params_are_strict() -> None:
    with pytest.raises(ValueError, match="extra"):
        FeatureParams(half_life=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="lacks event types"):
        FeatureParams(affinity_weights={EventType.LIKE: 1.0})
    with pytest.raises(ValueError, match="200"):
        FeatureParams(trending_half_life_s=60.0)


# -- trending sets ------------------------------------------------------------------------------


def test_trending_increments_use_forward_decay_in_the_events_epoch() -> None:
    event = ev("i4", EventType.SHARE, T0, region="us")
    amounts = trending.increments([event], ITEMS, P)
    epoch = trending.epoch_of(event.ts_s, P)
    scopes = {scope for scope, _ in amounts}
    assert scopes == {TrendingScope.everywhere(), TrendingScope.region("us"), TrendingScope.category("news")}
    assert {e for _, e in amounts} == {epoch}
    now = event.ts_s + 6 * 3600
    for per_item in amounts.values():
        # Read back, the score is the event's weight decayed to "now".
        assert trending.current_score(per_item["i4"], epoch, now, P) == pytest.approx(2.5)
        # Carried into the next epoch's set, it reads back the same from there.
        carried = per_item["i4"] * trending.carry_factor(P)
        assert carried == pytest.approx(trending.forward_weight(5.0, event.ts_s, epoch + 1, P), rel=1e-12)
        assert trending.current_score(carried, epoch + 1, now, P) == pytest.approx(2.5)
    assert trending.increments([ev("i4", EventType.HIDE, T0)], ITEMS, P) == {}


def test_trending_order_is_by_decayed_weight() -> None:
    old = ev("i1", EventType.SHARE, T0)  # weight 5, 12 hours old at the end: 1.25
    new = ev("i3", EventType.VIEW, T0 + timedelta(hours=12))  # weight 1, 0 hours old: 1
    new2 = ev("i3", EventType.VIEW, T0 + timedelta(hours=12))
    scores: dict[str, float] = defaultdict(float)
    epoch = trending.epoch_of(new.ts_s, P)
    for (scope, target), per_item in trending.increments([old, new, new2], ITEMS, P).items():
        if scope == TrendingScope.everywhere() and target == epoch:
            for item, amount in per_item.items():
                scores[item] += amount
    assert sorted(scores, key=scores.__getitem__, reverse=True) == ["i3", "i1"]


# -- parity --------------------------------------------------------------------------------------


def _random_stream(rng: random.Random, n: int) -> list[EventRecord]:
    items = [*ITEMS, "unknown-1", "unknown-2"]
    t = T0
    events = []
    for i in range(n):
        gap = rng.choice([0.0, 1.0, 30.0, 600.0, 1900.0, 4 * 3600.0, 3 * 86400.0])
        t = t + timedelta(seconds=gap * rng.random())
        kind = rng.choice(list(EventType))
        events.append(
            EventRecord(
                event_id=f"{rng.getrandbits(32):08x}-{i}",
                user_id=rng.choice(["u1", "u2", "u3"]),
                item_id=rng.choice(items),
                event_type=kind,
                ts=t,
                watch_time_s=rng.uniform(0, 900) if kind is EventType.WATCH else None,
                region=rng.choice([None, "eu", "us"]),
            )
        )
    return sorted(events, key=lambda e: e.sort_key)


def _by_entity(view: FeatureView, events: Sequence[EventRecord]) -> dict[str, list[EventRecord]]:
    groups: dict[str, list[EventRecord]] = defaultdict(list)
    for event in events:
        key = view.entity_key(event, ITEMS.get(event.item_id))
        if key is not None:
            groups[key].append(event)
    return groups


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.name)
def test_folding_in_batches_with_json_round_trips_equals_one_pass(view: FeatureView, seed: int) -> None:
    rng = random.Random(seed)
    events = _random_stream(rng, rng.randint(50, 400))
    offline = {key: view.update({}, evs, ITEMS, P) for key, evs in _by_entity(view, events).items()}

    online: dict[str, State] = {}
    start = 0
    while start < len(events):
        stop = start + rng.randint(1, 40)
        batch = events[start:stop]
        rng.shuffle(batch)  # arrival order within a batch must not matter
        for key, evs in _by_entity(view, batch).items():
            online[key] = json.loads(json.dumps(view.update(online.get(key, {}), evs, ITEMS, P)))
        start = stop

    assert online.keys() == offline.keys()
    for now in (events[-1].ts, events[-1].ts + timedelta(minutes=rng.randint(1, 20_000))):
        for key in offline:
            assert view.serve(online[key], now, P) == view.serve(offline[key], now, P), (key, now)
    assert json.loads(json.dumps(offline)) == online
