"""Small statistics for the toy reports: Student-t 95% confidence intervals over seeds and per-seed slopes.

A claim's direction is tested on one number per seed (a paired difference or a least-squares slope across
the swept values of that seed), so the seeds are the independent replicates and the interval is a t-interval
with n - 1 degrees of freedom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1 .. 30 (beyond: the normal 1.96 is within 2%)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Interval:
    """Mean over n replicates with its 95% t-interval (lo = hi = mean when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.lo > 0 or self.hi < 0)

    def fmt(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}g} (n={self.n})"
        return f"{self.mean:.{digits}g} [{self.lo:.{digits}g}, {self.hi:.{digits}g}]"


def ci95(values) -> Interval:
    """Mean and 95% t-interval of the finite entries of ``values``."""
    x = np.asarray([v for v in np.ravel(values) if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, mean, mean, len(x))
    half = t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x))


def slope(xs, ys) -> float:
    """Least-squares slope of ys on xs (nan with fewer than two distinct xs)."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    ok = np.isfinite(ys)
    if len(set(xs[ok])) < 2:
        return float("nan")
    return float(np.polyfit(xs[ok], ys[ok], 1)[0])


def direction(interval: Interval, expected_sign: int = 1) -> str:
    """'holds' when the 95% interval excludes 0 on the expected side, 'reversed' on the other, else
    'not significant'."""
    if not interval.excludes_zero():
        return "not significant"
    positive = interval.lo > 0
    return "holds" if positive == (expected_sign > 0) else "reversed"


def to_markdown(df) -> str:
    """A pipe table of a pandas DataFrame (pandas' own needs the optional ``tabulate``)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"
