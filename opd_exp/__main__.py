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
    75   the run dir is in use: another process holds its lock (one line names its pid and host); nothing was
         touched. `--wait` waits for it instead (then skips the dir if that process finished it).

One process at a time trains in a run dir (opd_exp.rundir.RunLock, held for the whole run). A sweep runs each
cell in a forked child process (opd_exp.processes.run_forked): a cell killed by a signal (the OOM killer) is
recorded as failed and the sweep goes on; so does a cell whose dir cannot be written (opd_exp.launchers).
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from opd_exp import reuse, rundir
from opd_exp.config import RunConfig, load_run_config
from opd_exp.config.validation import ConfigError, check_paths
from opd_exp.launchers import isolate_cells
from opd_exp.processes import EXIT_INTERRUPTED, forward_sigterm, run_forked, wait_for_other_cells

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# runner name -> "module:function"; each takes (RunConfig, run_dir) and returns {"status", "results", ...}
RUNNERS = {
    "opd": "opd_exp.train.loop:run",
    "toy_gamma": "opd_exp.toy.gamma:run",
    "toy_exact": "opd_exp.toy.exact:run",
}


# what a runner's first model load imports lazily (~1,000 modules, 4-5 s on a 2-core CPU), imported before a
# sweep forks its cells so that each cell's child starts with them
PRELOAD = {"opd": ("transformers.modeling_utils", "transformers.generation.utils")}


def _runner(name: str):
    module, func = RUNNERS[name].split(":")
    return getattr(importlib.import_module(module), func)


EXIT_FAILED, EXIT_CONFIG, EXIT_BUSY, EXIT_SIGINT = 1, 2, 75, 130  # 75: EX_TEMPFAIL (sysexits.h), try later
LAUNCHER_PID = "OPD_EXP_LAUNCHER_PID"  # env: the pid of the process that launched the run or sweep
WAIT = "OPD_EXP_WAIT"  # env, set by --wait: a run dir in use is waited for instead of refused
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}


def _clean_errors() -> tuple[type[Exception], ...]:
    """Errors whose message says everything (a field, or a file and its problem): printed as one line, never
    as a traceback. Imported lazily: a bad config must fail before torch is imported."""
    from opd_exp.models.pair import ModelLoadError
    from opd_exp.train.checkpoint import CheckpointError

    return ConfigError, ModelLoadError, CheckpointError


def disk_error(err: BaseException) -> OSError | None:
    """The OSError of a full disk or an unwritable file behind ``err``: itself or an exception it was raised from
    or while handling (torch.save reports a failed write as a RuntimeError raised while handling it)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def disk_message(run_dir: Path, err: OSError, started: bool = True) -> str:
    """One line: the file, the problem, what to do (``started``: the run wrote a checkpoint it resumes from)."""
    where = err.filename or run_dir
    then = "; earlier checkpoints are kept: free space or fix the permissions, then run the same command " \
           "again to resume" if started else ": free space, fix the permissions or choose another hydra.run.dir"
    return f"{where}: {DISK_ERRNOS[err.errno]} (errno {err.errno}){then}"


def write_final_summary(run_dir: Path, summary: dict) -> str | None:
    """Write the summary atomically; when that fails (a full disk has no room for the temp file), drop the
    stale one (its "running" would be a lie, and its blocks make room) and try once more. Returns None when
    written, else the one-line problem (the dir is then left with no summary: unfinished, resumable)."""
    path = run_dir / rundir.SUMMARY
    try:
        rundir.atomic_write_json(path, summary)
        return None
    except OSError:
        path.unlink(missing_ok=True)
    try:
        rundir.atomic_write_json(path, summary)
        return None
    except OSError as err:
        path.unlink(missing_ok=True)
        reason = DISK_ERRNOS.get(err.errno, err.strerror)
        return (f"{path}: cannot be written ({reason}); status {summary['status']} not recorded, the dir has no "
                f"summary (unfinished): free space, then run the same command again")


def _cannot_write(run_dir: Path, err: OSError, multirun: bool) -> dict:
    """The run dir cannot be written before the run starts: one line; exit 1 (a sweep's cell: failed)."""
    if disk_error(err) is None:
        raise err
    message = disk_message(run_dir, disk_error(err), started=False)
    print(f"[opd-exp] {message}", file=sys.stderr)
    if not multirun:
        sys.exit(EXIT_FAILED)
    return {"status": "failed", "error": message}


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
               "git_dirty": rundir.git_dirty(), "versions": rundir.package_versions()}
    try:
        cfg: RunConfig = load_run_config(cfg_node)
        check_paths(cfg)
        if cfg.runner == "opd":  # read the task's data now: a dataset error exits 2 before any run file
            from opd_exp.tasks.base import check_task_pair, make_task

            check_task_pair(cfg.task, cfg.model)
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
    lock = rundir.RunLock(run_dir)
    try:
        lock.acquire(wait=bool(os.environ.get(WAIT)))
    except rundir.RunDirBusy as err:
        print(f"[opd-exp] {err}", file=sys.stderr)
        if not multirun:
            sys.exit(EXIT_BUSY)
        return {"status": "busy", "error": str(err)}
    except OSError as err:  # a read-only run dir, a full disk
        return _cannot_write(run_dir, err, multirun)
    try:
        return _execute_locked(cfg, cfg_node, run_dir, summary, multirun, start, lock)
    finally:
        lock.release()


