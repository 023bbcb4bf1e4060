"""opd-exp: on-policy distillation experiments (Hydra entrypoint).

Usage:
    opd-exp                                         # distil the tiny student on the embedded default
    opd-exp estimator=topk_rkl sampling=top_p       # the paper's fix (LSM) with top-p rollouts
    opd-exp -m estimator=sampled_token,topk_rkl seed=0,1
    opd-exp experiment=toy_gamma                    # an experiment file from conf/experiment/
    python -m opd_exp --help                        # config groups and every key

Each run writes config.yaml, metrics.jsonl and run_summary.json into its Hydra output dir; a finished run dir is
skipped unless overwrite=true; an unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from opd_exp import rundir
from opd_exp.config import RunConfig, load_run_config
from opd_exp.validation import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# runner name -> "module:function"; each takes (RunConfig, run_dir) and returns {"status", "results", ...}
RUNNERS = {
    "opd": "opd_exp.train:run",
    "toy_gamma": "opd_exp.toy.gamma:run",
    "toy_exact": "opd_exp.toy.exact:run",
}


def _runner(name: str):
    module, func = RUNNERS[name].split(":")
    return getattr(importlib.import_module(module), func)


def execute(cfg_node: DictConfig, run_dir: Path, overrides: list[str], multirun: bool) -> dict:
    """Validate, skip-or-run, and always leave a run_summary.json describing what happened."""
    start = time.time()
    summary = {"status": "running", "overrides": overrides, "git_commit": rundir.git_commit(),
               "versions": rundir.package_versions()}
    try:
        cfg: RunConfig = load_run_config(cfg_node)
    except ConfigError as err:
        if not multirun:
            print(str(err), file=sys.stderr)
            sys.exit(2)
        summary.update(status="failed", error=str(err))
        rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
        print(f"[opd-exp] {run_dir}: {err}", file=sys.stderr)
        return summary
    summary.update(runner=cfg.runner, experiment=cfg.experiment, seed=cfg.seed)
    if rundir.is_finished(run_dir) and not cfg.overwrite:
        print(f"[opd-exp] {run_dir} already finished; skipping (overwrite=true to re-run)")
        return rundir.read_summary(run_dir)
    rundir.atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg_node, resolve=True))
    previous = rundir.read_summary(run_dir) or {}
    elapsed_before = float(previous.get("wall_time_s") or 0.0)
    rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
    try:
        outcome = _runner(cfg.runner)(cfg, run_dir)
        summary.update(outcome)
    except ConfigError as err:  # raised once models are loaded (e.g. K > vocabulary)
        summary.update(status="failed", error=str(err))
        print(str(err), file=sys.stderr)
    except Exception:  # a failed sweep cell must not stop the others
        summary.update(status="failed", error=traceback.format_exc())
        print(f"[opd-exp] run failed in {run_dir}:\n{summary['error']}", file=sys.stderr)
    summary["wall_time_s"] = elapsed_before + time.time() - start
    rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
    if summary["status"] == "failed" and not multirun:
        sys.exit(1)
    return summary


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    execute(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task), hc.mode == RunMode.MULTIRUN)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()
