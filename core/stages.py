"""The contracts of the stages a surface pipeline is built from.

Every stage has a ``name``: a snake_case id used as the key in metrics, logs, config and
experiments. Stages never know what runtime calls them (in-process or Ray Serve) and hold no
control flow beyond their own job; ordering, budgets and fallbacks belong to the pipeline runner.
The asynchronous stages (sources, hydrators, scorers) must not block the event loop: CPU-heavy
work goes to a thread or a ``DeploymentHandle``, or the runner cannot enforce their budgets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from core.types import Candidate, FilterResult, RequestContext


class StageContractError(RuntimeError):
    """Raised when a stage's output breaks its contract (length, order, finite scores).

    Attributes:
        stage: Name of the offending stage.
    """

    def __init__(self, stage: str, problem: str) -> None:
        super().__init__(f"stage {stage!r} broke its contract: {problem}")
        self.stage = stage


class StageDeclined(RuntimeError):
    """Raised by a stage that did not run by design (a circuit breaker open): skipped like a late stage.

    The runner treats it as any failure (the stage's output is not used and the fallback is
    counted) but logs it without a traceback: it is an expected state, and logging a traceback
    for every request while a breaker is open would cost more than the request.
    """


@runtime_checkable
class CandidateSource(Protocol):
    """Produces candidates for a request (ANN search, item-item table, popularity, follows, ...).

    A source that raises or overruns its budget is skipped when it is in the pipeline's
    ``fail_open`` set, and fails the request otherwise.
    """

    @property
    def name(self) -> str:
        """Snake_case id of this source."""
        ...

    @property
    def budget_ms(self) -> float:
        """Time this source may take, in milliseconds; the stage budget still caps it."""
        ...

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        """Retrieve candidates for ``ctx``.

        Args:
            ctx: The request.

        Returns:
            Candidates, best first, each with ``retrieval_score`` set. Returning the same item
            twice is allowed; the runner merges duplicates.
        """
        ...


@runtime_checkable
class Filter(Protocol):
    """Removes candidates that must not be shown (removed, blocked, hidden, seen, unsafe, ...).

    Synchronous and pure over its inputs: any data it needs (exclusion sets, flags) is fetched
    before it runs or held in memory. Cheaper filters go first in a pipeline.
    """

    @property
    def name(self) -> str:
        """Snake_case id of this filter; removals are counted under it."""
        ...

    def apply(self, ctx: RequestContext, cands: list[Candidate]) -> FilterResult:
        """Split ``cands`` into what passes and what is removed.

        Args:
            ctx: The request.
            cands: Candidates to check.

        Returns:
            ``kept`` and ``removed``, together exactly the input, each in input order.
        """
        ...


@runtime_checkable
class FeatureHydrator(Protocol):
    """Attaches features to candidates (one batched online-store read, item cache, ...)."""

    @property
    def name(self) -> str:
        """Snake_case id of this hydrator."""
        ...

    @property
    def budget_ms(self) -> float:
        """Time this hydrator may take, in milliseconds; the feature stage budget still caps it."""
        ...

    async def hydrate(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        """Attach features to ``cands``.

        Args:
            ctx: The request.
            cands: Candidates to enrich.

        Returns:
            The candidates with features added: same length and item order as ``cands``.
        """
        ...


@runtime_checkable
class Scorer(Protocol):
    """Scores candidates: a light pre-scorer, or the ranking model."""

    @property
    def name(self) -> str:
        """Snake_case id of this scorer."""
        ...

    @property
    def budget_ms(self) -> float:
        """Time this scorer may take, in milliseconds; the ranking stage budget still caps it."""
        ...

    async def score(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        """Set ``score`` on every candidate.

        Args:
            ctx: The request.
            cands: Candidates to score, in their current order.

        Returns:
            The candidates with finite ``score`` set: same length and item order as ``cands``.
            The runner sorts by score afterwards; a scorer never reorders.
        """
        ...


@runtime_checkable
class Policy(Protocol):
    """Re-ranks a ranked list: diversity, creator caps, freshness, exploration, business rules.

    Synchronous and pure over its inputs. Unlike scorers, a policy may reorder, drop or insert
    candidates, and sets ``reason`` and ``propensity`` where it changes them.
    """

    @property
    def name(self) -> str:
        """Snake_case id of this policy."""
        ...

    def apply(self, ctx: RequestContext, ranked: list[Candidate]) -> list[Candidate]:
        """Re-rank ``ranked``.

        Args:
            ctx: The request.
            ranked: Candidates, best first.

        Returns:
            The new list, best first.
        """
        ...


def check_same_items(stage: str, before: Sequence[Candidate], after: Sequence[Candidate]) -> None:
    """Check the contract of hydrators and scorers: same length and item order as their input.

    Args:
        stage: Name of the stage, for the error.
        before: What the stage was given.
        after: What it returned.

    Raises:
        StageContractError: The length or the order of item ids differs.
    """
    if len(after) != len(before):
        raise StageContractError(stage, f"returned {len(after)} candidates for {len(before)}")
    for position, (given, returned) in enumerate(zip(before, after, strict=True)):
        if given.item_id != returned.item_id:
            raise StageContractError(
                stage,
                f"changed the order: position {position} held {given.item_id!r}, now {returned.item_id!r}",
            )
