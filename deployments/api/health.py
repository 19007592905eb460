"""Liveness and readiness."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from deployments.api.auth import services
from deployments.api.services import ApiServices
from features.redis_store import StoreUnavailable

router = APIRouter(tags=["health"])


class Readiness(BaseModel):
    """Whether this process can serve: ``store`` is ``ok`` or why the online store did not answer."""

    status: Literal["ready", "unavailable"]
    store: str


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "The online store did not answer."}},
)
async def readyz(svc: Annotated[ApiServices, Depends(services)]) -> JSONResponse:
    """Ready when the online store answers; otherwise 503 so a balancer routes elsewhere."""
    try:
        await svc.store.aping()
    except StoreUnavailable as exc:
        return JSONResponse(status_code=503, content={"status": "unavailable", "store": str(exc)})
    return JSONResponse(content={"status": "ready", "store": "ok"})
