"""Seeds per claim from a power estimate: how many paired seeds each claim needs for its minimum detectable
effect (MDE) to reach a target, from the spread its committed table measured.

Usage:
    python scripts/plan_seeds.py                           # every results/*/claims.csv, target 2 points
    python scripts/plan_seeds.py --effect 0.01 --out /tmp/plan.md results/math_main/claims.csv

For a claim measured on n seeds with paired-difference interval [lo, hi], the paired sd is
(hi - lo) / 2 / t_{0.975, n-1} * sqrt(n); the MDE with n' seeds is (t_{1-a/2, n'-1} + t_{0.8, n'-1}) sd / sqrt(n')
(power 0.8). It reports n' for a = 0.05 and for a = 0.05 / m (m: the claims of that report; Holm's first
step, the strictest), capped at --max-seeds. Training-dynamics claims (metric train/..., in the curve's
own units) are left out: the target is in points of accuracy. A spread measured on few seeds is itself
uncertain: the plan is a starting point, to be checked when the new seeds come in. A claim read over pairs
(``over: pairs``, experiment=pair_seeds) counts pairs, not seeds. Writes a Markdown table
(stdout, and --out).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from opd_exp.report.stats import t_quantile

REPO = Path(__file__).resolve().parent.parent


def paired_sd(lo: float, hi: float, n: int) -> float:
    """The paired differences' sd behind a 95% t-interval [lo, hi] over n seeds."""
    return (hi - lo) / 2 / t_quantile(0.975, n - 1) * math.sqrt(n)


def mde(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def seeds_needed(sd: float, effect: float, alpha: float, max_seeds: int) -> int | None:
    """The fewest seeds (>= 2) whose MDE is at most ``effect``; None beyond ``max_seeds``."""
    for n in range(2, max_seeds + 1):
        if mde(sd, n, alpha) <= effect:
            return n
    return None


def plan(paths: list[Path], effect: float, max_seeds: int) -> list[str]:
    lines = [f"| report | claim | group | split | n | sd (pts) | MDE now (pts) | seeds for MDE <= {effect * 100:g} "
             "pts, a = 0.05 | ... a = 0.05 / m (Holm's strictest step) |", "|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        rows = [r for r in csv.DictReader(path.open()) if r.get("n") and int(float(r["n"])) >= 2
                and not r.get("metric", "").startswith("train/")]  # accuracy claims: the target is in points
        m = max(len(rows), 1)
        for r in rows:
            n = int(float(r["n"]))
            lo, hi = float(r["diff_ci_lo"]), float(r["diff_ci_hi"])
            if math.isnan(lo) or math.isnan(hi):
                continue
            sd = paired_sd(lo, hi, n)
            need = [seeds_needed(sd, effect, a, max_seeds) for a in (0.05, 0.05 / m)]
            shown = [str(k) if k is not None else f"> {max_seeds}" for k in need]
            claim = r["claim"] + (" (n: pairs)" if r.get("over") == "pairs" else "")
            lines.append(f"| {path.parent.name} | {claim} | {r.get('group') or 'all'} | {r['split']} | {n} | "
                         f"{sd * 100:.2f} | {mde(sd, n) * 100:.1f} | {shown[0]} | {shown[1]} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("claims", nargs="*", type=Path, help="claims.csv files (default: results/*/claims.csv)")
    ap.add_argument("--effect", type=float, default=0.02, help="target MDE, absolute (0.02 = 2 points)")
    ap.add_argument("--max-seeds", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    paths = args.claims or sorted((REPO / "results").glob("*/claims.csv"))
    if not paths:
        sys.exit("plan_seeds: no claims.csv found (run opd-exp-report first)")
    head = ["# Seeds per claim for a target MDE", "",
            f"Command: `python scripts/plan_seeds.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
            f"inputs: {', '.join(str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in paths)} "
            "(each claim's paired 95% interval and n). A plan, not a result: the spreads come from few seeds, "
            "and from the pair the tables were made on.", ""]
    text = "\n".join(head + plan(paths, args.effect, args.max_seeds)) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
