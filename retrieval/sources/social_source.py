"""Social retrieval: what the people a user follows recently liked or shared."""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from typing import Any, Final, cast

from core.schema import EntityType, EventType
from core.types import Candidate, RequestContext
from features.redis_store import RedisStore
from features.serving_record import loads as load_record
from features.user_context import RECENT_EVENT_TS, RECENT_EVENT_TYPES, RECENT_ITEM_IDS, recent_events

DEFAULT_SOCIAL_EVENTS: Final[frozenset[str]] = frozenset({EventType.LIKE.value, EventType.SHARE.value})
"""Events of a followee that make an item social proof."""

_VERB: Final = {EventType.SHARE.value: "Shared", EventType.PURCHASE.value: "Bought"}


class SocialSource:
    """Items liked or shared by followed users, scored by how many did and how recently.

    Two round trips: ``SMEMBERS`` of the user's following set, then one ``MGET`` of the
    followees' ``user_activity`` serving records, whose recent-event lists hold the likes and
    shares. A user following more than ``max_followees`` gets a sample, seeded by the request id
    so a retried request sees the same one. Users who opted out of personalisation keep no
    behaviour features, so their activity never appears here.

    Args:
        store: The Redis store.
        name: Stage id.
        budget_ms: Time the source may take.
        max_candidates: How many candidates at most.
        max_followees: Followees read per request.
        event_types: Followee events that count.
        half_life_s: Age at which a followee's event counts half.
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        name: str = "social",
        budget_ms: float = 15.0,
        max_candidates: int = 60,
        max_followees: int = 200,
        event_types: Collection[str] = DEFAULT_SOCIAL_EVENTS,
        half_life_s: float = 3 * 86_400.0,
    ) -> None:
        self.name = name
        self.budget_ms = budget_ms
        self.max_candidates = max_candidates
        self.max_followees = max_followees
        self.event_types = frozenset(event_types)
        self.half_life_s = half_life_s
        self._store = store

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        """Items the user's followees recently liked or shared.

        Args:
            ctx: The request.

        Returns:
            Up to ``max_candidates`` candidates, best first; each names how many followees
            engaged with it.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        if not ctx.personalization:
            return []
        keys = self._store.keys
        with self._store.guard():
            # The clients decode replies, so members are str.
            members = cast(set[str], await self._store.aclient.smembers(keys.following(ctx.user_id)))
        following = sorted(members)
        if not following:
            return []
        if len(following) > self.max_followees:
            following = random.Random(ctx.request_id).sample(following, self.max_followees)
        records = await self._store.amget_json(
            [keys.features(EntityType.USER, u) for u in following], unpack=load_record
        )
        consumed = {e.item_id for e in recent_events(ctx.user_features)}
        now_s = ctx.now.timestamp()
        scores: dict[str, float] = {}
        people: dict[str, set[str]] = {}
        verbs: dict[str, str] = {}
        for followee, record in zip(following, records, strict=True):
            for item_id, event_type, ts_s in _events(record):
                if event_type not in self.event_types or item_id in consumed:
                    continue
                age_s = max(0.0, now_s - ts_s)
                scores[item_id] = scores.get(item_id, 0.0) + math.exp2(-age_s / self.half_life_s)
                people.setdefault(item_id, set()).add(followee)
                if event_type == EventType.SHARE.value or item_id not in verbs:
                    verbs[item_id] = _VERB.get(event_type, "Liked")
        if not scores:
            return []
        ranked = sorted(scores.items(), key=lambda pair: (-pair[1], pair[0]))[: self.max_candidates]
        top = ranked[0][1]
        return [
            Candidate(
                item_id=item_id,
                retrieval_score=score / top,
                reason=_reason(verbs[item_id], len(people[item_id])),
            )
            for item_id, score in ranked
        ]


def _events(record: dict[str, Any] | None) -> list[tuple[str, str, float]]:
    if record is None:
        return []
    item_ids = record.get(RECENT_ITEM_IDS)
    types = record.get(RECENT_EVENT_TYPES)
    stamps = record.get(RECENT_EVENT_TS)
    if not isinstance(item_ids, list) or not isinstance(types, list) or not isinstance(stamps, list):
        return []
    return [(str(i), str(t), float(s)) for i, t, s in zip(item_ids, types, stamps, strict=False)]


def _reason(verb: str, followees: int) -> str:
    if followees > 1:
        return f"{verb} by {followees} people you follow"
    return f"{verb} by people you follow"
