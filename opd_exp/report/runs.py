"""Run dirs as the reports see them: summary, resolved config, overrides, and the cell (overrides minus the seed)
that a run belongs to; a sweep's planned cells (its multirun.yaml) that never produced a run dir with a result;
run dirs whose metrics.jsonl two processes wrote (steps out of order or duplicated) are rejected."""

from __future__ import annotations

import glob
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from opd_exp import rundir

FINISHED = rundir.FINISHED
# device and threads change the numbers (opd_exp's sweep dirs keep them apart too): they are part of a cell
# a cell pools its replicates: run seeds, and independently bootstrapped pairs (model.bootstrap.seed)
NOT_CELL_KEYS = {"seed", "model.bootstrap.seed", "experiment", "overwrite", "wandb.enabled", "wandb.mode"}
NOT_RUN = "not run"  # the status of a planned cell with no run dir holding a result
REJECTED = "rejected"  # the status of a run dir whose metrics.jsonl is not one writer's log


def parse_value(text: Any) -> Any:
    """An override's value as Hydra would type it: bool, null, int, float or the string itself."""
    if not isinstance(text, str):
        return text
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def same_value(a: Any, b: Any) -> bool:
    a, b = parse_value(a), parse_value(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


@dataclass
class Run:
    """One run dir as the report sees it."""

    path: Path
    summary: dict
    config: dict
    overrides: dict[str, Any]
    override_list: list[str]

    @property
    def status(self) -> str:
        return self.summary.get("status", "unfinished (no run_summary.json)")

    @property
    def usable(self) -> bool:
        return self.status in FINISHED and bool(self.summary.get("results"))

    @property
    def results(self) -> dict:
        return self.summary.get("results") or {}

    @property
    def seed(self) -> Any:
        return first_set(self.summary.get("seed"), self.config.get("seed"), self.overrides.get("seed"))

    @property
    def replicate(self) -> tuple:
        """(pair seed, run seed): the unit of replication that tables and claims pair and average over. A
        sweep over ``model.bootstrap.seed`` trains on independently bootstrapped pairs, so a verdict is not
        conditional on one pair; a checkpoint pair has no pair seed (None)."""
        return self.lookup("model.bootstrap.seed"), self.seed

    @property
    def experiment(self) -> str:
        return str(first_set(self.summary.get("experiment"), self.config.get("experiment"),
                             self.overrides.get("experiment"), "default"))

    @property
    def runner(self) -> str:
        return str(first_set(self.summary.get("runner"), self.config.get("runner"), "opd"))

    def lookup(self, key: str) -> Any:
        """Overrides first (group choices), then the resolved config by dotted path; None when absent."""
        if key in self.overrides:
            return self.overrides[key]
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    @property
    def cell(self) -> tuple:
        """(key, value text) of every override that defines the cell (the seed and run knobs left out)."""
        pairs = (o.partition("=")[::2] for o in self.override_list if "=" in o)
        return tuple(sorted((k.lstrip("+~"), v) for k, v in pairs
                            if k.lstrip("+~") not in NOT_CELL_KEYS and not k.startswith("hydra")))


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (reports stay machine-independent)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def split_override(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), parse_value(value)


def read_config(path: Path) -> dict:
    """The resolved config.yaml, or Hydra's own copy (resolved when possible) for runs that failed early."""
    from omegaconf import OmegaConf

    if (path / "config.yaml").exists():
        return yaml.safe_load((path / "config.yaml").read_text()) or {}
    hydra_cfg = path / ".hydra" / "config.yaml"
    if not hydra_cfg.exists():
        return {}
    node = OmegaConf.load(hydra_cfg)
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # an interpolation that needs Hydra's runtime: keep it unresolved
        return OmegaConf.to_container(node, resolve=False)


def load_run(path: Path) -> Run:
    summary = rundir.read_summary(path) or {}
    override_list = summary.get("overrides")
    if override_list is None and (path / ".hydra" / "overrides.yaml").exists():
        override_list = yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text())
    override_list = [str(o) for o in override_list or []]
    overrides = dict(split_override(o) for o in override_list if "=" in o)
    problem = rundir.metrics_order_problem(rundir.read_metrics(path))
    if problem is not None:
        summary = {**summary, "status": REJECTED, "error": f"{path / rundir.METRICS}: {problem}"}
    return Run(path, summary, read_config(path), overrides, override_list)


