"""Statistics of experiment metrics: user-clustered ratio estimates, arm comparisons, SRM.

Every rate the platform reports is a ratio of two sums over impressions (clicks / impressions,
watch seconds / impressions, ...). Impressions of one user are correlated (a user who likes the
feed clicks on many of them), so the unit of randomisation, the user, is also the unit of
variance: each ratio is ``sum_u Y_u / sum_u X_u`` over users and its variance comes from the
delta method on the per-user sums ``(X_u, Y_u)`` (Deng et al., "Applying the Delta Method in
Metric Analytics", KDD 2018). Treating impressions as independent would understate the variance
and report too many significant differences.

Only five moments per arm are needed (``n, sum X, sum Y, sum X^2, sum Y^2, sum XY``), so they are
summed in parallel (Ray Data map tasks) and combined on the driver, whatever the number of users.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

F64 = npt.NDArray[np.float64]

SRM_P_THRESHOLD: Final = 0.001
"""A sample-ratio mismatch is flagged below this p-value (the usual, deliberately strict, level)."""


def z_quantile(alpha: float) -> float:
    """The two-sided normal critical value for a ``1 - alpha`` interval (1.96 for ``alpha=0.05``)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return NormalDist().inv_cdf(1 - alpha / 2)


def two_sided_p(z: float) -> float:
    """The two-sided p-value of a standard normal statistic."""
    if math.isnan(z):
        return math.nan
    return math.erfc(abs(z) / math.sqrt(2))


@dataclass(frozen=True)
class RatioMoments:
    """Sums over users of a ratio metric's per-user numerator ``Y`` and denominator ``X``.

    Attributes:
        n: Number of users (clusters).
        sum_x: Sum of denominators.
        sum_y: Sum of numerators.
        sum_xx: Sum of squared denominators.
        sum_yy: Sum of squared numerators.
        sum_xy: Sum of numerator times denominator.
    """

    n: float
    sum_x: float
    sum_y: float
    sum_xx: float
    sum_yy: float
    sum_xy: float

    @classmethod
    def of(cls, numerator: npt.ArrayLike, denominator: npt.ArrayLike) -> RatioMoments:
        """Moments of per-user values.

        Args:
            numerator: ``Y_u``, one value per user.
            denominator: ``X_u``, aligned with ``numerator``.

        Returns:
            The moments.
        """
        y = np.asarray(numerator, dtype=np.float64)
        x = np.asarray(denominator, dtype=np.float64)
        if y.shape != x.shape:
            raise ValueError(f"numerator has shape {y.shape} but denominator {x.shape}")
        return cls(
            n=float(len(x)),
            sum_x=float(x.sum()),
            sum_y=float(y.sum()),
            sum_xx=float(np.dot(x, x)),
            sum_yy=float(np.dot(y, y)),
            sum_xy=float(np.dot(x, y)),
        )

    def __add__(self, other: RatioMoments) -> RatioMoments:
        return RatioMoments(
            n=self.n + other.n,
            sum_x=self.sum_x + other.sum_x,
            sum_y=self.sum_y + other.sum_y,
            sum_xx=self.sum_xx + other.sum_xx,
            sum_yy=self.sum_yy + other.sum_yy,
            sum_xy=self.sum_xy + other.sum_xy,
        )

    @property
    def ratio(self) -> float:
        """``sum Y / sum X``; NaN when the denominator is zero."""
        return self.sum_y / self.sum_x if self.sum_x > 0 else math.nan

    @property
    def variance(self) -> float:
        """Delta-method variance of :attr:`ratio`, clustered by user.

        ``Var(R) ~ (s_yy - 2 R s_xy + R^2 s_xx) / (n * mean_x^2)`` with sample (co)variances of
        the per-user sums; NaN with fewer than two users or a zero denominator.
        """
        n = self.n
        if n < 2 or self.sum_x <= 0:
            return math.nan
        mx, my, r = self.sum_x / n, self.sum_y / n, self.ratio
        s_xx = (self.sum_xx - n * mx * mx) / (n - 1)
        s_yy = (self.sum_yy - n * my * my) / (n - 1)
        s_xy = (self.sum_xy - n * mx * my) / (n - 1)
        # Rounding in the moment sums can leave a tiny negative where the true value is zero.
        return max(0.0, (s_yy - 2 * r * s_xy + r * r * s_xx) / (n * mx * mx))


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its standard error and confidence interval.

    Attributes:
        value: The estimate.
        std_error: Its standard error (NaN when it cannot be estimated).
        ci_low: Lower end of the ``1 - alpha`` interval.
        ci_high: Upper end of the interval.
    """

    value: float
    std_error: float
    ci_low: float
    ci_high: float

    @classmethod
    def normal(cls, value: float, variance: float, alpha: float) -> Estimate:
        """A normal-approximation interval ``value +- z * sqrt(variance)``."""
        se = math.sqrt(variance) if variance >= 0 else math.nan
        half = z_quantile(alpha) * se
        return cls(value=value, std_error=se, ci_low=value - half, ci_high=value + half)

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies inside the interval."""
        return self.ci_low <= value <= self.ci_high

    def as_dict(self) -> dict[str, float | None]:
        """JSON-ready values (NaN becomes ``None``)."""
        return {
            "value": _finite(self.value),
            "std_error": _finite(self.std_error),
            "ci_low": _finite(self.ci_low),
            "ci_high": _finite(self.ci_high),
        }


