"""Builds the frozen ``RequestContext`` of a recommendation request: profile and features read once.

One ``MGET`` reads both the user's profile record (privacy switch, interests, region, language,
age group) and the user's packed feature record, under a small budget of its own. Every stage of
the pipeline then reads ``ctx.user_features``; nothing else reads the user from Redis again.

The privacy switch is strong state (seed section 18): it is read fresh on every request, and when
it cannot be read the request is served as for a user who opted out, never the other way round.
A user who opted out gets no behaviour features and no profile fields in the context, so only the
non-personalised sources (trending, popular, ...) have anything to work with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from core.deadlines import within
from core.schema import EntityType, utcnow
from core.types import EMPTY_FEATURES, FeatureMap, ParamValue, RequestContext, monotonic_deadline
from features.candidate_refs import USER_AGE_GROUP, USER_INTERESTS, USER_LANGUAGE, USER_REGION
from features.definitions import serving_features
from features.redis_store import RedisStore, StoreUnavailable
from features.serving_record import loads as load_record

logger = logging.getLogger(__name__)

DEFAULT_READ_BUDGET_MS: Final = 15.0
"""Time the profile and feature read may take before the request goes on without them."""


@dataclass(frozen=True, slots=True)
class BuiltContext:
    """A request's context and how its user read went.

    Attributes:
        ctx: The frozen context every stage shares.
        user_read_ok: False when the profile and features could not be read (Redis down or late);
            the context then carries no personalisation.
    """

    ctx: RequestContext
    user_read_ok: bool


def _profile_features(profile: Mapping[str, Any]) -> dict[str, Any]:
    interests = profile.get("interests")
    return {
        USER_INTERESTS: [str(i) for i in interests] if isinstance(interests, list) and interests else None,
        USER_REGION: profile.get("region") if isinstance(profile.get("region"), str) else None,
        USER_LANGUAGE: profile.get("language") if isinstance(profile.get("language"), str) else None,
        USER_AGE_GROUP: profile.get("age_group") if isinstance(profile.get("age_group"), str) else None,
    }


class RequestContextBuilder:
    """Reads a user's profile and features and freezes them into a ``RequestContext``.

    Args:
        store: The Redis store.
        read_budget_ms: Time the one ``MGET`` may take.
        clock: Wall clock, timezone-aware (injectable for tests).
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        read_budget_ms: float = DEFAULT_READ_BUDGET_MS,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self.read_budget_ms = read_budget_ms
        self._clock = clock

    async def build(
        self,
        *,
        request_id: str,
        user_id: str,
        surface: str,
        limit: int,
        total_budget_ms: float,
        item_id: str | None = None,
        device: str | None = None,
        exclude_seen: bool = True,
        params: Mapping[str, ParamValue] | None = None,
        experiment_id: str | None = None,
        arm: str | None = None,
        read_user: bool = True,
    ) -> BuiltContext:
        """Read the user and build the context.

        The deadline is taken before the read, so the read counts against the surface's total.

        Args:
            request_id: Id of the request.
            user_id: The user.
            surface: The surface.
            limit: Items to return.
            total_budget_ms: The surface's total budget; the context's deadline.
            item_id: Seed item of item-to-item surfaces.
            device: Device class of the client.
            exclude_seen: Whether consumed items are filtered out.
            params: Per-request overrides.
            experiment_id: Experiment the request was assigned in.
            arm: Its arm.
            read_user: False for an anonymous request: nothing is read and nothing personalised.

        Returns:
            The context, and whether the user could be read.
        """
        deadline = monotonic_deadline(total_budget_ms)
        now = self._clock()
        if read_user:
            profile, features, ok = await self._read(user_id, now)
        else:
            profile, features, ok = None, EMPTY_FEATURES, True
        personalization = (
            read_user and ok and profile is not None and profile.get("personalization", True) is not False
        )
        region = language = None
        user_features = EMPTY_FEATURES
        if personalization and profile is not None:
            user_features = features.with_values(_profile_features(profile))
            region = user_features.get_str(USER_REGION, "") or None
            language = user_features.get_str(USER_LANGUAGE, "") or None
        elif personalization:
            # A user the catalog does not know yet: the behaviour recorded so far still counts.
            user_features = features
        ctx = RequestContext(
            request_id=request_id,
            user_id=user_id,
            surface=surface,
            limit=limit,
            now=now,
            deadline=deadline,
            device=device,
            region=region,
            language=language,
            item_id=item_id,
            experiment_id=experiment_id,
            arm=arm,
            user_features=user_features,
            exclude_seen=exclude_seen,
            personalization=personalization,
            params=dict(params or {}),
        )
        return BuiltContext(ctx=ctx, user_read_ok=ok)

    async def _read(self, user_id: str, now: datetime) -> tuple[dict[str, Any] | None, FeatureMap, bool]:
        keys = self._store.keys
        try:
            profile, record = await within(
                # The profile is a JSON object and the record a serving record: load_record reads both.
                self._store.amget_json(
                    [keys.user(user_id), keys.features(EntityType.USER, user_id)], unpack=load_record
                ),
                self.read_budget_ms / 1000.0,
            )
        except (StoreUnavailable, TimeoutError, ValueError) as exc:
            # ValueError: a record that is not a JSON object; the request must still be served.
            logger.warning("user %r could not be read; serving without personalisation: %s", user_id, exc)
            return None, EMPTY_FEATURES, False
        return profile, serving_features(record, now), True
