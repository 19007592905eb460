"""An A/B (or A/A) test run through the simulator against the live application.

The experiment is written to the online store (:func:`features.experiment_store.update_experiments`,
what the admin routes do), started, and every ingress replica picks it up on its next refresh;
the application then assigns each simulated user an arm, applies the arm's overrides and logs the
arm with every served list. After a round of traffic the experiment is stopped and
:func:`training.experiments.analysis.analyse_experiment` (``rayrec experiments report``) reads the
logged impressions and events from the lake.

* ``ab``: ``control`` is default serving; ``explore_90`` gives 90 % of the list's slots to
  exploration items, a deliberately worse arm (mostly unranked items).
* ``aa``: two arms with no overrides.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Final, Literal

import httpx

from core.lake import Lake
from features.experiment_store import update_experiments
from features.redis_store import RedisStore
from policies.experiments import (
    BUCKETS,
    Arm,
    ArmOverrides,
    ExperimentConfig,
    ExperimentRegistry,
    Layer,
)
from training.experiments.analysis import AnalysisConfig, AnalysisWindow, analyse_experiment
from training.experiments.closed_loop import ClosedLoop, RoundTraffic, ctr_estimate
from training.experiments.report import ExperimentReport
from training.experiments.stats import Estimate

ExperimentKind = Literal["ab", "aa"]

WORSE_ARM: Final = ArmOverrides(exploration_share=0.9)
"""Overrides of the deliberately worse arm of an A/B test: nine slots in ten explore.

Serving from ``trending`` alone was tried first and is not reliably worse here: on this world a
release trained on one round of the loop loses to the non-personal sources (see the README)."""


class ExperimentNotServed(RuntimeError):
    """The application does not report the experiment in its answers (assignment not wired in)."""


def experiment_arms(kind: ExperimentKind) -> tuple[Arm, Arm]:
    """The two arms of a simulated experiment, half of the users each.

    Args:
        kind: ``ab`` (default serving against :data:`WORSE_ARM`) or ``aa`` (two identical arms).

    Returns:
        ``(control, treatment)``.
    """
    control = Arm(name="control", share=0.5)
    if kind == "ab":
        return control, Arm(name="explore_90", share=0.5, overrides=WORSE_ARM)
    return control, Arm(name="control_copy", share=0.5)


@dataclass(frozen=True)
class SimulatedExperiment:
    """The outcome of an experiment run through the simulator.

    Attributes:
        kind: ``ab`` or ``aa``.
        experiment: The experiment's configuration after it was stopped.
        report: The analysis of the logged impressions and events.
        simulated_ctr: CTR per arm straight from the simulated outcomes, by the arm each answer
            named (a cross-check of the analysis' join).
        alpha: Significance level.
    """

    kind: ExperimentKind
    experiment: ExperimentConfig
    report: ExperimentReport
    simulated_ctr: dict[str, Estimate]
    alpha: float

    @property
    def treatment(self) -> str:
        """The arm compared with control."""
        return next(a.arm for a in self.report.arms if not a.is_control)

    @property
    def p_value(self) -> float:
        """p-value of the treatment's CTR against control's."""
        comparison = self.report.arm(self.treatment).metrics["ctr"].vs_control
        return math.nan if comparison is None else comparison.p_value

    @property
    def difference(self) -> float:
        """Treatment CTR minus control CTR, from the analysis."""
        comparison = self.report.arm(self.treatment).metrics["ctr"].vs_control
        return math.nan if comparison is None else comparison.difference.value

    @property
    def as_expected(self) -> bool:
        """A/B: control ahead with ``p < alpha``; A/A: no significant difference; both: no SRM."""
        if self.report.srm.flagged or math.isnan(self.p_value):
            return False
        if self.kind == "ab":
            return self.difference < 0 and self.p_value < self.alpha
        return self.p_value >= self.alpha

    def verdict(self) -> str:
        """One line saying what the test found."""
        ctr = ", ".join(
            f"{arm} {e.value:.4f} [{e.ci_low:.4f}, {e.ci_high:.4f}]" for arm, e in self.simulated_ctr.items()
        )
        srm = "SRM flagged" if self.report.srm.flagged else f"no SRM (p {self.report.srm.p_value:.3g})"
        found = (
            f"{self.treatment} - control CTR {self.difference:+.4f}, p {self.p_value:.3g}, {srm}; "
            f"simulated CTR per arm: {ctr}"
        )
        expected = (
            "control ahead with p < alpha and no SRM"
            if self.kind == "ab"
            else "no significant difference and no SRM"
        )
        return f"{self.kind.upper()}: {found}. Expected {expected}: {'yes' if self.as_expected else 'NO'}"


def register_experiment(store: RedisStore, kind: ExperimentKind, label: str) -> ExperimentConfig:
    """Add a layer and a two-arm experiment holding every bucket of it, and start it.

    Args:
        store: The online store the application reads experiments from.
        kind: ``ab`` or ``aa``.
        label: Unique suffix of the ids and salts (``[a-z0-9]``).

    Returns:
        The started experiment.
    """
    layer = Layer(name=f"sim-{label}", salt=f"sim-layer-{label}")
    experiment = ExperimentConfig(
        id=f"sim-{kind}-{label}",
        salt=f"sim-{kind}-{label}",
        layer=layer.name,
        arms=experiment_arms(kind),
        description=f"simulated {kind.upper()} test",
    )

    def change(registry: ExperimentRegistry) -> ExperimentConfig:
        registry.add_layer(layer)
        registry.register(experiment, buckets=(0, BUCKETS))
        return registry.start(experiment.id)

    return update_experiments(store, change)[1]


def stop_experiment(store: RedisStore, experiment_id: str) -> ExperimentConfig:
    """Stop an experiment; its users get default serving from then on."""
    return update_experiments(store, lambda registry: registry.stop(experiment_id))[1]


def wait_until_served(
    base_url: str, users: list[str], experiment_id: str, *, timeout_s: float = 30.0
) -> None:
    """Wait until an answer names the experiment (replicas refresh their snapshot about once a second).

    Raises:
        ExperimentNotServed: No answer named it within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base_url, timeout=30) as http:
        while time.monotonic() < deadline:
            for user in users[:5]:
                response = http.get("/api/recommendations", params={"userId": user, "limit": 1})
                if response.status_code == 200 and response.json().get("experiment") == experiment_id:
                    return
            time.sleep(0.5)
    raise ExperimentNotServed(
        f"after {timeout_s:.0f} s no answer names experiment {experiment_id!r}: the application does "
        "not assign experiments yet (the response's experiment and arm stay null)"
    )


