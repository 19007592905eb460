from __future__ import annotations

import pytest

from core.stages import Filter, StageContractError
from core.types import Candidate, FeatureMap
from features.candidate_refs import (
    SERVING_BLOCKED_CREATOR,
    SERVING_BLOCKED_ITEM,
    SERVING_EXCLUDED,
    SERVING_REMOVED,
    SERVING_USER_BLOCKED_CREATOR,
)
from policies.exclusion_filter import ExclusionFilter
from policies.global_block_filter import GlobalBlockFilter
from policies.purchased_filter import PurchasedFilter
from policies.removed_item_filter import RemovedItemFilter
from policies.seen_in_session_filter import SeenInSessionFilter
from policies.user_block_filter import UserBlockFilter
from tests.unit.serving_fixtures import CLEAN_FLAGS, NOW_S, ids, make_ctx

FLAG_FILTERS: list[tuple[Filter, tuple[str, ...]]] = [
    (RemovedItemFilter(), (SERVING_REMOVED,)),
    (GlobalBlockFilter(), (SERVING_BLOCKED_ITEM, SERVING_BLOCKED_CREATOR)),
    (UserBlockFilter(), (SERVING_USER_BLOCKED_CREATOR,)),
    (ExclusionFilter(), (SERVING_EXCLUDED,)),
]


def flagged(item_id: str, **flags: bool) -> Candidate:
    values = dict(CLEAN_FLAGS)
    values.update({f"serving:{k}": v for k, v in flags.items()})
    return Candidate(item_id=item_id, features=FeatureMap(values))


def check_partition(
    result_kept: list[Candidate], result_removed: list[Candidate], given: list[Candidate]
) -> None:
    # The filter contract: kept + removed is exactly the input, each side in input order.
    assert sorted(ids(result_kept) + ids(result_removed)) == sorted(ids(given))
    order = {c.item_id: i for i, c in enumerate(given)}
    for side in (result_kept, result_removed):
        positions = [order[c.item_id] for c in side]
        assert positions == sorted(positions)


@pytest.mark.parametrize(("stage", "refs"), FLAG_FILTERS, ids=lambda x: getattr(x, "name", ""))
def test_flag_filters_remove_exactly_the_flagged(stage: Filter, refs: tuple[str, ...]) -> None:
    assert isinstance(stage, Filter)
    given = [flagged("clean")]
    for n, ref in enumerate(refs):
        given.append(flagged(f"hit{n}", **{ref.split(":")[1]: True}))
    given.append(flagged("clean2"))
    # Flags of other filters never trigger this one.
    others = {r for _, rs in FLAG_FILTERS for r in rs} - set(refs)
    for n, ref in enumerate(sorted(others)):
        given.append(flagged(f"other{n}", **{ref.split(":")[1]: True}))
    result = stage.apply(make_ctx(), given)
    check_partition(result.kept, result.removed, given)
    assert sorted(ids(result.removed)) == sorted(f"hit{n}" for n in range(len(refs)))


@pytest.mark.parametrize(("stage", "refs"), FLAG_FILTERS, ids=lambda x: getattr(x, "name", ""))
def test_flag_filters_refuse_candidates_without_serving_state(stage: Filter, refs: tuple[str, ...]) -> None:
    with pytest.raises(StageContractError, match="serving-state hydrator"):
        stage.apply(make_ctx(), [Candidate(item_id="unchecked")])


def test_purchased_filter_removes_recent_purchases_only() -> None:
    ctx = make_ctx(
        user_features={
            "user_activity:recent_item_ids": ["a", "b", "c"],
            "user_activity:recent_event_types": ["purchase", "view", "purchase"],
            "user_activity:recent_event_ts": [NOW_S - 10, NOW_S - 20, NOW_S - 30],
        }
    )
    given = [Candidate(item_id=i) for i in ("a", "b", "c", "d")]
    result = PurchasedFilter().apply(ctx, given)
    check_partition(result.kept, result.removed, given)
    assert ids(result.removed) == ["a", "c"]
    assert ids(result.kept) == ["b", "d"]


def test_purchased_filter_keeps_everything_without_history() -> None:
    given = [Candidate(item_id="a")]
    result = PurchasedFilter().apply(make_ctx(), given)
    assert ids(result.kept) == ["a"] and result.removed == []


def test_seen_in_session_filter_honours_exclude_seen() -> None:
    features = {"user_activity:session_item_ids": ["a", "c"]}
    given = [Candidate(item_id=i) for i in ("a", "b", "c")]
    result = SeenInSessionFilter().apply(make_ctx(user_features=features), given)
    check_partition(result.kept, result.removed, given)
    assert ids(result.removed) == ["a", "c"]
    repeats_allowed = SeenInSessionFilter().apply(make_ctx(user_features=features, exclude_seen=False), given)
    assert ids(repeats_allowed.kept) == ["a", "b", "c"]


def test_filter_names_are_snake_case_ids() -> None:
    names = [f.name for f, _ in FLAG_FILTERS] + [PurchasedFilter().name, SeenInSessionFilter().name]
    assert names == [
        "removed_item",
        "global_block",
        "user_block",
        "exclusion",
        "purchased",
        "seen_in_session",
    ]