@dataclass(frozen=True)
class Comparison:
    """A treatment arm against the control arm on one ratio metric.

    Attributes:
        difference: Treatment minus control, with its interval.
        relative: ``treatment / control - 1``, with its (delta-method) interval.
        z: The z statistic of the difference.
        p_value: Two-sided p-value of "no difference".
    """

    difference: Estimate
    relative: Estimate
    z: float
    p_value: float

    def as_dict(self) -> dict[str, object]:
        """JSON-ready values."""
        return {
            "difference": self.difference.as_dict(),
            "relative": self.relative.as_dict(),
            "z": _finite(self.z),
            "p_value": _finite(self.p_value),
        }


def ratio_estimate(moments: RatioMoments, alpha: float) -> Estimate:
    """A ratio metric with its user-clustered normal interval."""
    return Estimate.normal(moments.ratio, moments.variance, alpha)


def compare(treatment: RatioMoments, control: RatioMoments, alpha: float) -> Comparison:
    """Two-sided z-test of a ratio metric between independent arms.

    Args:
        treatment: The treatment arm's moments.
        control: The control arm's moments.
        alpha: One minus the interval's coverage.

    Returns:
        The absolute and relative differences with intervals, the z statistic and the p-value.
    """
    rt, rc = treatment.ratio, control.ratio
    vt, vc = treatment.variance, control.variance
    diff = rt - rc
    var = vt + vc
    se = math.sqrt(var) if var >= 0 else math.nan
    if se > 0:
        z = diff / se
    elif se == 0:
        # Both arms without any variance: equal means no evidence of a difference, unequal is certain.
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    else:
        z = math.nan
    if rc and not math.isnan(rc):
        rel_var = vt / rc**2 + rt**2 * vc / rc**4
        relative = Estimate.normal(rt / rc - 1, rel_var, alpha)
    else:
        relative = Estimate(math.nan, math.nan, math.nan, math.nan)
    return Comparison(
        difference=Estimate.normal(diff, var, alpha), relative=relative, z=z, p_value=two_sided_p(z)
    )


def compare_paired(
    after: tuple[npt.ArrayLike, npt.ArrayLike], before: tuple[npt.ArrayLike, npt.ArrayLike], alpha: float
) -> Comparison:
    """Two-sided z-test of a ratio metric measured twice on the same users.

    Each ratio's delta-method linearisation per user, ``(Y_u - R X_u) / mean X``, is differenced
    user by user, so what a user shares across the two measurements (their taste) cancels
    instead of counting as noise twice, as it would in :func:`compare`.

    Args:
        after: ``(numerator, denominator)`` per user, the later measurement.
        before: The same users' values, aligned with ``after``.
        alpha: One minus the interval's coverage.

    Returns:
        The absolute and relative differences with intervals, the z statistic and the p-value.
    """
    y1, x1 = (np.asarray(v, dtype=np.float64) for v in after)
    y0, x0 = (np.asarray(v, dtype=np.float64) for v in before)
    if not (y1.shape == x1.shape == y0.shape == x0.shape):
        raise ValueError("after and before must hold the same users, aligned")
    n = len(x1)
    if n < 2 or x1.sum() <= 0 or x0.sum() <= 0:
        nan = Estimate(math.nan, math.nan, math.nan, math.nan)
        return Comparison(difference=nan, relative=nan, z=math.nan, p_value=math.nan)
    r1, r0 = y1.sum() / x1.sum(), y0.sum() / x0.sum()
    d1 = (y1 - r1 * x1) / x1.mean()
    d0 = (y0 - r0 * x0) / x0.mean()
    var = float(np.var(d1 - d0, ddof=1) / n)
    diff = r1 - r0
    se = math.sqrt(var)
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    if r0 > 0:
        # The relative change's linearisation: d(r1/r0) = d1/r0 - r1 d0/r0^2.
        rel_var = float(np.var(d1 / r0 - r1 * d0 / r0**2, ddof=1) / n)
        relative = Estimate.normal(r1 / r0 - 1, rel_var, alpha)
    else:
        relative = Estimate(math.nan, math.nan, math.nan, math.nan)
    return Comparison(
        difference=Estimate.normal(diff, var, alpha), relative=relative, z=z, p_value=two_sided_p(z)
    )


