"""Model bundles inside a Serve replica: typed ``user_config``, loading off to the side, atomic swap.

A model deployment's ``user_config`` names a bundle (``{"bundle": "production"}`` or an explicit
version). :class:`BundleSlot` resolves it in the model registry under the data home, loads it
(checksums verified by :meth:`ModelRegistry.load_bundle`), turns it into the deployment's serving
state, and only then replaces the state it serves with one assignment. Requests in flight keep
the object they started with.

What Serve 2.60 does with an exception from ``reconfigure`` decided the failure policy here: the
replica being updated is marked failed and stopped (``deployment_state._check_startup_replicas``),
and replacements are started with the same, failing config until the deployment is
``DEPLOY_FAILED``. A broken bundle that raised would therefore take the model deployment down
rather than leave the previous model serving. So ``reconfigure`` never raises for a bad bundle:
the slot keeps serving what it has and reports the failure in :meth:`BundleSlot.status`, which
``deployments.reload.apply_bundle`` reads back and raises to the operator.

The first load of a replica happens inside ``reconfigure`` (the replica is not serving yet, so
waiting costs nothing); later loads run in a worker thread while the previous state keeps
serving, because a replica is taken out of routing while ``reconfigure`` runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from deployments.wire import NO_MODEL
from training.registry import ModelRegistry
from training.release import Release, load_release

logger = logging.getLogger(__name__)

State = TypeVar("State")


class ModelUserConfig(BaseModel):
    """The ``user_config`` of a model deployment (``retrieval``, ``ranker``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle: Annotated[str, Field(min_length=1, max_length=64)] | None = "production"
    """Alias or version of the release to serve; ``null`` serves without a model."""

    fault: Literal["raise", "slow"] | None = None
    """Failure drill: ``raise`` fails every call, ``slow`` delays it by ``fault_delay_ms``.
    For rehearsing the fallbacks on a live graph; ``null`` in normal operation."""

    fault_delay_ms: Annotated[float, Field(gt=0, le=60_000)] = 500.0
    """Delay of the ``slow`` drill."""

    async def drill(self, stage: str) -> None:
        """Run the failure drill before a call of ``stage``: fail it, delay it, or nothing.

        Raises:
            RuntimeError: With ``fault: raise``.
        """
        if self.fault == "raise":
            raise RuntimeError(f"{stage} failure drill (user_config fault: raise)")
        if self.fault == "slow":
            await asyncio.sleep(self.fault_delay_ms / 1000.0)


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """What a replica serves and what it was last asked to serve.

    Attributes:
        version: Version served now (``none`` without a model).
        target: Version (or alias) last asked for.
        loading: A load is in progress.
        error: Why the last load failed, if it did.
        loaded_at_s: When the served version was swapped in, epoch seconds.
        refused: The last bundle refused and why (``"<ref>: <error>"``); kept after the config is
            put back to the served version, until another version is swapped in, so the status
            route still says why a promotion did not happen.
    """

    version: str
    target: str | None
    loading: bool
    error: str | None
    loaded_at_s: float | None
    refused: str | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "version": self.version,
            "target": self.target,
            "loading": self.loading,
            "error": self.error,
            "loadedAtS": self.loaded_at_s,
            "refused": self.refused,
        }


class BundleSlot(Generic[State]):
    """One replica's serving state built from a release bundle, swapped atomically.

    Args:
        home: Data home of the model registry.
        build: Turns a loaded release into the deployment's serving state (may return None
            when the release lacks what the deployment needs, e.g. a retrieval-only release for
            the ranker).
        name: The deployment's name, for logs.
    """

    def __init__(self, home: str, build: Callable[[Release], State | None], *, name: str) -> None:
        self._registry = ModelRegistry(home)
        self._build = build
        self._name = name
        self._served: tuple[str, State | None] = (NO_MODEL, None)
        self._target: str | None = None
        self._error: str | None = None
        self._loaded_at_s: float | None = None
        self._refused: str | None = None
        self._generation = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def version(self) -> str:
        """Version served now."""
        return self._served[0]

    @property
    def state(self) -> State | None:
        """The serving state, or None without a model."""
        return self._served[1]

    def served(self) -> tuple[str, State | None]:
        """Version and state read together, so one request never mixes two releases."""
        return self._served

    def status(self) -> SlotStatus:
        """What is served and what was asked for."""
        loading = self._task is not None and not self._task.done()
        return SlotStatus(self.version, self._target, loading, self._error, self._loaded_at_s, self._refused)

    async def configure(self, user_config: dict[str, Any]) -> ModelUserConfig:
        """Apply a holder's ``user_config``: validate it and serve its bundle.

        The first bundle loads before this returns (the replica is not serving yet); later ones
        load in the background while the served one keeps serving.

        Returns:
            The validated config (its drills are the holder's to run).

        Raises:
            pydantic.ValidationError: The config is invalid (Serve then rejects the update).
        """
        config = ModelUserConfig.model_validate(user_config)
        await self.apply(config.bundle, wait=self._generation == 0)
        return config

    async def apply(self, ref: str | None, *, wait: bool) -> None:
        """Serve the bundle ``ref`` names (or no model for None); never raises for a bad bundle.

        Args:
            ref: Alias or version, or None.
            wait: Load before returning (first load) rather than in the background.
        """
        self._target = ref
        self._generation += 1
        generation = self._generation
        if ref is None:
            self._served = (NO_MODEL, None)
            self._error = None
            return
        if ref == self.version and self._error is None:
            return
        job = asyncio.ensure_future(self._load(ref, generation))
        self._task = job
        if wait:
            await job

    def load_now(self, ref: str) -> None:
        """Load ``ref`` in this thread and serve it: a process's first load, before its event loop runs.

        Raises:
            Exception: Whatever loading raised; with nothing served yet there is nothing to keep.
        """
        self._target = ref
        self._generation += 1
        self._served = self._prepare(ref)
        self._error = None
        self._loaded_at_s = time.time()

    async def _load(self, ref: str, generation: int) -> None:
        started = time.perf_counter()
        try:
            version, state = await asyncio.to_thread(self._prepare, ref)
        except Exception as exc:  # a bad bundle of any kind must leave the old model serving
            if generation == self._generation:
                self._error = f"{type(exc).__name__}: {exc}"
                self._refused = f"{ref}: {self._error}"
            logger.error("%s: bundle %r not loaded, still serving %s: %s", self._name, ref, self.version, exc)
            return
        if generation != self._generation:
            logger.info("%s: bundle %s loaded but superseded; dropped", self._name, version)
            return
        if version != self._served[0]:
            self._refused = None
        self._served = (version, state)
        self._error = None
        self._loaded_at_s = time.time()
        logger.info(
            "%s: serving bundle %s (loaded in %.1f s)", self._name, version, time.perf_counter() - started
        )

    def _prepare(self, ref: str) -> tuple[str, State | None]:
        version = self._registry.resolve(ref)
        if version == self.version:
            return version, self.state
        release = load_release(self._registry.load_bundle(version))
        return version, self._build(release)
