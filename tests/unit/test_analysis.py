"""Experiment analysis without Ray: the statistics, and each stage function on hand-made tables."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from core.lake import conform
from core.tables import EVENTS, IMPRESSIONS, ITEMS
from policies.experiments import Arm, ExperimentConfig
from training.experiments import analysis as A
from training.experiments.report import ExperimentReport
from training.experiments.stats import (
    RatioMoments,
    bootstrap_ratio,
    compare,
    ratio_estimate,
    srm_check,
    two_sided_p,
    z_quantile,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EXPERIMENT = ExperimentConfig(
    id="exp_t",
    salt="exp-t",
    layer="ranking",
    arms=(Arm(name="control", share=0.5), Arm(name="treatment", share=0.5)),
)


# -- statistics ---------------------------------------------------------------------------------


def test_delta_method_matches_the_binomial_variance_with_one_impression_per_user() -> None:
    rng = np.random.default_rng(0)
    clicks = (rng.random(5_000) < 0.1).astype(float)
    moments = RatioMoments.of(clicks, np.ones_like(clicks))
    p = clicks.mean()
    assert moments.ratio == pytest.approx(p)
    assert moments.variance == pytest.approx(clicks.var(ddof=1) / len(clicks))


def test_delta_method_agrees_with_a_user_bootstrap_on_clustered_data() -> None:
    rng = np.random.default_rng(1)
    n = 3_000
    impressions = rng.integers(1, 30, n).astype(float)
    taste = rng.beta(1, 8, n)  # users differ: their impressions are correlated
    clicks = rng.binomial(impressions.astype(int), taste).astype(float)
    moments = RatioMoments.of(clicks, impressions)
    low, high = bootstrap_ratio([clicks], impressions, samples=2_000, alpha=0.05, seed=2)[0]
    delta = ratio_estimate(moments, 0.05)
    assert delta.ci_low == pytest.approx(low, rel=0.02)
    assert delta.ci_high == pytest.approx(high, rel=0.02)
    # Treating impressions as independent would understate the standard error.
    p = moments.ratio
    naive = math.sqrt(p * (1 - p) / impressions.sum())
    assert delta.std_error > 1.5 * naive


def test_moments_add_up_across_batches() -> None:
    rng = np.random.default_rng(3)
    y, x = rng.random(100), rng.random(100) + 1
    whole = RatioMoments.of(y, x)
    parts = RatioMoments.of(y[:40], x[:40]) + RatioMoments.of(y[40:], x[40:])
    assert parts.ratio == pytest.approx(whole.ratio)
    assert parts.variance == pytest.approx(whole.variance)


def test_compare_reports_difference_lift_and_p_value() -> None:
    control = RatioMoments.of(np.r_[np.ones(100), np.zeros(900)], np.ones(1000))
    treatment = RatioMoments.of(np.r_[np.ones(150), np.zeros(850)], np.ones(1000))
    result = compare(treatment, control, 0.05)
    assert result.difference.value == pytest.approx(0.05)
    assert result.relative.value == pytest.approx(0.5)
    se = math.sqrt(treatment.variance + control.variance)
    assert result.z == pytest.approx(0.05 / se)
    assert result.p_value == pytest.approx(two_sided_p(0.05 / se))
    assert 0 < result.p_value < 0.01
    same = compare(control, control, 0.05)
    assert same.p_value == pytest.approx(1.0)
    assert z_quantile(0.05) == pytest.approx(1.959964, abs=1e-6)


def test_srm_flags_a_broken_split_and_unknown_arms() -> None:
    shares = {"control": 0.5, "treatment": 0.5}
    assert not srm_check({"control": 5_020, "treatment": 4_980}, shares).flagged
    broken = srm_check({"control": 5_300, "treatment": 4_700}, shares)
    assert broken.flagged and broken.p_value < 1e-6
    stray = srm_check({"control": 50, "treatment": 50, "ghost": 3}, shares)
    assert stray.flagged and stray.unexpected_arms == ("ghost",)


# -- stages -------------------------------------------------------------------------------------


def _impressions(rows: list[tuple[str, str, str, int, str, datetime]]) -> pa.Table:
    """``(request_id, user_id, item_id, position, arm, served_at)`` rows of experiment ``exp_t``."""
    return conform(
        IMPRESSIONS,
        pa.table(
            {
                "request_id": [r[0] for r in rows],
                "user_id": [r[1] for r in rows],
                "surface": ["home"] * len(rows),
                "item_id": [r[2] for r in rows],
                "position": pa.array([r[3] for r in rows], pa.int32()),
                "experiment_id": ["exp_t"] * len(rows),
                "arm": [r[4] for r in rows],
                "served_at": [r[5] for r in rows],
            }
        ),
    )


def _events(
    rows: Sequence[tuple[str, str, str, str, datetime, str | None]], watch_s: float | None = None
) -> pa.Table:
    """``(event_id, user_id, item_id, event_type, ts, request_id)`` rows."""
    return conform(
        EVENTS,
        pa.table(
            {
                "event_id": [r[0] for r in rows],
                "user_id": [r[1] for r in rows],
                "item_id": [r[2] for r in rows],
                "event_type": [r[3] for r in rows],
                "ts": [r[4] for r in rows],
                "request_id": pa.array([r[5] for r in rows], pa.string()),
                "watch_time_s": pa.array([watch_s if r[3] == "watch" else None for r in rows], pa.float32()),
            }
        ),
    )


def _items(categories: dict[str, str], created: datetime = T0 - timedelta(hours=10)) -> pa.Table:
    n = len(categories)
    return conform(
        ITEMS,
        pa.table(
            {
                "item_id": list(categories),
                "item_type": ["video"] * n,
                "category": list(categories.values()),
                "creator_id": ["c1"] * n,
                "status": ["active"] * n,
                "created_at": [created] * n,
                "updated_at": [created] * n,
            }
        ),
    )


def _label(impressions: pa.Table, events: pa.Table, items: pa.Table | None = None) -> pa.Table:
    """The three stages, in process, on one partition holding everything."""
    items = items if items is not None else _items({})
    stats = A.summarise_items(pa.concat_tables([A.item_input_rows(items), A.popularity_rows(events)]))
    exposures = A.exposure_rows(impressions, experiment_id="exp_t")
    with_items = A.attach_items(pa.concat_tables([exposures, A.item_stat_rows(stats)]))
    return A.label_impressions(pa.concat_tables([with_items, A.event_rows(events)]))


def test_events_join_by_request_id_and_by_time_window() -> None:
    impressions = _impressions(
        [
            ("r1", "u1", "i1", 0, "control", T0),
            ("r1", "u1", "i2", 1, "control", T0),
            ("r2", "u1", "i1", 0, "control", T0 + timedelta(hours=2)),
            ("r3", "u2", "i3", 0, "treatment", T0),
        ]
    )
    events = _events(
        [
            ("e1", "u1", "i2", "click", T0 + timedelta(seconds=5), "r1"),  # by request id
            ("e1", "u1", "i2", "click", T0 + timedelta(seconds=5), "r1"),  # a second delivery
            ("e2", "u1", "i1", "like", T0 + timedelta(hours=3), None),  # latest impression of i1: r2
            ("e3", "u2", "i3", "click", T0 + timedelta(hours=25), None),  # beyond 24 h
            ("e4", "u2", "i3", "hide", T0 - timedelta(minutes=1), None),  # before any impression
            ("e5", "u1", "i1", "click", T0 + timedelta(seconds=9), "other-request"),  # not this experiment
            ("e6", "u1", "i1", "watch", T0 + timedelta(hours=2, minutes=1), "r2"),
            ("e7", "u2", "i1", "report", T0 + timedelta(seconds=7), "r1"),  # another user's request
        ],
        watch_s=42.0,
    )
    labelled = _label(impressions, events).to_pylist()
    by_slot = {(r["request_id"], r["item_id"]): r for r in labelled}
    assert len(labelled) == 4
    assert by_slot[("r1", "i2")]["clicked"] and by_slot[("r1", "i2")]["events_by_request"] == 1
    assert not by_slot[("r1", "i1")]["clicked"] and not by_slot[("r1", "i1")]["liked"]
    assert by_slot[("r2", "i1")]["liked"] and by_slot[("r2", "i1")]["events_by_window"] == 1
    assert by_slot[("r2", "i1")]["watch_s"] == pytest.approx(42.0)
    assert not by_slot[("r3", "i3")]["clicked"] and not by_slot[("r3", "i3")]["hidden"]
    assert not any(r["reported"] for r in labelled)


def test_a_request_id_event_outside_the_window_does_not_count() -> None:
    impressions = _impressions([("r1", "u1", "i1", 0, "control", T0)])
    events = _events([("e1", "u1", "i1", "purchase", T0 + timedelta(hours=30), "r1")])
    assert not _label(impressions, events).column("purchased")[0].as_py()
    wide = A.label_impressions(
        pa.concat_tables([A.exposure_rows(impressions, experiment_id="exp_t"), A.event_rows(events)]),
        attribution_window_h=48,
    )
    assert wide.column("purchased")[0].as_py()


def test_duplicate_impressions_are_counted_once_and_other_experiments_ignored() -> None:
    impressions = _impressions([("r1", "u1", "i1", 0, "control", T0), ("r1", "u1", "i1", 0, "control", T0)])
    other = impressions.set_column(
        impressions.column_names.index("experiment_id"), "experiment_id", pa.array(["exp_other"] * 2)
    )
    labelled = _label(pa.concat_tables([impressions, other]), _events([]))
    assert labelled.num_rows == 1


def test_user_sums_compute_diversity_novelty_and_age() -> None:
    impressions = _impressions(
        [
            ("r1", "u1", "i1", 0, "control", T0),
            ("r1", "u1", "i2", 1, "control", T0),
            ("r1", "u1", "i3", 2, "control", T0),
            ("r2", "u1", "i4", 0, "control", T0 + timedelta(hours=1)),  # a one-item list: no pairs
            ("r3", "u2", "i1", 0, "treatment", T0),
        ]
    )
    events = _events(
        [
            ("e1", "u1", "i1", "click", T0 + timedelta(seconds=3), "r1"),
            ("e2", "u9", "i1", "view", T0, None),  # counts for popularity only
        ]
    )
    items = _items({"i1": "a", "i2": "a", "i3": "b", "i4": "c"})
    labelled = _label(impressions, events, items)
    sums = A.user_metric_sums(labelled, total_events=2, catalogue_items=4)
    rows = {(r["arm"], r["user_id"]): r for r in sums.to_pylist()}
    u1 = rows[("control", "u1")]
    assert u1["impressions"] == 4 and u1["clicks"] == 1
    assert u1["lists"] == 1
    # Pairs of [a, a, b]: one of three share a category.
    assert u1["diversity_sum"] == pytest.approx(2 / 3)
    # i1 has two events: p = 3 / 6; the others none: p = 1 / 6.
    assert u1["novelty_sum"] == pytest.approx(-math.log2(3 / 6) - 3 * math.log2(1 / 6))
    assert u1["age_h_sum"] == pytest.approx(10 + 10 + 10 + 11)
    assert rows[("treatment", "u2")]["multi_arm"] == 0


def test_a_user_in_two_arms_is_flagged() -> None:
    impressions = _impressions(
        [("r1", "u1", "i1", 0, "control", T0), ("r2", "u1", "i2", 0, "treatment", T0 + timedelta(hours=1))]
    )
    sums = A.user_metric_sums(_label(impressions, _events([])), total_events=0, catalogue_items=2)
    assert sums.column("multi_arm").to_pylist() == [1.0, 1.0]


def test_partial_sums_give_the_same_totals_in_any_batching() -> None:
    rng = np.random.default_rng(4)
    n = 200
    rows = [
        (f"r{k}", f"u{k % 50}", f"i{rng.integers(20)}", 0, "control" if k % 50 < 25 else "treatment", T0)
        for k in range(n)
    ]
    clicks = [
        (f"e{k}", r[1], r[2], "click", T0 + timedelta(seconds=1), r[0])
        for k, r in enumerate(rows)
        if k % 3 == 0
    ]
    sums = A.user_metric_sums(
        _label(_impressions(rows), _events(clicks)), total_events=len(clicks), catalogue_items=20
    )
    whole = A.arm_totals(A.arm_partial_sums(sums))
    halves = A.arm_totals(
        pa.concat_tables([A.arm_partial_sums(sums.slice(0, 20)), A.arm_partial_sums(sums.slice(20))])
    )
    for arm in ("control", "treatment"):
        assert whole[arm].users == 25
        for name in ("ctr", "negative_feedback_rate", "novelty_bits"):
            assert halves[arm].moments[name].ratio == pytest.approx(whole[arm].moments[name].ratio)
            assert halves[arm].moments[name].variance == pytest.approx(whole[arm].moments[name].variance)


# -- the report ---------------------------------------------------------------------------------


def _totals(clicks: dict[str, tuple[int, int]], negatives: dict[str, int]) -> dict[str, A.ArmTotals]:
    """Arms of 1,000 users with 10 impressions each; ``clicks[arm] = (users clicking once, twice)``."""
    out: dict[str, A.ArmTotals] = {}
    for arm, (once, twice) in clicks.items():
        users = 1_000
        c = np.r_[np.ones(once), 2 * np.ones(twice), np.zeros(users - once - twice)]
        neg = np.r_[np.ones(negatives[arm]), np.zeros(users - negatives[arm])]
        table = pa.table(
            {"arm": [arm] * users, "user_id": [f"u{k}" for k in range(users)]}
            | {column: np.zeros(users) for column in A.SUM_COLUMNS}
        )
        for column, values in {
            "impressions": np.full(users, 10.0),
            "novelty_n": np.full(users, 10.0),
            "clicks": c,
            "negatives": neg,
        }.items():
            table = table.set_column(table.column_names.index(column), column, pa.array(values))
        out |= A.arm_totals(A.arm_partial_sums(table.cast(A.USER_SUMS_SCHEMA)))
    return out


def _report(totals: dict[str, A.ArmTotals]) -> ExperimentReport:
    return A.build_report(
        EXPERIMENT,
        totals,
        items_served={"control": 40, "treatment": 60},
        catalogue_items=100,
        config=A.AnalysisConfig(),
        window=A.AnalysisWindow(start=T0),
    )


def test_report_compares_arms_and_checks_guardrails(tmp_path: Path) -> None:
    report = _report(
        _totals({"control": (300, 0), "treatment": (300, 100)}, {"control": 10, "treatment": 60})
    )
    treatment = report.arm("treatment")
    assert treatment.metrics["ctr"].estimate.value == pytest.approx(0.05)
    vs = treatment.metrics["ctr"].vs_control
    assert vs is not None and vs.p_value < 0.001 and vs.relative.value == pytest.approx(2 / 3)
    assert treatment.coverage == pytest.approx(0.6)
    assert not report.srm.flagged
    negative = next(g for g in report.guardrails if g.metric == "negative_feedback_rate")
    assert negative.status == "fail" and not report.guardrails_pass
    fallback = next(g for g in report.guardrails if g.metric == "fallback_rate")
    assert fallback.status == "pass"

    text = report.render()
    assert "ctr" in text and "treatment" in text and "FAIL" in text and "sample ratio: ok" in text
    data = json.loads(report.to_json())
    assert data["arms"][1]["metrics"]["ctr"]["vs_control"]["p_value"] < 0.001
    assert data["guardrails_pass"] is False
    png = report.plot_ctr(tmp_path / "ctr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_flags_sample_ratio_mismatch() -> None:
    totals = _totals({"control": (100, 0), "treatment": (100, 0)}, {"control": 0, "treatment": 0})
    skewed = dict(totals)
    skewed["control"] = A.ArmTotals(
        users=1_300, sums=totals["control"].sums, moments=totals["control"].moments
    )
    report = _report(skewed)
    assert report.srm.flagged
    assert any("sample-ratio mismatch" in note for note in report.notes)
    assert "MISMATCH" in report.render()


def test_guardrail_config_refuses_unknown_metrics() -> None:
    with pytest.raises(ValueError, match="latency_ms"):
        A.Guardrail(metric="latency_ms")
