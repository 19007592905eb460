"""Bearer-token checks: admin and catalog-write routes need the admin token."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from deployments.api.services import ApiServices

_bearer = HTTPBearer(auto_error=False, description="The admin token (RAYREC_ADMIN_TOKEN).")


def services_of(request: Request) -> ApiServices:
    """The process's services, attached to the app at creation."""
    svc: ApiServices = request.app.state.services
    return svc


# The dependencies are coroutines although they never wait: FastAPI runs a plain function
# dependency in its thread pool, a thread hop per dependency and request on the read path.


async def services(request: Request) -> ApiServices:
    """The process's services (a dependency)."""
    return services_of(request)


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the call unless it carries the admin token.

    Raises:
        HTTPException: 401 without a bearer token, 403 with a wrong one, 503 when no admin token
            is configured (the routes are then disabled rather than open).
    """
    expected = services_of(request).settings.admin_token_value()
    if expected is None:
        raise HTTPException(503, "admin routes are disabled: RAYREC_ADMIN_TOKEN is not set")
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            401, "missing bearer token in the Authorization header", {"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(403, "the bearer token is not the admin token")


async def require_client(request: Request) -> None:
    """Refuse the call when client API keys are configured and ``X-API-Key`` is not one of them."""
    keys = services_of(request).settings.client_api_keys
    if not keys:
        return
    given = request.headers.get("x-api-key")
    if given is None:
        raise HTTPException(401, "missing X-API-Key header")
    if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
        raise HTTPException(403, "unknown API key")


Admin = Depends(require_admin)
Client = Depends(require_client)
