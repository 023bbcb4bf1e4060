"""Shared smoke-scale fixtures: one tiny bootstrapped pair per session, and the real CLI in a subprocess.

    def test_x(smoke):
        res = smoke.cli("estimator=topk_rkl", run_dir=tmp_path / "run")      # python -m opd_exp ..., waits
        proc = smoke.popen(run_dir=tmp_path / "run")                          # the same, returns the Popen
        summary = smoke.execute(tmp_path / "run", "seed=1")                    # in-process (opd_exp.__main__)

Every run uses ``experiment=smoke``: a test-only experiment file (:data:`SMOKE_EXPERIMENT`, written to a temp
config dir added with ``--config-dir``) that shrinks the pair, the task and the loop. The pair is bootstrapped
once, in-process, into a temp cache that ``OPD_EXP_CACHE`` points every run (and subprocess) at.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

# Smoke scale: a 1-layer teacher and student trained for a few SFT steps (the pair is not good at the task; the
# point is the machinery), 4 prompts x 4 rollouts per step, 6 steps, a checkpoint every 2. Every bootstrap knob
# that costs time is pinned, so that changes to the defaults in conf/model/tiny.yaml keep this fast.
SMOKE_EXPERIMENT = """\
# @package _global_
# the baseline's estimator, so that tests can poison ESTIMATORS["sampled_token"]; `estimator=` still overrides it
defaults:
  - override /estimator: sampled_token
experiment: smoke
device: cpu
threads: 1
model:
  bootstrap:
    seed: 0
    threads: 1
    eval_examples: 8
    eval_every: 0
    progress: false
    teacher: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, sft_examples: 64,
              sft_steps: 20, batch_size: 16, warmup_steps: 2, max_seconds: 0}
    student: {hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32, sft_examples: 32,
              sft_steps: 10, batch_size: 16, warmup_steps: 2, max_seconds: 0}
task:
  n_train: 256
  n_eval: 8
sampling:
  rollouts_per_prompt: 4
  max_new_tokens: 24
train:
  steps: 6
  prompts_per_step: 4
  mini_batch_size: 8
  checkpoint_every: 2
  diag_every: 3
eval:
  k: 2
  max_new_tokens: 24
  batch_size: 64
