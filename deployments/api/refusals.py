"""The refusals every route can answer, added to the OpenAPI schema from what each route depends on.

Some answers come from layers around the route rather than from its own code: the token and key
checks (:mod:`deployments.api.auth`), the body limit and the JSON parse, and the store-down
handler. Declaring them route by route drifts as routes are added, so they are derived here from
each route's dependencies and body, and the schema lists every status a route can answer:

- a route behind the admin token: ``401`` (no token), ``403`` (wrong token) and ``503`` (no
  token configured: admin routes are disabled, never open);
- a route behind the client keys: ``401`` (no ``X-API-Key``) and ``403`` (unknown key), answered
  only when ``RAYREC_CLIENT_API_KEYS`` is set;
- a route with a JSON body: ``400`` (not JSON, not UTF-8, or a ``Content-Length`` that is not a
  number) and ``413`` (over the body limit);
- a route that reads or writes the online store: ``503`` with ``Retry-After`` when Redis does not
  answer.

A status the route module already documents keeps its own description.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from deployments.api.auth import require_admin, require_client, services
from deployments.api.errors import ErrorBody

ERROR_REF: Final = "#/components/schemas/ErrorBody"

_ADMIN: Final = {
    "401": "No bearer token in the `Authorization` header.",
    "403": "The bearer token is not the admin token.",
    "503": "Admin routes are disabled (`RAYREC_ADMIN_TOKEN` is not set), or the store did not answer.",
}
_CLIENT: Final = {
    "401": "Client keys are configured and the call has no `X-API-Key` header.",
    "403": "The `X-API-Key` header holds no configured client key.",
}
_BODY: Final = {
    "400": "The body is not JSON (or not UTF-8), or `Content-Length` is not a number.",
    "413": "The body is larger than the API accepts (4 MiB).",
}
_STORE: Final = {"503": "The online store did not answer: retry after `Retry-After` seconds."}


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _calls(sub)


def route_refusals(route: APIRoute) -> dict[str, str]:
    """Status code to description of the refusals ``route`` can answer beyond its own code.

    Args:
        route: A route of the app.

    Returns:
        The statuses that its dependencies and body make possible.
    """
    calls = set(_calls(route.dependant))
    out: dict[str, str] = {}
    if route.body_field is not None:
        out.update(_BODY)
    # Every route that gets the process's services may reach Redis through them.
    if services in calls:
        out.update(_STORE)
    if require_client in calls:
        out.update(_CLIENT)
    if require_admin in calls:
        out.update(_ADMIN)
    return out


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}}


def _ensure_error_schema(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorBody" in components:
        return
    body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(body.pop("$defs", {}))
    components["ErrorBody"] = body


def api_routes(app: FastAPI) -> Iterator[tuple[str, APIRoute]]:
    """Every API route of ``app`` with the path it is served at.

    FastAPI builds the routes of an included router lazily, behind one ``_IncludedRouter`` entry
    of ``app.routes`` per router; each exposes its routes through ``effective_route_contexts``.
    Plain ``APIRoute`` entries (routes added to the app itself) are taken as they are.
    """
    for route in app.routes:
        if isinstance(route, APIRoute):
            yield route.path_format, route
            continue
        contexts = getattr(route, "effective_route_contexts", None)
        if not callable(contexts):
            continue
        for context in contexts():
            original = getattr(context, "original_route", None)
            if isinstance(original, APIRoute):
                yield str(getattr(context, "path", original.path_format)), original


def add_refusals(app: FastAPI, schema: dict[str, Any]) -> None:
    """Add the derived refusals to a generated schema, in place; a status already there is kept."""
    added = False
    for path, route in api_routes(app):
        if not route.include_in_schema:
            continue
        refusals = route_refusals(route)
        path_item = schema.get("paths", {}).get(path, {})
        for method in route.methods or ():
            operation = path_item.get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            for status, description in refusals.items():
                if status not in responses:
                    responses[status] = _error_response(description)
                    added = True
    if added:
        _ensure_error_schema(schema)


def document(app: FastAPI) -> None:
    """Have ``app``'s OpenAPI schema list the derived refusals (see the module docstring).

    Args:
        app: The application; may be called before or after its routers are included, since the
            schema is built when it is first asked for (and again when routes change).
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        # FastAPI hands back its cached schema until the routes change; adding is idempotent,
        # so a rebuilt schema gets the refusals again and a cached one is left as it is.
        add_refusals(app, schema)
        return schema

    # FastAPI's documented way to extend the generated schema is to replace app.openapi.
    app.openapi = openapi  # type: ignore[method-assign]
