"""opd-exp: on-policy distillation experiments (Hydra entrypoint).

Usage:
    opd-exp                                         # distil the tiny student on the embedded default
    opd-exp estimator=topk_rkl sampling=top_p       # the paper's fix (LSM) with top-p rollouts
    opd-exp -m estimator=sampled_token,topk_rkl seed=0,1
    opd-exp experiment=toy_gamma                    # an experiment file from conf/experiment/
    python -m opd_exp --help                        # config groups and every key
    torchrun --standalone --nproc_per_node 2 -m opd_exp threads=1 hydra.run.dir=outputs/ddp
                                                    # one run, data-parallel over 2 processes (train/distributed.py)

Each run writes config.yaml, metrics.jsonl and run_summary.json into its Hydra output dir; a finished run dir is
skipped unless overwrite=true (which clears it and trains from scratch); an unfinished one (killed, pre-empted,
failed) resumes from its last checkpoint when the same command is run again.

Exit status (single run; a sweep records each cell's status in its run_summary.json and goes on):
    0    completed, diverged (a result: the summary says status: diverged) or skipped (already finished)
    1    failed: the summary's error holds the message (a traceback only for an unexpected exception)
    2    bad config: one line naming the field, the value and the allowed values; nothing ran (a dataset error
         included). A config check that needs the loaded pair (estimator.top_k > V, mask.tokens outside the
         tokenizer) also exits 2, after the summary recorded status: failed
    143  interrupted by SIGTERM (128 + 15, as a shell reports a TERM'd job): a checkpoint was written and
         the summary says status: interrupted; rerun the same command to resume. A sweep stops here too
         (pre-emption takes the whole job); rerunning it skips finished cells and resumes this one. With a
         parallel launcher (joblib) the launching process passes SIGTERM on to its worker processes.
    130  interrupted by Ctrl-C (SIGINT): summary status: interrupted; resumes from the last periodic checkpoint.
"""

from __future__ import annotations

import importlib
import os
import signal
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
from opd_exp.config.validation import ConfigError
from opd_exp.processes import EXIT_INTERRUPTED, forward_sigterm

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# runner name -> "module:function"; each takes (RunConfig, run_dir) and returns {"status", "results", ...}
RUNNERS = {
    "opd": "opd_exp.train.loop:run",
    "toy_gamma": "opd_exp.toy.gamma:run",
    "toy_exact": "opd_exp.toy.exact:run",
}


def _runner(name: str):
    module, func = RUNNERS[name].split(":")
    return getattr(importlib.import_module(module), func)


EXIT_FAILED, EXIT_CONFIG, EXIT_SIGINT = 1, 2, 130
LAUNCHER_PID = "OPD_EXP_LAUNCHER_PID"  # env: the pid of the process that launched the run or sweep


def _clean_errors() -> tuple[type[Exception], ...]:
    """Errors whose message says everything (a field, or a file and its problem): printed as one line, never
    as a traceback. Imported lazily: a bad config must fail before torch is imported."""
    from opd_exp.models.pair import ModelLoadError
    from opd_exp.train.checkpoint import CheckpointError

    return ConfigError, ModelLoadError, CheckpointError


def _time_so_far(run_dir: Path) -> tuple[float, int]:
    """(wall time of this run dir's earlier attempts, this attempt's number). An attempt killed hard (SIGKILL,
    OOM, a lost node) left status "running" and its start time: it counts up to its last write."""
    prev = rundir.read_summary(run_dir) or {}
    spent = float(prev.get("wall_time_s") or 0.0)
    if prev.get("status") == "running" and prev.get("started_at"):
        last = rundir.last_write_time(run_dir)
        spent += max(0.0, (last or 0.0) - float(prev["started_at"]))
    return spent, int(prev.get("attempt") or 0) + 1


