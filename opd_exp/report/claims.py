"""The paper's claims, checked on a sweep: does each comparison reproduce at this scale, and could it have?

A claim compares two sides of a table, ``a`` and ``b`` (each a ``who`` evaluation of the runs matching
``where``, like a table row), on one split and metric, and says what the paper found: ``a`` is ``higher``,
``lower`` or ``similar``. A training-dynamics claim (the paper's appendix: shorter responses, lower gradient norm
and clip fraction, entropy kept) names a training curve as its metric, ``train/<name>``, read as each run's mean
over the last ``window`` of its steps (both sides trained runs, compared at the same steps, in the curve's units).
Each replicate (pair seed, run seed) gives one paired difference d_s = a_s - b_s (the runs of a replicate share the
pair, the prompts and the seed; teacher and student_before are the same for every seed of a pair, so they pair with
any of its runs); with ``over: pairs`` each pair's mean of its d_s is one observation instead, the pair being the
unit (a sweep over ``model.bootstrap.seed``, conf/experiment/pair_seeds.yaml). Per claim: mean(d) with its 95%
t-interval, the paired t-test's two-sided p, for a ``similar`` claim the equivalence test's p (TOST within
+-``margin``), and the minimum detectable effect (MDE: the true mean(d) the test detects with power 0.8 at alpha
0.05 and these seeds' spread). The p-values of one report (every
claim and facet group of an experiment) are Holm-adjusted as one family; the verdict reads the adjusted p:

    higher / lower:  reproduces                 adjusted p < 0.05, mean(d) on the paper's side
                     opposite (significant)     adjusted p < 0.05, on the other side
                     not significant (MDE x)    otherwise: no effect smaller than ~x could have shown
                     untestable at this scale   otherwise, when x exceeds the teacher's lead over the student
                                                on the split (the room distillation has): no plausible effect
                                                could have shown
    similar:         equivalent (within +-m)    adjusted TOST p < 0.05
                     opposite (significant)     the difference test is significant (adjusted) instead
                     not significant (...)      neither: the data cannot tell (margin and MDE stated)
    any:             untestable at this scale   declared with ``untestable: <reason>`` (the scale cannot
                                                show it); measured and shown, no verdict drawn

Declared in an experiment file's ``report.claims`` (conf/experiment/math_main.yaml has examples):

    claims:
      - claim: "Ours w/o mask beats sampled-token OPD"
        paper: "avg 41.7 vs 36.4"
        metric: avg@4
        split: avg                  # a split name | avg | hardest (opd_exp.report.hardest_split)
        a: {where: {recipe: ours, mask.enabled: false}}
        b: {where: {recipe: baseline, mask.enabled: false}}
        expect: higher
        margin: 0.02                # similar claims: the equivalence margin (absolute; 0.02 = 2 points)
        untestable: ""              # or why this scale cannot test the claim
        over: replicates            # or pairs (a sweep over model.bootstrap.seed): one mean difference per pair
      - claim: "LSM gives shorter responses"
        metric: train/response_len  # a training curve (metrics.jsonl), in its own units
        window: 0.25                # each run's mean over its last quarter of steps
        a: {where: {recipe: topk_full}}
        b: {where: {recipe: baseline}}
        expect: lower
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from opd_exp.config.validation import ConfigError, spec
from opd_exp.report.stats import Stat, holm, mean_ci, min_detectable_effect, paired_t_p, tost_p

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
    metric: str = spec("avg@4", "greedy@1 | avg@<k> | pass@<k> | train/<name> (a training curve)")
    split: str = spec("avg", "a split name | avg | hardest")
    a: SideSpec = field(default_factory=SideSpec)
    b: SideSpec = field(default_factory=SideSpec)
    expect: str = spec("higher", "what the paper found for a vs b", choices=list(EXPECT))
    margin: float = spec(0.02, "equivalence margin of a `similar` claim (absolute, in the metric's units: 0.02 = 2 "
                              "points of accuracy)", gt=0.0)
    window: float = spec(0.25, "train/ metrics: the final share of each run's steps averaged", gt=0.0, le=1.0)
    untestable: str = spec("", "why this scale cannot test the claim (empty: it is tested)")
    over: str = spec("replicates", "the unit of replication: every (pair seed, run seed), or `pairs`: each "
                                   "pair's mean difference over its run seeds is one observation",
                     choices=["replicates", "pairs"])


@dataclass
class ClaimResult:
    """A claim's numbers on one group of runs: both sides, their paired difference over seeds, its tests
    (``p``: the difference; ``p_equiv``: TOST, similar claims), the MDE, and, once the family is judged
    (:func:`judge`), the Holm-adjusted p of the claim's own test and the verdict."""

    spec: ClaimSpec
    split: str
    a: Stat
    b: Stat
    diff: Stat
    p: float
    p_equiv: float
    mde: float
    room: float = math.nan  # mean teacher - mean student_before on the split: the room distillation has
    p_holm: float = math.nan
    verdict: str = ""

    @property
    def scale(self) -> float:
        """Printed units per unit: accuracy in points (x 100), a training curve in its own units."""
        return 1.0 if is_training(self.spec.metric) else 100.0

    @property
    def unit(self) -> str:
        return "" if self.scale == 1.0 else " pts"

    def number(self, value: float) -> str:
        """``value`` in the claim's printed units: points with one decimal, or a curve's 3 significant digits."""
        return f"{value:.3g}" if self.scale == 1.0 else f"{value * 100:.1f}"

    @property
    def margin_text(self) -> str:
        return f"{self.spec.margin * self.scale:g}{self.unit}"

    @property
    def test_p(self) -> float:
        """The p-value the verdict rests on: equivalence for a similar claim, difference otherwise."""
        return self.p_equiv if self.spec.expect == "similar" else self.p