def _reuse_key(cfg: RunConfig, cfg_node: DictConfig, summary: dict) -> str | None:
    """The run's reuse key (opd_exp/reuse.py) when ``reuse=true`` applies: an OPD run in a single process."""
    if not cfg.reuse or cfg.runner != "opd" or _ranks()[1] > 1:
        return None
    return reuse.run_key(OmegaConf.to_container(cfg_node, resolve=True), summary["git_commit"], summary["git_dirty"])


def _cache(cfg: RunConfig) -> Path:
    from opd_exp.models.pair import cache_root  # imports torch: only for a run that trains or is reused

    return cache_root(cfg.model)


def _fresh(run_dir: Path) -> bool:
    """Nothing trained yet in ``run_dir`` (a started run resumes from its checkpoint instead of being reused)."""
    return not (run_dir / rundir.METRICS).exists() and not (run_dir / "checkpoints").exists()


def _execute_locked(cfg: RunConfig, cfg_node: DictConfig, run_dir: Path, summary: dict, multirun: bool,
                    start: float, lock: rundir.RunLock) -> dict:
    """execute() once this process holds the run dir's lock."""
    if rundir.is_finished(run_dir):
        if not cfg.overwrite:
            _tell_other_ranks("skip")
            print(f"[opd-exp] {run_dir} already finished; skipping (overwrite=true to re-run)")
            return rundir.read_summary(run_dir)
        rundir.clear_run(run_dir)  # else the final checkpoint would "resume" a finished run
    _tell_other_ranks("run")
    lock.claim()
    elapsed_before, attempt = _time_so_far(run_dir)
    summary.update(attempt=attempt, started_at=start, wall_time_s=elapsed_before)
    try:
        rundir.atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg_node, resolve=True))
        rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
    except OSError as err:
        return _cannot_write(run_dir, err, multirun)
    key = _reuse_key(cfg, cfg_node, summary)
    source = reuse.find(_cache(cfg), key, run_dir) if key and _fresh(run_dir) else None
    try:
        if source is not None:
            print(f"[opd-exp] {run_dir}: the same run finished in {source}; copying its results (reuse=true)")
            summary.update(reuse.copy_into(source, run_dir))
        else:
            summary.update(_runner(cfg.runner)(cfg, run_dir))
    except KeyboardInterrupt:
        summary.update(status="interrupted", error="KeyboardInterrupt")
    except Exception as err:  # a failed sweep cell must not stop the others
        disk = disk_error(err)
        if isinstance(err, _clean_errors()) or disk is not None:  # bad input file, a late config check, full disk
            summary.update(status="failed", error=disk_message(run_dir, disk) if disk is not None else str(err))
            print(f"[opd-exp] {run_dir}: {summary['error']}" if multirun else summary["error"], file=sys.stderr)
        else:
            summary.update(status="failed", error=traceback.format_exc())
            print(f"[opd-exp] run failed in {run_dir}:\n{summary['error']}", file=sys.stderr)
    summary["wall_time_s"] = elapsed_before + time.time() - start
    reusable = bool(key) and summary["status"] == "completed"
    if reusable:
        summary["reuse_key"] = key
    unwritten = write_final_summary(run_dir, summary)
    if unwritten is None and reusable and source is None:  # a copy is not recorded: its source already is
        reuse.record(_cache(cfg), key, run_dir)
    if unwritten is not None:
        print(f"[opd-exp] {unwritten}", file=sys.stderr)
        summary["status"] = "failed"
    if summary["status"] == "interrupted":
        sigint = summary.get("error") == "KeyboardInterrupt"
        saved = "the last periodic checkpoint is kept" if sigint else "checkpoint saved"
        print(f"[opd-exp] {run_dir}: interrupted; {saved}; run the same command again to resume", file=sys.stderr)
        end_interrupted(EXIT_SIGINT if sigint else EXIT_INTERRUPTED)
    if summary["status"] == "failed" and not multirun:  # a config check that needed the models: exit 2
        sys.exit(EXIT_CONFIG if summary.get("error", "").startswith("config error:") else EXIT_FAILED)
    return summary