def execute(cfg_node: DictConfig, run_dir: Path, overrides: list[str], multirun: bool) -> dict:
    """Validate, skip-or-run, and always leave a run_summary.json describing what happened."""
    start = time.time()
    summary = {"status": "running", "overrides": overrides, "git_commit": rundir.git_commit(),
               "versions": rundir.package_versions()}
    try:
        cfg: RunConfig = load_run_config(cfg_node)
        if cfg.runner == "opd":  # read the task's data now: a dataset error exits 2 before any run file
            from opd_exp.tasks.base import make_task

            make_task(cfg.task)
    except ConfigError as err:
        if not multirun:
            print(str(err), file=sys.stderr)
            sys.exit(EXIT_CONFIG)
        if not rundir.is_finished(run_dir):  # never overwrite a finished cell's summary
            summary.update(status="failed", error=str(err))
            rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
        print(f"[opd-exp] {run_dir}: {err}", file=sys.stderr)
        return summary
    summary.update(runner=cfg.runner, experiment=cfg.experiment, seed=cfg.seed)
    if rundir.is_finished(run_dir):
        if not cfg.overwrite:
            _tell_other_ranks("skip")
            print(f"[opd-exp] {run_dir} already finished; skipping (overwrite=true to re-run)")
            return rundir.read_summary(run_dir)
        rundir.clear_run(run_dir)  # else the final checkpoint would "resume" a finished run
    _tell_other_ranks("run")
    elapsed_before, attempt = _time_so_far(run_dir)
    rundir.atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg_node, resolve=True))
    summary.update(attempt=attempt, started_at=start, wall_time_s=elapsed_before)
    rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
    try:
        outcome = _runner(cfg.runner)(cfg, run_dir)
        summary.update(outcome)
    except KeyboardInterrupt:
        summary.update(status="interrupted", error="KeyboardInterrupt")
    except Exception as err:  # a failed sweep cell must not stop the others
        if isinstance(err, _clean_errors()):  # bad input file, or a config check that needed the models
            summary.update(status="failed", error=str(err))
            print(f"[opd-exp] {run_dir}: {err}" if multirun else str(err), file=sys.stderr)
        else:
            summary.update(status="failed", error=traceback.format_exc())
            print(f"[opd-exp] run failed in {run_dir}:\n{summary['error']}", file=sys.stderr)
    summary["wall_time_s"] = elapsed_before + time.time() - start
    rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
    if summary["status"] == "interrupted":
        sigint = summary.get("error") == "KeyboardInterrupt"
        saved = "the last periodic checkpoint is kept" if sigint else "checkpoint saved"
        print(f"[opd-exp] {run_dir}: interrupted; {saved}; run the same command again to resume", file=sys.stderr)
        code = EXIT_SIGINT if sigint else EXIT_INTERRUPTED
        if os.environ.get(LAUNCHER_PID, str(os.getpid())) != str(os.getpid()):
            # a sweep's worker process (joblib/loky): it would catch SystemExit and idle on; end it so the
            # launching process (opd_exp.processes.forward_sigterm) sees its cells are done
            sys.stderr.flush()
            os._exit(code)
        sys.exit(code)
    if summary["status"] == "failed" and not multirun:  # a config check that needed the models: exit 2
        sys.exit(EXIT_CONFIG if summary.get("error", "").startswith("config error:") else EXIT_FAILED)
    return summary


# ----------------------------------------------------------------------------- data-parallel (torchrun)
# Every rank runs this entrypoint; rank 0 runs execute() as a single process would, the others follow() it.


def _ranks() -> tuple[int, int]:
    """(this process's rank, the number of processes) from torchrun's env vars; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _tell_other_ranks(decision: str) -> None:
    """Rank 0 tells the others (follow()) whether it runs the run dir or skips it."""
    if _ranks()[1] > 1:
        from opd_exp.train import distributed  # imports torch: only once a bad config had its chance to fail fast

        distributed.broadcast(decision)


def follow(cfg_node: DictConfig, run_dir: Path) -> None:
    """A rank > 0: trains beside rank 0, which alone writes the run dir and decides to skip or (re)start it."""
    from opd_exp.train import distributed

    try:
        cfg = load_run_config(cfg_node)
        if distributed.broadcast(None) == "run":
            _runner(cfg.runner)(cfg, run_dir)
    except _clean_errors():
        pass  # rank 0 meets the same error and reports it


def check_torchrun_args(argv: list[str]) -> list[str]:
    """Under torchrun every rank must write to one run dir (the default dir holds each rank's own timestamp);
    ranks > 0 write no Hydra files there."""
    rank, world = _ranks()
    if world == 1:
        return argv
    if not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in argv):
        raise ConfigError("hydra.run.dir", "not set; required under torchrun (WORLD_SIZE > 1) so that every "
                          "rank writes to the same run dir, e.g. hydra.run.dir=outputs/ddp")
    return argv + (["hydra.output_subdir=null", "hydra/job_logging=disabled"] if rank > 0 else [])


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if _ranks()[1] > 1:
        from opd_exp.train import distributed

        distributed.init()
        if _ranks()[0] > 0:
            return follow(cfg, run_dir)
    execute(cfg, run_dir, list(hc.overrides.task), hc.mode == RunMode.MULTIRUN)


def check_cli_keys(argv: list[str]) -> list[str]:
    """Check the command line's ``group.key=value`` overrides against the schema before Hydra composes.

    An unknown key stops with the closest valid one (Hydra's own message would only say "not in struct").
    """
    import dataclasses
    import typing

    from opd_exp.config.validation import closest

    for arg in argv:
        key, eq, value = arg.partition("=")
        if arg.startswith(("-", "+", "~")) or not eq or "." not in key or key.startswith("hydra"):
            continue
        cls, parts = RunConfig, key.split(".")
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                prefix = ".".join(parts[:i])
                raise ConfigError(key, f"unknown key{closest(part, names)}; valid keys under "
                                  f"{prefix or 'the root'}: {', '.join(sorted(names))}")
            tp = typing.get_type_hints(cls)[part]
            if not dataclasses.is_dataclass(tp):
                break  # a leaf, or a free-form mapping (model.bootstrap, toy, ...) checked by its owner
            cls = tp
    return argv


def main() -> None:
    os.environ[LAUNCHER_PID] = str(os.getpid())  # inherited by a parallel launcher's worker processes
    signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        sys.argv[1:] = check_torchrun_args(check_cli_keys(sys.argv[1:]))
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    hydra_main()


if __name__ == "__main__":
    main()
