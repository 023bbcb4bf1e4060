"""opd-exp-report: run dirs -> the paper's tables (CSV, Markdown), figures (PNG) and a provenance README.

Usage:
    opd-exp-report multirun/math_main                       # -> results/math_main/
    opd-exp-report multirun/*                               # every experiment found -> results/<experiment>/
    opd-exp-report 'multirun/math_main/*recipe=ours*' --out /tmp/ours_only
    python -m opd_exp.report.cli multirun/ablation_k_topp

Arguments are sweep dirs, run dirs or globs: every directory under them holding a run_summary.json or a
.hydra/config.yaml is a run. Runs are grouped by experiment, then into cells by their overrides minus the seed;
seeds are aggregated into mean, a 95% t-interval (n - 1 degrees of freedom; n = 1 gives none) and n. Failed and
unfinished cells are listed in README.md with their error's last line, never fatal. With several experiments
and --out, each goes to <out>/<experiment>/. Toy-study runs (runner toy_gamma / toy_exact) go to
opd_exp.toy.report.write_toy_report; `failure_modes` runs also go to opd_exp.report.failure.write_failure_report
(its figures, tables and verdicts open the README).

Layout: the experiment's `report:` block (conf/experiment/<name>.yaml) mirrors the paper's rows x columns:

    report:
      title: "Table 1: ..."
      curves: [train/loss, train/response_len]   # metrics.jsonl keys plotted over steps (mean, CI band)
      facets: [model]                            # keys that split every table in one per value (default)
      tables:
        - name: main
          metric: avg@4                          # greedy@1 | avg@<k> | pass@<k>
          columns: [splits, avg]                 # splits = every eval split; hardest = the split on which
                                                 # the student scores lowest among those the
                                                 # teacher leads (AIME24's role); or split names
          rows:                                  # layout 1: explicit rows
            - {label: Teacher, who: teacher}     # who: teacher | student_before | student_after (default)
            - {label: Ours, where: {recipe: ours, mask.enabled: false}}
        - name: k                                # layout 2: one row per value of `x` among runs matching `fixed`
          metric: avg@4
          columns: [splits, avg]
          x: estimator.top_k
          fixed: {recipe: [ours, f6/k1, f6/k4]}  # a list matches any of its values
        - name: lr                               # layout 3: pivot, rows = `index` values, columns = `x`
          metric: avg@4                          # values, at one split; the best column per row is marked
          split: avg
          index: recipe
          x: train.lr

Keys in where / fixed / x / index / facets are looked up in the run's overrides first (group choices such as
recipe=ours or estimator=topk_v2), then in its resolved config by dotted path (estimator.top_k). Runs without
a report block get one generic table: every cell (its varying overrides) x every result.

Outputs per experiment: README.md (provenance and every table), <table>.md, <table>.csv (long: row, column,
mean, ci_lo, ci_hi, n), cells.csv, runs.csv, bars_<table>.png, curves_<table>.png, x_<table>.png (layouts 2, 3).
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from opd_exp.config.validation import ConfigError, spec, validate
from opd_exp.report.claims import WHO, ClaimSpec, SideSpec, claims_frame, claims_markdown, evaluate_claim
from opd_exp.report.figures import bar_figure, curve_figure, x_figure
from opd_exp.report.runs import (
    FINISHED,
    Run,
    cell_label,
    find_run_dirs,
    group_cells,
    load_run,
    parse_value,
    same_value,
    shown_path,
    varying_keys,
)
from opd_exp.report.stats import Stat, mean_ci
from opd_exp.report.table import Table

TOY_RUNNERS = ("toy_gamma", "toy_exact")
FAILURE_EXPERIMENT = "failure_modes"  # its runs also go to opd_exp.report.failure (figures and verdicts)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
DEFAULT_CURVES = ["train/loss", "train/response_len", "train/grad_norm", "train/clip_frac", "train/entropy"]
CI_NOTE = ("± is the half-width of the 95% t-interval over seeds (n - 1 degrees of freedom); "
           "n = 1 has no interval (nan in the CSV).")


# ----------------------------------------------------------------------------- the report block

@dataclass
class RowSpec(SideSpec):
    """One explicit row of a table: a labelled side (whose evaluation, of which runs)."""

    label: str = spec("", "row label as in the paper")


@dataclass
class TableSpec:
    """One table: explicit rows, an `x` sweep, or an `index` x `x` pivot."""

    name: str = spec("main", "file stem of the table")
    title: str = spec("", "heading")
    metric: str = spec("avg@4", "greedy@1 | avg@<k> | pass@<k>")
    columns: list[str] = spec(default_factory=lambda: ["splits", "avg"], doc="splits | avg | hardest | <split>")
    rows: list[RowSpec] = spec(default_factory=list, doc="explicit rows (layout 1)")
    x: str | None = spec(None, "key whose values are the rows (layout 2) or the columns (layout 3)")
    fixed: dict = spec(default_factory=dict, doc="key -> value the runs of layout 2 match")
    index: str | None = spec(None, "key whose values are the rows of a pivot (layout 3)")
    split: str = spec("avg", "the split a pivot reports")


@dataclass
class ReportSpec:
    """The `report:` block of an experiment file."""

    title: str = spec("", "title of README.md")
    curves: list[str] = spec(default_factory=lambda: list(DEFAULT_CURVES), doc="metrics.jsonl keys to plot")
    facets: list[str] = spec(default_factory=lambda: ["model"], doc="keys splitting every table per value")
    tables: list[TableSpec] = spec(default_factory=list, doc="the tables")
    claims: list[ClaimSpec] = spec(default_factory=list, doc="the paper's claims, checked per facet")


def report_spec(runs: list[Run]) -> ReportSpec | None:
    """The report block of the first run that has one (validated), or None for ad-hoc sweeps."""
    block = next((r.config.get("report") for r in runs if r.config.get("report")), None)
    if not block:
        return None
    return validate(ReportSpec, block, "report")


# ----------------------------------------------------------------------------- tables

def matches(run: Run, where: dict) -> bool:
    """Every key has the given value (or one of the given values, when a list)."""
    return all(any(same_value(run.lookup(k), one) for one in (v if isinstance(v, list) else [v]))
               for k, v in where.items())


def split_names(runs: list[Run]) -> list[str]:
    """Eval splits in the task's order (resolved config), else in the order results mention them."""
    seen: list[str] = []
    for run in runs:
        configured = list(((run.config.get("task") or {}).get("eval_splits") or {}).keys())
        found = [k.split("/")[1] for k in run.results if k.count("/") == 2 and k.split("/")[0] in WHO]
        for name in configured + found:
            if name != "avg" and name not in seen and any(f"/{name}/" in k for k in run.results):
                seen.append(name)
    return seen


