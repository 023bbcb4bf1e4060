"""The report's figures: bars per split with CI error bars, training curves with CI bands, metric against x."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from opd_exp import rundir
from opd_exp.report.runs import Run, parse_value
from opd_exp.report.stats import Stat, mean_ci
from opd_exp.report.table import Table


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# metrics.jsonl keys whose value is a loss of the run's own objective: not comparable across objectives
OBJECTIVE_SPECIFIC = ("train/loss", "train/kl")
# ranges of logged quantities, to keep a CI band inside what the quantity can take
RANGES = {"train/clip_frac": (0.0, 1.0), "train/truncated": (0.0, 1.0), "train/entropy": (0.0, math.inf),
          "train/response_len": (0.0, math.inf), "train/grad_norm": (0.0, math.inf)}


def axis_label(key: str) -> str:
    """A curve panel's y label: scores in percent (as the tables), the rest in their logged unit."""
    if "@" in key:
        return f"{key.rsplit('/', 1)[-1]} (%)"
    units = {"train/response_len": "tokens", "train/entropy": "nats / token", "train/logprob_gap": "nats / token",
             "train/clip_frac": "fraction of tokens", "train/grad_norm": "L2 norm (before clipping)"}
    return units.get(key, "value")


def bar_figure(table: Table, path: Path) -> bool:
    """Grouped bars: one group per column (split), one bar per row, 95% CI error bars; scores in percent."""
    labels = [lab for lab, stats in table.cells.items() if any(s.n for s in stats.values())]
    columns = table.columns
    if not labels or not columns:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(columns) * (1 + 0.25 * len(labels))), 3.6))
    width = 0.8 / len(labels)
    scale = 100.0 if "@" in (table.metric or "") else 1.0
    for i, label in enumerate(labels):
        stats = [table.cells[label][c] for c in columns]
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(columns))]
        means = [s.mean * scale for s in stats]
        errs = [[0 if math.isnan(s.lo) else (s.mean - s.lo) * scale for s in stats],
                [0 if math.isnan(s.hi) else (s.hi - s.mean) * scale for s in stats]]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=label)
    ax.set_xticks(range(len(columns)), columns, rotation=15 if len(columns) > 4 else 0)
    ax.set_xlabel("eval split")
    ax.set_ylabel(f"{table.metric} (%)" if scale == 100.0 else table.metric or "value")
    ax.set_title(table.title or table.name, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def curve_stats(runs: list[Run], key: str) -> tuple[list[int], list[Stat]]:
    """Per step, the mean and CI over the runs (seeds) that logged ``key`` at that step."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for row in rundir.read_metrics(run.path):
            if row.get(key) is not None and "step" in row:
                by_step[int(row["step"])].append(float(row[key]))
    steps = sorted(by_step)
    return steps, [mean_ci(by_step[s]) for s in steps]


def comparable_keys(rows: list[tuple[str, list[Run]]], keys: list[str]) -> list[str]:
    """``keys`` without the objective-specific losses when the rows train more than one objective."""
    objectives = {str(r.lookup("estimator.name")) for _, runs in rows for r in runs}
    return [k for k in keys if k not in OBJECTIVE_SPECIFIC] if len(objectives) > 1 else list(keys)


CurveData = dict[str, list[tuple[str, list[int], list[Stat]]]]  # key -> [(row label, steps, per-step stats)]


def curve_data(table: Table, keys: list[str], max_lines: int = 12) -> CurveData:
    """Per metrics.jsonl key, per row (at most ``max_lines``), the mean over seeds at each step with its CI.
    Objective-specific losses (:data:`OBJECTIVE_SPECIFIC`) are left out when the rows train different objectives
    (one loss type per axis); ``train/logprob_gap`` compares them. Keys and rows nobody logged are dropped."""
    rows = list(table.row_runs.items())[:max_lines]
    data = {k: [(lab, *curve_stats(rs, k)) for lab, rs in rows] for k in comparable_keys(rows, keys)}
    data = {k: [d for d in v if d[1]] for k, v in data.items()}
    return {k: v for k, v in data.items() if v}


def curve_records(data: CurveData) -> list[dict]:
    """The curves in long form (key, row, step, mean, ci_lo, ci_hi, n): what curves_<table>.csv holds, so the
    figure can be redrawn without the run dirs."""
    return [{"key": key, "row": label, "step": step, "mean": st.mean, "ci_lo": st.lo, "ci_hi": st.hi, "n": st.n}
            for key, lines in data.items() for label, steps, stats in lines
            for step, st in zip(steps, stats, strict=True)]


def curve_figure(data: CurveData, path: Path) -> bool:
    """One panel per key, one line per row (mean over seeds) with its CI band, kept inside the quantity's
    range."""
    if not data:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(data), figsize=(3.4 * len(data), 3.0), squeeze=False)
    for ax, (key, lines) in zip(axes[0], data.items(), strict=True):
        lo_bound, hi_bound = (0.0, 100.0) if "@" in key else RANGES.get(key, (-math.inf, math.inf))
        scale = 100.0 if "@" in key else 1.0
        for label, steps, stats in lines:
            line, = ax.plot(steps, [s.mean * scale for s in stats], label=label, lw=1.2)
            ax.fill_between(steps, [max(lo_bound, s.lo * scale) for s in stats],
                            [min(hi_bound, s.hi * scale) for s in stats], alpha=0.2, color=line.get_color(), lw=0)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(axis_label(key), fontsize=8)
    axes[0][0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def x_figure(table: Table, path: Path) -> bool:
    """Metric against a numeric `x` (layout 2: one line per column; layout 3: one line per row)."""
    if not table.x_key:
        return False
    series: dict[str, list[tuple[float, Stat]]] = defaultdict(list)
    for label, stats in table.cells.items():
        for col, s in stats.items():
            if not s.n:
                continue
            pivot = col.startswith(f"{table.x_key}=")
            x = parse_value((col if pivot else label).split("=", 1)[1])
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                series[label if pivot else col].append((float(x), s))
    if not series:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for name, points in series.items():
        points.sort(key=lambda p: p[0])
        xs, stats = [p[0] for p in points], [p[1] for p in points]
        errs = [[0 if math.isnan(s.lo) else s.mean - s.lo for s in stats],
                [0 if math.isnan(s.hi) else s.hi - s.mean for s in stats]]
        ax.errorbar(xs, [s.mean for s in stats], yerr=errs, marker="o", capsize=2, label=name)
    xs_all = [p[0] for pts in series.values() for p in pts]
    if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
        ax.set_xscale("log", base=2 if all(float(x).is_integer() for x in xs_all) else 10)
    ax.set_xlabel(table.x_key)
    ax.set_ylabel(table.metric)
    ax.set_title(table.title or table.name, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
