"""The failure-modes report: figures, tables and verdicts for `failure_modes` runs (PAPER.md, F1-F3).

    opd-exp experiment=failure_modes && opd-exp-report multirun/failure_modes   # -> results/failure_modes/

opd-exp-report hands the runs of the `failure_modes` experiment here (:func:`write_failure_report`), then adds
its own provenance, generic tables and cell list to the same README. Inputs per run dir: config.yaml,
run_summary.json, metrics.jsonl (``diag/...`` keys every ``train.diag_every`` steps) and the raw per-token
samples ``diag/samples_step{0,last}.npz`` (opd_exp/train/diagnostics.py).

Cells are (pair, estimator, rollout top-p, mask), read from each run's resolved config; seeds are the
replicates. Every number is a mean over seeds with a 95% t-interval (opd_exp.stats.mean_ci); comparisons
between cells pair runs by seed; the rules below are applied in :mod:`opd_exp.report.failure_verdicts`. A
verdict needs two seeds or more (else "not enough seeds"); verdicts use the claims' vocabulary
(opd_exp/report/claims.py). Each mode's rule is a one-sample t-test of the seeds' mean against its threshold
("above 0.5" below: significantly above, two-sided 0.05), Holm-adjusted over the report's rules (controls left
out). Mode 2 is untestable on a pair none of whose responses loops;
mode 3 is a control on a pair whose teacher and student share one convention. The rules are fixed
here, before any run was read, and never tuned to the outcome:

- mode 1 (Fig. 2) reproduces on a pair when, in the baseline cell (sampled_token, top-p 1, no mask) at the first
  step, the share of sampled tokens below the diagonal (teacher prob < student prob) is above 0.5. The fix
  (topk_rkl) does not train on that one-token reward, so it removes it by construction; the shares on its
  rollouts are reported, not judged.
- mode 2 (Figs. 3-4) reproduces when, in the baseline cell at the last step, p10 of the teacher - student gap of
  the sampled token (special tokens left out, so mode 3 does not pose as mode 2) is lower in the last quarter
  of the responses than in the first: the per-seed difference is below 0. The fix removes it when the
  same test fails on its cell (topk_rkl, top-p < 1, masked); the paired difference is given either way.
- mode 3 (Fig. 5) reproduces on a pair when, at the first step, the teacher - student log-prob gap on the
  pair's special tokens (``model.special_tokens``) is below -5 nats
  (:data:`~opd_exp.report.failure_verdicts.MISMATCH_NATS`). Its harm is a student that stops writing its own
  end token: masking removes it when, per estimator, the last-step share of truncated responses drops with the
  mask (paired CI above 0) to no more than on the other pair (CIs overlap).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from opd_exp.report.failure_cells import (
    LOG_FLOOR,
    Cell,
    all_special_ids,
    by_cell,
    clear_caches,
    find_loop,
    fmt,
    log_probs,
    metric_at,
    pair_tokenizer,
    paired,
    samples,
    seed_stat,
    special_token_ids,
)
from opd_exp.report.failure_verdicts import verdict_lines
from opd_exp.report.figures import curve_stats, pyplot
from opd_exp.report.runs import Run
from opd_exp.report.stats import Stat

N_BUCKETS = 4  # relative-position buckets (quarters of each response), as the diagnostics log them
DYNAMICS = ["train/response_len", "train/grad_norm", "train/clip_frac", "train/entropy", "train/logprob_gap",
            "diag/len/truncated_frac"]


# ----------------------------------------------------------------------------- mode 1: the scatter


def below_diagonal(s: dict[str, np.ndarray]) -> float:
    """Share of sampled tokens whose teacher probability is below the student's (negative reward)."""
    return float(np.mean(s["teacher_prob"] < s["student_prob"])) if len(s["token_id"]) else float("nan")


def above_diagonal(s: dict[str, np.ndarray]) -> float:
    """Share of sampled tokens whose teacher probability is above the student's (the rest are exact ties)."""
    return float(np.mean(s["teacher_prob"] > s["student_prob"])) if len(s["token_id"]) else float("nan")


def top_ids_share(s: dict[str, np.ndarray], n: int = 5) -> float:
    """Share of the batch's positive reward carried by its ``n`` leading token ids (saved with the samples)."""
    return float(np.sum(s["pos_signal_shares"][:n])) if "pos_signal_shares" in s else float("nan")


