"""Small statistics for the toy reports: Student-t 95% confidence intervals over seeds, per-seed slopes, and
each claim's test and verdict in the vocabulary of the model tables (opd_exp/report/claims.py).

A claim's direction is tested on one number per seed (a paired difference or a least-squares slope across
the swept values of that seed), so the seeds are the independent replicates and the interval is a t-interval
with n - 1 degrees of freedom. A claim that must hold at several couplings (or gammas) is the intersection of
one test per part (intersection-union test, Berger 1982: p = the largest part's p). A claim about a size (the
paper's drift that never reaches the goal) also gets an equivalence test within a stated margin (two one-sided
tests). Verdicts read Holm-adjusted p-values over the claims of one sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from opd_exp.report.stats import holm, min_detectable_effect, paired_t_p, t_quantile, tost_p


@dataclass(frozen=True)
class Interval:
    """Mean over n replicates with its 95% t-interval (lo = hi = mean when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

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
    half = t_quantile(0.975, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x))


def slope(xs, ys) -> float:
    """Least-squares slope of ys on xs (nan with fewer than two distinct xs)."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    ok = np.isfinite(ys)
    if len(set(xs[ok])) < 2:
        return float("nan")
    return float(np.polyfit(xs[ok], ys[ok], 1)[0])


@dataclass(frozen=True)
class ClaimTest:
    """One toy claim's test. ``parts``: the per-seed numbers of each part (one part, or one per coupling),
    oriented so that the paper's direction is positive; ``margin``: equivalence margin on ``equiv``, the per-seed
    numbers whose size the paper describes (None: the claim is a direction only)."""

    parts: tuple[tuple[float, ...], ...]
    margin: float | None = None
    equiv: tuple[float, ...] = ()

    @property
    def p(self) -> float:
        """Two-sided paired t-test of mean 0, the largest over the parts (every part must show it); NaN with
        fewer than 2 seeds."""
        return _largest(paired_t_p(list(v)) for v in self.parts)

    @property
    def p_equiv(self) -> float:
        return tost_p(list(self.equiv), self.margin) if self.margin is not None else float("nan")

    @property
    def mde(self) -> float:
        """The smallest effect every part would detect (power 0.8, two-sided 0.05), the largest over the parts."""
        return _largest(min_detectable_effect(list(v)) for v in self.parts)

    def direction_sign(self) -> int:
        """+1 / -1 when every part's mean is on that side, else 0."""
        signs = {int(np.sign(np.mean(v))) for v in self.parts}
        return signs.pop() if len(signs) == 1 else 0


def _largest(values) -> float:
    """The largest value, NaN when any is NaN."""
    values = list(values)
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def holm_family(tests: list[ClaimTest]) -> list[tuple[float, float]]:
    """(Holm-adjusted direction p, Holm-adjusted equivalence p) of each claim: one family per sweep, every
    direction test and every equivalence test in it (NaN stays NaN)."""
    adjusted = holm([t.p for t in tests] + [t.p_equiv for t in tests])
    return list(zip(adjusted[:len(tests)], adjusted[len(tests):], strict=True))


def verdict(test: ClaimTest, p_holm: float, p_equiv_holm: float, margin_what: str = "",
            alpha: float = 0.05) -> str:
    """reproduces / opposite (significant) / equivalent (within the margin) / not significant (with the MDE).
    A claim about a size is equivalent when its size sits within +-margin, even where its direction alone is
    significant: the effect the paper describes is then absent."""
    if math.isnan(test.p):
        return "untestable at this scale: fewer than 2 seeds"
    if test.margin is not None and p_equiv_holm < alpha:
        shown = "; the direction alone is significant" if p_holm < alpha else ""
        return f"equivalent (within +-{test.margin:g}{margin_what}{shown})"
    if p_holm < alpha and test.direction_sign() != 0:
        return "reproduces" if test.direction_sign() > 0 else "opposite (significant)"
    return f"not significant (MDE {test.mde:.3g})"


def claim_columns(test: ClaimTest, p_holm: float, p_equiv_holm: float, margin_what: str = "") -> dict[str, str]:
    """The test's columns of a verdict row."""
    size = f"MDE {test.mde:.3g}" + (f"; margin +-{test.margin:g}, TOST p {test.p_equiv:.2g} (Holm {p_equiv_holm:.2g})"
                                    if test.margin is not None else "")
    return {"p (raw / Holm)": f"{test.p:.2g} / {p_holm:.2g}", "MDE / margin": size,
            "verdict": verdict(test, p_holm, p_equiv_holm, margin_what)}


def judge(rows: list[dict], tests: list[ClaimTest], margin_whats: list[str] | None = None) -> list[dict]:
    """Each verdict row with its test's columns, the family Holm-adjusted."""
    whats = margin_whats or [""] * len(rows)
    return [row | claim_columns(t, ph, pe, w)
            for row, t, (ph, pe), w in zip(rows, tests, holm_family(tests), whats, strict=True)]


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
