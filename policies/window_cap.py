"""Sliding-window caps: at most ``max_per_window`` items of one key in any ``window`` consecutive slots.

Shared by the creator cap and the category spread (keys: creator, category), and by the policies
that insert items into an already capped list (exploration, sponsored slots), which must check
that an insertion keeps the cap.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Sequence

from core.types import Candidate

KeyOf = Callable[[Candidate], str | None]
"""The key a cap counts (creator id, category); None means the candidate shares it with nobody."""


def _key(key_of: KeyOf, cand: Candidate) -> str:
    key = key_of(cand)
    # A NUL prefix cannot occur in ids, so an unknown key never collides with a real one.
    return f"\0{cand.item_id}" if key is None else key


def window_capped(
    cands: Sequence[Candidate], key_of: KeyOf, max_per_window: int, window: int
) -> tuple[list[Candidate], list[Candidate]]:
    """Reorder greedily so that no key appears more than ``max_per_window`` times in any window.

    At each position the best-ranked remaining candidate whose key still fits the window ending
    there is placed, so the order changes only where the cap forces it. Runs in
    O(n · window · log keys).

    Args:
        cands: Candidates, best first.
        key_of: The key each candidate counts under.
        max_per_window: Items of one key allowed in a window (at least 1).
        window: Consecutive positions a window spans (at least 1).

    Returns:
        ``(placed, left_over)``: the capped order, and the candidates that could not be placed
        anywhere after it without breaking the cap, in input order.

    Raises:
        ValueError: ``max_per_window`` or ``window`` is below 1.
    """
    if max_per_window < 1 or window < 1:
        raise ValueError(f"max_per_window and window must be at least 1, got {max_per_window}, {window}")
    keys = [_key(key_of, cand) for cand in cands]
    # Candidates are read in rank order; one whose key is full at that point waits in its key's
    # queue. Every waiting candidate ranks above every unread one, so the best candidate that
    # fits is the best waiting head that fits, else the next unread one that fits: the heap
    # holds only the heads of keys with someone waiting (usually none), not one per key.
    waiting: dict[str, deque[int]] = {}
    heads: list[tuple[int, str]] = []
    recent: deque[str] = deque()
    counts: dict[str, int] = {}
    placed: list[Candidate] = []
    unread = 0
    total = len(cands)
    while True:
        chosen = -1
        if heads:
            blocked: list[tuple[int, str]] = []
            while heads:
                rank, key = heapq.heappop(heads)
                if counts.get(key, 0) < max_per_window:
                    queue = waiting[key]
                    chosen = queue.popleft()
                    if queue:
                        heapq.heappush(heads, (queue[0], key))
                    break
                blocked.append((rank, key))
            for entry in blocked:
                heapq.heappush(heads, entry)
        while chosen < 0 and unread < total:
            key = keys[unread]
            if counts.get(key, 0) < max_per_window:
                chosen = unread
            else:
                queue = waiting.setdefault(key, deque())
                if not queue:
                    heapq.heappush(heads, (unread, key))
                queue.append(unread)
            unread += 1
        if chosen < 0:
            break
        placed.append(cands[chosen])
        if window > 1:
            key = keys[chosen]
            recent.append(key)
            counts[key] = counts.get(key, 0) + 1
            if len(recent) > window - 1:
                gone = recent.popleft()
                counts[gone] -= 1
    left = sorted(rank for queue in waiting.values() for rank in queue)
    return placed, [cands[rank] for rank in left]


def fits_at(
    keys: Sequence[str | None], position: int, key: str | None, max_per_window: int, window: int
) -> bool:
    """Whether inserting an item of ``key`` at ``position`` keeps a capped list within the cap.

    Inserting into a list that meets the cap can only break windows that contain the new item,
    and only for its own key; those are the windows checked.

    Args:
        keys: The keys of the list, in order (None: shares its key with nobody).
        position: Where the item would go (0 to ``len(keys)``).
        key: The item's key (None: always fits).
        max_per_window: Items of one key allowed in a window.
        window: Consecutive positions a window spans.

    Returns:
        True when every window holding the new item has at most ``max_per_window`` of ``key``.
    """
    if key is None:
        return True
    # Only the windows holding the new item can break, so only their span of the list is built.
    low = max(0, position - window + 1)
    span = [*keys[low:position], key, *keys[position : position + window - 1]]
    starts = range(position - low + 1)
    return all(span[start : start + window].count(key) <= max_per_window for start in starts)
