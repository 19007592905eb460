"""Typed reads of Redis streams for assertions (redis-py's stubs return loose unions)."""

from __future__ import annotations

from typing import cast

from features.redis_store import RedisStore


def stream_entries(store: RedisStore, stream: str) -> list[tuple[str, dict[str, str]]]:
    """Every entry of a stream, oldest first, as decoded strings."""
    reply = store.client.xrange(stream) or []
    return cast(list[tuple[str, dict[str, str]]], reply)