def mode1(cells: dict[Cell, list[Run]], out: Path) -> tuple[list[dict], dict]:
    rows, per = [], {}
    for cell, runs in cells.items():
        for which in ("first", "last"):
            got = {r.seed: s for r in runs if (s := samples(r, which)) is not None and "teacher_prob" in s}
            below = {k: below_diagonal(s) for k, s in got.items()}
            above = {k: above_diagonal(s) for k, s in got.items()}
            top5 = {k: top_ids_share(s) for k, s in got.items()}
            per[(cell, which)] = below
            rows.append({"pair": cell.pair, "cell": cell.label, "step": which, "below_diag": seed_stat(below),
                         "above_diag": seed_stat(above), "top5_ids_pos_share": seed_stat(top5)})
    scatter_figure(cells, out / "fig2_scatter.png")
    return rows, per


def scatter_figure(cells: dict[Cell, list[Run]], path: Path, max_points: int = 6000) -> bool:
    base = [(c, rs) for c, rs in cells.items() if c.is_baseline]
    if not base:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(base), figsize=(max(5.0, 3.6 * len(base)), 3.8), squeeze=False)
    for ax, (cell, runs) in zip(axes[0], base, strict=True):
        got = [s for r in runs if (s := samples(r, "first")) is not None and "teacher_prob" in s]
        if not got:
            continue
        t = np.concatenate([s["teacher_prob"] for s in got])
        p = np.concatenate([s["student_prob"] for s in got])
        keep = np.random.default_rng(0).permutation(len(t))[:max_points]
        ax.scatter(p[keep], t[keep], s=3, alpha=0.25, lw=0)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_title(f"{cell.pair}: {np.mean(t < p):.0%} below the diagonal", fontsize=9)
        ax.set_xlabel("student prob of sampled token")
        ax.set_ylabel("teacher prob")
    fig.suptitle("Fig. 2: sampled tokens at the first step\n(sampled-token OPD, top-p 1, all seeds)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- mode 2: gap by position, loops


def gap_p10_by_bucket(s: dict[str, np.ndarray], special: np.ndarray) -> list[float]:
    """p10 of log q - log pi over non-special tokens, per quarter of the responses (nan where empty)."""
    log_q, log_p = log_probs(s)
    gap = log_q - log_p
    keep = ~np.isin(s["token_id"], special)
    bucket = np.minimum((s["rel_pos"] * N_BUCKETS).astype(int), N_BUCKETS - 1)
    return [float(np.percentile(gap[keep & (bucket == j)], 10)) if np.any(keep & (bucket == j)) else float("nan")
            for j in range(N_BUCKETS)]


def mode2(cells: dict[Cell, list[Run]], out: Path, tok) -> tuple[list[dict], dict]:
    rows, widen = [], {}
    for cell, runs in cells.items():
        for which in ("first", "last"):
            first = which == "first"
            p10 = {r.seed: gap_p10_by_bucket(s, all_special_ids(tok, s)) for r in runs
                   if (s := samples(r, which)) is not None and "teacher_prob" in s}
            widen[(cell, which)] = {k: v[-1] - v[0] for k, v in p10.items()}
            row = {"pair": cell.pair, "cell": cell.label, "step": which}
            row |= {f"gap_p10_q{j + 1}": seed_stat({k: v[j] for k, v in p10.items()}) for j in range(N_BUCKETS)}
            row["q4_minus_q1"] = seed_stat(widen[(cell, which)])
            row["loop_frac"] = seed_stat({r.seed: metric_at(r, "diag/rep/loop_frac", first) for r in runs})
            row["teacher_prob_in_loop"] = seed_stat({  # only runs whose batch had loop tokens
                r.seed: metric_at(r, "diag/rep/teacher_prob_in_loop", first) for r in runs
                if (metric_at(r, "diag/rep/loop_tokens", first) or 0) > 0})
            rows.append(row)
    gap_figure(cells, out / "fig4_gap_by_position.png", tok)
    return rows, widen


def gap_figure(cells: dict[Cell, list[Run]], path: Path, tok) -> bool:
    """Box plots of the gap per position quarter, first vs last step, one panel per pair and estimator."""
    panels = [(c, rs) for c, rs in cells.items()
              if not c.mask and (c.is_baseline or (c.estimator == "topk_rkl" and c.top_p < 1.0))]
    if not panels:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.5, 3.8 * len(panels)), 3.6), squeeze=False)
    for ax, (cell, runs) in zip(axes[0], panels, strict=True):
        for k, (which, color) in enumerate((("first", "tab:blue"), ("last", "tab:red"))):
            data = []
            for j in range(N_BUCKETS):
                vals = []
                for r in runs:
                    s = samples(r, which)
                    if s is None or "teacher_prob" not in s:
                        continue
                    log_q, log_p = log_probs(s)
                    bucket = np.minimum((s["rel_pos"] * N_BUCKETS).astype(int), N_BUCKETS - 1)
                    keep = (bucket == j) & ~np.isin(s["token_id"], all_special_ids(tok, s))
                    vals.append((log_q - log_p)[keep])
                data.append(np.concatenate(vals) if vals else np.array([]))
            pos = [j * 3 + k for j in range(N_BUCKETS)]
            bp = ax.boxplot([d if len(d) else [np.nan] for d in data], positions=pos, widths=0.8,
                            whis=(10, 90), showfliers=False, patch_artist=True)
            for patch in bp["boxes"]:
                patch.set_facecolor(color)
                patch.set_alpha(0.4)
            ax.plot([], [], color=color, label=f"{which} step")
        ax.set_xticks([j * 3 + 0.5 for j in range(N_BUCKETS)], [f"Q{j + 1}" for j in range(N_BUCKETS)])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(f"{cell.pair}: {cell.label}", fontsize=8)
        ax.set_xlabel("position quarter of the response")
        ax.set_ylabel("log q - log pi (whiskers p10-p90)")
        ax.legend(fontsize=7)
    fig.suptitle("Fig. 4: teacher - student gap of the sampled token by position\n(special tokens left out; "
                 "first vs last step)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def loop_figure(found, tok, path: Path) -> bool:
    """Fig. 3: one looping response, the teacher's and the student's probability of each sampled token."""
    if found is None:
        return False
    cell, seed, which, ids, q, p, loop = found
    pieces = tok.convert_ids_to_tokens([int(i) for i in ids]) if tok is not None else [str(i) for i in ids]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(ids)), 3.2))
    xs = np.arange(len(ids))
    for x in xs[loop]:
        ax.axvspan(x - 0.5, x + 0.5, color="0.9", lw=0)
    ax.plot(xs, q, "o-", ms=3, label="teacher q(y_t)")
    ax.plot(xs, p, "s-", ms=3, alpha=0.7, label="student pi(y_t)")
    ax.set_xticks(xs, pieces, rotation=90, fontsize=6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Fig. 3: a repetition loop (grey) in {cell.pair}, {cell.label}, seed {seed}, {which} step",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- mode 3: the mismatch table


def token_logprobs(s: dict[str, np.ndarray], token_id: int) -> tuple[float, float, int]:
    """Mean (student, teacher) log-prob over the occurrences of ``token_id`` and their count."""
    log_q, log_p = log_probs(s)
    hit = s["token_id"] == token_id
    if not hit.any():
        return float("nan"), float("nan"), 0
    return float(log_p[hit].mean()), float(log_q[hit].mean()), int(hit.sum())


def mode3(cells: dict[Cell, list[Run]], tok) -> tuple[list[dict], dict]:
    """Per cell, step and special token: the student's and the teacher's mean log-prob (mean over seeds) and
    the teacher - student gap; ``gaps[(cell, step)]`` = per seed, the gap averaged over the special tokens."""
    rows, gaps = [], {}
    for cell, runs in cells.items():
        specials = special_token_ids(runs[0], tok)
        for which in ("first", "last"):
            got = {r.seed: s for r in runs if (s := samples(r, which)) is not None and "teacher_prob" in s}
            per_seed_gap: dict[Any, list[float]] = defaultdict(list)
            for name, tid in specials.items():
                vals = {k: token_logprobs(s, tid) for k, s in got.items()}
                student = {k: v[0] for k, v in vals.items() if v[2]}
                teacher = {k: v[1] for k, v in vals.items() if v[2]}
                for k in student:
                    per_seed_gap[k].append(teacher[k] - student[k])
                rows.append({"pair": cell.pair, "cell": cell.label, "step": which, "token": name,
                             "student_logprob": seed_stat(student), "teacher_logprob": seed_stat(teacher),
                             "gap": paired(teacher, student), "count": sum(v[2] for v in vals.values())})
            gaps[(cell, which)] = {k: float(np.mean(v)) for k, v in per_seed_gap.items()}
    return rows, gaps


# ----------------------------------------------------------------------------- training dynamics


def dynamics(cells: dict[Cell, list[Run]], out: Path) -> list[dict]:
    """Curves per pair (one figure each): a panel per key, a line per cell (mean over seeds, CI band)."""

    rows = []
    pairs = sorted({c.pair for c in cells})
    for pair in pairs:
        mine = {c: rs for c, rs in cells.items() if c.pair == pair}
        data = {k: [(c, *curve_stats(rs, k)) for c, rs in mine.items()] for k in DYNAMICS}
        data = {k: [d for d in v if d[1]] for k, v in data.items() if any(d[1] for d in v)}
        for key, lines in data.items():
            for cell, steps, stats in lines:
                rows.append({"pair": pair, "cell": cell.label, "key": key, "first_step": steps[0],
                             "first": stats[0], "last_step": steps[-1], "last": stats[-1]})
        if data:
            dynamics_figure(pair, data, out / f"dynamics_{pair}.png")
    return rows


def dynamics_figure(pair: str, data: dict, path: Path) -> None:
    plt = pyplot()
    n_cols = min(3, len(data))
    n_rows = math.ceil(len(data) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.4 * n_cols, 2.8 * n_rows + 0.4), squeeze=False)
    for ax in axes.flat[len(data):]:
        ax.set_visible(False)
    colors = {}
    for ax, (key, lines) in zip(axes.flat, data.items(), strict=False):
        for cell, steps, stats in lines:
            base = f"{cell.estimator}, p={cell.top_p:g}"
            colors.setdefault(base, f"C{len(colors)}")
            ax.plot(steps, [s.mean for s in stats], color=colors[base], ls="--" if cell.mask else "-", lw=1.1,
                    label=cell.label)
            ax.fill_between(steps, [s.lo for s in stats], [s.hi for s in stats], color=colors[base], alpha=0.15,
                            lw=0)
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"training dynamics, {pair} (mean over seeds, 95% CI band; dashed = masked)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- tables


