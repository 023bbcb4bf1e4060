"""Means over seeds with Student-t confidence intervals, paired t-tests, Holm's correction, equivalence tests and
minimum detectable effects (no scipy: Student's t distribution is computed in closed form)."""

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
    """Mean over seeds with a two-sided t-interval; lo/hi are NaN when n < 2. ``basis`` "prompts": one
    evaluation (n = 1) whose lo/hi are its own interval over the evaluated prompts (:func:`evaluation_stat`)."""

    mean: float
    lo: float
    hi: float
    n: int
    basis: str = "seeds"


def evaluation_stat(value: float, ci: list[float]) -> Stat:
    """A single evaluation shared by every seed (teacher, student before), with its 95% interval over prompts
    (Wilson; for avg@k at the effective sample size; recorded by opd_exp/train/evaluate.py)."""
    return Stat(float(value), float(ci[0]), float(ci[1]), 1, basis="prompts")


def clamp(stat: Stat, lo: float = 0.0, hi: float = 1.0) -> Stat:
    """The interval cut to the metric's range (an accuracy's t-interval can cross 0 or 1; its mean cannot)."""
    if math.isnan(stat.lo):
        return stat
    return Stat(stat.mean, max(lo, stat.lo), min(hi, stat.hi), stat.n, stat.basis)


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


def t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with integer ``dof``."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = (1 - t_two_sided_mass(abs(t), dof)) / 2
    return 1 - tail if t >= 0 else tail


def paired_t_p(diffs: list[float]) -> float:
    """Two-sided p-value of the paired t-test of H0: mean(d) = 0 (n - 1 dof); NaN when n < 2. Zero spread: 0 for
    a nonzero mean, 1 for a zero mean."""
    n, mean, se = _mean_se(diffs)
    if n < 2:
        return math.nan
    if se == 0:
        return 0.0 if mean != 0 else 1.0
    return 2 * (1 - t_cdf(abs(mean) / se, n - 1))


def tost_p(diffs: list[float], margin: float) -> float:
    """Two one-sided tests (Schuirmann 1987) of equivalence within +-``margin``: the larger of the p-values of
    H0: mean <= -margin and H0: mean >= +margin; p < alpha means equivalent at level alpha (the 1 - 2 alpha
    interval lies inside the margin). NaN when n < 2."""
    n, mean, se = _mean_se(diffs)
    if n < 2:
        return math.nan
    if se == 0:
        return 0.0 if abs(mean) < margin else 1.0
    return max(1 - t_cdf((mean + margin) / se, n - 1), t_cdf((mean - margin) / se, n - 1))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979) of a family of p-values, in their order: the i-th smallest times
    (m - i + 1), made monotone, capped at 1. NaN entries stay NaN and do not count in m."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    out, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        out[i] = running
    return out


def min_detectable_effect(diffs: list[float], alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference the paired t-test at these seeds detects with ``power`` (two-sided
    ``alpha``), from the observed spread: (t_{1-alpha/2} + t_{power}) * sd / sqrt(n), n - 1 dof. NaN when n < 2."""
    n, _, se = _mean_se(diffs)
    if n < 2:
        return math.nan
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * se


def _mean_se(values: list[float]) -> tuple[int, float, float]:
    vals = [float(v) for v in values]
    n = len(vals)
    if n < 2:
        return n, (vals[0] if vals else math.nan), math.nan
    mean = sum(vals) / n
    return n, mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n)