def who_values(runs: list[Run], who: str, split: str, metric: str) -> list[float]:
    """One value per seed: student_after per run; teacher / student_before averaged over the runs of a seed."""
    key = f"{who}/{split}/{metric}"
    by_seed: dict[Any, list[float]] = defaultdict(list)
    for i, run in enumerate(runs):
        value = run.results.get(key)
        if value is not None:
            by_seed[run.seed if who != "student_after" else (run.seed, i)].append(float(value))
    return [sum(v) / len(v) for v in by_seed.values()]


def hardest_split(runs: list[Run], metric: str) -> str | None:
    """The split standing in for the paper's AIME24 (hard for the student, with a teacher well ahead): the
    lowest student_before score among the splits on which the teacher scores above the student before
    training. A split the teacher fails as badly as the student carries no signal to distil, so it cannot
    play that role. With no such split, the teacher's lowest-scoring one. Only before-training evaluations
    decide, never the trained students'."""
    splits = split_names(runs)
    if not splits:
        return None
    teacher = {s: mean_ci(who_values(runs, "teacher", s, metric)).mean for s in splits}
    student = {s: mean_ci(who_values(runs, "student_before", s, metric)).mean for s in splits}
    taught = [s for s in splits if teacher[s] > student[s]]  # NaN compares False: no teacher, no split
    if taught:
        return min(taught, key=lambda s: student[s])
    return min(splits, key=lambda s: (math.isnan(teacher[s]), teacher[s]))


def expand_columns(spec_columns: list[str], runs: list[Run], metric: str) -> tuple[list[str], list[str]]:
    """(split names, column headers): `splits` -> every split, `hardest` -> ``hardest_split``."""
    splits, headers = [], []
    for col in spec_columns:
        if col == "splits":
            names = split_names(runs)
            splits += names
            headers += names
        elif col == "hardest":
            name = hardest_split(runs, metric)
            if name:
                splits.append(name)
                headers.append(f"hardest ({name})")
        else:
            splits.append(col)
            headers.append(col)
    return splits, headers


