"""Property-based fuzzing of the HTTP API from its own OpenAPI schema, in-process over ASGI.

Schemathesis generates valid and invalid calls for every operation the schema lists and checks
each answer: never a 5xx, a status the operation documents, and a body that matches the schema
documented for that status. Admin routes are called with the admin token, so they are fuzzed past
the token check. The read path runs over a model gateway without models (the popular fallback),
and the event rate limit is on with a limit no run reaches, so its code path runs on every event
call without refusing any.

The run is bounded: ``MAX_EXAMPLES`` calls per operation, no example database kept,
and a timeout on the whole test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from core.settings import Settings
from deployments.api.app import create_app
from deployments.api.services import ApiServices
from deployments.recommender.options import ServingOptions
from deployments.recommender.service import RecommendationService
from features.metrics import StreamMetrics
from tests.integration.conftest import REDIS_URL
from tests.integration.no_models import NoModels

pytestmark = pytest.mark.integration

TOKEN = "fuzz-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "30"))
"""Calls per operation; CI keeps the default, a deeper local run sets ``FUZZ_MAX_EXAMPLES``."""
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


def _services() -> ApiServices:
    settings = Settings.from_env(
        None,
        redis_url=REDIS_URL,
        namespace=f"fuzz-{uuid4().hex[:8]}",
        admin_token=TOKEN,
        rate_limit_events_per_s=1_000_000.0,
        rate_limit_events_burst=10_000_000,
    )
    services = ApiServices.from_settings(settings)
    # Refreshes far apart: the service's loops live in the client's event loop thread until the
    # process ends, and must not keep reading a namespace that is gone.
    options = ServingOptions(popular_refresh_s=86_400.0, catalog_refresh_s=86_400.0)
    services.recommendations = RecommendationService(services.store, NoModels(), options)
    return services


# Built at import: schemathesis.pytest.from_fixture, the lazy loader, fails under pytest 9.2
# (it sets Function._nodeid, which pytest 9.2 no longer has). Building the app opens no
# connection; only the calls need Redis, and the fixture below skips them when it is missing.
SERVICES = _services()
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(SERVICES, stream_metrics=StreamMetrics()))


@pytest.fixture(scope="module", autouse=True)
def fuzz_namespace(redis_settings: Settings) -> Iterator[None]:
    SERVICES.store.delete_namespace()
    try:
        yield
    finally:
        SERVICES.store.delete_namespace()
        SERVICES.close()


@pytest.mark.timeout(900)
@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=list(HealthCheck),
)
def test_api_holds_its_schema(case: Case[Any]) -> None:
    case.call_and_validate(headers=ADMIN, checks=CHECKS)
