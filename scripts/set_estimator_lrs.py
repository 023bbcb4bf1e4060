"""Write each estimator recipe's tuned learning rate (conf/recipe/est/<name>.yaml) from the lr-tuning report.

Usage:
    opd-exp experiment=estimators_lr_tune && opd-exp-report multirun/estimators_lr_tune
    python scripts/set_estimator_lrs.py                             # results/estimators_lr_tune/main.csv
    python scripts/set_estimator_lrs.py --table outputs/smoke/results/estimators_lr_tune/main.csv --dry-run

For every row ``recipe=est/<name>`` of the pivot table (avg@k averaged over the tuning splits, per lr), the lr
with the highest mean over seeds replaces the ``lr:`` line of conf/recipe/est/<name>.yaml, and the comment above
it records the sweep and every lr's mean. What conf/experiment/lr_tune.yaml's users do by hand for the paper's
recipes, done the same way for the estimator comparison so that every objective gets the same tuning budget.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LR_LINE = re.compile(r"^(?P<indent>[ \t]*)lr:[ \t]*\S+[ \t]*$", re.M)
COMMENT = re.compile(r"(^\s*#[^\n]*\n)+(?=\s*lr:)", re.M)


def best_lrs(table: Path) -> dict[str, tuple[float, dict[float, float]]]:
    """recipe name -> (best lr, {lr: mean}) from the report's pivot CSV (rows recipe=..., columns train.lr=...)."""
    means: dict[str, dict[float, float]] = defaultdict(dict)
    with open(table) as f:
        for row in csv.DictReader(f):
            if row["row"].startswith("recipe=est/") and row["column"].startswith("train.lr=") and row["mean"]:
                lr = float(row["column"].split("=", 1)[1])
                means[row["row"].removeprefix("recipe=est/")][lr] = float(row["mean"])
    return {name: (max(by_lr, key=by_lr.get), by_lr) for name, by_lr in means.items()}


def rewrite(path: Path, lr: float, by_lr: dict[float, float], table: Path) -> str:
    text = path.read_text()
    indent = LR_LINE.search(text).group("indent")
    grid = ", ".join(f"{k:g}: {100 * v:.1f}%" for k, v in sorted(by_lr.items()))
    comment = (f"{indent}# lr: the best of estimators_lr_tune ({table.as_posix()}; avg@k over the tuning splits and\n"
               f"{indent}# seeds: {grid}), written by scripts/set_estimator_lrs.py\n")
    text = COMMENT.sub(comment, text, count=1)
    return LR_LINE.sub(f"{indent}lr: {lr:g}", text, count=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=Path("results/estimators_lr_tune/main.csv"))
    parser.add_argument("--dry-run", action="store_true", help="print the choices, change no file")
    args = parser.parse_args()
    for name, (lr, by_lr) in sorted(best_lrs(args.table).items()):
        path = REPO / "conf" / "recipe" / "est" / f"{name}.yaml"
        print(f"{name}: lr {lr:g}  ({', '.join(f'{k:g}: {100 * v:.1f}%' for k, v in sorted(by_lr.items()))})")
        if not args.dry_run:
            path.write_text(rewrite(path, lr, by_lr, args.table))


if __name__ == "__main__":
    main()
