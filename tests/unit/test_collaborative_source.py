"""The ``collaborative`` source: EASE candidates from the request's positive history."""

from __future__ import annotations

import asyncio

import numpy as np

from core.types import FeatureInput
from deployments.retrieval_model import HistoryScorer
from retrieval.sources.collaborative_source import CollaborativeSource
from tests.unit.serving_fixtures import NOW_S, ids, make_ctx
from training.collaborative import CollaborativeModel

ITEMS = ["a", "b", "c", "d", "e", "f"]


def _scorer() -> HistoryScorer:
    # Two taste groups: users of a/b/c and users of d/e/f.
    users = np.repeat(np.arange(40), 2)
    rng = np.random.default_rng(0)
    first = rng.integers(0, 3, size=40)
    second = (first + rng.integers(1, 3, size=40)) % 3
    group = (np.arange(40) >= 20) * 3
    rows = np.stack([first + group, second + group], axis=1).reshape(-1)
    model = CollaborativeModel.fit(users, rows, len(ITEMS), 1.0)
    return HistoryScorer(model, ITEMS, {item: n for n, item in enumerate(ITEMS)})


def _history(items: list[str], types: list[str]) -> dict[str, FeatureInput]:
    return {
        "user_activity:recent_item_ids": items,
        "user_activity:recent_event_types": types,
        "user_activity:recent_event_ts": [NOW_S - 60 * (n + 1) for n in range(len(items))],
    }


def test_candidates_follow_the_history_and_leave_it_out() -> None:
    source = CollaborativeSource(_scorer(), max_candidates=2)
    ctx = make_ctx(user_features=_history(["a", "b"], ["like", "view"]))
    got = asyncio.run(source.fetch(ctx))
    assert ids(got) == ["c"]  # the other group's items score below zero and are not offered
    assert got[0].retrieval_score == 1.0
    liked = make_ctx(user_features=_history(["d", "a", "b"], ["like", "like", "view"]))
    assert "e" in ids(asyncio.run(source.fetch(liked)))


def test_no_history_negative_feedback_or_consent_gives_nothing() -> None:
    source = CollaborativeSource(_scorer())
    assert asyncio.run(source.fetch(make_ctx())) == []
    hidden = make_ctx(user_features=_history(["a"], ["not_interested"]))
    assert asyncio.run(source.fetch(hidden)) == []
    opted_out = make_ctx(user_features=_history(["a"], ["like"]), personalization=False)
    assert asyncio.run(source.fetch(opted_out)) == []
    unknown = make_ctx(user_features=_history(["zzz"], ["like"]))
    assert asyncio.run(source.fetch(unknown)) == []
