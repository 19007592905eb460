"""The closed feedback loop over HTTP: simulated users, the live Serve app, retraining, promotion.

Users of a synthetic world (:mod:`training.synthetic`) ask the running application for
recommendations over real HTTP (``GET /api/recommendations``), react to every served item as
their hidden preferences say (:func:`react`, drawn from
:func:`training.synthetic.outcome_probabilities`, so the truth is defined in one place) and send
what they did back over HTTP: ``POST /api/events/batch`` for clicks, views, watches, likes,
shares, purchases and skips, ``POST /api/recommendations/feedback`` for hides, "not interested"
and reports. The serving side logs every list to the impressions stream and the lake writer
appends events and impressions to the lake.

A *round* is one pass of traffic. Between rounds :class:`ClosedLoop` waits until the lake holds
every event and impression of the round, trains a release from the lake through the same
:func:`training.pipeline.run_training` as ``rayrec train``, promotes it to ``production`` and
waits until the application answers with the new model version. Round 0 starts cold: the
catalog and the users exist, no behaviour does and no model is registered, so the application
serves what it can without one (trending, popular, newest, content from onboarding interests,
exploration).

CTR per round is clicks over impressions of the simulated outcomes, with a user-clustered
delta-method interval (:func:`ctr_estimate`), the same statistics as ``rayrec experiments report``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Final, Protocol

import httpx
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from core.schema import EventType
from training.experiments.stats import Comparison, Estimate, RatioMoments, compare_paired, ratio_estimate
from training.synthetic import WorldTruth, outcome_probabilities

F64 = npt.NDArray[np.float64]
Bool = npt.NDArray[np.bool_]

FEEDBACK_TYPES: Final = frozenset({EventType.HIDE, EventType.NOT_INTERESTED, EventType.REPORT})
"""Reactions sent through the feedback route: they must hold on the user's very next request."""

_EVENT_STEP_MS: Final = 50
"""Spacing of one slot's events, so they arrive in the order a user would produce them."""


# ---------------------------------------------------------------------------------------------
# Reactions (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reactions:
    """What users did with each served item, arrays aligned with the served slots.

    ``view``, ``watch_s``, ``like``, ``share`` and ``purchase`` follow a click; ``skip``, ``hide``,
    ``not_interested`` and ``report`` follow no click and exclude one another. ``watch_s`` is NaN
    where nothing playable was viewed.
    """

    click: Bool
    view: Bool
    watch_s: F64
    like: Bool
    share: Bool
    purchase: Bool
    skip: Bool
    hide: Bool
    not_interested: Bool
    report: Bool

    def __len__(self) -> int:
        return len(self.click)

    def events_of(self, slot: int) -> list[tuple[EventType, float | None]]:
        """The events one slot produced, in the order they happen, with the watch time of ``watch``."""
        out: list[tuple[EventType, float | None]] = []
        if self.click[slot]:
            out.append((EventType.CLICK, None))
            if self.view[slot]:
                out.append((EventType.VIEW, None))
            if not math.isnan(self.watch_s[slot]):
                out.append((EventType.WATCH, float(self.watch_s[slot])))
            for kind, happened in (
                (EventType.LIKE, self.like),
                (EventType.SHARE, self.share),
                (EventType.PURCHASE, self.purchase),
            ):
                if happened[slot]:
                    out.append((kind, None))
        else:
            for kind, happened in (
                (EventType.SKIP, self.skip),
                (EventType.HIDE, self.hide),
                (EventType.NOT_INTERESTED, self.not_interested),
                (EventType.REPORT, self.report),
            ):
                if happened[slot]:
                    out.append((kind, None))
        return out


