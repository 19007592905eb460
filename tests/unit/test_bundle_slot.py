"""The model slot of a deployment: no bundle, a bad bundle, and the user_config it accepts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.bundle_slot import BundleSlot, ModelUserConfig
from deployments.wire import NO_MODEL
from training.registry import ModelRegistry


def test_without_a_registered_bundle_the_slot_serves_no_model(tmp_path: Path) -> None:
    slot: BundleSlot[object] = BundleSlot(str(tmp_path), lambda release: release, name="test")
    asyncio.run(slot.apply("production", wait=True))
    status = slot.status()
    assert slot.served() == (NO_MODEL, None)
    assert status.version == NO_MODEL and status.target == "production" and not status.loading
    assert status.error is not None and "production" in status.error


def test_a_bundle_that_does_not_load_leaves_the_served_state_and_reports_why(tmp_path: Path) -> None:
    source = tmp_path / "bundle"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"not a release")
    version = ModelRegistry(str(tmp_path)).register(source).version
    slot: BundleSlot[object] = BundleSlot(str(tmp_path), lambda release: release, name="test")
    asyncio.run(slot.apply(version, wait=True))
    assert slot.version == NO_MODEL
    assert slot.status().target == version and slot.status().error


def test_no_bundle_at_all_is_a_valid_choice(tmp_path: Path) -> None:
    slot: BundleSlot[object] = BundleSlot(str(tmp_path), lambda release: release, name="test")
    asyncio.run(slot.apply(None, wait=True))
    assert slot.status().error is None and slot.version == NO_MODEL


def test_user_config_is_strict() -> None:
    assert ModelUserConfig.model_validate({}).bundle == "production"
    assert (
        ModelUserConfig.model_validate({"bundle": None, "fault": "slow", "fault_delay_ms": 50}).fault
        == "slow"
    )
    with pytest.raises(ValidationError):
        ModelUserConfig.model_validate({"fault": "explode"})
    with pytest.raises(ValidationError):
        ModelUserConfig.model_validate({"bundel": "production"})


def test_load_now_raises_what_the_load_raised_and_serves_nothing(tmp_path: Path) -> None:
    slot: BundleSlot[object] = BundleSlot(str(tmp_path), lambda release: release, name="test")
    with pytest.raises(Exception, match="production"):
        slot.load_now("production")
    assert slot.served() == (NO_MODEL, None)


def test_configure_validates_and_the_drills_fail_or_delay(tmp_path: Path) -> None:
    slot: BundleSlot[object] = BundleSlot(str(tmp_path), lambda release: release, name="test")
    with pytest.raises(ValidationError):
        asyncio.run(slot.configure({"fault": "explode"}))
    config = asyncio.run(slot.configure({"bundle": None, "fault": "raise"}))
    assert slot.status().target is None and slot.version == NO_MODEL
    with pytest.raises(RuntimeError, match="ranker failure drill"):
        asyncio.run(config.drill("ranker"))
    slow = ModelUserConfig(fault="slow", fault_delay_ms=30)
    started = asyncio.run(_timed(slow.drill("retrieval")))
    assert started >= 0.025
    asyncio.run(ModelUserConfig().drill("ranker"))


async def _timed(job: Any) -> float:
    begun = time.perf_counter()
    await job
    return time.perf_counter() - begun
