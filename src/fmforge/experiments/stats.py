"""Interval estimates the experiments share."""

from __future__ import annotations

import math


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Return the Wilson score interval of a proportion wins / n (0, 1 when n is 0).

    `wins` may count ties as halves; the interval is then conservative (ties have less spread than
    a coin flip). Unlike a bootstrap it does not collapse to a point at 0 or 1: 40 wins of 40 give
    [0.912, 1].
    """
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