def simulated_ctr_by_arm(traffic: RoundTraffic, alpha: float) -> dict[str, Estimate]:
    """CTR per arm from the simulated outcomes, user-clustered, by the arm each answer named."""
    clicks: dict[str, dict[str, int]] = {}
    shown: dict[str, dict[str, int]] = {}
    for s in traffic.lists:
        arm = s.arm or "none"
        clicks.setdefault(arm, {})
        shown.setdefault(arm, {})
        clicks[arm][s.user_id] = clicks[arm].get(s.user_id, 0) + s.clicks
        shown[arm][s.user_id] = shown[arm].get(s.user_id, 0) + len(s.item_ids)
    return {
        arm: ctr_estimate(
            [clicks[arm][u] for u in sorted(shown[arm])], [shown[arm][u] for u in sorted(shown[arm])], alpha
        )
        for arm in sorted(shown)
    }


def run_simulated_experiment(
    loop: ClosedLoop,
    store: RedisStore,
    lake: Lake,
    *,
    kind: ExperimentKind,
    warmup_rounds: int = 1,
    alpha: float = 0.05,
) -> SimulatedExperiment:
    """Warm up (rounds with retraining), run one round inside an experiment, and analyse it.

    Args:
        loop: The closed loop against the running application.
        store: The online store the application reads experiments from.
        lake: The lake the application logs to.
        kind: ``ab`` or ``aa``.
        warmup_rounds: Rounds of traffic, each followed by a retraining, before the experiment,
            so the control arm serves a trained model.
        alpha: Significance level.

    Returns:
        The outcome.

    Raises:
        ExperimentNotServed: The application does not assign experiments.
    """
    for number in range(warmup_rounds):
        loop.round(number)
        loop.retrain()
    experiment = register_experiment(store, kind, uuid.uuid4().hex[:8])
    try:
        wait_until_served(loop.serving.base_url, loop.users, experiment.id)
        _, traffic = loop.drive(warmup_rounds)
    finally:
        stopped = stop_experiment(store, experiment.id)
    # The window opens with the round, so the readiness probes above (answers nobody reacted to)
    # stay out of the analysis.
    window = AnalysisWindow(start=traffic.started_at)
    report = analyse_experiment(lake, stopped, AnalysisConfig(alpha=alpha, window=window))
    return SimulatedExperiment(
        kind=kind,
        experiment=stopped,
        report=report,
        simulated_ctr=simulated_ctr_by_arm(traffic, alpha),
        alpha=alpha,
    )