"""


@dataclass
class Smoke:
    """The session's smoke setup: a config dir holding ``experiment/smoke.yaml`` and a bootstrapped cache."""

    root: Path
    conf_dir: Path
    cache: Path
    entry: Path  # the bootstrapped pair: entry / "teacher", "student", "tokenizer"

    # sweeps pass K = 8 as recipe/ours.yaml does (conf/estimator/topk_rkl.yaml keeps the paper's K = 32, which the
    # embedded vocabulary holds: test_cli.py::test_topk_rkl_default_k_fits_the_default_pair)
    SWEEP4: typing.ClassVar[tuple] = ("estimator=sampled_token,topk_rkl", "seed=0,1")  # the spine's sweep

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        return env | {"OPD_EXP_CACHE": str(self.cache), "PYTHONUNBUFFERED": "1"}

    def argv(self, *overrides: str, run_dir: Path | None = None, sweep_dir: Path | None = None) -> list[str]:
        args = [sys.executable, "-m", "opd_exp", "--config-dir", str(self.conf_dir)]
        args += ["-m", f"hydra.sweep.dir={sweep_dir}"] if sweep_dir is not None else []
        args.append("experiment=smoke")
        if run_dir is not None:
            args.append(f"hydra.run.dir={run_dir}")
        return args + list(overrides)

    def cli(self, *overrides: str, run_dir: Path | None = None, sweep_dir: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        """Run ``python -m opd_exp`` with the smoke experiment and ``overrides``; wait for it."""
        return subprocess.run(self.argv(*overrides, run_dir=run_dir, sweep_dir=sweep_dir), cwd=self.root,
                              env=self.env(), capture_output=True, text=True, timeout=timeout)

    def popen(self, *overrides: str, run_dir: Path) -> subprocess.Popen:
        """Start the CLI without waiting (for kill/signal tests); stdout and stderr are pipes."""
        return subprocess.Popen(self.argv(*overrides, run_dir=run_dir), cwd=self.root, env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def compose(self, *overrides: str):
        """The composed config (no ``hydra`` node) the CLI would see for ``overrides``."""
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=[f"hydra.searchpath=[file://{self.conf_dir}]", "experiment=smoke",
                                                *overrides])

    def run_config(self, *overrides: str):
        from opd_exp.config import load_run_config

        return load_run_config(self.compose(*overrides))

    def execute(self, run_dir: Path, *overrides: str, multirun: bool = False) -> dict:
        """What the CLI does for one run, in this process (``SystemExit`` where the CLI would exit non-zero)."""
        from opd_exp.__main__ import execute

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        return execute(self.compose(*overrides), Path(run_dir), list(overrides), multirun)

    # --- reading and driving runs (static: they need no setup)

    @staticmethod
    def metrics(run_dir: Path) -> list[dict]:
        """metrics.jsonl's rows without the wall-time fields (``time/*``), for determinism checks."""
        from opd_exp.rundir import read_metrics

        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_metrics(run_dir)]

    @staticmethod
    def summary(run_dir: Path) -> dict:
        return json.loads((Path(run_dir) / "run_summary.json").read_text())

    @staticmethod
    def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
        """Poll ``predicate()`` every 20 ms until true; fail if ``proc`` exits first or the time runs out."""
        deadline = time.time() + timeout
        while not predicate():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-3000:]}")
            if time.time() > deadline:
                proc.send_signal(signal.SIGKILL)
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.02)

    @staticmethod
    def files(run_dir: Path) -> dict[str, bytes]:
        """Every file opd-exp writes in a run dir (Hydra's own .hydra/ and log left out), path -> bytes."""
        run_dir = Path(run_dir)
        return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
                if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"}


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> Smoke:
    """Bootstraps the smoke pair once per session into a temp cache (``OPD_EXP_CACHE``, restored after)."""
    from opd_exp.models.bootstrap import ensure_tiny_pair

    root = tmp_path_factory.mktemp("smoke")
    (root / "conf" / "experiment").mkdir(parents=True)
    (root / "conf" / "experiment" / "smoke.yaml").write_text(SMOKE_EXPERIMENT)
    previous = os.environ.get("OPD_EXP_CACHE")
    os.environ["OPD_EXP_CACHE"] = str(root / "cache")
    try:
        s = Smoke(root=root, conf_dir=root / "conf", cache=root / "cache", entry=Path())
        cfg = s.run_config()
        s.entry = ensure_tiny_pair(cfg.model, cfg.task)
        yield s
    finally:
        if previous is None:
            os.environ.pop("OPD_EXP_CACHE", None)
        else:
            os.environ["OPD_EXP_CACHE"] = previous


@pytest.fixture(scope="session")
def reference_run(smoke, tmp_path_factory) -> Path:
    """An uninterrupted in-process smoke run (defaults: sampled_token, seed 0). Read-only: copy to modify."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    summary = smoke.execute(run_dir)
    assert summary["status"] == "completed", summary
    return run_dir


@pytest.fixture(scope="session")
def sweep4(smoke, tmp_path_factory):
    """`opd-exp -m estimator=sampled_token,topk_rkl seed=0,1` into one sweep dir: (dir, CompletedProcess)."""
    sweep_dir = tmp_path_factory.mktemp("sweep4") / "sweep"
    res = smoke.cli(*Smoke.SWEEP4, sweep_dir=sweep_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    return sweep_dir, res


def pytest_collection_modifyitems(items):
    """Every test that uses the bootstrapped smoke pair (the real CLI, in a subprocess or in-process) is `slow`:
    `pytest -m "not slow"` runs the rest in under two minutes; plain `pytest` runs everything."""
    for item in items:
        if "smoke" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
