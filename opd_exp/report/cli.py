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
(its figures, tables and verdicts open the README); `estimators` runs also go to
opd_exp.report.estimators.write_estimators_report (the gradient probe's table, ranking and figures).

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
mean, ci_lo, ci_hi, n), cells.csv, runs.csv, bars_<table>.png, curves_<table>.png with its data in
curves_<table>.csv (key, row, step, mean, ci_lo, ci_hi, n), x_<table>.png (layouts 2, 3).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import traceback
from collections import defaultdict
from pathlib import Path

from opd_exp import rundir
from opd_exp.config.validation import ConfigError
from opd_exp.report.claims import claims_frame, claims_markdown, evaluate_claim, judge
from opd_exp.report.figures import bar_figure, curve_data, curve_figure, curve_records, x_figure
from opd_exp.report.runs import (
    FINISHED,
    NOT_RUN,
    REJECTED,
    Run,
    cell_label,
    find_run_dirs,
    group_cells,
    load_run,
    missing_cells,
    shown_path,
    varying_keys,
)
from opd_exp.report.stats import Stat, mean_ci
from opd_exp.report.table import (
    DEFAULT_CURVES,
    ReportSpec,
    Table,
    build_table,
    generic_table,
    hardest_split,
    matches,
    report_spec,
)

TOY_RUNNERS = ("toy_gamma", "toy_exact")
FAILURE_EXPERIMENT = "failure_modes"  # its runs also go to opd_exp.report.failure (figures and verdicts)
ESTIMATORS_EXPERIMENT = "estimators"  # its runs also go to opd_exp.report.estimators (the gradient probe)
CI_NOTE = ("± is the half-width of the 95% t-interval over seeds (n - 1 degrees of freedom), cut to [0, 100] for "
           "scores; [lo, hi]: a single evaluation shared by every seed (teacher, student before) with its 95% "
           "interval over the evaluated prompts (Wilson; for avg@k at the effective sample size from evaluation "
           "version 2 on, a normal interval before); n = 1 otherwise has no interval (nan in the CSV).")


# ----------------------------------------------------------------------------- writing tables

def is_score(metric: str) -> bool:
    return "@" in metric


def fmt(stat: Stat, percent: bool) -> str:
    if stat.n == 0:
        return "–"
    scale = 100.0 if percent else 1.0
    if stat.basis == "prompts":  # one evaluation: its interval over prompts
        return (f"{stat.mean * scale:.1f} [{stat.lo * scale:.1f}, {stat.hi * scale:.1f}]" if percent
                else f"{stat.mean:.4g} [{stat.lo:.3g}, {stat.hi:.3g}]")
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
    """The settings that size a run; the prompts actually evaluated per split (the summary's ``eval_prompts``)
    instead of ``task.n_eval`` where the runs recorded them (``eval.n_prompts`` may evaluate fewer)."""
    evaluated = sorted({", ".join(f"{k}={v}" for k, v in r.summary["eval_prompts"].items())
                        for r in runs if r.summary.get("eval_prompts")})
    keys = ["model.name", "train.steps", "train.prompts_per_step", "sampling.rollouts_per_prompt",
            "sampling.max_new_tokens", *([] if evaluated else ["task.n_eval"]), "eval.k", "eval.top_p",
            "eval.temperature", "eval.max_new_tokens", "device"]
    out = []
    for key in keys:
        values = sorted({str(r.lookup(key)) for r in runs if r.lookup(key) is not None})
        if values:
            out.append(f"{key}={'|'.join(values)}")
    return out + [f"evaluated prompts per split: {' | '.join(evaluated)}"] if evaluated else out


