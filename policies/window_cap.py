"""Sliding-window caps: at most ``max_per_window`` items of one key in any ``window`` consecutive slots.

Shared by the creator cap and the category spread (keys: creator, category), and by the policies
that insert items into an already capped list (exploration, sponsored slots), which must check
that an insertion keeps the cap.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
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
    queues: dict[str, deque[tuple[int, Candidate]]] = {}
    for rank, cand in enumerate(cands):
        queues.setdefault(_key(key_of, cand), deque()).append((rank, cand))
    heads = [(queue[0][0], key) for key, queue in queues.items()]
    heapq.heapify(heads)
    recent: deque[str] = deque()
    counts: Counter[str] = Counter()
    placed: list[Candidate] = []
    while heads:
        blocked: list[tuple[int, str]] = []
        chosen: str | None = None
        while heads:
            rank, key = heapq.heappop(heads)
            if counts[key] < max_per_window:
                chosen = key
                break
            blocked.append((rank, key))
        for entry in blocked:
            heapq.heappush(heads, entry)
        if chosen is None:
            break
        queue = queues[chosen]
        placed.append(queue.popleft()[1])
        if queue:
            heapq.heappush(heads, (queue[0][0], chosen))
        if window > 1:
            recent.append(chosen)
            counts[chosen] += 1
            if len(recent) > window - 1:
                counts[recent.popleft()] -= 1
    left = sorted((entry for queue in queues.values() for entry in queue), key=lambda entry: entry[0])
    return placed, [cand for _, cand in left]


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
