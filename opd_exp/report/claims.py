"""The paper's claims, checked on a sweep: does the direction of each comparison reproduce at this scale?

A claim compares two sides of a table, ``a`` and ``b`` (each a ``who`` evaluation of the runs matching
``where``, like a table row), on one split and metric, and says what the paper found: ``a`` is ``higher``,
``lower`` or ``similar``. Each seed gives one paired difference d_s = a_s - b_s (the runs of a seed share the
pair, the prompts and the seed; teacher and student_before are the same for every seed, so they pair with
anything); the verdict reads the 95% t-interval of mean(d) over the seeds that both sides have:

    higher / lower:  reproduces           the interval excludes 0 on the paper's side
                     opposite             the interval excludes 0 on the other side
                     not significant      the interval contains 0 (the sign of the mean is reported, or
                                          "no difference" when the mean is exactly 0)
    similar:         consistent           the interval contains 0 (weak evidence with few seeds)
                     does not reproduce   the interval excludes 0

Declared in an experiment file's ``report.claims`` (conf/experiment/math_main.yaml has examples):

    claims:
      - claim: "Ours w/o mask beats sampled-token OPD"
        paper: "avg 41.7 vs 36.4"
        metric: avg@4
        split: avg                  # a split name | avg | hardest (opd_exp.report.hardest_split)
        a: {where: {recipe: ours, mask.enabled: false}}
        b: {where: {recipe: baseline, mask.enabled: false}}
        expect: higher
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from opd_exp.config.validation import spec
from opd_exp.report.stats import Stat, mean_ci

WHO = ("teacher", "student_before", "student_after")
EXPECT = ("higher", "lower", "similar")


@dataclass
class SideSpec:
    """One side of a comparison: whose evaluation, of which runs."""

    who: str = spec("student_after", "whose evaluation", choices=list(WHO))
    where: dict = spec(default_factory=dict, doc="key -> value every run of the side matches")


@dataclass
class ClaimSpec:
    """One claim of the paper as a paired comparison of two sides."""

    claim: str = spec("", "the claim in words")
    paper: str = spec("", "the paper's numbers behind it")
    metric: str = spec("avg@4", "greedy@1 | avg@<k> | pass@<k>")
    split: str = spec("avg", "a split name | avg | hardest")
    a: SideSpec = field(default_factory=SideSpec)
    b: SideSpec = field(default_factory=SideSpec)
    expect: str = spec("higher", "what the paper found for a vs b", choices=list(EXPECT))


@dataclass
class ClaimResult:
    """A claim's numbers on one group of runs: both sides and their paired difference over seeds."""

    spec: ClaimSpec
    split: str
    a: Stat
    b: Stat
    diff: Stat
    verdict: str


def values_by_seed(runs: list, who: str, key: str) -> dict[Any, float]:
    """seed -> the mean of ``key`` over the runs of that seed (one value per seed)."""
    by_seed: dict[Any, list[float]] = defaultdict(list)
    for run in runs:
        value = run.results.get(f"{who}/{key}")
        if value is not None:
            by_seed[run.seed].append(float(value))
    return {seed: sum(v) / len(v) for seed, v in by_seed.items()}


def verdict(diff: Stat, expect: str) -> str:
    """The verdict of a paired difference (a - b) against the paper's direction (module docstring)."""
    if diff.n < 2:
        return f"not enough seeds (n = {diff.n})"
    above, below = diff.lo > 0, diff.hi < 0
    if expect == "similar":
        if above or below:
            return "does not reproduce (significant difference)"
        return "consistent (no significant difference)"
    paper_side, other_side = (above, below) if expect == "higher" else (below, above)
    if paper_side:
        return "reproduces"
    if other_side:
        return "opposite (significant)"
    if diff.mean == 0:
        return "not significant (no difference)"
    direction = "the paper's" if (diff.mean > 0) == (expect == "higher") else "the opposite"
    return f"not significant (mean in {direction} direction)"


def evaluate_claim(claim: ClaimSpec, runs: list, matches, hardest_split) -> ClaimResult:
    """``runs``: finished runs of one table group; ``matches(run, where)`` and ``hardest_split(runs, metric)``
    are the report's row selection and split choice, so a claim reads exactly what its table shows."""
    split = hardest_split(runs, claim.metric) if claim.split == "hardest" else claim.split
    key = f"{split}/{claim.metric}"
    sides = []
    for side in (claim.a, claim.b):
        picked = [r for r in runs if matches(r, side.where)] if side.who == "student_after" else runs
        sides.append(values_by_seed(picked, side.who, key))
    a, b = sides
    paired = [a[s] - b[s] for s in a if s in b]
    diff = mean_ci(paired)
    return ClaimResult(claim, str(split), mean_ci(list(a.values())), mean_ci(list(b.values())), diff,
                       verdict(diff, claim.expect))


def _pct(stat: Stat, ci: bool = False) -> str:
    if stat.n == 0:
        return "–"
    text = f"{stat.mean * 100:.1f}"
    if ci and stat.n > 1:
        text += f" [{stat.lo * 100:.1f}, {stat.hi * 100:.1f}]"
    return text


def claims_markdown(results: list[tuple[str, ClaimResult]]) -> list[str]:
    """The README section: one line per (group, claim), numbers in percent."""
    lines = ["## Paper claims at this scale", "",
             "Each row compares two rows of the tables on one split: a - b is the mean paired difference over "
             "seeds with its 95% t-interval (percentage points); the verdict reads that interval "
             "(opd_exp/report/claims.py).", "",
             "| claim | paper | group | split | a | b | a - b [95% CI] | n | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for group, r in results:
        lines.append(f"| {r.spec.claim} | {r.spec.paper} | {group or 'all'} | {r.split} | {_pct(r.a)} | "
                     f"{_pct(r.b)} | {_pct(r.diff, ci=True)} | {r.diff.n} | {r.verdict} |")
    reproduced = sum(r.verdict == "reproduces" or r.verdict.startswith("consistent") for _, r in results)
    lines += ["", f"{reproduced} of {len(results)} claim checks reproduce (or are consistent); the others are "
              "stated as measured, not tuned until they do.", ""]
    return lines


def claims_frame(results: list[tuple[str, ClaimResult]]):
    import pandas as pd

    rows = [{"claim": r.spec.claim, "paper": r.spec.paper, "group": group, "split": r.split,
             "metric": r.spec.metric, "expect": r.spec.expect, "a_mean": r.a.mean, "b_mean": r.b.mean,
             "diff_mean": r.diff.mean, "diff_ci_lo": r.diff.lo, "diff_ci_hi": r.diff.hi, "n": r.diff.n,
             "verdict": r.verdict} for group, r in results]
    return pd.DataFrame(rows)
