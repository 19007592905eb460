"""Sponsored items from a configured campaign list, marked for the sponsored-slot policy."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from core.types import Candidate, FeatureMap, RequestContext
from features.candidate_refs import SPONSORED_BID, SPONSORED_CAMPAIGN_ID
from features.user_context import interest_categories, request_region

_Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class SponsoredCampaign(BaseModel):
    """One campaign: which items it promotes, what it bids and whom it targets.

    An empty targeting set means "everyone" for that dimension.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    campaign_id: _Name
    """Id of the campaign; logged with every sponsored impression."""

    item_ids: Annotated[tuple[_Name, ...], Field(min_length=1)]
    """Items promoted, in the advertiser's order of preference."""

    bid: Annotated[float, Field(gt=0)]
    """Bid per impression; higher bids win the sponsored slots."""

    categories: frozenset[_Name] = frozenset()
    """Show only to users whose categories (or interests) include one of these."""

    regions: frozenset[_Name] = frozenset()
    """Show only to requests from one of these regions."""

    surfaces: frozenset[_Name] = frozenset()
    """Show only on these surfaces."""

    active: bool = True
    """Paused campaigns stay configured but serve nothing."""


class SponsoredConfig(BaseModel):
    """The campaigns a replica serves (from the Serve ``user_config``, reloadable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    campaigns: tuple[SponsoredCampaign, ...] = ()
    """Every campaign, active or paused."""


class SponsoredSource:
    """Candidates of the campaigns whose targeting matches the request, highest bid first.

    Each candidate carries ``sponsored:campaign_id`` and ``sponsored:bid``; that mark is what the
    pre-scorer, the organic policies and :class:`policies.sponsored_slot_policy.SponsoredSlotPolicy`
    recognise. Its retrieval score is 0: sponsored items are placed by slot, never by relevance.
    Category targeting uses personal data, so a user who opted out only sees untargeted campaigns.

    Args:
        config: The campaigns; swap in a new set with :meth:`update`.
        name: Stage id.
        budget_ms: Time the source may take (it never waits on I/O).
        max_candidates: How many candidates at most.
    """

    def __init__(
        self,
        config: SponsoredConfig,
        *,
        name: str = "sponsored",
        budget_ms: float = 5.0,
        max_candidates: int = 10,
    ) -> None:
        self.name = name
        self.budget_ms = budget_ms
        self.max_candidates = max_candidates
        self._config = config

    def update(self, config: SponsoredConfig) -> None:
        """Serve another set of campaigns from the next request on."""
        self._config = config

    def matches(self, campaign: SponsoredCampaign, ctx: RequestContext) -> bool:
        """Whether ``campaign`` may be shown for ``ctx``."""
        if not campaign.active:
            return False
        if campaign.surfaces and ctx.surface not in campaign.surfaces:
            return False
        region = request_region(ctx)
        if campaign.regions and region not in campaign.regions:
            return False
        if campaign.categories:
            categories = {c for c, _ in interest_categories(ctx)}
            return bool(categories & campaign.categories)
        return True

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        """The items of the matching campaigns.

        Args:
            ctx: The request.

        Returns:
            Up to ``max_candidates`` candidates, highest bid first; an item promoted by several
            campaigns comes once, with the highest bid.
        """
        matching = sorted(
            (c for c in self._config.campaigns if self.matches(c, ctx)),
            key=lambda c: (-c.bid, c.campaign_id),
        )
        out: dict[str, Candidate] = {}
        for campaign in matching:
            marks = FeatureMap({SPONSORED_CAMPAIGN_ID: campaign.campaign_id, SPONSORED_BID: campaign.bid})
            for item_id in campaign.item_ids:
                if item_id not in out and len(out) < self.max_candidates:
                    out[item_id] = Candidate(
                        item_id=item_id, retrieval_score=0.0, features=marks, reason="Sponsored"
                    )
        return list(out.values())
