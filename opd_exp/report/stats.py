"""Means over seeds with Student-t confidence intervals (no scipy: the t quantile is computed in closed form)."""

from __future__ import annotations

import math
from dataclasses import dataclass


def t_two_sided_mass(t: float, dof: int) -> float:
    """P(|T| < t) for Student's t with integer ``dof`` (closed form, Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(dof))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if dof % 2 == 1:
        total, term = (0.0, 0.0) if dof == 1 else (1.0, 1.0)  # cos + 2/3 cos^3 + (2*4)/(3*5) cos^5 ...
        for j in range(1, (dof - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    total = term = 1.0  # 1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 ...
    for j in range(1, dof // 2):
        term *= c2 * (2 * j - 1) / (2 * j)
        total += term
    return s * total


def t_quantile(prob: float, dof: int) -> float:
    """The ``prob`` quantile (prob > 0.5) of Student's t with ``dof`` degrees of freedom, by bisection."""
    target = 2 * prob - 1  # P(|T| < q)
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, dof) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_mass(mid, dof) < target else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Stat:
    """Mean over seeds with a two-sided t-interval; lo/hi are NaN when n < 2."""

    mean: float
    lo: float
    hi: float
    n: int


def mean_ci(values: list[float], level: float = 0.95) -> Stat:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(vals)
    if n == 0:
        return Stat(math.nan, math.nan, math.nan, 0)
    mean = sum(vals) / n
    if n == 1:
        return Stat(mean, math.nan, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Stat(mean, mean - half, mean + half, n)
