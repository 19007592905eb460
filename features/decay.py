"""Exponentially time-decayed sums kept as JSON: values held at a reference time.

A decayed sum ``S(now) = sum(w_i * 2 ** ((t_i - now) / half_life))`` is stored as its value at a
reference time ``ref`` (the latest event time folded in). Folding a newer event first decays the
stored values to the new event's time; folding an older (late) event adds its weight already
decayed to ``ref``. Serving decays from ``ref`` to ``now``. Mathematically the result does not
depend on the order events are folded in, and no landmark grows without bound, so the values
never overflow however long an entity lives.
"""

from __future__ import annotations

import math


def decay(value: float, from_s: float, to_s: float, half_life_s: float) -> float:
    """A decayed value carried from one instant to another.

    Args:
        value: The value as of ``from_s``.
        from_s: Instant ``value`` holds at, in epoch seconds.
        to_s: Instant wanted, in epoch seconds (earlier instants grow the value back).
        half_life_s: Half-life of the decay.

    Returns:
        ``value * 2 ** ((from_s - to_s) / half_life_s)``.
    """
    if from_s == to_s:
        return value
    return value * math.exp2((from_s - to_s) / half_life_s)


def add_decayed(
    scores: dict[str, float],
    ref_s: float | None,
    key: str,
    weight: float,
    t_s: float,
    half_life_s: float,
    floor: float = 0.0,
) -> float:
    """Add one weighted event at ``t_s`` to a dict of decayed sums held at ``ref_s``, in place.

    Args:
        scores: Key to value as of ``ref_s``; updated in place.
        ref_s: The instant ``scores`` hold at; ``None`` when ``scores`` is empty and new.
        key: Which sum the event adds to.
        weight: What the event adds, as of its own time.
        t_s: The event time, epoch seconds.
        half_life_s: Half-life of the decay.
        floor: When the reference moves forward, sums whose magnitude fell below this are
            dropped, which keeps the dict bounded.

    Returns:
        The new reference instant: ``max(ref_s, t_s)``.
    """
    if ref_s is None:
        ref_s = t_s
    if t_s > ref_s:
        factor = math.exp2((ref_s - t_s) / half_life_s)
        for name in list(scores):
            value = scores[name] * factor
            if abs(value) < floor:
                del scores[name]
            else:
                scores[name] = value
        ref_s = t_s
    scores[key] = scores.get(key, 0.0) + decay(weight, t_s, ref_s, half_life_s)
    return ref_s
