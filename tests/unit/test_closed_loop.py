"""The closed loop's pure parts: the user reaction model, the bodies sent back, CTR and its interval."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from core.lake import Lake
from core.schema import EventType, FeedbackRequest, UserEvent
from core.tables import EVENTS
from training.experiments.closed_loop import (
    FEEDBACK_TYPES,
    LoopReport,
    Reactions,
    RoundResult,
    RoundTraffic,
    ServedList,
    TrafficConfig,
    ctr_estimate,
    react,
    reaction_bodies,
    wait_for_lake,
)
from training.experiments.simulated_experiment import WORSE_ARM, experiment_arms
from training.synthetic import WorldConfig, WorldTruth, build_truth, outcome_probabilities


@pytest.fixture(scope="module")
def truth() -> WorldTruth:
    return build_truth(WorldConfig.tiny(n_events=0, seed=3))


def _pairs(truth: WorldTruth, n: int, seed: int) -> tuple[list[str], list[str], list[int]]:
    rng = np.random.default_rng(seed)
    users = [truth.user_ids[k] for k in rng.integers(0, truth.n_users, n)]
    items = [truth.item_ids[k] for k in rng.integers(0, truth.n_items, n)]
    positions = rng.integers(0, 10, n).tolist()
    return users, items, positions


def test_reaction_rates_follow_the_world_probabilities(truth: WorldTruth) -> None:
    # One exposure repeated many times: each outcome's frequency must match its probability.
    n = 40_000
    user, item = truth.user_ids[5], truth.item_ids[17]
    reactions = react(truth, [user] * n, [item] * n, [2] * n, np.random.default_rng(0))
    probs = {k: float(v[0]) for k, v in outcome_probabilities(truth, [user], [item], [2]).items()}
    click = probs[EventType.CLICK]
    no_click = 1 - click
    expected = {
        "click": click,
        "like": click * probs[EventType.LIKE],
        "purchase": click * probs[EventType.PURCHASE],
        "report": no_click * probs[EventType.REPORT],
        "hide": no_click * probs[EventType.HIDE],
        "skip": no_click * probs[EventType.SKIP],
    }
    for name, p in expected.items():
        observed = float(getattr(reactions, name).mean())
        tolerance = 4 * math.sqrt(p * (1 - p) / n) + 1e-4
        assert abs(observed - p) < tolerance, (name, observed, p)


def test_reactions_are_consistent_and_follow_affinity(truth: WorldTruth) -> None:
    users, items, positions = _pairs(truth, 20_000, 1)
    r = react(truth, users, items, positions, np.random.default_rng(1))
    # What follows a click never happens without one; negative reactions exclude one another.
    for follows_click in (r.view, r.like, r.share, r.purchase, ~np.isnan(r.watch_s)):
        assert not (follows_click & ~r.click).any()
    negatives = np.stack([r.skip, r.hide, r.not_interested, r.report]).astype(int)
    assert not (negatives.sum(axis=0) > 1).any()
    assert not (negatives.sum(axis=0).astype(bool) & r.click).any()
    # Users click what they like: clicked pairs have a higher true affinity than the others.
    affinity = truth.affinity(truth.user_index(users), truth.item_index(items))
    assert affinity[r.click].mean() > affinity[~r.click].mean() + 0.1


def test_reactions_are_reproducible_from_the_seed(truth: WorldTruth) -> None:
    users, items, positions = _pairs(truth, 500, 2)
    a = react(truth, users, items, positions, np.random.default_rng([7, 1, 0]))
    b = react(truth, users, items, positions, np.random.default_rng([7, 1, 0]))
    c = react(truth, users, items, positions, np.random.default_rng([7, 1, 1]))
    assert np.array_equal(a.click, b.click) and np.array_equal(a.hide, b.hide)
    assert not np.array_equal(a.click, c.click)


def _reactions(**set_slots: list[int]) -> Reactions:
    n = 4
    fields: dict[str, np.ndarray] = {
        name: np.zeros(n, dtype=bool)
        for name in ("click", "view", "like", "share", "purchase", "skip", "hide", "not_interested", "report")
    }
    for name, slots in set_slots.items():
        fields[name][slots] = True
    watch = np.full(n, np.nan)
    watch[0] = 42.5
    return Reactions(watch_s=watch, **fields)


def test_bodies_go_to_the_right_route_and_pass_the_api_models() -> None:
    reactions = _reactions(click=[0], view=[0], like=[0], skip=[1], hide=[2], report=[3])
    served = [{"itemId": f"i{k}", "position": k} for k in range(4)]
    at = datetime(2026, 1, 1, tzinfo=UTC)
    events, feedback = reaction_bodies(
        "u1", served, reactions, request_id="req-1", surface="home", at=at, event_prefix="sim-x-r0-1-0"
    )
    parsed = [UserEvent.model_validate(e) for e in events]
    assert [(e.item_id, e.event_type) for e in parsed] == [
        ("i0", EventType.CLICK),
        ("i0", EventType.VIEW),
        ("i0", EventType.WATCH),
        ("i0", EventType.LIKE),
        ("i1", EventType.SKIP),
    ]
    assert parsed[2].watch_time_s == 42.5
    assert all(e.context.request_id == "req-1" and e.context.surface == "home" for e in parsed)
    assert len({e.event_id for e in parsed}) == len(parsed)
    stamps = [e.timestamp for e in parsed]
    assert stamps == sorted(stamps) and stamps[0] > at
    bodies = [FeedbackRequest.model_validate(f) for f in feedback]
    assert [(b.item_id, b.feedback.value) for b in bodies] == [("i2", "hide"), ("i3", "report")]
    assert {EventType(b.feedback.value) for b in bodies} <= FEEDBACK_TYPES


def test_ctr_interval_is_the_clustered_delta_method() -> None:
    rng = np.random.default_rng(4)
    shown = np.full(400, 10)
    clicks = rng.binomial(10, rng.uniform(0.05, 0.4, 400))
    estimate = ctr_estimate(clicks, shown, alpha=0.05)
    assert estimate.value == pytest.approx(clicks.sum() / shown.sum())
    # With equal impressions per user the delta method reduces to the spread of per-user CTRs.
    per_user = clicks / shown
    se = per_user.std(ddof=1) / math.sqrt(len(per_user))
    assert estimate.std_error == pytest.approx(se, rel=1e-9)
    assert estimate.ci_low == pytest.approx(estimate.value - 1.959964 * se, rel=1e-5)
    # A user-level spread wider than the binomial one widens the interval.
    binomial_se = math.sqrt(estimate.value * (1 - estimate.value) / shown.sum())
    assert estimate.std_error > binomial_se


def _served(
    user: str, clicks: int, size: int, fallback: str | None = None, arm: str | None = None
) -> ServedList:
    return ServedList(
        user_id=user,
        request_id=f"r-{user}-{clicks}",
        model_version="v1",
        experiment=None,
        arm=arm,
        fallback=fallback,
        item_ids=tuple(f"i{k}" for k in range(size)),
        clicks=clicks,
        likes=0,
        negatives=0,
        events_sent=clicks,
    )


def test_round_figures_come_from_the_lists(tmp_path: Path) -> None:
    traffic = RoundTraffic(
        lists=[_served("u1", 2, 10), _served("u1", 0, 10, "popular"), _served("u2", 5, 10)],
        errors={"feedback 503": 1},
    )
    result = RoundResult.of(0, traffic, alpha=0.05)
    assert (result.users, result.requests, result.impressions, result.clicks) == (2, 3, 30, 7)
    assert result.ctr.value == pytest.approx(7 / 30)
    assert result.fallbacks == {"popular": 1}
    assert result.errors == {"feedback 503": 1}
    report = LoopReport(world={"preset": "tiny"}, traffic=TrafficConfig(), alpha=0.05, rounds=[result])
    assert "0.2333" in report.render()
    assert report.write_json(tmp_path / "loop.json").exists()
    png = report.plot(tmp_path / "loop.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wait_for_lake_returns_once_rows_are_there_and_times_out_otherwise(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    with pytest.raises(TimeoutError, match="0 of 3 events"):
        wait_for_lake(lake, events=3, impressions=0, timeout_s=0.2, poll_s=0.05)
    rows = pa.table(
        {
            "event_id": ["e1", "e2", "e3"],
            "user_id": ["u1", "u1", "u2"],
            "item_id": ["i1", "i2", "i1"],
            "event_type": ["click", "view", "click"],
            "ts": pa.array([datetime(2026, 1, 1, tzinfo=UTC)] * 3, EVENTS.schema.field("ts").type),
        }
    )
    lake.append("events", rows)
    assert wait_for_lake(lake, events=3, impressions=0, timeout_s=5, poll_s=0.05) == (3, 0)
    # Impressions serving dropped never come: an unchanged count ends the wait, missing events do not.
    assert wait_for_lake(lake, events=3, impressions=5, timeout_s=5, poll_s=0.05, settle_s=0.3) == (3, 0)
    with pytest.raises(TimeoutError, match="3 of 4 events"):
        wait_for_lake(lake, events=4, impressions=0, timeout_s=0.3, poll_s=0.05, settle_s=0.1)


def test_ab_arms_split_users_in_half_and_only_the_worse_arm_overrides() -> None:
    control, worse = experiment_arms("ab")
    assert control.share == worse.share == 0.5
    assert control.overrides.overridden() == frozenset()
    assert worse.overrides == WORSE_ARM and worse.overrides.exploration_share == 0.9
    a, b = experiment_arms("aa")
    assert a.overrides == b.overrides and a.name != b.name


def test_paired_change_uses_the_users_common_to_both_rounds() -> None:
    cold = RoundResult.of(0, RoundTraffic(lists=[_served("u1", 1, 10), _served("u2", 2, 10)]), alpha=0.05)
    later = RoundResult.of(
        1, RoundTraffic(lists=[_served("u1", 3, 10), _served("u2", 4, 10), _served("u3", 9, 10)]), alpha=0.05
    )
    report = LoopReport(world={"preset": "tiny"}, traffic=TrafficConfig(), alpha=0.05, rounds=[cold, later])
    paired = report.paired_change()
    assert paired is not None
    # u3 was not served at cold start: left out of the paired figure, kept in the round's CTR.
    assert paired.difference.value == pytest.approx(7 / 20 - 3 / 20)
    assert "paired by user" in report.render()
    assert report.as_dict()["ctr_change_paired"]["p_value"] is not None


def test_retraining_is_measured_against_the_last_cold_round() -> None:
    rounds = [
        RoundResult.of(n, RoundTraffic(lists=[_served("u1", c, 10), _served("u2", c, 10)]), alpha=0.05)
        for n, c in enumerate([5, 2, 4])
    ]
    report = LoopReport(world={}, traffic=TrafficConfig(), alpha=0.05, rounds=rounds, cold_rounds=2)
    assert report.baseline is rounds[1]
    assert report.ctr_change == pytest.approx(0.4 - 0.2)
    assert "without a model (round 1)" in report.render()
    only_cold = LoopReport(world={}, traffic=TrafficConfig(), alpha=0.05, rounds=rounds[:2], cold_rounds=2)
    assert only_cold.baseline is None and math.isnan(only_cold.ctr_change)
