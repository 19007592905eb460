"""Recommendation routes (seed section 3) and the read path's status for operators.

``GET /api/recommendations?userId=u123&surface=home&limit=20`` answers
``{"requestId", "surface", "modelVersion", "experiment", "arm", "fallback", "skippedSources",
"items": [{"itemId", "score", "reason", "position", "sources", "propensity"}]}``. A degraded
answer is still a ``200``: ``fallback`` names the degraded mode (``ranker_prescore``,
``cached_list``, ``popular``, ...), ``skippedSources`` the sources that were late or failed.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.exceptions import RequestValidationError

from core.schema import MAX_ID_LEN, Device, Model
from deployments.api.auth import Admin, Client, services
from deployments.api.errors import ErrorBody
from deployments.api.params import ItemIdPath
from deployments.api.services import ApiServices
from deployments.recommender.service import Recommendation, RecommendationQuery, RecommendationService

MAX_LIMIT = 100
"""Most items one request may ask for."""

SIMILAR_SURFACE = "similar"
"""The surface of ``GET /api/items/{itemId}/similar``."""

_ID_PATTERN = r"^[A-Za-z0-9_\-:.@+=]+$"
_SEEDED_SOURCES = frozenset({"similar_items"})
"""Sources that need a seed item; a surface that requires one of them requires ``itemId``."""

router = APIRouter(prefix="/api", tags=["recommendations"], dependencies=[Client])
admin = APIRouter(prefix="/api/admin", tags=["admin"], dependencies=[Admin])

_REFUSALS: dict[int | str, dict[str, object]] = {
    422: {"model": ErrorBody, "description": "A parameter was refused; `fields` names each one."},
    503: {"model": ErrorBody, "description": "This process does not serve recommendations."},
}

UserIdQuery = Annotated[
    str,
    Query(alias="userId", min_length=1, max_length=MAX_ID_LEN, pattern=_ID_PATTERN, description="The user."),
]
OptionalUserIdQuery = Annotated[
    str | None,
    Query(
        alias="userId",
        min_length=1,
        max_length=MAX_ID_LEN,
        pattern=_ID_PATTERN,
        description="The user, if known.",
    ),
]
LimitQuery = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items to return (1-100).")]
DeviceQuery = Annotated[Device | None, Query(description="Device class of the client.")]


class RecommendedItemBody(Model):
    """One recommended item."""

    item_id: str
    score: float
    reason: str
    position: int
    sources: list[str]
    propensity: float


class RecommendationResponse(Model):
    """A served list."""

    request_id: str
    surface: str
    model_version: str
    experiment: str | None
    arm: str | None
    fallback: str | None
    skipped_sources: dict[str, str]
    items: list[RecommendedItemBody]

    @classmethod
    def of(cls, answer: Recommendation) -> RecommendationResponse:
        """The body of a served list."""
        return cls(
            request_id=answer.request_id,
            surface=answer.surface,
            model_version=answer.model_version,
            experiment=answer.experiment_id,
            arm=answer.arm,
            fallback=answer.fallback,
            skipped_sources=answer.skipped_sources,
            items=[
                RecommendedItemBody(
                    item_id=i.item_id,
                    score=i.score,
                    reason=i.reason,
                    position=i.position,
                    sources=list(i.sources),
                    propensity=i.propensity,
                )
                for i in answer.items
            ],
        )


async def recommender(svc: Annotated[ApiServices, Depends(services)]) -> RecommendationService:
    """The process's recommendation service.

    Raises:
        HTTPException: 503 when this process does not serve the read path.
    """
    if svc.recommendations is None:
        raise HTTPException(503, "this process does not serve recommendations")
    return svc.recommendations


Recommender = Annotated[RecommendationService, Depends(recommender)]


def _refused(field: str, message: str, value: Any) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": ("query", field), "msg": message, "type": "value_error", "input": value}]
    )


def _needs_seed(service: RecommendationService, surface: str) -> bool:
    return any(s.name in _SEEDED_SOURCES and not s.fail_open for s in service.surfaces[surface].sources)


@router.get("/recommendations", response_model=RecommendationResponse, responses=_REFUSALS)
async def recommendations(
    service: Recommender,
    user_id: UserIdQuery,
    surface: Annotated[str, Query(min_length=1, max_length=64, description="A configured surface.")] = "home",
    limit: LimitQuery = 20,
    item_id: Annotated[
        str | None,
        Query(
            alias="itemId", min_length=1, max_length=MAX_ID_LEN, pattern=_ID_PATTERN, description="Seed item."
        ),
    ] = None,
    device: DeviceQuery = None,
    exclude_seen: Annotated[
        bool, Query(alias="excludeSeen", description="Leave out what the user consumed in this session.")
    ] = True,
) -> RecommendationResponse:
    """Recommendations for a user on a surface, best first, each with its reason."""
    if surface not in service.surfaces:
        raise _refused("surface", f"unknown surface; one of {sorted(service.surfaces)}", surface)
    if item_id is None and _needs_seed(service, surface):
        raise _refused("itemId", f"surface {surface!r} needs a seed item", None)
    query = RecommendationQuery(
        user_id=user_id,
        surface=surface,
        limit=limit,
        item_id=item_id,
        device=None if device is None else device.value,
        exclude_seen=exclude_seen,
    )
    return RecommendationResponse.of(await service.recommend(query))


@router.get("/items/{item_id}/similar", response_model=RecommendationResponse, responses=_REFUSALS)
async def similar_items(
    service: Recommender,
    item_id: ItemIdPath,
    user_id: OptionalUserIdQuery = None,
    limit: LimitQuery = 20,
    device: DeviceQuery = None,
) -> RecommendationResponse:
    """Items to show under an item ("you may also like"): its neighbours, then what is trending."""
    if SIMILAR_SURFACE not in service.surfaces:
        raise HTTPException(404, f"the {SIMILAR_SURFACE!r} surface is not configured")
    query = RecommendationQuery(
        user_id=user_id,
        surface=SIMILAR_SURFACE,
        limit=limit,
        item_id=item_id,
        device=None if device is None else device.value,
    )
    return RecommendationResponse.of(await service.recommend(query))


@admin.get("/debug/recommendations", responses=_REFUSALS)
async def explain_recommendations(
    service: Recommender,
    user_id: OptionalUserIdQuery = None,
    surface: Annotated[str, Query(min_length=1, max_length=64, description="A configured surface.")] = "home",
    limit: LimitQuery = 20,
    item_id: Annotated[
        str | None,
        Query(
            alias="itemId", min_length=1, max_length=MAX_ID_LEN, pattern=_ID_PATTERN, description="Seed item."
        ),
    ] = None,
    device: DeviceQuery = None,
) -> dict[str, Any]:
    """One request run through its surface's pipeline, explained stage by stage.

    The answer lists the experiment assignment and the overrides applied, every stage in run
    order with its candidates (sources, scores, scalar features once hydrated), the item ids each
    filter removed, skipped sources with the reason, fallbacks, and the final items with
    position, score, propensity and reason. Nothing is logged or served.
    """
    if surface not in service.surfaces:
        raise _refused("surface", f"unknown surface; one of {sorted(service.surfaces)}", surface)
    if item_id is None and _needs_seed(service, surface):
        raise _refused("itemId", f"surface {surface!r} needs a seed item", None)
    query = RecommendationQuery(
        user_id=user_id,
        surface=surface,
        limit=limit,
        item_id=item_id,
        device=None if device is None else device.value,
    )
    return await service.explain(query)


@admin.get("/serving")
async def serving_status(service: Recommender) -> dict[str, Any]:
    """What this replica serves: model versions, the ranker's breaker, the log, latency medians."""
    return await service.status()
