"""Fixtures for tests against the real Redis server at 127.0.0.1:6379."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from uuid import uuid4

import pytest
import redis

from core.settings import Settings
from features.redis_store import RedisStore
from tests.integration.ray_session import ray_cluster

__all__ = ["ray_cluster", "redis_settings", "store"]

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
START_COMMAND = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    REDIS_HOST,
    "--port",
    str(REDIS_PORT),
    "--save",
    "",
    "--appendonly",
    "no",
]


def _answers() -> bool:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _ensure_redis() -> str | None:
    """Make Redis answer; return why it cannot, or None when it does."""
    if _answers():
        return None
    if shutil.which("redis-server") is None:
        return f"Redis does not answer at {REDIS_URL} and redis-server is not installed"
    result = subprocess.run(START_COMMAND, capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        return f"redis-server failed to start: {result.stderr.strip() or result.stdout.strip()}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _answers():
            return None
        time.sleep(0.1)
    return f"redis-server was started but does not answer at {REDIS_URL} after 10 s"


@pytest.fixture(scope="session")
def redis_settings() -> Iterator[Settings]:
    problem = _ensure_redis()
    if problem is not None:
        pytest.skip(f"integration tests need Redis: {problem}")
    yield Settings.from_env(redis_url=REDIS_URL, namespace=f"test-{uuid4().hex[:8]}")


@pytest.fixture
def store(redis_settings: Settings) -> Iterator[RedisStore]:
    redis_store = RedisStore.from_settings(redis_settings)
    redis_store.delete_namespace()
    try:
        yield redis_store
    finally:
        redis_store.delete_namespace()
        redis_store.close()
