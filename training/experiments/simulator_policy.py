"""A small list-serving simulator over a synthetic world, for validating experiment analysis and OPE.

It needs no serving stack: a request is a user with a handful of candidate items (drawn by
popularity, boosted for the user's interest categories), a :class:`ListPolicy` turns the
candidates into a ranked list, and the world's hidden truth
(:func:`training.synthetic.outcome_probabilities`) decides what the user does with each slot.

Every policy here knows the exact probability that it puts a candidate at a position (its
*marginal* propensity), so the logs it writes carry the propensities that off-policy evaluation
needs and that the live ranker is expected to log:

* greedy (``temperature=0``): the top-``K`` by score, probability one or zero;
* Plackett-Luce (``temperature>0``): items are drawn one slot at a time with probability
  proportional to ``exp(score / temperature)`` among those left; the marginals are summed over
  every prefix, which is why candidate sets are kept small (:data:`MAX_CANDIDATES`);
* exploration (``epsilon``): that share of requests gets a uniformly random list, whose marginal
  is ``1 / M`` at every position.

Scores may carry noise (``score_noise``): a fixed draw per request and candidate, part of the
request's context, standing for a model's error. Given the context, the policy's probabilities
are exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.schema import EventType
from core.tables import EVENTS, IMPRESSIONS
from policies.experiments import ExperimentSet, Name, assign
from training.synthetic import WorldTruth, outcome_probabilities

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]
Str = npt.NDArray[np.str_]

MAX_CANDIDATES: Final = 12
"""Largest candidate set: Plackett-Luce marginals enumerate every prefix of the list."""

_NOISE_STREAMS: Final = 2
_EVENT_DELAY_S: Final = 5.0
_SLOT_DELAY_S: Final = 3.0


class SimulationConfig(BaseModel):
    """Shape of the simulated traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    list_size: Annotated[int, Field(ge=1, le=8)] = 5
    """Slots per served list (``K``)."""
    candidates: Annotated[int, Field(ge=2, le=MAX_CANDIDATES)] = 10
    """Candidates per request (``M``) the policy orders."""
    mean_requests_per_user: Annotated[float, Field(ge=1, le=100)] = 3.0
    """Mean requests per user: ``1 + Poisson(mean - 1)``, so users differ in how much they count."""
    interest_boost: Annotated[float, Field(ge=0, le=10)] = 1.5
    """Log-weight added to candidates from the user's interest categories (retrieval's personal part)."""
    missing_request_id_share: Annotated[float, Field(ge=0, le=1)] = 0.2
    """Share of requests whose events arrive without ``request_id`` (clients that drop it)."""
    request_gap_s: Annotated[float, Field(gt=60)] = 3_600.0
    """Time between two requests of one user; events of one list come within a minute."""
    surface: Annotated[str, Field(min_length=1, max_length=64)] = "home"
    """Surface logged with every list."""

    @model_validator(mode="after")
    def _fits(self) -> SimulationConfig:
        if self.list_size > self.candidates:
            raise ValueError("list_size: must not exceed candidates")
        return self


