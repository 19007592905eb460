"""New catalog items into a serving retrieval model's delta index, without retraining.

Items added to the catalog after training are embedded with the release's item tower and added
to the model's delta index: from the catalog change stream as they arrive, and from the
active-item set when a bundle is loaded. The ``retrieval`` deployment runs this loop, and so
does an ingress replica that holds the models itself (``model_placement: ingress``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

from deployments.retrieval_model import RetrievalModel, item_records
from features.catalog_changes import decode_change
from features.redis_store import RedisStore
from features.stream_codec import EntryDecodeError

logger = logging.getLogger(__name__)

RETRY_S = 2.0
"""Pause after a failed read before the next one."""

_ITEMS_TABLE = "items"


async def follow_catalog(
    store: RedisStore, current: Callable[[], RetrievalModel | None], *, redis_timeout_s: float
) -> None:
    """Add items to the delta index of the model served now as the catalog stream announces them.

    Runs until cancelled. A model swapped in is first caught up with every active item it lacks.

    Args:
        store: The online store.
        current: The retrieval model served now (None without a bundle).
        redis_timeout_s: The store's socket timeout; blocking reads end well before it.
    """
    stream = store.keys.stream_catalog(_ITEMS_TABLE)
    # Blocking reads end well before the socket timeout, or every idle read would "fail".
    block_ms = max(100, int(redis_timeout_s * 500))
    last_id: str | None = None
    caught_up_for: RetrievalModel | None = None
    while True:
        try:
            if last_id is None:
                # An explicit position rather than "$": entries added while a read failed are
                # picked up by the next one instead of being skipped.
                newest = cast(list[tuple[str, Any]], await store.aclient.xrevrange(stream, count=1))
                last_id = newest[0][0] if newest else "0-0"
            model = current()
            if model is not None and model is not caught_up_for:
                await _catch_up(store, model)
                caught_up_for = model
            reply = cast(
                list[tuple[str, list[tuple[str, dict[str, str]]]]],
                await store.aclient.xread({stream: last_id}, count=500, block=block_ms),
            )
            records: list[dict[str, Any]] = []
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    with contextlib.suppress(EntryDecodeError):
                        records.append(decode_change(fields))
            model = current()
            if model is not None and records:
                added = await asyncio.to_thread(model.add_new_items, item_records(records))
                if added:
                    logger.info("retrieval: %d new items added to the delta index", added)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down: retry; serving does not depend on this loop
            logger.warning("retrieval: catalog stream not followed: %s", exc)
            await asyncio.sleep(RETRY_S)


async def _catch_up(store: RedisStore, model: RetrievalModel) -> None:
    keys = store.keys
    active = cast(set[str], await store.aclient.smembers(keys.items_active()))  # type: ignore[misc]
    missing = [i for i in active if model.index.position_of(i) is None]
    if not missing:
        return
    records = await store.amget_json([keys.item(i) for i in missing])
    added = await asyncio.to_thread(model.add_new_items, item_records(records))
    logger.info(
        "retrieval: %d catalog items newer than bundle %s added to the delta index", added, model.version
    )
