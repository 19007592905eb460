"""Off-policy evaluation: a target ranking policy's CTR estimated from a logging policy's impressions.

**Formulation (item-position IPS).** A logged slot is a request ``x``, a position ``k`` and the
item ``i`` shown there, with the logging policy's marginal probability ``p0 = pi_0(i at k | x)``
(``impressions.propensity``) and the click ``c``. The target policy answers
``p = pi(i at k | x)`` for the same slot. With ``w = p / p0``:

* IPS: ``sum w * c / N`` over the ``N`` logged slots;
* SNIPS (self-normalised): ``sum w * c / sum w``, biased in small samples but with much lower
  variance, and immune to a constant error in the propensities.

Both estimate the target's expected clicks per slot under the *position-based* assumption that
the click on a slot depends on the request, the item and the position, not on the other items of
the list. They are unbiased (IPS) or consistent (SNIPS) when the logging policy gives a
positive probability to every (item, position) the target can choose; a target placing items the
logging policy never could shows up as a mean weight below one.

Weights can be clipped at ``max_weight`` (bias towards lower values, for less variance); the
count of clipped rows and the effective sample size ``(sum w)^2 / sum w^2`` are reported.
Intervals are clustered by user, like the A/B metrics: each user's slots are one unit, with the
delta method on per-user sums (default) or a user-level bootstrap.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from training.experiments.stats import Estimate, RatioMoments, bootstrap_ratio, group_sum, ratio_estimate

if TYPE_CHECKING:
    from core.lake import Lake

F64 = npt.NDArray[np.float64]

CONTEXT_COLUMNS: Final[tuple[str, ...]] = (
    "request_id",
    "user_id",
    "surface",
    "item_id",
    "position",
    "score",
    "propensity",
    "model_version",
    "served_at",
)
"""Columns a :class:`TargetPolicy` receives: one logged slot per row, as in ``impressions``."""


@runtime_checkable
class TargetPolicy(Protocol):
    """A policy to evaluate offline.

    Attributes:
        name: Shown in the result.
    """

    name: str

    def probability(self, context: pa.Table) -> F64:
        """Probability the policy would put each row's item at each row's position.

        Args:
            context: Logged slots with :data:`CONTEXT_COLUMNS` (and maybe more).

        Returns:
            ``(rows,)`` probabilities in ``[0, 1]``, aligned with the rows.
        """
        ...


class OpeConfig(BaseModel):
    """How the estimates are computed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_weight: Annotated[float, Field(gt=0)] | None = None
    """Clip importance weights at this value; no clipping (unbiased IPS) when ``None``."""
    min_propensity: Annotated[float, Field(gt=0, le=1)] = 1e-9
    """Rows whose logged propensity is missing or below this are left out and counted."""
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    """One minus the intervals' coverage."""
    interval: Literal["delta", "bootstrap"] = "delta"
    """Delta method on per-user sums, or a user-level percentile bootstrap."""
    bootstrap_samples: Annotated[int, Field(ge=100, le=100_000)] = 1_000
    """Replicates of the bootstrap."""
    seed: Annotated[int, Field(ge=0)] = 0
    """Seed of the bootstrap."""


USER_SUMS_SCHEMA: Final = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("slots", pa.float64()),
        pa.field("clicks", pa.float64()),
        pa.field("weighted_clicks", pa.float64()),
        pa.field("weight_sum", pa.float64()),
        pa.field("weight_sq_sum", pa.float64()),
        pa.field("max_weight", pa.float64()),
        pa.field("clipped", pa.int64()),
        pa.field("dropped", pa.int64()),
    ]
)
"""Per-user sums the estimators need: the only thing collected on the driver."""