def react(
    truth: WorldTruth,
    user_ids: Sequence[str],
    item_ids: Sequence[str],
    positions: Sequence[int],
    rng: np.random.Generator,
) -> Reactions:
    """Draw each user's reaction to the item served to them, from the world's hidden truth.

    Probabilities come from :func:`training.synthetic.outcome_probabilities`, and are used as the
    world's generator uses them: one click draw per exposure; view, like, share and purchase each
    drawn given the click; at most one of report, hide, not_interested and skip given no click.

    Args:
        truth: The world's truth.
        user_ids: One user per served slot.
        item_ids: The item in each slot.
        positions: Zero-based position of each slot in its list.
        rng: Source of the draws.

    Returns:
        The reactions, aligned with the inputs.
    """
    n = len(item_ids)
    probs = outcome_probabilities(truth, user_ids, item_ids, np.asarray(positions, dtype=np.int64))
    draw = rng.random((n, 6))
    click = draw[:, 0] < probs[EventType.CLICK]
    view = click & (draw[:, 1] < probs[EventType.VIEW])
    like = click & (draw[:, 2] < probs[EventType.LIKE])
    share = click & (draw[:, 3] < probs[EventType.SHARE])
    purchase = click & (draw[:, 4] < probs[EventType.PURCHASE])
    negative = np.cumsum(
        np.stack(
            [
                probs[EventType.REPORT],
                probs[EventType.HIDE],
                probs[EventType.NOT_INTERESTED],
                probs[EventType.SKIP],
            ],
            axis=1,
        ),
        axis=1,
    )
    which = (negative < draw[:, 5:6]).sum(axis=1)
    no_click = ~click
    users = truth.user_index(user_ids)
    items = truth.item_index(item_ids)
    watched = view & (probs[EventType.WATCH] > 0.5)
    # The watched share follows the generator's completion model (ResponseModel.completion_*).
    r = truth.config.response
    affinity = truth.affinity(users, items).astype(np.float64)
    quality = truth.creator_quality[truth.item_creator[items]]
    logit = (
        r.completion_bias
        + r.completion_affinity * affinity
        + r.completion_quality * quality
        + rng.normal(0.0, r.completion_noise, n)
    )
    completion = 0.5 * (1.0 + np.tanh(0.5 * logit))
    watch_s = np.where(watched, np.round(truth.item_duration_s[items] * completion, 1), np.nan)
    return Reactions(
        click=click,
        view=view,
        watch_s=watch_s,
        like=like,
        share=share,
        purchase=purchase,
        skip=no_click & (which == 3),
        hide=no_click & (which == 1),
        not_interested=no_click & (which == 2),
        report=no_click & (which == 0),
    )


