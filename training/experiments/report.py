"""The experiment report: its values, an aligned text table, JSON and a PNG chart of CTR per arm."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from training.experiments.stats import Comparison, Estimate, SrmCheck


@dataclass(frozen=True)
class MetricResult:
    """One metric in one arm.

    Attributes:
        name: Metric id.
        estimate: Value with its interval.
        vs_control: Comparison with the control arm; ``None`` for the control itself.
        higher_is_better: Direction of improvement.
        description: What the metric measures.
    """

    name: str
    estimate: Estimate
    vs_control: Comparison | None
    higher_is_better: bool
    description: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "estimate": self.estimate.as_dict(),
            "vs_control": self.vs_control.as_dict() if self.vs_control is not None else None,
            "higher_is_better": self.higher_is_better,
            "description": self.description,
        }


@dataclass(frozen=True)
class ArmResult:
    """Everything measured in one arm.

    Attributes:
        arm: Arm name.
        is_control: Whether it is the baseline.
        users: Users with at least one impression.
        impressions: Impressions served.
        items_served: Distinct items served.
        coverage: ``items_served`` over the catalogue's active items.
        metrics: Ratio metrics by name, in display order.
    """

    arm: str
    is_control: bool
    users: int
    impressions: int
    items_served: int
    coverage: float
    metrics: dict[str, MetricResult]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "arm": self.arm,
            "is_control": self.is_control,
            "users": self.users,
            "impressions": self.impressions,
            "items_served": self.items_served,
            "coverage": _finite(self.coverage),
            "metrics": {name: m.as_dict() for name, m in self.metrics.items()},
        }


@dataclass(frozen=True)
class GuardrailResult:
    """A guardrail metric checked in one treatment arm.

    Attributes:
        metric: The metric.
        arm: The treatment arm.
        status: ``pass``, ``fail`` (significantly worse than ``tolerance``) or ``no_data``.
        relative: Relative change against control with its interval.
        tolerance: Relative worsening accepted.
    """

    metric: str
    arm: str
    status: Literal["pass", "fail", "no_data"]
    relative: Estimate | None
    tolerance: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "metric": self.metric,
            "arm": self.arm,
            "status": self.status,
            "relative": self.relative.as_dict() if self.relative is not None else None,
            "tolerance": self.tolerance,
        }


@dataclass(frozen=True)
class ExperimentReport:
    """The analysis of one experiment.

    Attributes:
        experiment_id: The experiment.
        control: Its control arm.
        alpha: Significance level; intervals have ``1 - alpha`` coverage.
        window_start: First serving instant analysed (``None``: unbounded).
        window_end: End of the serving instants analysed (``None``: unbounded).
        attribution_window_h: How long after an impression its events counted.
        arms: One result per arm, configured arms first.
        srm: The sample-ratio check.
        guardrails: One result per guardrail and treatment arm.
        diagnostics: Counts that tell how the data was joined.
        notes: Warnings a reader must see before trusting the numbers.
    """

    experiment_id: str
    control: str
    alpha: float
    window_start: datetime | None
    window_end: datetime | None
    attribution_window_h: float
    arms: list[ArmResult]
    srm: SrmCheck
    guardrails: list[GuardrailResult] = field(default_factory=list)
    diagnostics: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def arm(self, name: str) -> ArmResult:
        """One arm's result.

        Raises:
            KeyError: No such arm.
        """
        for result in self.arms:
            if result.arm == name:
                return result
        raise KeyError(f"no arm {name!r} in the report of {self.experiment_id!r}")

    @property
    def guardrails_pass(self) -> bool:
        """Whether no guardrail failed."""
        return all(g.status != "fail" for g in self.guardrails)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "experiment_id": self.experiment_id,
            "control": self.control,
            "alpha": self.alpha,
            "window": {
                "start": self.window_start.isoformat() if self.window_start else None,
                "end": self.window_end.isoformat() if self.window_end else None,
                "attribution_window_h": self.attribution_window_h,
            },
            "arms": [a.as_dict() for a in self.arms],
            "srm": self.srm.as_dict(),
            "guardrails": [g.as_dict() for g in self.guardrails],
            "guardrails_pass": self.guardrails_pass,
            "diagnostics": self.diagnostics,
            "notes": self.notes,
        }

    def to_json(self) -> str:
        """The report as indented JSON (NaN written as ``null``)."""
        return json.dumps(self.as_dict(), indent=2, sort_keys=False)

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to a file."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.to_json() + "\n")
        return target

    def render(self) -> str:
        """The report as aligned text tables."""
        level = f"{100 * (1 - self.alpha):g}%"
        span = (
            f"served {_when(self.window_start)} to {_when(self.window_end)}, "
            f"events within {self.attribution_window_h:g} h"
        )
        out = [f"experiment {self.experiment_id}: control {self.control!r}, {level} intervals, {span}", ""]
        out.append(
            _table(
                ["arm", "users", "impressions", "items", "coverage"],
                [
                    [
                        a.arm + (" (control)" if a.is_control else ""),
                        f"{a.users:,}",
                        f"{a.impressions:,}",
                        f"{a.items_served:,}",
                        _pct(a.coverage),
                    ]
                    for a in self.arms
                ],
            )
        )
        out.append("")
        rows = []
        names = list(self.arms[0].metrics) if self.arms else []
        for name in names:
            for a in self.arms:
                m = a.metrics[name]
                est, vs = m.estimate, m.vs_control
                rows.append(
                    [
                        name,
                        a.arm,
                        _num(est.value),
                        f"[{_num(est.ci_low)}, {_num(est.ci_high)}]",
                        "" if vs is None else _signed(vs.difference.value),
                        "" if vs is None else _signed_pct(vs.relative.value),
                        ""
                        if vs is None
                        else f"[{_signed_pct(vs.relative.ci_low)}, {_signed_pct(vs.relative.ci_high)}]",
                        "" if vs is None else _p(vs.p_value),
                    ]
                )
        out.append(
            _table(["metric", "arm", "value", f"{level} CI", "diff", "rel.", f"rel. {level} CI", "p"], rows)
        )
        out.append("")
        srm = self.srm
        verdict = "MISMATCH" if srm.flagged else "ok"
        observed = ", ".join(f"{arm} {n:,}" for arm, n in srm.observed.items())
        expected = ", ".join(f"{arm} {share:.1%}" for arm, share in srm.expected_shares.items())
        out.append(
            f"sample ratio: {verdict} (users {observed}; configured {expected}; "
            f"chi2 {_num(srm.chi2)}, p {_p(srm.p_value)}, flagged below {srm.threshold:g})"
        )
        if self.guardrails:
            out.append("")
            out.append(
                _table(
                    ["guardrail", "arm", "status", "rel. change", f"{level} CI", "tolerance"],
                    [
                        [
                            g.metric,
                            g.arm,
                            g.status.upper(),
                            "" if g.relative is None else _signed_pct(g.relative.value),
                            ""
                            if g.relative is None
                            else f"[{_signed_pct(g.relative.ci_low)}, {_signed_pct(g.relative.ci_high)}]",
                            _pct(g.tolerance),
                        ]
                        for g in self.guardrails
                    ],
                )
            )
        if self.diagnostics:
            out.append("")
            out.append(
                "joins: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in self.diagnostics.items())
            )
        for note in self.notes:
            out.append(f"note: {note}")
        return "\n".join(out)

    def plot_ctr(self, path: str | Path, metric: str = "ctr") -> Path:
        """Draw a metric per arm with its interval, as a PNG.

        Uses matplotlib's Agg canvas directly, so no display and no global backend switch.

        Args:
            path: Where to write the PNG.
            metric: The metric to draw.

        Returns:
            The path written.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        figure = Figure(figsize=(max(4.0, 1.4 * len(self.arms) + 2), 3.6), dpi=120)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot(1, 1, 1)
        names = [a.arm for a in self.arms]
        values = [a.metrics[metric].estimate for a in self.arms]
        xs = list(range(len(names)))
        for x, a, est in zip(xs, self.arms, values, strict=True):
            low = est.value - est.ci_low if math.isfinite(est.ci_low) else 0.0
            high = est.ci_high - est.value if math.isfinite(est.ci_high) else 0.0
            axes.errorbar(
                [x],
                [est.value],
                yerr=[[low], [high]],
                fmt="o",
                capsize=6,
                color="#555555" if a.is_control else "#1f77b4",
            )
            vs = a.metrics[metric].vs_control
            label = (
                "control" if vs is None else f"{_signed_pct(vs.relative.value)}, p {_p_phrase(vs.p_value)}"
            )
            axes.annotate(
                label,
                (x, est.ci_high if math.isfinite(est.ci_high) else est.value),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
        axes.set_xticks(xs, names)
        axes.set_xlim(-0.6, len(names) - 0.4)
        axes.margins(y=0.2)
        axes.set_ylabel(f"{metric} ({100 * (1 - self.alpha):g}% CI)")
        axes.set_title(f"{self.experiment_id}: {metric} per arm")
        axes.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        figure.savefig(target, format="png")
        return target


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M")


def _num(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"


def _signed(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:+.4f}"


def _pct(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{100 * value:.1f}%"


def _signed_pct(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{100 * value:+.1f}%"


def _p_phrase(value: float) -> str:
    text = _p(value)
    return f"< {text[1:]}" if text.startswith("<") else f"= {text}"


def _p(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return "<0.0001" if value < 1e-4 else f"{value:.4f}"
