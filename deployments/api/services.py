"""What the HTTP routes need, built once per process (one Serve replica, or one test)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.settings import Settings
from features.catalog_changes import CatalogChanges
from features.intake import EventIntake
from features.redis_store import RedisStore

if TYPE_CHECKING:
    from deployments.recommender.service import RecommendationService


@dataclass
class ApiServices:
    """The objects behind the routes.

    Attributes:
        settings: Validated settings.
        store: The online store (pools shared by all routes of the process).
        intake: The event hand-off to the stream.
        changes: Catalog, moderation and privacy writes.
        stream_stats: Reports of the stream consumers, where they run beside this app.
        recommendations: The read path, where this process serves it (the Serve ingress).
    """

    settings: Settings
    store: RedisStore
    intake: EventIntake
    changes: CatalogChanges
    stream_stats: Callable[[], Awaitable[dict[str, Any]]] | None = None
    recommendations: RecommendationService | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiServices:
        """Open pools and build the services; no network call is made here."""
        store = RedisStore.from_settings(settings)
        return cls(
            settings=settings,
            store=store,
            intake=EventIntake(store, settings.stream_max_len),
            changes=CatalogChanges(store),
        )

    def close(self) -> None:
        """Release the connection pools."""
        self.store.close()