def reaction_bodies(
    user_id: str,
    served: Sequence[Mapping[str, Any]],
    reactions: Reactions,
    *,
    request_id: str,
    surface: str,
    at: datetime,
    event_prefix: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The HTTP bodies that report one list's reactions.

    Args:
        user_id: The user who was served.
        served: The response's ``items`` (``itemId`` and ``position`` are read).
        reactions: The user's reactions, aligned with ``served``.
        request_id: The response's ``requestId``, sent with every event so analysis joins exactly.
        surface: The surface of the request.
        at: When the user saw the list; events follow it a few milliseconds apart.
        event_prefix: Start of the event ids of the batch route (``<prefix>-<position>-<n>``).

    Returns:
        The events for ``POST /api/events/batch`` and the bodies for
        ``POST /api/recommendations/feedback``.
    """
    events: list[dict[str, Any]] = []
    feedback: list[dict[str, Any]] = []
    step = 0
    for slot, item in enumerate(served):
        position = int(item["position"])
        for n, (kind, watch_s) in enumerate(reactions.events_of(slot)):
            step += 1
            stamp = (at + timedelta(milliseconds=_EVENT_STEP_MS * step)).isoformat()
            if kind in FEEDBACK_TYPES:
                feedback.append(
                    {
                        "userId": user_id,
                        "itemId": item["itemId"],
                        "feedback": kind.value,
                        "requestId": request_id,
                        "timestamp": stamp,
                    }
                )
                continue
            body: dict[str, Any] = {
                "eventId": f"{event_prefix}-{position}-{n}",
                "userId": user_id,
                "itemId": item["itemId"],
                "eventType": kind.value,
                "timestamp": stamp,
                "context": {"surface": surface, "requestId": request_id, "position": position},
            }
            if watch_s is not None:
                body["watchTimeS"] = watch_s
            events.append(body)
    return events, feedback


def ctr_estimate(clicks: npt.ArrayLike, impressions: npt.ArrayLike, alpha: float = 0.05) -> Estimate:
    """Clicks per impression with a user-clustered delta-method interval.

    A user's slots are not independent draws (the same taste decides all of them), so the
    interval treats users as the units, as ``rayrec experiments report`` does.

    Args:
        clicks: Clicks of each user.
        impressions: Impressions of each user, aligned with ``clicks``.
        alpha: One minus the interval's coverage.

    Returns:
        The CTR with its interval (NaN bounds with fewer than two users).
    """
    return ratio_estimate(RatioMoments.of(clicks, impressions), alpha)


# ---------------------------------------------------------------------------------------------
# Traffic over HTTP
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedList:
    """One answered request and the user's reactions to it."""

    user_id: str
    request_id: str
    model_version: str
    experiment: str | None
    arm: str | None
    fallback: str | None
    item_ids: tuple[str, ...]
    clicks: int
    likes: int
    negatives: int
    """Hides, not-interested and reports."""
    events_sent: int
    """Events accepted by the two routes for this list."""


@dataclass
class RoundTraffic:
    """Everything one round of traffic produced.

    Attributes:
        lists: The answered requests.
        errors: Non-2xx answers, by ``route status``.
        started_at: When the first request went out.
        ended_at: When the last reaction was accepted.
    """

    lists: list[ServedList] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    ended_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def impressions(self) -> int:
        """Items served in all."""
        return sum(len(s.item_ids) for s in self.lists)

    @property
    def events_sent(self) -> int:
        """Events accepted in all."""
        return sum(s.events_sent for s in self.lists)

    def error(self, key: str) -> None:
        """Count one refused call."""
        self.errors[key] = self.errors.get(key, 0) + 1


class TrafficConfig(BaseModel):
    """Shape of one round of simulated traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_user: Annotated[int, Field(ge=1, le=100)] = 3
    """Requests each taking part user makes, one after the other (reacting in between)."""
    list_size: Annotated[int, Field(ge=1, le=100)] = 10
    """``limit`` of every request."""
    surface: Annotated[str, Field(min_length=1, max_length=64)] = "home"
    """Surface requested."""
    concurrency: Annotated[int, Field(ge=1, le=256)] = 8
    """Users served at once."""
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """Per HTTP call."""


async def drive_round(
    base_url: str,
    truth: WorldTruth,
    users: Sequence[str],
    config: TrafficConfig,
    *,
    seed: int,
    label: str,
) -> RoundTraffic:
    """Run one round: every user requests, reacts and reports back, ``requests_per_user`` times.

    The draws of a user's ``n``-th list depend only on ``(seed, user, n)``, so a round is
    reproducible whatever order the concurrent users are answered in.

    Args:
        base_url: The application, e.g. ``http://127.0.0.1:8000``.
        truth: The world's truth.
        users: Users taking part.
        config: Traffic shape.
        seed: Seed of the reactions.
        label: Unique label of the round, the start of its event ids.

    Returns:
        The served lists, reactions sent and errors.
    """
    traffic = RoundTraffic()
    gate = asyncio.Semaphore(config.concurrency)
    limits = httpx.Limits(
        max_connections=config.concurrency * 2, max_keepalive_connections=config.concurrency * 2
    )
    user_index = truth.user_index(list(users))
    async with httpx.AsyncClient(base_url=base_url, timeout=config.timeout_s, limits=limits) as http:

        async def one_user(user: str, index: int) -> None:
            async with gate:
                for n in range(config.requests_per_user):
                    rng = np.random.default_rng([seed, index, n])
                    served = await _one_request(
                        http, truth, user, config, rng, f"{label}-{index}-{n}", traffic
                    )
                    if served is not None:
                        traffic.lists.append(served)

        await asyncio.gather(*(one_user(u, int(i)) for u, i in zip(users, user_index, strict=True)))
    traffic.ended_at = datetime.now(UTC)
    return traffic


async def _one_request(
    http: httpx.AsyncClient,
    truth: WorldTruth,
    user: str,
    config: TrafficConfig,
    rng: np.random.Generator,
    event_prefix: str,
    traffic: RoundTraffic,
) -> ServedList | None:
    response = await http.get(
        "/api/recommendations", params={"userId": user, "surface": config.surface, "limit": config.list_size}
    )
    if response.status_code != 200:
        traffic.error(f"recommendations {response.status_code}")
        return None
    body = response.json()
    items: list[dict[str, Any]] = body["items"]
    seen_at = datetime.now(UTC)
    item_ids = [str(i["itemId"]) for i in items]
    reactions = react(truth, [user] * len(items), item_ids, [int(i["position"]) for i in items], rng)
    events, feedback = reaction_bodies(
        user,
        items,
        reactions,
        request_id=str(body["requestId"]),
        surface=config.surface,
        at=seen_at,
        event_prefix=event_prefix,
    )
    sent = 0
    if events:
        answer = await http.post("/api/events/batch", json={"events": events})
        if answer.status_code == 202:
            sent += len(events)
        else:
            traffic.error(f"events/batch {answer.status_code}")
    for one in feedback:
        answer = await http.post("/api/recommendations/feedback", json=one)
        if answer.status_code == 202:
            sent += 1
        else:
            traffic.error(f"feedback {answer.status_code}")
    negatives = reactions.hide | reactions.not_interested | reactions.report
    return ServedList(
        user_id=user,
        request_id=str(body["requestId"]),
        model_version=str(body["modelVersion"]),
        experiment=body.get("experiment"),
        arm=body.get("arm"),
        fallback=body.get("fallback"),
        item_ids=tuple(item_ids),
        clicks=int(reactions.click.sum()),
        likes=int(reactions.like.sum()),
        negatives=int(negatives.sum()),
        events_sent=sent,
    )


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundResult:
    """One round's figures.

    Attributes:
        round: Round number, from 0 (cold start).
        model_version: Version the application answered with (``none`` without a model; several
            joined by ``+`` if it changed during the round).
        users: Users served.
        requests: Lists served.
        impressions: Items served.
        clicks: Simulated clicks.
        likes: Simulated likes.
        negatives: Simulated hides, not-interested and reports.
        ctr: Clicks per impression with its interval.
        fallbacks: Lists served by a fallback, by kind.
        errors: Refused calls, by route and status.
        events_sent: Events accepted by the application.
        request_ids: The round's request ids, to find its rows in the lake.
        started_at: First request.
        ended_at: Last reaction.
        train_s: Wall time of the retraining after this round (None when none followed).
        next_version: Version promoted after this round.
        impressions_logged: Impression rows the lake gained with the round (serving drops a log
            entry rather than fail a request when Redis is slow; the model-version probes after a
            promotion add a few); None until the lake was read.
        per_user: Each user's ``(clicks, impressions)`` in the round, for paired comparisons.
    """

    round: int
    model_version: str
    users: int
    requests: int
    impressions: int
    clicks: int
    likes: int
    negatives: int
    ctr: Estimate
    fallbacks: dict[str, int]
    errors: dict[str, int]
    events_sent: int
    request_ids: tuple[str, ...]
    started_at: datetime
    ended_at: datetime
    train_s: float | None = None
    next_version: str | None = None
    impressions_logged: int | None = None
    per_user: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, number: int, traffic: RoundTraffic, alpha: float) -> RoundResult:
        """Summarise a round's traffic.

        Args:
            number: Round number.
            traffic: What the round produced.
            alpha: One minus the CTR interval's coverage.

        Returns:
            The figures.
        """
        clicks: dict[str, int] = {}
        shown: dict[str, int] = {}
        fallbacks: dict[str, int] = {}
        versions: list[str] = []
        for s in traffic.lists:
            clicks[s.user_id] = clicks.get(s.user_id, 0) + s.clicks
            shown[s.user_id] = shown.get(s.user_id, 0) + len(s.item_ids)
            if s.fallback:
                fallbacks[s.fallback] = fallbacks.get(s.fallback, 0) + 1
            if s.model_version not in versions:
                versions.append(s.model_version)
        users = sorted(shown)
        return cls(
            round=number,
            model_version="+".join(versions) or "none",
            users=len(users),
            requests=len(traffic.lists),
            impressions=traffic.impressions,
            clicks=sum(s.clicks for s in traffic.lists),
            likes=sum(s.likes for s in traffic.lists),
            negatives=sum(s.negatives for s in traffic.lists),
            ctr=ctr_estimate([clicks[u] for u in users], [shown[u] for u in users], alpha),
            fallbacks=dict(sorted(fallbacks.items())),
            errors=dict(sorted(traffic.errors.items())),
            events_sent=traffic.events_sent,
            request_ids=tuple(s.request_id for s in traffic.lists),
            started_at=traffic.started_at,
            ended_at=traffic.ended_at,
            per_user={u: (clicks[u], shown[u]) for u in users},
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (request ids left out)."""
        return {
            "round": self.round,
            "model_version": self.model_version,
            "users": self.users,
            "requests": self.requests,
            "impressions": self.impressions,
            "clicks": self.clicks,
            "likes": self.likes,
            "negatives": self.negatives,
            "ctr": self.ctr.as_dict(),
            "fallbacks": self.fallbacks,
            "errors": self.errors,
            "events_sent": self.events_sent,
            "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat(),
            "train_s": self.train_s,
            "next_version": self.next_version,
            "impressions_logged": self.impressions_logged,
        }


@dataclass
class LoopReport:
    """The closed loop's figures, round by round.

    Attributes:
        world: The world's size and seed.
        traffic: The traffic shape.
        alpha: One minus the CTR intervals' coverage.
        rounds: Per-round figures.
    """

    world: dict[str, Any]
    traffic: TrafficConfig
    alpha: float
    rounds: list[RoundResult] = field(default_factory=list)
    cold_rounds: int = 1

    @property
    def baseline(self) -> RoundResult | None:
        """The last round served without a model: what retraining is measured against."""
        cold = self.rounds[: self.cold_rounds]
        return cold[-1] if cold and len(self.rounds) > len(cold) else None

    @property
    def ctr_change(self) -> float:
        """Last round's CTR minus the baseline round's (NaN before a retrained round)."""
        base = self.baseline
        return math.nan if base is None else self.rounds[-1].ctr.value - base.ctr.value

    def paired_change(self) -> Comparison | None:
        """Last round's CTR against the baseline's over the users served in both, paired by user.

        The same users take part in every round, so a user's taste enters both CTRs; pairing
        removes it from the comparison's noise. None before a retrained round or without common
        users.
        """
        base = self.baseline
        if base is None:
            return None
        first, last = base.per_user, self.rounds[-1].per_user
        users = sorted(set(first) & set(last))
        if len(users) < 2:
            return None
        after = ([last[u][0] for u in users], [last[u][1] for u in users])
        before = ([first[u][0] for u in users], [first[u][1] for u in users])
        return compare_paired(after, before, self.alpha)

    def render(self) -> str:
        """The per-round table."""
        coverage = f"{100 * (1 - self.alpha):g}% CI"
        lines = [
            f"{'round':>5}  {'model':<26} {'users':>6} {'requests':>8} {'impressions':>11} "
            f"{'clicks':>7}  {'CTR':>7}  {coverage:<17} {'fallbacks':>9}"
        ]
        for r in self.rounds:
            interval = f"[{r.ctr.ci_low:.4f}, {r.ctr.ci_high:.4f}]"
            lines.append(
                f"{r.round:>5}  {r.model_version:<26} {r.users:>6} {r.requests:>8} {r.impressions:>11} "
                f"{r.clicks:>7}  {r.ctr.value:.4f}  {interval:<17} {sum(r.fallbacks.values()):>9}"
            )
        base = self.baseline
        if base is not None:
            first, last = base.ctr, self.rounds[-1].ctr
            lines.append(
                f"CTR {first.value:.4f} without a model (round {base.round}) -> {last.value:.4f} after "
                f"{len(self.rounds) - self.cold_rounds} retraining(s) ({self.ctr_change:+.4f})"
            )
            paired = self.paired_change()
            if paired is not None:
                d = paired.difference
                lines.append(
                    f"paired by user: {d.value:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}], "
                    f"{100 * paired.relative.value:+.1f} %, p = {paired.p_value:.2g}"
                )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready report."""
        return {
            "world": self.world,
            "traffic": self.traffic.model_dump(mode="json"),
            "alpha": self.alpha,
            "cold_rounds": self.cold_rounds,
            "baseline_round": None if (base := self.baseline) is None else base.round,
            "rounds": [r.as_dict() for r in self.rounds],
            "ctr_change": None if math.isnan(self.ctr_change) else self.ctr_change,
            "ctr_change_paired": None if (paired := self.paired_change()) is None else paired.as_dict(),
        }

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`as_dict` as JSON."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return target

    def plot(self, path: str | Path) -> Path:
        """Draw CTR per round with its interval as a PNG (matplotlib's Agg canvas, as the A/B report).

        Args:
            path: Where to write the PNG.

        Returns:
            The path written.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        figure = Figure(figsize=(max(4.5, 1.3 * len(self.rounds) + 2), 3.6), dpi=120)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot(1, 1, 1)
        xs = [r.round for r in self.rounds]
        values = [r.ctr.value for r in self.rounds]
        low = [r.ctr.value - r.ctr.ci_low if math.isfinite(r.ctr.ci_low) else 0.0 for r in self.rounds]
        high = [r.ctr.ci_high - r.ctr.value if math.isfinite(r.ctr.ci_high) else 0.0 for r in self.rounds]
        axes.errorbar(xs, values, yerr=[low, high], fmt="o-", capsize=6, color="#1f77b4")
        for r in self.rounds:
            axes.annotate(
                "no model" if r.model_version == "none" else r.model_version[-12:],
                (r.round, r.ctr.ci_high if math.isfinite(r.ctr.ci_high) else r.ctr.value),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
            )
        axes.set_xticks(xs, [f"round {x}" for x in xs])
        axes.margins(x=0.15, y=0.25)
        axes.set_ylabel(f"CTR ({100 * (1 - self.alpha):g}% CI)")
        axes.set_title("closed loop: CTR per round", fontsize=10)
        axes.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        figure.savefig(target, format="png")
        return target


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class ServingControl(Protocol):
    """The running application, as the loop needs it."""

    base_url: str
    """Where the application answers HTTP."""

    def serve_version(self, version: str) -> None:
        """Make every replica serve a registered version (a hot swap); return once they do."""
        ...


class LakeCounts(Protocol):
    """The part of :class:`core.lake.Lake` the loop reads."""

    def count(self, table: str) -> int:
        """Rows of a table."""
        ...


def wait_for_lake(
    lake: LakeCounts,
    *,
    events: int,
    impressions: int,
    timeout_s: float = 180.0,
    poll_s: float = 1.0,
    settle_s: float = 15.0,
) -> tuple[int, int]:
    """Wait until the lake writer has written the round's events and impressions.

    Every event was acknowledged (``202``), so it is in the stream and must reach the lake: the
    wait is for all of them. The recommendation log is best effort (serving drops an entry rather
    than fail a request when Redis is slow), so impressions are waited for until they are all
    there or their count has not moved for ``settle_s`` (longer than the writer's flush interval).

    Args:
        lake: The lake.
        events: Event rows expected in all.
        impressions: Impression rows expected in all.
        timeout_s: How long to wait.
        poll_s: Time between two looks.
        settle_s: How long an unchanged impression count means the writer has written them all.

    Returns:
        The rows found, ``(events, impressions)``.

    Raises:
        TimeoutError: The events did not all arrive in time.
    """
    deadline = time.monotonic() + timeout_s
    last_impressions, changed_at = -1, time.monotonic()
    while True:
        found = (lake.count("events"), lake.count("impressions"))
        now = time.monotonic()
        if found[1] != last_impressions:
            last_impressions, changed_at = found[1], now
        if found[0] >= events and (found[1] >= impressions or now - changed_at >= settle_s):
            return found
        if now > deadline:
            raise TimeoutError(
                f"after {timeout_s:.0f} s the lake holds {found[0]:,} of {events:,} events and "
                f"{found[1]:,} of {impressions:,} impressions"
            )
        time.sleep(poll_s)


def wait_for_version(base_url: str, user_id: str, version: str, *, timeout_s: float = 120.0) -> None:
    """Wait until the application answers a request with this model version.

    Raises:
        TimeoutError: It did not within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    seen = "nothing"
    with httpx.Client(base_url=base_url, timeout=30) as http:
        while time.monotonic() < deadline:
            response = http.get("/api/recommendations", params={"userId": user_id, "limit": 1})
            if response.status_code == 200:
                seen = str(response.json()["modelVersion"])
                if seen == version:
                    return
            time.sleep(0.5)
    raise TimeoutError(f"the application still answers with model {seen}, not {version}")


Trainer = Callable[[], str]
"""Trains a release from the lake, registers and promotes it; returns its version."""


class ClosedLoop:
    """Rounds of serve -> react -> report -> retrain -> promote against a running application.

    Args:
        truth: The world's truth (its users are the simulated users).
        serving: The running application.
        lake: The lake the application's lake writer fills.
        train: Trains, registers and promotes a release; returns its version.
        traffic: Shape of each round.
        alpha: One minus the CTR intervals' coverage.
        users: Users taking part in every round; all of the world's when omitted.
        seed: Seed of the reactions.
        log: Where progress lines go.
    """

    def __init__(
        self,
        truth: WorldTruth,
        serving: ServingControl,
        lake: LakeCounts,
        train: Trainer,
        *,
        traffic: TrafficConfig,
        alpha: float = 0.05,
        users: Sequence[str] | None = None,
        seed: int = 0,
        log: Callable[[str], None] = print,
    ) -> None:
        self.truth = truth
        self.serving = serving
        self.lake = lake
        self.train = train
        self.traffic = traffic
        self.alpha = alpha
        self.users = list(users) if users is not None else truth.user_ids
        self.seed = seed
        self.log = log
        self._run = uuid.uuid4().hex[:8]
        self._events_expected = lake.count("events")
        self._impressions_expected = lake.count("impressions")

    def round(self, number: int) -> RoundResult:
        """Run one round of traffic and wait until the lake holds all of it.

        Args:
            number: Round number (part of the seed and of the event ids).

        Returns:
            The round's figures.
        """
        return self.drive(number)[0]

    def drive(self, number: int) -> tuple[RoundResult, RoundTraffic]:
        """:meth:`round`, also returning every served list (with its experiment arm).

        Args:
            number: Round number (part of the seed and of the event ids).

        Returns:
            The round's figures and its traffic.
        """
        traffic = asyncio.run(
            drive_round(
                self.serving.base_url,
                self.truth,
                self.users,
                self.traffic,
                seed=self.seed * 1_000 + number,
                label=f"sim-{self._run}-r{number}",
            )
        )
        result = RoundResult.of(number, traffic, self.alpha)
        self._events_expected += result.events_sent
        self._impressions_expected += result.impressions
        started = time.perf_counter()
        _, logged = wait_for_lake(
            self.lake, events=self._events_expected, impressions=self._impressions_expected
        )
        # Later rounds wait for what was logged, not for entries serving dropped.
        result = replace(
            result, impressions_logged=logged - (self._impressions_expected - result.impressions)
        )
        self._impressions_expected = logged
        self.log(
            f"round {number}: {result.requests} lists, {result.impressions} impressions, "
            f"{result.clicks} clicks, CTR {result.ctr.value:.4f} "
            f"[{result.ctr.ci_low:.4f}, {result.ctr.ci_high:.4f}], model {result.model_version}; "
            f"lake flushed after {time.perf_counter() - started:.1f} s"
        )
        return result, traffic

    def retrain(self) -> tuple[str, float]:
        """Train, register and promote a release, and wait until the application serves it.

        Returns:
            The version and the wall time from the start of training until it was served.
        """
        started = time.perf_counter()
        version = self.train()
        self.serving.serve_version(version)
        wait_for_version(self.serving.base_url, self.users[0], version)
        elapsed = time.perf_counter() - started
        self.log(f"retrained and serving {version} after {elapsed:.1f} s")
        return version, elapsed

    def run(self, rounds: int, world: Mapping[str, Any], *, cold_rounds: int = 1) -> LoopReport:
        """Run ``rounds`` rounds, the first ``cold_rounds`` without a model, retraining after each.

        A user's session keeps the items they reacted to (up to ``session_items_max``), and
        ``excludeSeen`` leaves them out, so the very first round, served to empty sessions, has
        more to choose from than any later one. Retraining is measured against the last cold
        round, served as later rounds are; with ``cold_rounds=1`` that is round 0 itself.

        Args:
            rounds: Number of rounds (at least 1).
            world: Description of the world, copied into the report.
            cold_rounds: Rounds served without a model before the first retraining (at least 1).

        Returns:
            The report.
        """
        if cold_rounds < 1:
            raise ValueError(f"cold_rounds must be at least 1, got {cold_rounds}")
        report = LoopReport(
            world=dict(world), traffic=self.traffic, alpha=self.alpha, cold_rounds=cold_rounds
        )
        for number in range(rounds):
            result = self.round(number)
            if cold_rounds - 1 <= number < rounds - 1:
                version, seconds = self.retrain()
                result = replace(result, train_s=round(seconds, 1), next_version=version)
            report.rounds.append(result)
        return report