def fill_row(table: Table, label: str, runs: list[Run], who: str, splits: list[str], headers: list[str]) -> None:
    table.cells[label] = {h: mean_ci(who_values(runs, who, s, table.metric))
                          for s, h in zip(splits, headers, strict=True)}
    if who == "student_after":
        table.row_runs[label] = runs
    else:
        table.notes.append(f"row '{label}': the {who} evaluation every run makes, averaged per seed")
    n_cells = len({r.cell for r in runs})
    if who == "student_after" and n_cells > 1:
        table.notes.append(f"row '{label}' pools {n_cells} cells: add the differing key to `where` or `facets`")


def rows_table(ts: TableSpec, runs: list[Run], usable: list[Run]) -> Table:
    splits, headers = expand_columns(ts.columns, usable, ts.metric)
    table = Table(ts.name, ts.title, ts.metric, headers)
    for row in ts.rows:
        picked = [r for r in usable if matches(r, row.where)] if row.who == "student_after" else usable
        fill_row(table, row.label, picked, row.who, splits, headers)
        if not picked and any(matches(r, row.where) for r in runs):
            table.notes.append(f"row '{row.label}': no finished run yet")
    return table


def sorted_values(values: list[Any]) -> list[Any]:
    try:
        return sorted(set(values), key=lambda v: (parse_value(v) is None, parse_value(v)))
    except TypeError:
        return sorted(set(values), key=str)


def x_table(ts: TableSpec, usable: list[Run]) -> Table:
    picked = [r for r in usable if matches(r, ts.fixed)]
    splits, headers = expand_columns(ts.columns, usable, ts.metric)
    table = Table(ts.name, ts.title, ts.metric, headers, x_key=ts.x)
    for value in sorted_values([r.lookup(ts.x) for r in picked]):
        fill_row(table, f"{ts.x}={value}", [r for r in picked if same_value(r.lookup(ts.x), value)],
                 "student_after", splits, headers)
    return table


def pivot_table(ts: TableSpec, usable: list[Run]) -> Table:
    xs = sorted_values([r.lookup(ts.x) for r in usable])
    table = Table(ts.name, ts.title, ts.metric, [f"{ts.x}={x}" for x in xs], x_key=ts.x)
    for index in sorted_values([r.lookup(ts.index) for r in usable]):
        row_runs = [r for r in usable if same_value(r.lookup(ts.index), index)]
        stats = {f"{ts.x}={x}": mean_ci(who_values([r for r in row_runs if same_value(r.lookup(ts.x), x)],
                                                   "student_after", ts.split, ts.metric)) for x in xs}
        best = max((h for h in stats if stats[h].n), key=lambda h: stats[h].mean, default=None)
        label = f"{ts.index}={index}"
        table.cells[label] = stats
        if best:
            table.marks.add((label, best))
        table.notes.append(f"{label}: best {best or 'n/a'} (highest mean; * in the table)"
                           + recorded_choice(ts.index, index, ts.x, best))
        table.row_runs[label] = row_runs
    return table


def recorded_choice(index_key: str, index: Any, x_key: str, best: str | None) -> str:
    """For a pivot over recipes: the value of ``x_key`` that conf/recipe/<index>.yaml records, and whether it
    is the sweep's best (how lr_tune's choice is checked against what the tables then use)."""
    path = CONF_DIR / "recipe" / f"{index}.yaml"
    if index_key != "recipe" or not path.is_file() or not best:
        return ""
    node: Any = yaml.safe_load(path.read_text()) or {}
    for part in x_key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        return f"; conf/recipe/{index}.yaml sets no {x_key}"
    agrees = same_value(node, best.split("=", 1)[1])
    return f"; conf/recipe/{index}.yaml records {x_key}={node} ({'the best' if agrees else 'NOT the best'})"


def build_table(ts: TableSpec, runs: list[Run]) -> Table:
    usable = [r for r in runs if r.usable and r.runner == "opd"]
    if ts.index and ts.x:
        return pivot_table(ts, usable)
    if ts.x:
        return x_table(ts, usable)
    return rows_table(ts, runs, usable)


def generic_table(runs: list[Run]) -> Table:
    """Ad-hoc sweeps: a row per cell (its varying overrides), a column per result (student_after when present)."""
    usable = [r for r in runs if r.usable]
    keys = sorted({k for r in usable for k, v in r.results.items() if isinstance(v, (int, float))})
    after = [k for k in keys if k.startswith("student_after/")]
    keys = after or keys
    table = Table("main", "every cell x every result (no report block)", "", keys)
    varying = varying_keys(runs)
    for cell, cell_runs in group_cells(usable).items():
        label = cell_label(cell, varying)
        table.cells[label] = {k: mean_ci([r.results.get(k) for r in cell_runs]) for k in keys}
        table.row_runs[label] = cell_runs
    return table


