"""One local Ray cluster per test session, shared by every module that needs Ray."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
TEST_DRAIN_S = "2"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    from deployments.commands import ray_runtime_env

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        # Two CPUs, as on the machines this runs on; the working tree is importable on workers
        # because they inherit the driver's working directory and PYTHONPATH.
        # The Serve settings the product runs with (deployments.commands.connect_ray), but for
        # the drain of a stopping ingress replica: 30 s by default, so that a load balancer
        # outside Serve stops sending to it first. Serve's own HAProxy drops a stopping replica
        # at once, and the tests delete and redeploy apps often.
        runtime_env = ray_runtime_env()
        runtime_env["env_vars"][DRAIN_ENV] = os.environ.get(DRAIN_ENV, TEST_DRAIN_S)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
        started = True
    yield
    if started:
        ray.shutdown()