def values_by_seed(runs: list, who: str, key: str) -> dict[Any, float]:
    """replicate (pair seed, run seed) -> the mean of ``key`` over its runs (one value per replicate)."""
    by_seed: dict[Any, list[float]] = defaultdict(list)
    for run in runs:
        value = run.results.get(f"{who}/{key}")
        if value is not None:
            by_seed[run.replicate].append(float(value))
    return {seed: sum(v) / len(v) for seed, v in by_seed.items()}


def is_training(metric: str) -> bool:
    return metric.startswith("train/")


def curve_tail_mean(run, key: str, window: float) -> float | None:
    """The mean of the training curve ``key`` (metrics.jsonl) over the run's last ``window`` of steps: the rows
    with step >= (1 - window) * last step; None when the run logged no finite value of it."""
    from opd_exp.rundir import read_metrics

    points = [(row["step"], float(row[key])) for row in read_metrics(run.path)
              if key in row and row[key] is not None and math.isfinite(float(row[key]))]
    if not points:
        return None
    start = (1 - window) * max(step for step, _ in points)
    tail = [value for step, value in points if step >= start]
    return sum(tail) / len(tail)


def curve_by_seed(runs: list, key: str, window: float) -> dict[Any, float]:
    """replicate -> the mean over its runs of :func:`curve_tail_mean`."""
    by_seed: dict[Any, list[float]] = defaultdict(list)
    for run in runs:
        value = curve_tail_mean(run, key, window)
        if value is not None:
            by_seed[run.replicate].append(value)
    return {seed: sum(v) / len(v) for seed, v in by_seed.items()}


def verdict(r: ClaimResult, p_diff_holm: float, alpha: float = 0.05) -> str:
    """The verdict of a judged claim (module docstring): ``r.p_holm`` is its own test's adjusted p,
    ``p_diff_holm`` the adjusted p of its difference test (the same for a directional claim)."""
    if r.spec.untestable:
        return f"untestable at this scale: {r.spec.untestable}"
    if r.diff.n < 2:
        return f"not enough seeds (n = {r.diff.n})"
    mde, margin = f"MDE {r.number(r.mde)}{r.unit}", r.margin_text
    if r.spec.expect == "similar":
        if r.p_holm < alpha:
            return f"equivalent (within +-{margin})"
        if p_diff_holm < alpha:
            return "opposite (significant difference)"
        return f"not significant (not shown equivalent within +-{margin}; {mde})"
    if r.p_holm < alpha:
        return "reproduces" if (r.diff.mean > 0) == (r.spec.expect == "higher") else "opposite (significant)"
    if r.mde > r.room:  # False when the room is unknown (nan)
        return (f"untestable at this scale: not significant, and its {mde} exceeds the teacher's lead over the "
                f"student on {r.split} ({r.number(r.room)}{r.unit})")
    return f"not significant ({mde})"


