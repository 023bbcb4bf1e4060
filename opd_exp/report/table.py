"""The report block of an experiment file (which tables, rows, claims) and the tables it lays out from runs:
explicit rows, an `x` sweep, or an `index` x `x` pivot, each a :class:`Table` of Stat cells that the writers
(Markdown, CSV, figures) read."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from opd_exp.config.validation import spec, validate
from opd_exp.report.claims import WHO, ClaimSpec, SideSpec
from opd_exp.report.runs import Run, cell_label, group_cells, parse_value, same_value, varying_keys
from opd_exp.report.stats import Stat, clamp, evaluation_stat, mean_ci

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# train/logprob_gap (teacher - student log-prob of the sampled tokens: minus a KL estimate) compares objectives;
# eval/student/... is plotted when the runs evaluate during training (train.eval_every > 0)
DEFAULT_CURVES = ["train/loss", "train/logprob_gap", "train/response_len", "train/grad_norm", "train/clip_frac",
                  "train/entropy", "eval/student/avg/greedy@1"]


@dataclass
class Table:
    """A laid-out table: rows x columns of Stat, plus where each row came from."""

    name: str
    title: str
    metric: str
    columns: list[str]
    cells: dict[str, dict[str, Stat]] = field(default_factory=dict)  # row label -> column -> Stat
    row_runs: dict[str, list[Run]] = field(default_factory=dict)  # row label -> student_after runs (curves)
    notes: list[str] = field(default_factory=list)
    x_key: str | None = None
    marks: set = field(default_factory=set)  # (row, column) cells marked * (a pivot's best column)


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
    include: list[str] = spec(default_factory=list, doc="Markdown files in the report's dir, written by another "
                              "committed command, embedded in README.md after the claims")
    notes: list[str] = spec(default_factory=list, doc="paragraphs under 'Notes' before the included files: what "
                            "the tables and included evidence show, written in the experiment file")


def report_spec(runs: list[Run]) -> ReportSpec | None:
    """The report block (validated) of the runs' experiment file in this checkout
    (conf/experiment/<experiment>.yaml, interpolations such as ${eval.k} resolved against the run's config), so
    that the title, tables, claims and notes committed beside the report are the ones it applies; where there is
    no such file, the block stored with the first run that has one; None for ad-hoc sweeps."""
    run = next((r for r in runs if r.config.get("report")), None)
    if run is None:
        return None
    block = run.config["report"]
    path = CONF_DIR / "experiment" / f"{run.experiment}.yaml"
    if path.is_file() and "report" in (node := OmegaConf.load(path)):
        resolved = OmegaConf.merge({k: v for k, v in run.config.items() if k != "report"}, {"report": node.report})
        block = OmegaConf.to_container(resolved.report, resolve=True)
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
    """student_after: one value per run. teacher / student_before: one value per replicate (pair seed, run
    seed), averaged over its runs; per pair seed when the runs span several pairs (a pair has one teacher and
    one student, so its run seeds are not independent draws of them)."""
    key = f"{who}/{split}/{metric}"
    several_pairs = len({run.replicate[0] for run in runs}) > 1
    by_unit: dict[Any, list[float]] = defaultdict(list)
    for i, run in enumerate(runs):
        value = run.results.get(key)
        if value is None:
            continue
        unit = (run.replicate, i) if who == "student_after" else run.replicate[0] if several_pairs else run.replicate
        by_unit[unit].append(float(value))
    return [sum(v) / len(v) for v in by_unit.values()]


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


def row_stat(runs: list[Run], who: str, split: str, metric: str) -> Stat:
    """A table cell. student_after: the mean over seeds with its t-interval. teacher / student_before: one
    value per seed; when every seed saw the same evaluation (the cached before-training evaluation), that
    evaluation with its interval over prompts, not a zero-width interval over seeds. Scores (``@`` metrics)
    keep their interval inside [0, 1]."""
    values = who_values(runs, who, split, metric)
    stat = mean_ci(values)
    if who != "student_after" and len(set(values)) == 1:
        ci = next((r.results.get(f"{who}/{split}/{metric}_ci") for r in runs
                   if r.results.get(f"{who}/{split}/{metric}_ci")), None)
        stat = evaluation_stat(values[0], ci) if ci else Stat(values[0], math.nan, math.nan, 1)
    return clamp(stat) if "@" in metric else stat


def fill_row(table: Table, label: str, runs: list[Run], who: str, splits: list[str], headers: list[str]) -> None:
    table.cells[label] = {h: row_stat(runs, who, s, table.metric) for s, h in zip(splits, headers, strict=True)}
    if who == "student_after":
        table.row_runs[label] = runs
    else:
        table.notes.append(f"row '{label}': the {who} evaluation every run makes, averaged per seed (one shared "
                           "evaluation: its 95% interval over the evaluated prompts, in brackets)")
    n_cells = len({r.cell for r in runs})
    if who == "student_after" and n_cells > 1:
        table.notes.append(f"row '{label}' pools {n_cells} cells: add the differing key to `where` or `facets`")


def rows_table(ts: TableSpec, runs: list[Run], usable: list[Run]) -> Table:
    splits, headers = expand_columns(ts.columns, usable, ts.metric)
    table = Table(ts.name, ts.title, ts.metric, headers)
    for row in ts.rows:
        picked = [r for r in usable if matches(r, row.where)]  # teacher / student_before rows too (one pair)
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