@dataclass(frozen=True)
class SrmCheck:
    """Sample-ratio mismatch: are the users per arm what the configured shares predict?

    Attributes:
        observed: Users seen per arm (configured arms first, then unexpected ones).
        expected_shares: Configured share per arm.
        chi2: Pearson's chi-square statistic over the configured arms.
        p_value: Its p-value with ``arms - 1`` degrees of freedom.
        unexpected_arms: Arms seen in the log that the configuration does not have.
        threshold: p-value under which a mismatch is flagged.
    """

    observed: dict[str, int]
    expected_shares: dict[str, float]
    chi2: float
    p_value: float
    unexpected_arms: tuple[str, ...]
    threshold: float = SRM_P_THRESHOLD

    @property
    def flagged(self) -> bool:
        """True when the split is not what was configured: the results cannot be trusted."""
        return bool(self.unexpected_arms) or (not math.isnan(self.p_value) and self.p_value < self.threshold)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready values."""
        return {
            "observed": self.observed,
            "expected_shares": self.expected_shares,
            "chi2": _finite(self.chi2),
            "p_value": _finite(self.p_value),
            "unexpected_arms": list(self.unexpected_arms),
            "threshold": self.threshold,
            "flagged": self.flagged,
        }


def srm_check(
    observed: Mapping[str, int], shares: Mapping[str, float], threshold: float = SRM_P_THRESHOLD
) -> SrmCheck:
    """Chi-square goodness-of-fit of users per arm against the configured shares.

    Args:
        observed: Users seen per arm.
        shares: Configured traffic share per arm (summing to 1).
        threshold: p-value under which a mismatch is flagged.

    Returns:
        The check; with no users at all the statistic and p-value are NaN and nothing is flagged.
    """
    arms = list(shares)
    counts = np.array([observed.get(a, 0) for a in arms], dtype=np.float64)
    total = counts.sum()
    unexpected = tuple(sorted(a for a, n in observed.items() if a not in shares and n > 0))
    if total <= 0 or len(arms) < 2:
        chi2, p = math.nan, math.nan
    else:
        expected = total * np.array([shares[a] for a in arms], dtype=np.float64)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        p = float(sps.chi2.sf(chi2, df=len(arms) - 1))
    seen = {a: int(observed.get(a, 0)) for a in arms} | {a: int(observed[a]) for a in unexpected}
    return SrmCheck(
        observed=seen,
        expected_shares={a: float(shares[a]) for a in arms},
        chi2=chi2,
        p_value=p,
        unexpected_arms=unexpected,
        threshold=threshold,
    )


def bootstrap_ratio(
    numerators: Sequence[F64] | F64,
    denominator: F64,
    *,
    samples: int,
    alpha: float,
    seed: int,
) -> list[tuple[float, float]]:
    """Percentile intervals of ratios ``sum Y_j / sum X`` under a user-level bootstrap.

    Users are resampled with replacement; every numerator is resampled with the same draws, so
    the intervals of several estimators over one log are comparable.

    Args:
        numerators: One or more per-user numerators ``Y_j`` (each shape ``(n_users,)``).
        denominator: Per-user denominator ``X``.
        samples: Bootstrap replicates.
        alpha: One minus the coverage.
        seed: Seed of the resampling.

    Returns:
        ``(low, high)`` per numerator.
    """
    ys = [
        np.asarray(y, dtype=np.float64)
        for y in (numerators if isinstance(numerators, Sequence) else [numerators])
    ]
    x = np.asarray(denominator, dtype=np.float64)
    n = len(x)
    if n == 0:
        return [(math.nan, math.nan) for _ in ys]
    rng = np.random.default_rng(seed)
    ratios = np.empty((len(ys), samples))
    # Replicates in chunks keep the (chunk, n_users) count matrix small for large logs.
    chunk = max(1, min(samples, 2**22 // max(n, 1)))
    for lo in range(0, samples, chunk):
        b = min(chunk, samples - lo)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)
        den = counts @ x
        for j, y in enumerate(ys):
            with np.errstate(invalid="ignore", divide="ignore"):
                ratios[j, lo : lo + b] = (counts @ y) / den
    out = []
    for j in range(len(ys)):
        low, high = np.nanquantile(ratios[j], [alpha / 2, 1 - alpha / 2])
        out.append((float(low), float(high)))
    return out


def group_sum(groups: npt.ArrayLike, values: npt.ArrayLike, size: int) -> F64:
    """Sum of ``values`` per group index in ``[0, size)`` (``np.bincount`` with weights, as float64).

    Args:
        groups: Non-negative group index of each value.
        values: The values.
        size: Number of groups (the length of the result).

    Returns:
        ``(size,)`` sums; zero for groups without values.
    """
    weights = np.asarray(values, dtype=np.float64)
    return np.asarray(
        np.bincount(np.asarray(groups, dtype=np.int64), weights=weights, minlength=size), dtype=np.float64
    )


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