def judge(results: list[tuple[str, ClaimResult]], alpha: float = 0.05) -> None:
    """Holm-adjust the family's p-values (each claim's own test; untestable claims are left out) and set
    every verdict, in place."""
    tested = [r for _, r in results if not r.spec.untestable]
    for r, adjusted in zip(tested, holm([r.test_p for r in tested]), strict=True):
        r.p_holm = adjusted
    diff_holm = dict(zip(map(id, tested), holm([r.p for r in tested]), strict=True))
    for _, r in results:
        r.verdict = verdict(r, diff_holm.get(id(r), math.nan), alpha)


def evaluate_claim(claim: ClaimSpec, runs: list, matches, hardest_split) -> ClaimResult:
    """``runs``: finished runs of one table group; ``matches(run, where)`` and ``hardest_split(runs, metric)``
    are the report's row selection and split choice, so a claim reads exactly what its table shows. The
    verdict is set by :func:`judge` over the whole family."""
    if is_training(claim.metric):
        return _evaluate_curve_claim(claim, runs, matches)
    split = hardest_split(runs, claim.metric) if claim.split == "hardest" else claim.split
    key = f"{split}/{claim.metric}"
    sides = []
    for side in (claim.a, claim.b):
        picked = [r for r in runs if matches(r, side.where)]
        sides.append(values_by_seed(picked, side.who, key))
    teacher, before = (list(values_by_seed(runs, who, key).values()) for who in ("teacher", "student_before"))
    room = sum(teacher) / len(teacher) - sum(before) / len(before) if teacher and before else math.nan
    return _compared(claim, str(split), *sides, room)


def _evaluate_curve_claim(claim: ClaimSpec, runs: list, matches) -> ClaimResult:
    """A training-dynamics claim: both sides trained runs, each run's curve over the same final steps."""
    for name, side in (("a", claim.a), ("b", claim.b)):
        if side.who != "student_after":
            raise ConfigError(f"report.claims.{name}.who", f"got {side.who} for the training curve {claim.metric}; "
                              "only trained runs (student_after) have one")
    a, b = (curve_by_seed([r for r in runs if matches(r, side.where)], claim.metric, claim.window)
            for side in (claim.a, claim.b))
    return _compared(claim, f"last {claim.window:.0%} of steps", a, b, math.nan)


def per_pair_means(diffs: dict[tuple, float]) -> list[float]:
    """replicate (pair seed, run seed) -> difference, to one mean difference per pair seed: the two-stage test
    of a random pair effect, since the run seeds of one pair share its teacher and student and are not
    independent draws of a pair."""
    by_pair: dict[Any, list[float]] = defaultdict(list)
    for (pair_seed, _), value in diffs.items():
        by_pair[pair_seed].append(value)
    return [sum(v) / len(v) for v in by_pair.values()]


def _compared(claim: ClaimSpec, split: str, a: dict, b: dict, room: float) -> ClaimResult:
    """The claim's numbers from each side's replicate -> value: the paired differences and their tests."""
    diffs = {s: a[s] - b[s] for s in a if s in b}
    paired = per_pair_means(diffs) if claim.over == "pairs" else list(diffs.values())
    return ClaimResult(claim, split, mean_ci(list(a.values())), mean_ci(list(b.values())), mean_ci(paired),
                       p=paired_t_p(paired), p_equiv=tost_p(paired, claim.margin) if claim.expect == "similar"
                       else math.nan, mde=min_detectable_effect(paired), room=room)


