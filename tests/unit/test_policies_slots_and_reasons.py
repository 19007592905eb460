from __future__ import annotations

import pytest

from core.types import Candidate
from features.candidate_refs import RERANK_EXPLORATION, SPONSORED_BID, SPONSORED_CAMPAIGN_ID
from policies.creator_cap_policy import creator_of
from policies.reason_policy import FALLBACK_REASON, NEW_FOR_YOU, ReasonPolicy
from policies.sponsored_slot_policy import SponsoredSlotPolicy, label
from tests.unit.serving_fixtures import NOW_S, cand, ids, make_ctx
from tests.unit.test_policies_reranking import max_in_any_window


def ad(item_id: str, bid: float, creator: str = "adv", reason: str | None = "Sponsored") -> Candidate:
    c = cand(
        item_id, 0.0, creator=creator, extra={SPONSORED_CAMPAIGN_ID: f"camp-{item_id}", SPONSORED_BID: bid}
    )
    c.reason = reason
    return c


def organic(n: int) -> list[Candidate]:
    return [cand(f"o{k}", float(n - k), creator=f"c{k}") for k in range(n)]


def test_sponsored_items_take_the_configured_slots_by_bid() -> None:
    given = [*organic(4), ad("low", 1.0), *organic(12)[4:], ad("high", 3.0), ad("mid", 2.0)]
    out = SponsoredSlotPolicy(slots=(2, 5), max_per_list=2).apply(make_ctx(limit=10), given)
    assert out[2].item_id == "high" and out[5].item_id == "mid"
    assert "low" not in ids(out), "sponsored items without a slot are never shown as organic"
    assert ids([c for c in out if not c.features.get(SPONSORED_CAMPAIGN_ID)]) == ids(organic(12))
    for c in (out[2], out[5]):
        assert c.reason is not None and c.reason.startswith("Sponsored")


def test_at_most_k_sponsored_and_never_beyond_the_list() -> None:
    given = [*organic(3), ad("a1", 3.0), ad("a2", 2.0), ad("a3", 1.0)]
    out = SponsoredSlotPolicy(slots=(0, 1, 2, 8), max_per_list=2).apply(make_ctx(limit=10), given)
    assert ids(out)[:2] == ["a1", "a2"] and len(out) == 5
    none = SponsoredSlotPolicy(slots=(2,), max_per_list=0).apply(make_ctx(), given)
    assert ids(none) == ids(organic(3))


def test_sponsored_placement_keeps_the_creator_cap() -> None:
    given = [
        cand("x0", 3, creator="x"),
        cand("o1", 2, creator="o1"),
        cand("o2", 1, creator="o2"),
        ad("bad", 9.0, creator="x"),
        ad("ok", 1.0),
    ]
    out = SponsoredSlotPolicy(slots=(1,), max_per_list=1, creator_cap=(1, 3)).apply(make_ctx(limit=5), given)
    assert out[1].item_id == "ok"
    assert max_in_any_window([creator_of(c) for c in out], 3) <= 1


def test_label_always_leads_with_sponsored() -> None:
    assert label(None) == "Sponsored"
    assert label("Sponsored") == "Sponsored"
    assert label("Trending now") == "Sponsored · Trending now"


def test_every_item_gets_a_reason() -> None:
    ctx = make_ctx(
        user_features={
            "user_activity:top_categories": ["cooking"],
            "user_activity:top_category_affinities": [2.0],
        }
    )
    kept = cand("kept", 9)
    kept.reason = "Because you watched Pasta 101"
    explored = cand("explored", 8, age_h=500, extra={RERANK_EXPLORATION: True})
    fresh = cand("fresh", 7, age_h=2)
    liked = cand("liked", 6, category="cooking", age_h=500)
    social = cand("social", 5, category="cars", age_h=500, sources=("social",))
    unknown = cand("unknown", 4, category="cars", age_h=500, sources=("mystery",))
    sponsored = ad("ad", 1.0, reason=None)
    given = [kept, explored, fresh, liked, social, unknown, sponsored]
    out = ReasonPolicy().apply(ctx, given)
    reasons = {c.item_id: c.reason for c in out}
    assert reasons == {
        "kept": "Because you watched Pasta 101",
        "explored": NEW_FOR_YOU,
        "fresh": NEW_FOR_YOU,
        "liked": "Because you like cooking",
        "social": "Liked by people you follow",
        "unknown": FALLBACK_REASON,
        "ad": "Sponsored",
    }
    assert all(c.reason for c in out)


def test_new_user_reasons_cite_onboarding_interests() -> None:
    ctx = make_ctx(params={"interests": "jazz, hiking"})
    out = ReasonPolicy().apply(ctx, [cand("j", 1, category="jazz", age_h=1000)])
    assert out[0].reason == "Based on your interest in jazz"


def test_reason_policy_ignores_history_of_users_who_opted_out() -> None:
    ctx = make_ctx(
        personalization=False,
        user_features={
            "user_activity:top_categories": ["cooking"],
            "user_activity:top_category_affinities": [1.0],
        },
    )
    out = ReasonPolicy().apply(ctx, [cand("c", 1, category="cooking", age_h=1000, sources=("trending",))])
    assert out[0].reason == "Trending now"


@pytest.mark.parametrize("slots", [(-1,)])
def test_sponsored_slots_must_be_positions(slots: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        SponsoredSlotPolicy(slots=slots)


def test_now_is_the_request_instant() -> None:
    # Reasons judge age by ctx.now, not the wall clock, so one request sees one instant.
    assert make_ctx().now.timestamp() == NOW_S