def write_table(rows: list[dict], stem: str, out: Path, title: str) -> list[str]:
    """rows -> <stem>.csv (Stat columns as mean, ci_lo, ci_hi, n) and a Markdown table (returned)."""
    import pandas as pd

    if not rows:
        return [f"### {title}", "", "No data.", ""]
    flat = []
    for row in rows:
        item = {}
        for k, v in row.items():
            if isinstance(v, Stat):
                item |= {k: v.mean, f"{k}_ci_lo": v.lo, f"{k}_ci_hi": v.hi, f"{k}_n": v.n}
            else:
                item[k] = v
        flat.append(item)
    pd.DataFrame(flat).to_csv(out / f"{stem}.csv", index=False)
    keys = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v, 2) if isinstance(v, Stat) else str(v) for v in row.values()) + " |")
    return lines + ["", f"CSV: [{stem}.csv]({stem}.csv). Values: mean [95% CI] (n seeds).", ""]


def write_failure_report(runs: list[Run], out: Path) -> list[str]:
    """Figures and CSV tables into ``out``; returns the Markdown (verdicts, figures, tables) for README.md."""
    out.mkdir(parents=True, exist_ok=True)
    clear_caches()
    usable = [r for r in runs if r.usable]
    cells = by_cell(usable)
    if not cells:
        return ["## Failure modes", "", "No finished run yet.", ""]
    tok = pair_tokenizer(usable[0])
    rows1, m1 = mode1(cells, out)
    rows2, m2 = mode2(cells, out, tok)
    rows3, m3 = mode3(cells, tok)
    found = find_loop(cells)
    has_loop_fig = loop_figure(found, tok, out / "fig3_loop_example.png")
    rows4 = dynamics(cells, out)
    pairs = sorted({c.pair for c in cells})
    seeds = sorted({r.seed for r in usable}, key=str)
    wall = sum(float(r.summary.get("wall_time_s") or 0.0) for r in runs)
    md = ["## Failure modes at this scale", "",
          "- command: `opd-exp experiment=failure_modes` then `opd-exp-report multirun/failure_modes`",
          f"- seeds: {', '.join(map(str, seeds))}; {len(usable)} finished runs in {len(cells)} cells",
          f"- wall time: {wall / 60:.1f} min summed over runs ({wall / max(len(runs), 1):.0f} s per run)", ""]
    md += verdict_lines(pairs, cells, m1, m2, m3, rows2)
    md += ["## Figures", "", "![Fig. 2](fig2_scatter.png)", "", "![Fig. 4](fig4_gap_by_position.png)", ""]
    if has_loop_fig:
        cell, seed, which = found[:3]
        md += [f"![Fig. 3](fig3_loop_example.png) A loop from {cell.pair}, {cell.label}, seed {seed}, {which} "
               f"step; mean teacher prob on its loop tokens: {float(np.mean(found[4][found[6]])):.2f}.", ""]
    else:
        md += ["Fig. 3: no repetition loop (a unit of <= 8 tokens repeated >= 3 times back to back) occurred in "
               "any saved response (first and last step of every run), so there is no loop example.", ""]
    md += [f"![dynamics](dynamics_{p}.png)" for p in pairs] + [""]
    md += write_table(rows1, "mode1_signal", out, "Mode 1: share of sampled tokens below the diagonal")
    md += write_table(rows2, "mode2_gap_by_position", out,
                      "Mode 2: p10 of log q - log pi per position quarter (nats), loop rates")
    md += write_table(rows3, "mode3_special_tokens", out,
                      f"Mode 3 (Fig. 5): log-probs on the special tokens (floor {LOG_FLOOR:.1f}: float32 probs)")
    md += write_table(rows4, "dynamics", out, "Training dynamics: first and last logged value")
    return md