def is_run_dir(path: Path) -> bool:
    return (path / rundir.SUMMARY).is_file() or (path / ".hydra" / "config.yaml").is_file()


def find_run_dirs(args: list[str]) -> list[Path]:
    """Run dirs named by, or found below, each argument (a dir or a glob)."""
    found: set[Path] = set()
    for arg in args:
        for top in [Path(p) for p in sorted(glob.glob(arg))] or [Path(arg)]:
            if is_run_dir(top):
                found.add(top.resolve())
            elif top.is_dir():
                for marker in list(top.rglob(rundir.SUMMARY)) + list(top.rglob(".hydra/config.yaml")):
                    run = marker.parent.parent if marker.parent.name == ".hydra" else marker.parent
                    if ".submitit" not in run.parts:
                        found.add(run.resolve())
    return sorted(found)


# ----------------------------------------------------------------------------- a sweep's plan

def planned_cells(multirun_yaml: Path) -> list[list[str]]:
    """Every cell's override list that the sweep saved in ``multirun_yaml`` plans: the cartesian product of its
    sweeper params and command-line overrides, expanded as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plan = yaml.safe_load(multirun_yaml.read_text()) or {}
    hydra_node = plan.get("hydra") or {}
    params = ((hydra_node.get("sweeper") or {}).get("params")) or {}
    args = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in (hydra_node.get("overrides") or {})
                                                      .get("task") or []]
    overrides = OverridesParser.create().parse_overrides(args)
    return BasicSweeper.split_arguments(overrides, None)[0]


def missing_cells(runs: list[Run], args: list[str]) -> list[Run]:
    """The planned cells of every sweep (a multirun.yaml) under ``args`` with no run dir holding a result (its
    dir could not be written, its process died before writing, the sweep stopped first), as runs with status
    ``not run``."""
    seen = {frozenset(r.override_list) for r in runs}
    missing = []
    for top in sorted({Path(p) for arg in args for p in glob.glob(arg)} or {Path(a) for a in args}):
        plans = [top / "multirun.yaml"] if (top / "multirun.yaml").is_file() else sorted(top.rglob("multirun.yaml"))
        for plan_file in plans:
            plan = yaml.safe_load(plan_file.read_text()) or {}
            plain = {k: v for k, v in plan.items() if k != "hydra"}
            try:
                cells = planned_cells(plan_file)
            except Exception as err:  # a sweep syntax only Hydra's config loader expands (glob(), choice groups)
                print(f"[opd-exp-report] {plan_file}: its cells cannot be listed ({type(err).__name__}: {err})",
                      file=sys.stderr)
                continue
            for cell in cells:
                if frozenset(cell) in seen:
                    continue
                seen.add(frozenset(cell))
                overrides = dict(split_override(o) for o in cell if "=" in o)
                summary = {"status": NOT_RUN, "overrides": cell, "experiment": plan.get("experiment"),
                           "runner": plan.get("runner"), "seed": overrides.get("seed", plan.get("seed")),
                           "error": f"planned in {plan_file}; it has no run dir"}
                missing.append(Run(plan_file.parent, summary, plain, overrides, cell))
    return missing


# ----------------------------------------------------------------------------- cells

def group_cells(runs: list[Run]) -> dict[tuple, list[Run]]:
    cells: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        cells[run.cell].append(run)
    return dict(sorted(cells.items()))


def varying_keys(runs: list[Run]) -> list[str]:
    """Cell keys whose value differs between runs (a key some runs lack counts as differing)."""
    cells = [dict(r.cell) for r in runs]
    keys = {k for c in cells for k in c}
    return sorted(k for k in keys if len({c.get(k) for c in cells}) > 1)


def cell_label(cell: tuple, varying: list[str]) -> str:
    items = dict(cell)
    return ",".join(f"{k}={items[k]}" if k in items else f"{k}=(unset)" for k in varying) or "all"