def user_sums(slots: pa.Table, target: TargetPolicy, config: OpeConfig) -> pa.Table:
    """Per-user importance-weighted sums of logged slots.

    Args:
        slots: Logged slots with :data:`CONTEXT_COLUMNS` and a boolean ``clicked``; every row of a
            user must be in this table (a Ray Data partition by ``user_id`` qualifies).
        target: The policy to evaluate.
        config: Clipping and the propensity floor.

    Returns:
        One row per user with :data:`USER_SUMS_SCHEMA`.
    """
    if slots.num_rows == 0:
        return USER_SUMS_SCHEMA.empty_table()
    propensity = np.asarray(
        pc.fill_null(slots.column("propensity"), 0.0).to_numpy(zero_copy_only=False), dtype=np.float64
    )
    usable = propensity >= config.min_propensity
    clicked = np.asarray(
        pc.fill_null(slots.column("clicked"), False).to_numpy(zero_copy_only=False), dtype=bool
    )
    target_p = np.zeros(slots.num_rows)
    if usable.any():
        kept = slots.filter(pa.array(usable))
        probability = np.asarray(target.probability(kept), dtype=np.float64)
        if probability.shape != (kept.num_rows,):
            raise ValueError(
                f"target {target.name!r} returned shape {probability.shape} for {kept.num_rows} rows"
            )
        if (probability < 0).any() or (probability > 1 + 1e-9).any() or not np.isfinite(probability).all():
            raise ValueError(f"target {target.name!r} returned probabilities outside [0, 1]")
        target_p[usable] = probability
    raw = np.where(usable, target_p / np.where(usable, propensity, 1.0), 0.0)
    clipped = usable & (raw > config.max_weight) if config.max_weight is not None else np.zeros_like(usable)
    weight = np.minimum(raw, config.max_weight) if config.max_weight is not None else raw
    users, inverse = np.unique(
        np.asarray(slots.column("user_id").to_pylist(), dtype=object), return_inverse=True
    )
    n_users = len(users)

    def per_user(values: npt.ArrayLike) -> F64:
        return group_sum(inverse, values, n_users)

    max_per_user = np.zeros(n_users)
    np.maximum.at(max_per_user, inverse, weight)
    return pa.Table.from_arrays(
        [
            pa.array(users.tolist(), pa.string()),
            pa.array(per_user(usable)),
            pa.array(per_user(usable & clicked)),
            pa.array(per_user(weight * clicked)),
            pa.array(per_user(weight)),
            pa.array(per_user(weight * weight)),
            pa.array(max_per_user),
            pa.array(per_user(clipped).astype(np.int64)),
            pa.array(per_user(~usable).astype(np.int64)),
        ],
        schema=USER_SUMS_SCHEMA,
    )


@dataclass(frozen=True)
class OpeResult:
    """Off-policy estimates of one target policy's CTR.

    Attributes:
        target: The target policy's name.
        users: Users (clusters) in the log.
        slots: Logged slots used.
        dropped: Slots left out for a missing or too small propensity.
        logged: The logging policy's own CTR on the used slots (on-policy, for reference).
        ips: Inverse propensity scoring estimate.
        snips: Self-normalised estimate.
        mean_weight: Mean importance weight; about 1 when the target's support is covered.
        max_weight: Largest weight used (after clipping).
        clipped: Slots whose weight was clipped.
        effective_sample_size: Kish's ``(sum w)^2 / sum w^2``.
        config: How it was computed.
    """

    target: str
    users: int
    slots: int
    dropped: int
    logged: Estimate
    ips: Estimate
    snips: Estimate
    mean_weight: float
    max_weight: float
    clipped: int
    effective_sample_size: float
    config: OpeConfig

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "target": self.target,
            "users": self.users,
            "slots": self.slots,
            "dropped": self.dropped,
            "logged_ctr": self.logged.as_dict(),
            "ips": self.ips.as_dict(),
            "snips": self.snips.as_dict(),
            "mean_weight": self.mean_weight,
            "max_weight": self.max_weight,
            "clipped": self.clipped,
            "effective_sample_size": self.effective_sample_size,
            "config": self.config.model_dump(),
        }

    def render(self) -> str:
        """A short aligned text summary."""
        level = round(100 * (1 - self.config.alpha))
        rows = [("logged policy CTR", self.logged), ("IPS", self.ips), ("SNIPS", self.snips)]
        width = max(len(name) for name, _ in rows)
        lines = [
            f"off-policy evaluation of {self.target!r}: {self.slots:,} slots of {self.users:,} users"
            + (f" ({self.dropped:,} without a usable propensity left out)" if self.dropped else ""),
        ]
        for name, est in rows:
            lines.append(
                f"  {name:<{width}}  {est.value:.5f}  {level}% CI [{est.ci_low:.5f}, {est.ci_high:.5f}]"
            )
        clip = "no clipping" if self.config.max_weight is None else f"clipped at {self.config.max_weight:g}"
        lines.append(
            f"  weights: mean {self.mean_weight:.3f}, max {self.max_weight:.3g}, {clip} "
            f"({self.clipped:,} slots), effective sample size {self.effective_sample_size:,.0f} "
            f"({self.effective_sample_size / max(self.slots, 1):.1%} of slots)"
        )
        return "\n".join(lines)


