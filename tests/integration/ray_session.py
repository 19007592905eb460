"""One local Ray cluster per test session, shared by every module that needs Ray."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    from deployments.commands import ray_runtime_env

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        # Two CPUs, as on the machines this runs on; the working tree is importable on workers
        # because they inherit the driver's working directory and PYTHONPATH.
        # The Serve settings the product runs with (deployments.commands.connect_ray).
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=ray_runtime_env())
        started = True
    yield
    if started:
        ray.shutdown()
