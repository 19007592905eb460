"""The experiment configuration in the online store: one Redis key holding the whole set as JSON.

The whole :class:`~policies.experiments.ExperimentSet` is one value, written with one ``SET``, so a
reader (a serving replica refreshing its snapshot, the simulator) always sees a complete,
validated configuration and never half of a change. Read-modify-write changes (the admin routes)
go through :func:`update_experiments` / :func:`aupdate_experiments`, which ``WATCH`` the key so two
concurrent changes cannot overwrite each other: the loser re-reads and re-applies its change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from redis.exceptions import WatchError

from features.redis_store import RedisStore
from policies.experiments import ExperimentRegistry

T = TypeVar("T")

MAX_ATTEMPTS = 20
"""How often a read-modify-write is retried when another writer changed the key in between."""


class ExperimentConflict(RuntimeError):
    """The key kept changing under a read-modify-write for :data:`MAX_ATTEMPTS` attempts."""


def _registry(raw: str | bytes | None) -> ExperimentRegistry:
    return ExperimentRegistry() if raw is None else ExperimentRegistry.from_json(raw)


def load_experiments(store: RedisStore) -> ExperimentRegistry:
    """Read the experiment configuration.

    Args:
        store: The online store.

    Returns:
        A registry holding the stored configuration; an empty one when none is stored.

    Raises:
        StoreUnavailable: Redis could not be reached.
        pydantic.ValidationError: The stored JSON is not a valid configuration.
    """
    with store.guard():
        raw: str | bytes | None = store.client.get(store.keys.experiments())
    return _registry(raw)


async def aload_experiments(store: RedisStore) -> ExperimentRegistry:
    """Async :func:`load_experiments` on the asyncio pool, for serving replicas.

    Args:
        store: The online store.

    Returns:
        A registry holding the stored configuration; an empty one when none is stored.

    Raises:
        StoreUnavailable: Redis could not be reached.
        pydantic.ValidationError: The stored JSON is not a valid configuration.
    """
    with store.guard():
        raw: str | bytes | None = await store.aclient.get(store.keys.experiments())
    return _registry(raw)


def save_experiments(store: RedisStore, registry: ExperimentRegistry) -> None:
    """Replace the stored configuration with the registry's, in one ``SET``.

    Args:
        store: The online store.
        registry: The configuration to store.

    Raises:
        StoreUnavailable: Redis could not be reached.
    """
    with store.guard():
        store.client.set(store.keys.experiments(), registry.to_json())


def update_experiments(
    store: RedisStore, change: Callable[[ExperimentRegistry], T]
) -> tuple[ExperimentRegistry, T]:
    """Apply a change to the stored configuration without losing a concurrent writer's change.

    The key is watched while it is read and the change applied; if another writer replaced it in
    between, the transaction is refused and the change is applied again to the newer value.

    Args:
        store: The online store.
        change: Changes the registry in place (``register``, ``start``, ...) and returns any value;
            an exception it raises aborts the update and is passed on, with nothing written.

    Returns:
        The registry as stored, and what ``change`` returned.

    Raises:
        ExperimentConflict: The key changed under every attempt.
        StoreUnavailable: Redis could not be reached.
    """
    key = store.keys.experiments()
    with store.guard():
        for _ in range(MAX_ATTEMPTS):
            with store.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                    registry = _registry(pipe.get(key))
                    result = change(registry)
                    pipe.multi()
                    pipe.set(key, registry.to_json())
                    pipe.execute()
                except WatchError:
                    continue
                return registry, result
    raise ExperimentConflict(f"{key} kept changing over {MAX_ATTEMPTS} attempts")


async def aupdate_experiments(
    store: RedisStore, change: Callable[[ExperimentRegistry], T]
) -> tuple[ExperimentRegistry, T]:
    """Async :func:`update_experiments` on the asyncio pool, for the admin routes.

    Args:
        store: The online store.
        change: Changes the registry in place and returns any value; an exception it raises
            aborts the update and is passed on, with nothing written.

    Returns:
        The registry as stored, and what ``change`` returned.

    Raises:
        ExperimentConflict: The key changed under every attempt.
        StoreUnavailable: Redis could not be reached.
    """
    key = store.keys.experiments()
    with store.guard():
        for _ in range(MAX_ATTEMPTS):
            async with store.aclient.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    registry = _registry(await pipe.get(key))
                    result = change(registry)
                    pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                    pipe.set(key, registry.to_json())
                    await pipe.execute()
                except WatchError:
                    continue
                return registry, result
    raise ExperimentConflict(f"{key} kept changing over {MAX_ATTEMPTS} attempts")