def code_line(runs: list[Run]) -> str:
    """The commit(s) that ran, each with its number of runs and whether its tree had uncommitted changes."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for run in runs:
        dirty = run.summary.get("git_dirty")
        state = "dirty" if dirty else ("clean" if dirty is False else "dirty flag not recorded")
        counts[(str(run.summary.get("git_commit") or "unknown"), state)] += 1
    return ", ".join(f"{commit[:10]} ({n} run{'s' * (n != 1)}, {state})"
                     for (commit, state), n in sorted(counts.items()))


def pair_line(runs: list[Run]) -> str:
    """Every distinct pair the runs used (the summary's ``pair``): entry, weights hashes, bootstrap settings."""
    seen = []
    for run in runs:
        pair = run.summary.get("pair")
        if pair and pair not in seen:
            seen.append(pair)
    parts = []
    for pair in seen:
        if "entry" in pair:
            parts.append(f"{pair['entry']} (teacher sha256 {str(pair.get('teacher_sha256'))[:12]}, student "
                         f"{str(pair.get('student_sha256'))[:12]}; bootstrapped with {pair.get('bootstrap_threads')}"
                         f" torch threads, {pair.get('precision')}, version {pair.get('bootstrap_version')})")
        else:
            parts.append(", ".join(f"{k} {v}" for k, v in pair.items() if v is not None))
    return "; ".join(parts) or "not recorded (runs older than the pair's provenance)"


def provenance(runs: list[Run], args: list[str]) -> list[str]:
    command, swept = sweep_command(runs)
    commits = sorted({str(r.summary.get("git_commit")) for r in runs if r.summary.get("git_commit")})
    seeds = sorted({r.seed for r in runs if r.seed is not None}, key=str)
    wall = [float(r.summary.get("wall_time_s") or 0.0) for r in runs]
    versions = next((r.summary.get("versions") for r in runs if r.summary.get("versions")), {})
    report_dirty = rundir.git_dirty()
    report_code = f"{(rundir.git_commit() or 'unknown')[:10]}" + (
        " (dirty)" if report_dirty else " (clean)" if report_dirty is False else "")
    return [
        "## How this was made", "",
        f"- report: `opd-exp-report {' '.join(args)}` on {datetime.date.today().isoformat()}, code {report_code}; "
        "nothing in this directory is edited by hand",
        f"- sweep: `{command}`" + (f", swept: {'; '.join(swept)}" if swept else ""),
        f"- run dirs: {len(runs)} ({', '.join(sorted({shown_path(r.path.parent) for r in runs}))})",
        f"- code that ran: {code_line(runs) if commits else 'unknown'}",
        f"- pair: {pair_line(runs)}" if any(r.runner == "opd" for r in runs) else "- pair: none (the toy study)",
        f"- seeds: {', '.join(map(str, seeds)) or 'unknown'}",
        f"- scale: {', '.join(scale_lines(runs)) or 'unknown'}" if any(r.runner == "opd" for r in runs)
        else "- scale: the toy study's settings (toy.* in each run's config.yaml)",
        f"- wall time: {sum(wall) / 3600:.2f} h summed over runs (per cell below)",
        *reused_line(runs),
        f"- versions: {', '.join(f'{k} {v}' for k, v in sorted(versions.items())) or 'unknown'}", ""]


def reused_line(runs: list[Run]) -> list[str]:
    """How many runs copied a finished run of the same config (``reuse=true``, opd_exp/reuse.py), and from
    which sweeps; nothing when none did."""
    sources = [Path(r.summary["reused_from"]) for r in runs if r.summary.get("reused_from")]
    if not sources:
        return []
    where = ", ".join(sorted({src.parent.name for src in sources}))
    return [f"- reused: {len(sources)} runs copy a finished run with the same config and commit (`reuse=true`; "
            f"their wall time is the copy's) from the sweeps {where}"]


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
            curves = curve_data(table, spec_.curves if spec_ else DEFAULT_CURVES)
            if curves:  # the figure's data, committed beside it (6 significant digits)
                pd.DataFrame(curve_records(curves)).to_csv(out / f"curves_{stem}.csv", index=False,
                                                           float_format="%.6g")
            figures = [name for name, ok in (
                (f"bars_{stem}.png", bar_figure(table, out / f"bars_{stem}.png")),
                (f"curves_{stem}.png", curve_figure(curves, out / f"curves_{stem}.png")),
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
    judge(results)
    claims_frame(results).to_csv(out / "claims.csv", index=False)
    return claims_markdown(results)


def included_sections(out: Path, names: list[str]) -> list[str]:
    """``report.include``: each file's Markdown, its headings one level down, under a heading naming it; a file
    not written yet is one line saying so (the report never fails on it)."""
    lines = []
    for name in names:
        path = out / name
        if not path.is_file():
            lines += [f"## {name}", "", f"Not written yet: {path} (see the experiment file for its command).", ""]
            continue
        text = path.read_text().strip().splitlines()
        lines += [f"## {name}", ""] + [f"#{line}" if line.startswith("#") else line for line in text] + [""]
    return lines


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
    if name == ESTIMATORS_EXPERIMENT and opd:
        from opd_exp.report.estimators import write_estimators_report

        body += write_estimators_report(opd, out)
    if opd:
        body += write_claims(opd, out, spec_)
    if spec_ and spec_.notes:
        body += ["## Notes", ""] + [line for note in spec_.notes for line in (note.strip(), "")]
    body += included_sections(out, spec_.include if spec_ else [])
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
    runs += missing_cells(runs, paths)
    if not runs:
        raise FileNotFoundError(f"no run dirs (run_summary.json or .hydra/config.yaml) under {paths}")
    for run in runs:
        if run.status == REJECTED:
            print(f"[opd-exp-report] rejected {run.summary['error']}; left out of the tables", file=sys.stderr)
    groups = group_by_experiment(runs)
    readmes = []
    for name, exp_runs in groups.items():
        target = Path(out) / name if out and len(groups) > 1 else Path(out or Path(results_root) / name)
        readmes.append(write_experiment(name, exp_runs, target, paths))
        n_bad = sum(r.status not in FINISHED for r in exp_runs)
        n_missing = sum(r.status == NOT_RUN for r in exp_runs)
        print(f"[opd-exp-report] {name}: {len(exp_runs) - n_missing} runs ({n_bad - n_missing} not finished), "
              f"{n_missing} planned cells never ran -> {target}")
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