def estimate(sums: pa.Table, target: str, config: OpeConfig) -> OpeResult:
    """IPS and SNIPS estimates from per-user sums.

    Args:
        sums: :func:`user_sums` rows, one per user (rows of one user from several partitions are
            added up).
        target: Name of the target policy.
        config: Interval settings.

    Returns:
        The estimates.
    """
    if sums.num_rows:
        sums = sums.group_by("user_id").aggregate(
            [
                (c, "sum")
                for c in (
                    "slots",
                    "clicks",
                    "weighted_clicks",
                    "weight_sum",
                    "weight_sq_sum",
                    "clipped",
                    "dropped",
                )
            ]
            + [("max_weight", "max")]
        )

    def column(name: str) -> F64:
        if sums.num_rows == 0:
            return np.zeros(0)
        return np.asarray(sums.column(f"{name}_sum").to_numpy(), dtype=np.float64)

    n = column("slots")
    clicks = column("clicks")
    wc = column("weighted_clicks")
    w = column("weight_sum")
    w2 = column("weight_sq_sum")
    alpha = config.alpha
    logged = ratio_estimate(RatioMoments.of(clicks, n), alpha)
    ips_m, snips_m = RatioMoments.of(wc, n), RatioMoments.of(wc, w)
    ips, snips = ratio_estimate(ips_m, alpha), ratio_estimate(snips_m, alpha)
    if config.interval == "bootstrap" and len(n):
        ((ips_lo, ips_hi),) = bootstrap_ratio(
            [wc], n, samples=config.bootstrap_samples, alpha=alpha, seed=config.seed
        )
        ((sn_lo, sn_hi),) = bootstrap_ratio(
            [wc], w, samples=config.bootstrap_samples, alpha=alpha, seed=config.seed
        )
        ips = Estimate(ips.value, ips.std_error, ips_lo, ips_hi)
        snips = Estimate(snips.value, snips.std_error, sn_lo, sn_hi)
    total_slots = float(n.sum())
    total_w, total_w2 = float(w.sum()), float(w2.sum())
    return OpeResult(
        target=target,
        users=int(sums.num_rows),
        slots=int(total_slots),
        dropped=int(column("dropped").sum()),
        logged=logged,
        ips=ips,
        snips=snips,
        mean_weight=total_w / total_slots if total_slots else math.nan,
        max_weight=float(sums.column("max_weight_max").to_numpy().max()) if sums.num_rows else math.nan,
        clipped=int(column("clipped").sum()),
        effective_sample_size=total_w**2 / total_w2 if total_w2 > 0 else 0.0,
        config=config,
    )


def evaluate_slots(slots: pa.Table, target: TargetPolicy, config: OpeConfig | None = None) -> OpeResult:
    """Evaluate a target policy on logged slots held in memory.

    Args:
        slots: Logged slots with :data:`CONTEXT_COLUMNS` and ``clicked``.
        target: The policy to evaluate.
        config: Estimator settings; defaults when omitted.

    Returns:
        The estimates.
    """
    config = config if config is not None else OpeConfig()
    return estimate(user_sums(slots, target, config), target.name, config)


def evaluate_lake(
    lake: Lake,
    target: TargetPolicy,
    config: OpeConfig | None = None,
    *,
    experiment_id: str | None = None,
    arm: str | None = None,
    attribution_window_h: float = 24.0,
    partitions: int = 4,
) -> OpeResult:
    """Evaluate a target policy on the lake's impressions, read and joined with Ray Data.

    Clicks are attributed to impressions exactly as in the experiment report (see
    :mod:`training.experiments.analysis`); importance weights and per-user sums are computed in
    Ray tasks, and only the per-user sums reach the driver.

    Args:
        lake: The lake.
        target: The policy to evaluate; it is shipped to the Ray tasks, so it must pickle.
        config: Estimator settings; defaults when omitted.
        experiment_id: Only impressions of this experiment; all impressions when omitted.
        arm: Only impressions of this arm (with ``experiment_id``).
        attribution_window_h: How long after an impression a click still counts.
        partitions: Hash partitions of the shuffle by user.

    Returns:
        The estimates.
    """
    from training.experiments.analysis import AnalysisWindow, collect, labelled_impressions

    config = config if config is not None else OpeConfig()
    labelled = labelled_impressions(
        lake,
        experiment_id=experiment_id,
        arm=arm,
        window=AnalysisWindow(attribution_window_h=attribution_window_h),
        partitions=partitions,
    )
    weigh = functools.partial(user_sums, target=target, config=config)
    sums = labelled.map_batches(weigh, batch_format="pyarrow", batch_size=None)
    return estimate(collect(sums, USER_SUMS_SCHEMA), target.name, config)
