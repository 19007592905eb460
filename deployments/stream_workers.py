"""The deployment that keeps the stream processors and the lake writer running.

One stream processor per feature partition (see :mod:`features.partitions`), so the folds of
users and of items run in two processes side by side, and the lake writer. All are Ray actors of
their own (restarted by Ray when they die, see ``features/``). This
one-replica deployment creates them, so their lifetime is the Serve application's: deploying the
app starts them, deleting it stops them, and Serve's health checks on this replica surface an
actor that stopped answering.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from core.settings import Settings
from features.lake_writer import start_lake_writer
from features.partitions import PARTITIONS
from features.stream_processor import STATE_CACHE_SIZE, start_stream_processor

_HEALTH_TIMEOUT_S = 20.0


@serve.deployment(
    name="stream_workers",
    num_replicas=1,
    max_ongoing_requests=8,
    ray_actor_options={"num_cpus": 0.05},
    health_check_period_s=10,
    health_check_timeout_s=30,
)
class StreamWorkers:
    """Owns the feature partitions' consumers (online features) and the ``lake`` consumer (Parquet).

    Their reports are named ``stream_processor_<partition>``
    (:attr:`~features.partitions.FeaturePartition.report_name`) and ``lake_writer``.

    Args:
        settings_overrides: Values that win over the replica's ``RAYREC_*`` environment.
        actor_num_cpus: CPUs reserved by each processor and by the lake writer.
        processor_batch_size: Most events the stream processor folds in one transaction. The
            processor reads whatever has arrived up to this many, so a large cap costs no latency
            when it keeps up and lets it catch up in fewer, cheaper round trips when it is behind;
            the cap bounds how long one transaction holds Redis.
        processor_state_cache_size: Entity states the stream processor keeps in memory after
            writing them, so hot items and creators are not read and decoded again every batch.
    """

    def __init__(
        self,
        settings_overrides: dict[str, Any] | None = None,
        actor_num_cpus: float = 0.15,
        processor_batch_size: int = 2000,
        processor_state_cache_size: int = STATE_CACHE_SIZE,
    ) -> None:
        settings = Settings.from_env(None, **(settings_overrides or {}))
        namespace = settings.namespace
        # Names carry the namespace so several deployments (or test runs) can share one cluster.
        self._actors = {
            p.report_name: start_stream_processor(
                settings,
                name=f"{namespace}-stream-processor-{p.name}",
                consumer=f"processor-{p.name}-0",
                partition=p.name,
                batch_size=processor_batch_size,
                state_cache_size=processor_state_cache_size,
                num_cpus=actor_num_cpus,
            )
            for p in PARTITIONS
        }
        self._actors["lake_writer"] = start_lake_writer(
            settings, name=f"{namespace}-lake-writer", num_cpus=actor_num_cpus
        )

    async def stats(self) -> dict[str, Any]:
        """Running totals of every consumer, by report name."""
        reports = await asyncio.gather(*(actor.stats.remote() for actor in self._actors.values()))
        return dict(zip(self._actors, reports, strict=True))

    async def check_health(self) -> None:
        """Serve marks the replica unhealthy (and replaces it) when an actor stops answering."""
        await asyncio.wait_for(self.stats(), timeout=_HEALTH_TIMEOUT_S)