class ListPolicy(BaseModel):
    """A stochastic ranking policy with exact position propensities."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    """Policy name, logged as ``model_version``."""
    score: Literal["affinity", "popularity", "uniform"] = "affinity"
    """What it ranks by: the true user-item affinity, the item's popularity prior, or nothing."""
    reverse: bool = False
    """Rank the worst first (a deliberately bad arm)."""
    score_noise: Annotated[float, Field(ge=0, le=100)] = 0.0
    """Standard deviation of the noise added to scores (a model's error)."""
    noise_stream: Annotated[int, Field(ge=0, lt=_NOISE_STREAMS)] = 0
    """Which of the request's noise draws it sees; two policies with one stream make the same errors."""
    temperature: Annotated[float, Field(ge=0, le=100)] = 0.0
    """0: greedy top-K. Above 0: Plackett-Luce over ``exp(score / temperature)``."""
    epsilon: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Share of requests served a uniformly random list (exploration)."""

    def scores(self, truth: WorldTruth, requests: Requests) -> F64:
        """Scores of every candidate, ``(R, M)``."""
        cand = requests.candidates
        if self.score == "affinity":
            base = truth.affinity(requests.user[:, None], cand).astype(np.float64)
        elif self.score == "popularity":
            base = truth.item_popularity[cand].astype(np.float64)
        else:
            base = np.zeros(cand.shape)
        if self.reverse:
            base = -base
        return np.asarray(base + self.score_noise * requests.noise[:, :, self.noise_stream], dtype=np.float64)

    def marginals(self, truth: WorldTruth, requests: Requests) -> F64:
        """Probability of each candidate at each position, ``(R, M, K)``.

        Every position's probabilities sum to one over candidates.
        """
        k = requests.list_size
        scores = self.scores(truth, requests)
        r, m = scores.shape
        if self.score == "uniform" or self.epsilon >= 1:
            return np.full((r, m, k), 1.0 / m)
        if self.temperature == 0:
            order = _top_k(scores, k)
            base = np.zeros((r, m, k))
            base[np.arange(r)[:, None], order, np.arange(k)[None, :]] = 1.0
        else:
            base = plackett_luce_marginals(scores / self.temperature, k)
        mixed: F64 = (1 - self.epsilon) * base + self.epsilon / m
        return mixed

    def sample(self, truth: WorldTruth, requests: Requests, rng: np.random.Generator) -> I64:
        """Draw a list per request: candidate columns of the ``K`` slots, ``(R, K)``."""
        k = requests.list_size
        scores = self.scores(truth, requests)
        r, m = scores.shape
        uniform = _top_k(rng.gumbel(size=(r, m)), k)
        if self.score == "uniform" or self.epsilon >= 1:
            return uniform
        if self.temperature == 0:
            chosen = _top_k(scores, k)
        else:
            # Gumbel-top-K is an exact Plackett-Luce draw.
            chosen = _top_k(scores / self.temperature + rng.gumbel(size=(r, m)), k)
        explore = np.asarray(rng.random(r) < self.epsilon, dtype=bool)
        out: I64 = np.where(explore[:, None], uniform, chosen)
        return out


SIMULATED_POLICIES: Final[dict[str, ListPolicy]] = {
    policy.name: policy
    for policy in (
        # The default logging policy: a noisy model, sampled softly, with 10 % exploration, so
        # every candidate has a positive probability at every position.
        ListPolicy(name="logging", score="affinity", score_noise=0.8, temperature=0.5, epsilon=0.1),
        ListPolicy(name="greedy", score="affinity", score_noise=0.3, noise_stream=1),
        ListPolicy(name="softmax", score="affinity", score_noise=0.3, noise_stream=1, temperature=0.2),
        ListPolicy(name="popular", score="popularity", temperature=0.5),
        ListPolicy(name="random", score="uniform"),
        ListPolicy(name="reversed", score="affinity", reverse=True),
    )
}
"""Named policies for simulations and ``rayrec ope --target``: a better model (``greedy``,
``softmax``: less noise than ``logging``), non-personal ones and deliberately bad ones."""


def _top_k(scores: F64, k: int) -> I64:
    # A stable sort of the negated scores breaks ties by candidate order, identically in
    # marginals() and sample().
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)


def plackett_luce_marginals(logits: F64, k: int) -> F64:
    """Exact probability of each item at each of the first ``k`` positions under Plackett-Luce.

    A prefix's probability depends only on its set of items and, for the next slot, on the weight
    left outside it, so the sum runs over sets rather than orderings:
    ``P(first s picks are S) = sum_{j in S} P(S - j) * w_j / (W - w(S - j))``.

    Args:
        logits: ``(R, M)`` log-weights per request and candidate.
        k: Number of positions.

    Returns:
        ``(R, M, k)`` marginals.
    """
    r, m = logits.shape
    if not 1 <= k <= m:
        raise ValueError(f"k must be in [1, {m}], got {k}")
    # Shifting by the row maximum keeps exp() finite; the floor keeps every weight positive.
    w = np.exp(np.maximum(logits - logits.max(axis=1, keepdims=True), -700.0))
    total = w.sum(axis=1)
    out = np.zeros((r, m, k))
    level: dict[int, tuple[F64, F64]] = {0: (np.ones(r), np.zeros(r))}
    for pos in range(k):
        following: dict[int, tuple[F64, F64]] = {}
        for mask, (prob, used) in level.items():
            scale = prob / (total - used)
            for i in range(m):
                if mask >> i & 1:
                    continue
                contribution = scale * w[:, i]
                out[:, i, pos] += contribution
                if pos + 1 < k:
                    key = mask | 1 << i
                    if key in following:
                        following[key][0][:] += contribution
                    else:
                        following[key] = (contribution.copy(), used + w[:, i])
        level = following
    return out


@dataclass(frozen=True)
class Requests:
    """Simulated recommendation requests and their context.

    Attributes:
        request_ids: ``(R,)`` ids.
        user: ``(R,)`` user indices of the world.
        candidates: ``(R, M)`` candidate item indices, distinct within a request.
        noise: ``(R, M, 2)`` standard normal draws that noisy policies add to their scores.
        served_at_us: ``(R,)`` serving time, microseconds since the epoch (UTC).
        list_size: Slots per list (``K``).
    """

    request_ids: Str
    user: I64
    candidates: I64
    noise: F64
    served_at_us: I64
    list_size: int

    def __len__(self) -> int:
        return len(self.request_ids)

    def take(self, rows: I64 | Bool) -> Requests:
        """The requests selected by an index or mask array."""
        return Requests(
            request_ids=self.request_ids[rows],
            user=self.user[rows],
            candidates=self.candidates[rows],
            noise=self.noise[rows],
            served_at_us=self.served_at_us[rows],
            list_size=self.list_size,
        )


@dataclass(frozen=True)
class ServedLists:
    """What was served for each request.

    Attributes:
        requests: The requests.
        columns: ``(R, K)`` candidate column shown in each slot.
        items: ``(R, K)`` item index shown in each slot.
        scores: ``(R, K)`` serving policy's score of each shown item.
        propensity: ``(R, K)`` marginal probability the serving policy had of that item in that slot.
        policy: ``(R,)`` name of the policy that served each request.
        arm: ``(R,)`` experiment arm of each request (empty strings outside an experiment).
    """

    requests: Requests
    columns: I64
    items: I64
    scores: F64
    propensity: F64
    policy: Str
    arm: Str


@dataclass(frozen=True)
class Outcomes:
    """What each user did with each slot, ``(R, K)`` arrays.

    ``like``, ``purchase`` and ``watch_s`` follow a click; ``hide``, ``not_interested``,
    ``report`` and ``skip`` follow no click and exclude one another. ``watch_s`` is NaN where
    nothing was watched.
    """

    click: Bool
    like: Bool
    purchase: Bool
    watch_s: F64
    hide: Bool
    not_interested: Bool
    report: Bool
    skip: Bool


@dataclass(frozen=True)
class SimulatedLog:
    """A simulated log and the truth behind it.

    Attributes:
        served: The served lists.
        outcomes: The drawn outcomes.
        impressions: Rows in the ``impressions`` lake schema.
        events: Rows in the ``events`` lake schema.
    """

    served: ServedLists
    outcomes: Outcomes
    impressions: pa.Table
    events: pa.Table

    def arm_ctr(self) -> dict[str, float]:
        """Observed clicks per impression in each arm, straight from the simulation."""
        out = {}
        for arm in sorted(set(self.served.arm.tolist())):
            rows = self.served.arm == arm
            out[arm] = float(self.outcomes.click[rows].mean())
        return out


class ListSimulator:
    """Simulates requests, served lists and user responses in one synthetic world."""

    def __init__(self, truth: WorldTruth, config: SimulationConfig | None = None) -> None:
        """Bind the simulator to a world.

        Args:
            truth: The world's hidden truth.
            config: Traffic shape; defaults when omitted.
        """
        self.truth = truth
        self.config = config if config is not None else SimulationConfig()
        self._user_ids = np.asarray(truth.user_ids)
        self._item_ids = np.asarray(truth.item_ids)
        interests = np.zeros((truth.n_users, len(truth.category_names)), dtype=bool)
        rows = np.repeat(np.arange(truth.n_users), truth.user_interest_categories.shape[1])
        weights = truth.user_interest_weights.ravel() > 0
        interests[rows[weights], truth.user_interest_categories.ravel()[weights]] = True
        self._interests = interests

    # -- requests ----------------------------------------------------------------------------

    def requests(self, seed: int, *, users: I64 | None = None, prefix: str = "sim") -> Requests:
        """Draw requests: each user asks ``1 + Poisson(mean - 1)`` times, one request gap apart.

        Args:
            seed: Seed of every draw.
            users: User indices taking part; every user of the world when omitted.
            prefix: Start of the request ids (``<prefix>-r<n>``).

        Returns:
            The requests, grouped by user in time order.
        """
        truth, config = self.truth, self.config
        rng = np.random.default_rng([seed, 1])
        who = np.arange(truth.n_users) if users is None else np.asarray(users, dtype=np.int64)
        counts = 1 + rng.poisson(config.mean_requests_per_user - 1, len(who))
        user = np.repeat(who, counts)
        nth = np.arange(len(user)) - np.repeat(np.cumsum(counts) - counts, counts)
        r, m = len(user), config.candidates
        logits = truth.item_popularity[None, :]
        candidates = np.empty((r, m), dtype=np.int64)
        step = max(1, 2**21 // truth.n_items)
        for lo in range(0, r, step):
            u = user[lo : lo + step]
            boosted = logits + config.interest_boost * self._interests[u][:, truth.item_category]
            keys = boosted + rng.gumbel(size=boosted.shape)
            candidates[lo : lo + step] = np.argpartition(-keys, m - 1, axis=1)[:, :m]
        noise = rng.standard_normal((r, m, _NOISE_STREAMS))
        start_s = truth.config.end.timestamp()
        # Users start within the first gap so that requests of different users interleave.
        offset_s = (who * 7.0) % config.request_gap_s
        served_s = start_s + np.repeat(offset_s, counts) + nth * config.request_gap_s
        return Requests(
            request_ids=np.char.add(f"{prefix}-r", np.arange(r).astype(str)),
            user=user,
            candidates=candidates,
            noise=noise,
            served_at_us=np.round(served_s * 1e6).astype(np.int64),
            list_size=config.list_size,
        )

    # -- serving -----------------------------------------------------------------------------

    def serve(
        self,
        requests: Requests,
        policies: ListPolicy | Mapping[str, ListPolicy],
        seed: int,
        *,
        arms: Str | None = None,
    ) -> ServedLists:
        """Serve every request with its policy, recording exact propensities.

        Args:
            requests: The requests.
            policies: One policy for all requests, or one per arm.
            seed: Seed of the policies' draws.
            arms: ``(R,)`` arm of each request; required with one policy per arm.

        Returns:
            The served lists.
        """
        r, k = len(requests), requests.list_size
        if isinstance(policies, ListPolicy):
            arm_of = np.full(r, "").astype(str) if arms is None else np.asarray(arms).astype(str)
            by_arm = dict.fromkeys(set(arm_of.tolist()), policies)
        else:
            if arms is None:
                raise ValueError("arms are required when each arm has its own policy")
            by_arm, arm_of = dict(policies), arms
        missing = sorted(set(arm_of.tolist()) - set(by_arm))
        if missing:
            raise ValueError(f"no policy for arms {missing}")
        columns = np.empty((r, k), dtype=np.int64)
        propensity = np.empty((r, k))
        scores = np.empty((r, k))
        policy_name = np.empty(r, dtype=object)
        for n, (arm, policy) in enumerate(sorted(by_arm.items())):
            rows = np.flatnonzero(arm_of == arm)
            if not len(rows):
                continue
            part = requests.take(rows)
            rng = np.random.default_rng([seed, 2, n])
            chosen = policy.sample(self.truth, part, rng)
            marginals = policy.marginals(self.truth, part)
            slot = np.arange(k)[None, :]
            local = np.arange(len(rows))[:, None]
            columns[rows] = chosen
            propensity[rows] = marginals[local, chosen, slot]
            scores[rows] = policy.scores(self.truth, part)[local, chosen]
            policy_name[rows] = policy.name
        items = np.take_along_axis(requests.candidates, columns, axis=1)
        return ServedLists(
            requests=requests,
            columns=columns,
            items=items,
            scores=scores,
            propensity=propensity,
            policy=policy_name.astype(str),
            arm=np.asarray(arm_of).astype(str),
        )

    def serve_experiment(
        self,
        requests: Requests,
        experiments: ExperimentSet,
        experiment_id: str,
        policies: Mapping[str, ListPolicy],
        seed: int,
    ) -> ServedLists:
        """Serve requests in an experiment, each user in the arm :func:`assign` gives them.

        Requests of users the experiment does not take are dropped.

        Args:
            requests: The requests.
            experiments: The experiment configuration.
            experiment_id: The experiment to simulate.
            policies: The policy of each arm.
            seed: Seed of the policies' draws.

        Returns:
            The lists served to the experiment's users.
        """
        arm_of_user: dict[int, str] = {}
        first_seen: dict[int, int] = {}
        for row, u in enumerate(requests.user.tolist()):
            first_seen.setdefault(u, row)
        for u, row in first_seen.items():
            at = datetime.fromtimestamp(requests.served_at_us[row] / 1e6, tz=self.truth.config.start.tzinfo)
            for a in assign(str(self._user_ids[u]), experiments, now=at):
                if a.experiment_id == experiment_id:
                    arm_of_user[u] = a.arm
        arms = np.array([arm_of_user.get(u, "") for u in requests.user.tolist()], dtype=object).astype(str)
        kept = np.flatnonzero(arms != "")
        return self.serve(requests.take(kept), policies, seed, arms=arms[kept])

    # -- responses ---------------------------------------------------------------------------

    def respond(self, served: ServedLists, seed: int) -> Outcomes:
        """Draw what each user does with each slot, from the world's hidden truth.

        Args:
            served: The served lists.
            seed: Seed of the draws.

        Returns:
            The outcomes.
        """
        truth = self.truth
        r, k = served.items.shape
        user = np.repeat(served.requests.user, k)
        item = served.items.ravel()
        positions = np.tile(np.arange(k), r)
        probs = outcome_probabilities(
            truth, self._user_ids[user].tolist(), self._item_ids[item].tolist(), positions
        )
        rng = np.random.default_rng([seed, 3])
        u = rng.random((len(item), 6))
        click = u[:, 0] < probs[EventType.CLICK]
        like = click & (u[:, 1] < probs[EventType.LIKE])
        purchase = click & (u[:, 2] < probs[EventType.PURCHASE])
        watched = click & (u[:, 3] < probs[EventType.VIEW]) & (probs[EventType.WATCH] > 0.5)
        response = truth.config.response
        affinity = truth.affinity(user, item).astype(np.float64)
        quality = truth.creator_quality[truth.item_creator[item]]
        completion = 1.0 / (
            1.0
            + np.exp(
                -(
                    response.completion_bias
                    + response.completion_affinity * affinity
                    + response.completion_quality * quality
                    + rng.normal(0.0, response.completion_noise, len(item))
                )
            )
        )
        watch_s = np.where(watched, np.round(truth.item_duration_s[item] * completion, 1), np.nan)
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
        which = (negative < u[:, 4:5]).sum(axis=1)
        no_click = ~click

        def grid(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
            return values.reshape(r, k)

        return Outcomes(
            click=grid(click),
            like=grid(like),
            purchase=grid(purchase),
            watch_s=grid(watch_s),
            hide=grid(no_click & (which == 1)),
            not_interested=grid(no_click & (which == 2)),
            report=grid(no_click & (which == 0)),
            skip=grid(no_click & (which == 3)),
        )

    def click_probabilities(self, requests: Requests) -> F64:
        """True click probability of every candidate at every position, ``(R, M, K)``."""
        r, m = requests.candidates.shape
        k = requests.list_size
        user = np.repeat(requests.user, m * k)
        item = np.repeat(requests.candidates.ravel(), k)
        positions = np.tile(np.arange(k), r * m)
        probs = outcome_probabilities(
            self.truth, self._user_ids[user].tolist(), self._item_ids[item].tolist(), positions
        )
        return probs[EventType.CLICK].reshape(r, m, k)

    def expected_ctr(self, requests: Requests, policy: ListPolicy) -> float:
        """A policy's exact expected clicks per impression on these requests.

        Args:
            requests: The requests (their candidates and noise are the context).
            policy: The policy.

        Returns:
            ``sum over requests, candidates, positions of P(candidate at position) * P(click)``
            divided by the number of slots.
        """
        marginals = policy.marginals(self.truth, requests)
        return float(
            (marginals * self.click_probabilities(requests)).sum() / (len(requests) * requests.list_size)
        )

    # -- logging -----------------------------------------------------------------------------

    def log(
        self,
        served: ServedLists,
        outcomes: Outcomes,
        seed: int,
        *,
        experiment_id: str | None = None,
        prefix: str = "sim",
    ) -> SimulatedLog:
        """The served lists and outcomes as lake rows (``impressions`` and ``events``).

        A share of requests (``missing_request_id_share``) logs its events without ``request_id``
        and ``position``, so analysis has to join them by user, item and time.

        Args:
            served: The served lists.
            outcomes: Their outcomes.
            seed: Seed of which requests lose their ids.
            experiment_id: Logged with every impression (and the arm) when given.
            prefix: Start of the event ids (``<prefix>-e<n>``).

        Returns:
            The log.
        """
        requests = served.requests
        r, k = served.items.shape
        config = self.config
        rid = np.repeat(requests.request_ids, k)
        user_ids = self._user_ids[np.repeat(requests.user, k)]
        item_ids = self._item_ids[served.items.ravel()]
        served_us = np.repeat(requests.served_at_us, k)
        positions = np.tile(np.arange(k, dtype=np.int32), r)
        arms = np.repeat(served.arm, k)
        in_experiment = experiment_id is not None
        ts_type = IMPRESSIONS.schema.field("served_at").type
        impressions = pa.table(
            {
                "request_id": pa.array(rid, pa.string()),
                "user_id": pa.array(user_ids, pa.string()),
                "surface": pa.array(np.full(r * k, config.surface), pa.string()),
                "item_id": pa.array(item_ids, pa.string()),
                "position": pa.array(positions, pa.int32()),
                "score": pa.array(served.scores.ravel().astype(np.float32)),
                "sources": pa.array([["simulator"]] * (r * k), pa.list_(pa.string())),
                "propensity": pa.array(served.propensity.ravel().astype(np.float32)),
                "model_version": pa.array(np.repeat(served.policy, k), pa.string()),
                "experiment_id": pa.array([experiment_id] * (r * k), pa.string()),
                "arm": pa.array(arms if in_experiment else [None] * (r * k), pa.string()),
                "fallback": pa.nulls(r * k, pa.string()),
                "served_at": pa.array(served_us, ts_type),
            }
        )
        rng = np.random.default_rng([seed, 4])
        anonymous = np.repeat(rng.random(r) < config.missing_request_id_share, k)
        kinds: list[tuple[EventType, Bool, float]] = [
            (EventType.CLICK, outcomes.click.ravel(), 0.0),
            (EventType.LIKE, outcomes.like.ravel(), 20.0),
            (EventType.WATCH, ~np.isnan(outcomes.watch_s.ravel()), 25.0),
            (EventType.PURCHASE, outcomes.purchase.ravel(), 30.0),
            (EventType.SKIP, outcomes.skip.ravel(), 0.0),
            (EventType.HIDE, outcomes.hide.ravel(), 1.0),
            (EventType.NOT_INTERESTED, outcomes.not_interested.ravel(), 1.0),
            (EventType.REPORT, outcomes.report.ravel(), 1.0),
        ]
        rows_list, types_list, delays = [], [], []
        for event_type, happened, delay_s in kinds:
            rows = np.flatnonzero(happened)
            rows_list.append(rows)
            types_list.append(np.full(len(rows), event_type.value))
            delays.append(np.full(len(rows), delay_s))
        rows = np.concatenate(rows_list)
        event_types = np.concatenate(types_list)
        delay = np.concatenate(delays)
        order = np.lexsort((delay, rows))
        rows, event_types, delay = rows[order], event_types[order], delay[order]
        ts_us = served_us[rows] + np.round((_EVENT_DELAY_S + _SLOT_DELAY_S * positions[rows] + delay) * 1e6)
        watch = outcomes.watch_s.ravel()[rows]
        keep_id = ~anonymous[rows]
        events = pa.table(
            {
                "event_id": pa.array(
                    np.char.add(f"{prefix}-e", np.arange(len(rows)).astype(str)), pa.string()
                ),
                "user_id": pa.array(user_ids[rows], pa.string()),
                "item_id": pa.array(item_ids[rows], pa.string()),
                "event_type": pa.array(event_types, pa.string()),
                "ts": pa.array(ts_us.astype(np.int64), EVENTS.schema.field("ts").type),
                "surface": pa.array(np.full(len(rows), config.surface), pa.string()),
                "request_id": pa.array(rid[rows], pa.string(), mask=~keep_id),
                "position": pa.array(positions[rows], pa.int32(), mask=~keep_id),
                "watch_time_s": pa.array(
                    np.nan_to_num(watch).astype(np.float32), mask=event_types != EventType.WATCH.value
                ),
            }
        )
        return SimulatedLog(served=served, outcomes=outcomes, impressions=impressions, events=events)

    def target(self, requests: Requests, policy: ListPolicy) -> SimulatedTargetPolicy:
        """A policy as an off-policy evaluation target over these requests."""
        return SimulatedTargetPolicy(self, requests, policy)


class SimulatedTargetPolicy:
    """A :class:`ListPolicy` answering :class:`training.experiments.ope.TargetPolicy` for logged rows.

    It finds each logged row's request (by ``request_id``) among the simulated requests, whose
    candidates and noise are the context, and returns the policy's marginal probability of the
    row's item at the row's position. An item outside the request's candidates, or a position
    past the list, has probability zero.
    """

    def __init__(self, simulator: ListSimulator, requests: Requests, policy: ListPolicy) -> None:
        """Precompute the policy's marginals on the requests.

        Args:
            simulator: The simulator that drew the requests.
            requests: The requests the log was served for.
            policy: The target policy.
        """
        self.name = policy.name
        self.policy = policy
        self._row = {rid: n for n, rid in enumerate(requests.request_ids.tolist())}
        self._candidates = requests.candidates
        self._marginals = policy.marginals(simulator.truth, requests)
        self._truth = simulator.truth

    def probability(self, context: pa.Table) -> F64:
        """Target probability of each logged (request, position, item).

        Args:
            context: Logged rows with at least ``request_id``, ``item_id`` and ``position``.

        Returns:
            ``(rows,)`` probabilities.
        """
        n = context.num_rows
        request_ids = context.column("request_id").to_pylist()
        rows = np.array([self._row.get(rid, -1) for rid in request_ids], dtype=np.int64)
        items = self._truth.item_index(context.column("item_id").to_pylist())
        positions = np.asarray(context.column("position").to_numpy(zero_copy_only=False), dtype=np.int64)
        out = np.zeros(n)
        k = self._marginals.shape[2]
        known = (rows >= 0) & (positions >= 0) & (positions < k)
        if not known.any():
            return out
        cand = self._candidates[rows[known]]
        match = cand == items[known][:, None]
        found = match.any(axis=1)
        column = match.argmax(axis=1)
        values = self._marginals[rows[known], column, positions[known]]
        out[np.flatnonzero(known)] = np.where(found, values, 0.0)
        return out