def _shown(stat: Stat, scale: float, ci: bool = False) -> str:
    """A side or a difference in the claim's printed units (x 100 for accuracies)."""
    if stat.n == 0:
        return "–"
    digits = (lambda v: f"{v * scale:.1f}") if scale != 1.0 else (lambda v: f"{v:.3g}")
    text = digits(stat.mean)
    if ci and stat.n > 1:
        text += f" [{digits(stat.lo)}, {digits(stat.hi)}]"
    return text


def _p(value: float) -> str:
    return "–" if math.isnan(value) else (f"{value:.3f}" if value >= 0.001 else "<0.001")


def claims_markdown(results: list[tuple[str, ClaimResult]]) -> list[str]:
    """The README section: one line per (group, claim), accuracies in points, training curves in their units."""
    lines = ["## Paper claims at this scale", "",
             "Each row compares two rows of the tables on one split: a - b is the mean paired difference over "
             "seeds with its 95% t-interval (percentage points); p is the paired t-test's (for a `similar` "
             "claim, the equivalence test's within the margin), Holm p the same adjusted over every claim of "
             "this report, and the verdict reads Holm p; MDE: the smallest true difference these seeds detect "
             "with power 0.8; teacher lead: the teacher's score minus the student's before distillation on the "
             "split, the room distillation has (a claim whose MDE exceeds it is untestable at this scale) "
             "(opd_exp/report/claims.py).", ""]
    if any(is_training(r.spec.metric) for _, r in results):
        lines += ["Training-dynamics claims (metric `train/...`) read each run's curve over its last steps, in the "
                  "curve's own units (tokens, nats, a fraction), not points.", ""]
    if any(r.spec.over == "pairs" for _, r in results):
        lines += ["Claims read over pairs (`over: pairs`: n in pairs) take each independently bootstrapped pair's "
                  "mean difference over its run seeds as one observation: their n counts pairs, their interval "
                  "and MDE the spread between pairs.", ""]
    lines += ["| claim | paper | group | split | a | b | a - b [95% CI] | n | p | Holm p | MDE / margin | teacher "
              "lead | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for group, r in results:
        bound = (f"+-{r.spec.margin * r.scale:g} (MDE {r.number(r.mde)})" if r.spec.expect == "similar"
                 else r.number(r.mde)) if not math.isnan(r.mde) else "–"
        lines.append(f"| {r.spec.claim} | {r.spec.paper} | {group or 'all'} | {r.split} | {_shown(r.a, r.scale)} | "
                     f"{_shown(r.b, r.scale)} | {_shown(r.diff, r.scale, ci=True)} | {r.diff.n}"
                     f"{' pairs' if r.spec.over == 'pairs' else ''} | {_p(r.test_p)} | "
                     f"{_p(r.p_holm)} | {bound} | {'–' if math.isnan(r.room) else r.number(r.room)} | {r.verdict} |")
    counts = defaultdict(int)
    for _, r in results:
        counts[r.verdict.split(" (")[0].split(":")[0]] += 1
    lines += ["", "Verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (of {len(results)} "
              "claim checks); stated as measured, never tuned until they reproduce.", ""]
    return lines


def claims_frame(results: list[tuple[str, ClaimResult]]):
    import pandas as pd

    rows = [{"claim": r.spec.claim, "paper": r.spec.paper, "group": group, "split": r.split,
             "metric": r.spec.metric, "expect": r.spec.expect, "a_mean": r.a.mean, "b_mean": r.b.mean,
             "diff_mean": r.diff.mean, "diff_ci_lo": r.diff.lo, "diff_ci_hi": r.diff.hi, "n": r.diff.n,
             "over": r.spec.over, "p": r.p, "p_equiv": r.p_equiv, "p_holm": r.p_holm, "mde": r.mde,
             "teacher_lead": r.room, "margin": r.spec.margin if r.spec.expect == "similar" else math.nan,
             "verdict": r.verdict}
            for group, r in results]
    return pd.DataFrame(rows)
