"""Intervals for the project's rates. Every DSR, FPR, ASR and accuracy is a share of n held-out items, so
it is reported with its count and a 95% Wilson score interval; a difference of two rates (an attack's gain
over the clean image, qmllm against SafeCLIP) with Newcombe's hybrid score interval, and called a
difference only when that interval excludes zero."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / n (well behaved at 0 and n, unlike p +- z se)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes <= 0 else max(0.0, centre - half)   # exact at the ends, not a rounding error away
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return (low, high)


def rate(successes: int, n: int) -> dict:
    """A rate as the metrics files store it: value, count, n and its 95% interval."""
    low, high = wilson(successes, n)
    return {"value": successes / n if n else 0.0, "count": int(successes), "n": int(n), "ci95": [low, high]}


def difference(a: dict, b: dict) -> dict:
    """a - b for two `rate`s, with Newcombe's (1998) hybrid score interval; `significant` when it excludes 0."""
    (la, ua), (lb, ub) = a["ci95"], b["ci95"]
    pa, pb = a["value"], b["value"]
    delta = pa - pb
    low = delta - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2)
    high = delta + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)
    return {"value": delta, "ci95": [low, high], "significant": bool(low > 0 or high < 0)}