def end_interrupted(code: int) -> None:
    """Exit with an interruption's status (130, 143): a sweep stops there, as the whole job is pre-empted."""
    launcher = os.environ.get(LAUNCHER_PID, str(os.getpid()))
    if launcher != str(os.getpid()):
        # a sweep cell's process (forked child, joblib/loky worker): a worker would catch SystemExit and idle on;
        # end it so the launching process (opd_exp.processes.forward_sigterm) sees its cells are done, once no
        # other cell is still checkpointing (a worker's exit makes loky SIGKILL the other workers' trees)
        if os.getppid() == int(launcher):
            wait_for_other_cells(int(launcher))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def execute_cell(cfg_node: DictConfig, run_dir: Path, overrides: list[str]) -> dict:
    """A sweep cell: execute() in a forked child (opd_exp.processes.run_forked). A signal that kills the child
    (the OOM killer's SIGKILL) fails this cell alone, recorded in its summary, and the sweep goes on; an
    interruption the cell handled (SIGTERM: 143, Ctrl-C: 130) stops the sweep as before."""
    name = str(cfg_node.get("runner"))
    if name in RUNNERS:  # imported once, here (torch, transformers, ...): every cell's child starts with them
        for module in (RUNNERS[name].split(":")[0], *PRELOAD.get(name, ())):
            importlib.import_module(module)
    code, killed_by = run_forked(lambda: execute(cfg_node, run_dir, overrides, multirun=True))
    if killed_by is None and code in (EXIT_INTERRUPTED, EXIT_SIGINT):
        end_interrupted(code)
    if killed_by is None:
        return rundir.read_summary(run_dir) or {"status": "failed", "error": f"the cell exited with status {code}"}
    return record_killed(run_dir, killed_by, overrides)


def record_killed(run_dir: Path, signame: str, overrides: list[str]) -> dict:
    """Mark a cell whose process a signal killed as failed (a summary left "running", or none), once the lock
    it held has died with it; a finished summary is never touched. One line on stderr."""
    oom = " (out of memory? the OOM killer sends SIGKILL)" if signame == "SIGKILL" else ""
    message = (f"{run_dir}: the cell's process was killed by {signame}{oom}; the other cells go on; run the "
               f"same command again to resume this one")
    print(f"[opd-exp] {message}", file=sys.stderr)
    failed = {"status": "failed", "error": message, "overrides": overrides}
    lock = rundir.RunLock(run_dir)
    try:
        lock.acquire()
    except (rundir.RunDirBusy, OSError):  # another process took the dir over, or it cannot be written
        return failed
    lock.claim()  # and, on release, clear the dead process's name
    try:
        summary = rundir.read_summary(run_dir)
        if summary is not None and summary.get("status") != "running":
            return summary
        if summary is not None:  # its wall time counts up to now, as _time_so_far would count it
            spent = float(summary.get("wall_time_s") or 0.0) + time.time() - float(summary["started_at"])
            failed = {**summary, **failed, "wall_time_s": spent}
        rundir.atomic_write_json(run_dir / rundir.SUMMARY, failed)
        return failed
    finally:
        lock.release()


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
            follow(cfg, run_dir)
        else:
            execute(cfg, run_dir, list(hc.overrides.task), hc.mode == RunMode.MULTIRUN)
        distributed.finish()  # every rank leaves together, after rank 0's evaluation, and exits 0 here
    if hc.mode == RunMode.MULTIRUN:
        return execute_cell(cfg, run_dir, list(hc.overrides.task))
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


def check_output_dir(argv: list[str]) -> list[str]:
    """The run dir (the sweep dir with -m) named on the command line must be a writable dir: created and probed
    here, so that a read-only or misplaced one is one line naming the field, not Hydra's logging traceback."""
    key = "hydra.sweep.dir" if {"-m", "--multirun"} & set(argv) else "hydra.run.dir"
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name != key or not eq or "${" in value:
            continue
        try:
            Path(value).expanduser().mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=Path(value).expanduser()):
                pass
        except OSError as err:
            raise ConfigError(key, f"got {value}: cannot be written ({err.strerror or err}); choose a writable "
                              f"dir") from None
    return argv


def main() -> None:
    os.environ[LAUNCHER_PID] = str(os.getpid())  # inherited by a parallel launcher's worker processes
    signal.signal(signal.SIGTERM, forward_sigterm)
    argv = sys.argv[1:]
    if "--wait" in argv:  # ours, not Hydra's: wait for a run dir that another process holds
        argv.remove("--wait")
        os.environ[WAIT] = "1"
    try:
        sys.argv[1:] = check_output_dir(check_torchrun_args(check_cli_keys(argv)))
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    isolate_cells()
    hydra_main()


if __name__ == "__main__":
    main()
