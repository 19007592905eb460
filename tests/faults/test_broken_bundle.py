"""Scenario 5: a bundle with corrupt ranker weights is registered, promoted and applied.

The replicas refuse it at load (its checksums do not match) and keep serving the previous
release; the application's config is put back to that release's explicit version, so a replica
started afterwards (here: one killed and replaced) loads the previous release, not the alias that
now names the broken one; the status route says which bundle was refused and why.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.faults.harness import APP, FaultApp, TrafficDriver, kill_replica, until, wait_replaced
from training.registry import ModelRegistry

# The first scenario of a run also waits for the shared application (a smoke training run).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]


def _broken_copy(fault_app: FaultApp, registry: ModelRegistry) -> str:
    """Register a copy of the serving bundle, then corrupt its ranker weights in the registry."""
    staging = Path(tempfile.mkdtemp())
    try:
        for path in (fault_app.home / "artifacts" / "bundles" / fault_app.version).iterdir():
            if path.is_dir():
                shutil.copytree(path, staging / path.name)
            elif path.name != "manifest.json":
                shutil.copy(path, staging / path.name)
        broken = registry.register(staging, config={"description": "ranker weights to be corrupted"})
    finally:
        shutil.rmtree(staging)
    weights = fault_app.home / "artifacts" / "bundles" / broken.version / "ranker.pt"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    return broken.version


def test_a_broken_bundle_is_refused_and_the_previous_one_keeps_serving(fault_app: FaultApp) -> None:
    from deployments.reload import BundleLoadError, apply_bundle, deployed_config, model_statuses

    registry = ModelRegistry(str(fault_app.home))
    broken = _broken_copy(fault_app, registry)
    with TrafficDriver(fault_app, "broken-bundle") as traffic:
        traffic.wait_calls(10)
        registry.promote(broken, "production")
        try:
            with pytest.raises(BundleLoadError) as refused:
                apply_bundle(APP, "production", timeout_s=120)
        finally:
            registry.rollback("production")
        assert refused.value.version == broken
        traffic.wait_calls(10)

        # The status route says which bundle was refused and why.
        models = fault_app.admin_status()["models"]
        refusal = str(models[refused.value.deployment]["refused"])
        assert refusal.startswith(f"{broken}: ") and "checksum" in refusal.lower(), refusal
        assert {models["retrieval"]["version"], models["ranker"]["version"]} == {fault_app.version}

        # The deployed config names the serving version, so a replacement replica loads it too.
        config = deployed_config(APP)
        bundles = {
            d.name: d.user_config["bundle"] for d in config.deployments if isinstance(d.user_config, dict)
        }
        assert bundles["retrieval"] == bundles["ranker"] == fault_app.version, bundles
        with traffic.retries_tolerated():
            killed = kill_replica("ranker")
            wait_replaced("ranker", killed, 1)
        until(
            lambda: all(s["version"] == fault_app.version for s in model_statuses(APP, "ranker", calls=3)),
            60,
            "the replacement ranker serving the previous release",
        )
        fault_app.wait_serving()
        traffic.wait_calls(10)
    # While the ranker is replaced, answers are shaped by a fallback; every full answer, before,
    # during and after the refusal, comes from the previous release.
    versions = {c.version for c in traffic.calls if c.fallback == "none"}
    assert versions == {fault_app.version}, versions
    assert broken not in {c.version for c in traffic.calls}
    traffic.finish(refused=broken, reason=refusal[:200])