# ----------------------------------------------------------------------------- writing tables

def is_score(metric: str) -> bool:
    return "@" in metric


def fmt(stat: Stat, percent: bool) -> str:
    if stat.n == 0:
        return "–"
    scale = 100.0 if percent else 1.0
    if stat.n == 1:
        return f"{stat.mean * scale:.1f} (n=1)" if percent else f"{stat.mean:.4g} (n=1)"
    half = (stat.hi - stat.lo) / 2 * scale
    return f"{stat.mean * scale:.1f} ± {half:.1f}" if percent else f"{stat.mean:.4g} ± {half:.2g}"


def markdown(table: Table) -> str:
    percent = is_score(table.metric) or all(is_score(c) for c in table.columns)
    unit = f"{table.metric} (%)" if table.metric and percent else table.metric or "value"
    header = ["row"] + table.columns + ["n"]
    lines = [f"### {table.title or table.name}", "", f"Metric: {unit}. {CI_NOTE}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, stats in table.cells.items():
        ns = sorted({s.n for s in stats.values() if s.n})
        n_text = "0" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
        values = [fmt(stats[c], percent) + (" *" if (label, c) in table.marks else "") for c in table.columns]
        lines.append("| " + " | ".join([label] + values + [n_text]) + " |")
    lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def table_frame(table: Table):
    import pandas as pd

    rows = [{"table": table.name, "row": label, "column": col, "metric": table.metric, "mean": s.mean,
             "ci_lo": s.lo, "ci_hi": s.hi, "n": s.n}
            for label, stats in table.cells.items() for col, s in stats.items()]
    return pd.DataFrame(rows, columns=["table", "row", "column", "metric", "mean", "ci_lo", "ci_hi", "n"])


def runs_frame(runs: list[Run]):
    import pandas as pd

    rows = []
    for run in runs:
        row = {"run_dir": shown_path(run.path), "status": run.status, "seed": run.seed, "runner": run.runner,
               "wall_time_s": run.summary.get("wall_time_s"), "overrides": " ".join(run.override_list),
               "git_commit": run.summary.get("git_commit")}
        row |= {k: v for k, v in run.results.items() if isinstance(v, (int, float))}
        rows.append(row)
    return pd.DataFrame(rows)


def cells_frame(runs: list[Run]):
    import pandas as pd

    varying = varying_keys(runs)
    rows = []
    for cell, cell_runs in group_cells([r for r in runs if r.usable]).items():
        keys = sorted({k for r in cell_runs for k, v in r.results.items() if isinstance(v, (int, float))})
        for key in keys:
            s = mean_ci([r.results.get(key) for r in cell_runs])
            rows.append({"cell": cell_label(cell, varying), "key": key, "mean": s.mean, "ci_lo": s.lo,
                         "ci_hi": s.hi, "n": s.n})
    return pd.DataFrame(rows, columns=["cell", "key", "mean", "ci_lo", "ci_hi", "n"])


# ----------------------------------------------------------------------------- figures
# ----------------------------------------------------------------------------- provenance

def last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def sweep_command(runs: list[Run]) -> tuple[str, list[str]]:
    """`opd-exp <overrides every run shares>` and the other keys with their values (the swept ones)."""
    values: dict[str, list[str]] = defaultdict(list)
    for run in runs:
        for override in run.override_list:
            key, _, value = override.partition("=")
            values[key].append(value)
    shared = [f"{k}={v[0]}" for k, v in values.items() if len(v) == len(runs) and len(set(v)) == 1]
    shared.sort(key=lambda o: not o.startswith("experiment="))
    swept = [f"{k} in {{{', '.join(sorted(set(v)))}}}" for k, v in sorted(values.items())
             if f"{k}={v[0]}" not in shared]
    return "opd-exp " + " ".join(shared), swept


def scale_lines(runs: list[Run]) -> list[str]:
    keys = ["model.name", "train.steps", "train.prompts_per_step", "sampling.rollouts_per_prompt",
            "sampling.max_new_tokens", "task.n_eval", "eval.k", "device"]
    out = []
    for key in keys:
        values = sorted({str(r.lookup(key)) for r in runs if r.lookup(key) is not None})
        if values:
            out.append(f"{key}={'|'.join(values)}")
    return out


def provenance(runs: list[Run], args: list[str]) -> list[str]:
    command, swept = sweep_command(runs)
    commits = sorted({str(r.summary.get("git_commit")) for r in runs if r.summary.get("git_commit")})
    seeds = sorted({r.seed for r in runs if r.seed is not None}, key=str)
    wall = [float(r.summary.get("wall_time_s") or 0.0) for r in runs]
    versions = next((r.summary.get("versions") for r in runs if r.summary.get("versions")), {})
    return [
        "## How this was made", "",
        f"- report: `opd-exp-report {' '.join(args)}` on {datetime.date.today().isoformat()}; "
        "nothing in this directory is edited by hand",
        f"- sweep: `{command}`" + (f", swept: {'; '.join(swept)}" if swept else ""),
        f"- run dirs: {len(runs)} ({', '.join(sorted({shown_path(r.path.parent) for r in runs}))})",
        f"- git commit(s): {', '.join(commits) or 'unknown'}",
        f"- seeds: {', '.join(map(str, seeds)) or 'unknown'}",
        f"- scale: {', '.join(scale_lines(runs)) or 'unknown'}" if any(r.runner == "opd" for r in runs)
        else "- scale: the toy study's settings (toy.* in each run's config.yaml)",
        f"- wall time: {sum(wall) / 3600:.2f} h summed over runs (per cell below)",
        f"- versions: {', '.join(f'{k} {v}' for k, v in sorted(versions.items())) or 'unknown'}", ""]


def cell_sections(runs: list[Run]) -> list[str]:
    varying = varying_keys(runs)
    lines = ["## Cells", "", "| cell | runs | finished | wall time (min, summed) |", "|---|---|---|---|"]
    for cell, cell_runs in group_cells(runs).items():
        done = sum(r.status in FINISHED for r in cell_runs)
        wall = sum(float(r.summary.get("wall_time_s") or 0.0) for r in cell_runs) / 60
        lines.append(f"| {cell_label(cell, varying)} | {len(cell_runs)} | {done} | {wall:.1f} |")
    bad = [r for r in runs if r.status not in FINISHED or r.status == "diverged"]
    lines += ["", "## Failed, diverged or unfinished runs", ""]
    if not bad:
        return lines + ["None.", ""]
    lines += ["| cell | seed | status | error (last line) | run dir |", "|---|---|---|---|---|"]
    for run in bad:
        error = last_line(run.summary.get("error")).replace("|", "\\|")
        where = shown_path(run.path)
        lines.append(f"| {cell_label(run.cell, varying)} | {run.seed} | {run.status} | {error} | {where} |")
    return lines + ["", "Re-running the same sweep command re-executes only these cells (finished ones are "
                    "skipped).", ""]


# ----------------------------------------------------------------------------- one experiment

def facet_groups(runs: list[Run], facets: list[str]) -> dict[str, list[Run]]:
    """Runs split by the facet keys that vary among them; '' when none varies."""
    varying = [f for f in facets if len({repr(r.lookup(f)) for r in runs}) > 1]
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[",".join(f"{f}={run.lookup(f)}" for f in varying)].append(run)
    return dict(sorted(groups.items()))


def write_tables(runs: list[Run], out: Path, spec_: ReportSpec | None) -> list[str]:
    """Every table of the experiment into out/, returning the Markdown to inline in README.md."""
    import pandas as pd

    md, frames = [], []
    facets = facet_groups(runs, spec_.facets) if spec_ else {"": runs}
    for facet, facet_runs in facets.items():
        tables = [build_table(ts, facet_runs) for ts in spec_.tables] if spec_ and spec_.tables \
            else [generic_table(facet_runs)]
        for table in tables:
            stem = table.name + (f"__{facet}" if facet else "")
            table.title = table.title or (spec_.title if spec_ and len(tables) == 1 else "") or table.name
            if facet:
                table.title = f"{table.title} [{facet}]"
            text = markdown(table)
            (out / f"{stem}.md").write_text(text)
            frame = table_frame(table)
            frame.insert(1, "facet", facet)
            frame.to_csv(out / f"{stem}.csv", index=False)
            frames.append(frame)
            figures = [name for name, ok in (
                (f"bars_{stem}.png", bar_figure(table, out / f"bars_{stem}.png")),
                (f"curves_{stem}.png", curve_figure(table, spec_.curves if spec_ else DEFAULT_CURVES,
                                                    out / f"curves_{stem}.png")),
                (f"x_{stem}.png", x_figure(table, out / f"x_{stem}.png"))) if ok]
            md += [text] + [f"![{name}]({name})" for name in figures] + [""]
    if frames:
        pd.concat(frames).to_csv(out / "tables.csv", index=False)
    return md


def write_claims(runs: list[Run], out: Path, spec_: ReportSpec | None) -> list[str]:
    """The paper's claims (``report.claims``) per facet group into out/claims.csv; the README section."""
    if not spec_ or not spec_.claims:
        return []
    results = []
    for facet, facet_runs in facet_groups(runs, spec_.facets).items():
        usable = [r for r in facet_runs if r.usable and r.runner == "opd"]
        results += [(facet, evaluate_claim(c, usable, matches, hardest_split)) for c in spec_.claims]
    claims_frame(results).to_csv(out / "claims.csv", index=False)
    return claims_markdown(results)


def toy_report(runs: list[Run], out: Path) -> bool:
    """Hand toy-study runs to the toy module's own report; False when that module is not available."""
    try:
        from opd_exp.toy.report import write_toy_report
    except ImportError as err:
        print(f"[opd-exp-report] opd_exp.toy.report unavailable ({err}); generic tables instead", file=sys.stderr)
        return False
    write_toy_report([r.path for r in runs], out)
    return True


def write_experiment(name: str, runs: list[Run], out: Path, args: list[str]) -> Path:
    """Tables, figures, runs.csv, cells.csv and README.md of one experiment into ``out``.

    Toy-study runs: the toy report writes its tables, figures and README.md; the provenance and cell sections
    are appended to that README (generic tables only when the toy report is unavailable)."""
    out.mkdir(parents=True, exist_ok=True)
    spec_ = report_spec(runs)
    toy = [r for r in runs if r.runner in TOY_RUNNERS]
    opd = [r for r in runs if r.runner not in TOY_RUNNERS]
    toy_written = bool(toy) and toy_report(toy, out)
    title = spec_.title if spec_ and spec_.title else name
    body = [f"# {title} (`{name}`)", ""] if not toy_written else ["", "---", "", f"# Runs of `{name}`", ""]
    if name == FAILURE_EXPERIMENT and opd:
        from opd_exp.report.failure import write_failure_report

        body += write_failure_report(opd, out)
    if opd:
        body += write_claims(opd, out, spec_)
    body += provenance(runs, args)
    if opd or not toy_written:
        body += ["## Tables", ""] + write_tables(opd or toy, out, spec_ if opd else None)
    body += cell_sections(runs)
    runs_frame(runs).to_csv(out / "runs.csv", index=False)
    cells_frame(runs).to_csv(out / "cells.csv", index=False)
    readme = out / "README.md"
    text = "\n".join(body).rstrip() + "\n"
    if toy_written and readme.exists():
        text = readme.read_text().rstrip() + "\n" + text  # what the toy report just wrote, then ours
    readme.write_text(text)
    return readme


# ----------------------------------------------------------------------------- CLI

def group_by_experiment(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs per experiment; both toy studies share one report, ``toy`` (results/toy/)."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups["toy" if run.runner in TOY_RUNNERS else run.experiment].append(run)
    return dict(sorted(groups.items()))


def report(paths: list[str], out: str | None = None, results_root: str = "results") -> list[Path]:
    """Read the run dirs under ``paths`` and write one report per experiment; returns the README paths."""
    runs = [load_run(p) for p in find_run_dirs(paths)]
    if not runs:
        raise FileNotFoundError(f"no run dirs (run_summary.json or .hydra/config.yaml) under {paths}")
    groups = group_by_experiment(runs)
    readmes = []
    for name, exp_runs in groups.items():
        target = Path(out) / name if out and len(groups) > 1 else Path(out or Path(results_root) / name)
        readmes.append(write_experiment(name, exp_runs, target, paths))
        n_bad = sum(r.status not in FINISHED for r in exp_runs)
        print(f"[opd-exp-report] {name}: {len(exp_runs)} runs ({n_bad} not finished) -> {target}")
    return readmes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opd-exp-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="sweep dirs, run dirs or globs")
    parser.add_argument("--out", default=None, help="output dir (default: results/<experiment>)")
    args = parser.parse_args(argv)
    try:
        report(args.paths, args.out)
    except (FileNotFoundError, ConfigError) as err:
        print(f"[opd-exp-report] {err}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
