"""The same 2-cell sweep through Hydra's basic launcher, joblib (local parallel) and submitit_local gives the same
report: a cell's result depends on its config and seed alone, never on the process or launcher that ran it.

    opd-exp -m estimator=sampled_token,full_rkl                                   # basic: one cell after another
    opd-exp -m estimator=sampled_token,full_rkl hydra/launcher=joblib            # local processes (loky)
    opd-exp -m estimator=sampled_token,full_rkl hydra/launcher=submitit_local    # submitit's local executor

conf/hydra/launcher/ holds the presets built on these (local_parallel, local_gpu, slurm_gpu); submitit_slurm needs
a cluster and is only composed here (tests/test_configs.py composes every preset).
"""

from __future__ import annotations

import pandas as pd
import pytest

from opd_exp import rundir
from opd_exp.report import cli as report

SWEEP = ("estimator=sampled_token,full_rkl", "train.steps=2", "train.diag_every=0", "train.checkpoint_every=0",
         "eval.teacher=false")
LAUNCHERS = {
    "basic": (),
    "joblib": ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
    # the local executor polls its jobs every second; a cell that hangs fails the sweep after timeout_min
    "submitit_local": ("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"),
}


@pytest.fixture(scope="module")
def reports(smoke, tmp_path_factory) -> dict[str, tuple]:
    """launcher -> (its sweep dir, its report dir)."""
    root = tmp_path_factory.mktemp("launchers")
    out = {}
    for name, args in LAUNCHERS.items():
        sweep_dir = root / name
        res = smoke.cli(*SWEEP, *args, sweep_dir=sweep_dir, timeout=300)
        assert res.returncode == 0, f"{name}:\n{res.stderr[-3000:]}"
        report.report([str(sweep_dir)], out=str(root / f"report_{name}"))
        out[name] = (sweep_dir, root / f"report_{name}")
    return out


def cell_results(smoke, sweep_dir) -> dict[str, dict]:
    """Cell (its override dir name) -> status and results of its run_summary.json, and its training curves (the
    smoke pair scores ~0 on the task: the curves are what tells two runs apart)."""
    cells = [p.parent for p in sweep_dir.glob("*/run_summary.json")]
    return {cell.name: {"status": rundir.read_summary(cell)["status"], "results": rundir.read_summary(cell)["results"],
                        "metrics": smoke.metrics(cell)} for cell in cells}


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launcher_gives_the_basic_launchers_report(smoke, reports, launcher):
    (basic_sweep, basic_report), (sweep, out) = reports["basic"], reports[launcher]
    cells = cell_results(smoke, sweep)
    assert len(cells) == 2 and all(cell.startswith("estimator=") for cell in cells), sorted(cells)
    assert all(c["status"] == "completed" and len(c["metrics"]) == 3 for c in cells.values())
    assert cells == cell_results(smoke, basic_sweep)
    for table in ("tables.csv", "cells.csv"):  # runs.csv and README.md hold paths and wall times
        expected = pd.read_csv(basic_report / table)
        assert len(expected) > 0
        pd.testing.assert_frame_equal(pd.read_csv(out / table), expected)
