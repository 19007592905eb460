"""The fault suite's world: one Serve application on a Redis of its own, shared by every scenario.

The application runs against a private ``redis-server`` with an append-only file
(``appendfsync always``), so the Redis scenario can stop and restart it without touching the
shared Redis the other integration tests use, and so every event acknowledged before the stop is
still there after it. The world is the one of ``tests/integration/test_serving_graph.py``: a tiny
synthetic world imported into a temporary lake, its newest events replayed into the online store,
the session's smoke-sized release (``tests/integration/smoke_release.py``) installed as
``production``; the surfaces' budgets are widened
the same way so a slow moment of the shared machine is not mistaken for a fault.

The ingress runs two replicas (as an operator runs it for availability), the model deployments
one each, without autoscaling, so a killed replica is replaced rather than scaled around.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from features.redis_store import RedisStore
from tests.faults.harness import ADMIN_TOKEN, APP, FaultApp
from tests.integration.conftest import REDIS_URL
from tests.integration.ray_session import ray_cluster
from tests.integration.smoke_release import busiest_users, import_world, smoke_registry
from tests.integration.test_redis_outage import DurableRedis, _free_port
from tests.integration.test_serving_graph import WIDEN, _test_surfaces

__all__ = ["fault_app", "ray_cluster"]

REPLICAS = {"ingress": 2, "retrieval": 1, "ranker": 1}
INGRESS_CPUS = 0.25
"""Two ingress replicas, the model deployments and the stream workers fit the two-CPU test cluster."""


def _fault_config(args: dict[str, Any], port: int) -> dict[str, Any]:
    from deployments.reload import serve_config

    config = serve_config(
        APP, args, host="127.0.0.1", port=port, env_vars={"RAYREC_ADMIN_TOKEN": ADMIN_TOKEN}
    )
    for deployment in config["applications"][0]["deployments"]:
        replicas = REPLICAS.get(deployment["name"])
        if replicas is not None:
            deployment.pop("autoscaling_config", None)
            deployment["num_replicas"] = replicas
        if deployment["name"] == "ingress":
            deployment["ray_actor_options"] = {"num_cpus": INGRESS_CPUS}
    return config


@pytest.fixture(scope="package")
def fault_app(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultApp]:
    """The Serve application with a trained bundle, on a durable private Redis."""
    from ray import serve

    from deployments.reload import deploy

    if shutil.which("redis-server") is None:
        pytest.skip("the fault suite needs redis-server for its own durable Redis")
    base = tmp_path_factory.mktemp("faults")
    redis_dir = base / "redis"
    redis_dir.mkdir()
    redis_server = DurableRedis(_free_port(), redis_dir)
    redis_server.start()
    home = base / "home"
    settings = Settings.from_env(None, redis_url=redis_server.url, namespace="faults", home=str(home))
    store = RedisStore.from_settings(settings)
    try:
        lake = import_world(home, store)
        version = smoke_registry(tmp_path_factory, REDIS_URL, home)

        users = busiest_users(lake)

        port = _free_port()
        args = {
            "home": str(home),
            "namespace": settings.namespace,
            "redis_url": settings.redis_url,
            "serving": {
                "surfaces_path": str(_test_surfaces(home / "surfaces.yaml")),
                # Three failures open it whatever came before: the traffic here is light and
                # the ratio rule is the unit tests' business.
                "breaker": {"failure_threshold": 3, "failure_ratio": 0.01, "window_s": 30, "cooldown_s": 1.0},
                "user_read_ms": 15 * WIDEN,
                "fallback_read_ms": 10 * WIDEN,
            },
        }
        deploy(_fault_config(args, port), timeout_s=600)
        app = FaultApp(
            url=f"http://127.0.0.1:{port}",
            home=Path(home),
            settings=settings,
            store=store,
            redis=redis_server,
            version=version,
            users=users,
            reports=base / "reports",
        )
        app.wait_serving()
        yield app
    finally:
        with contextlib.suppress(Exception):  # Serve may not have started when setup failed
            serve.delete(APP)
            serve.shutdown()  # type: ignore[no-untyped-call]
        store.close()
        redis_server.stop()
