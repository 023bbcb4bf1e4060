"""The files of one run directory, written so that nothing already written is lost.

A run dir (Hydra's output dir) holds:
    config.yaml        the resolved config
    metrics.jsonl      one JSON object per line: {"step": int, "<ns>/<name>": float, ...}, ns in train/eval/diag
    run_summary.json   status, results, wall time, seed, provenance (written atomically, updated at the end)
    checkpoints/       the training state (see opd_exp.train.checkpoint)
    .run.lock          held (flock) by the one process running in this dir; its text names the holder

``run_summary.json`` schema (the report reads only this and metrics.jsonl):
    status:      "running" | "completed" | "failed" | "diverged" | "interrupted"
    runner, experiment, seed, overrides (list of "key=value" from the command line / sweep)
    results:     flat {"<name>": float}, e.g. "student_after/id/pass@1", and "<name>_ci": [lo, hi]
    wall_time_s (all attempts: a resumed run adds to it; an attempt killed hard counts up to its last write),
    attempt (1, 2, ... one per start), started_at (epoch seconds of this attempt), git_commit, versions,
    error (the one-line message, or the traceback of an unexpected exception, when failed),
    interrupted_at_step (when interrupted by SIGTERM: the step its checkpoint resumes from)
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SUMMARY = "run_summary.json"
METRICS = "metrics.jsonl"
LOCK = ".run.lock"
NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}  # a file system without flock (some Lustre mounts)
FINISHED = ("completed", "diverged")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def read_summary(run_dir: str | Path) -> dict | None:
    """The run's summary, or None when absent or unreadable (a run killed before writing it)."""
    try:
        return read_json(Path(run_dir) / SUMMARY)
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(run_dir: str | Path) -> bool:
    summary = read_summary(run_dir)
    return bool(summary) and summary.get("status") in FINISHED


def clear_run(run_dir: str | Path) -> None:
    """Remove what a previous attempt trained (overwrite=true): checkpoints, metrics, diagnostics, summary."""
    import shutil

    run_dir = Path(run_dir)
    for name in ("checkpoints", "diag"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in (METRICS, SUMMARY):
        (run_dir / name).unlink(missing_ok=True)


class RunDirBusy(RuntimeError):
    """Another process holds the run dir's lock; the message names it (pid, host, since when)."""


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.run.lock``, held for the whole run, so that one process alone
    trains in (and writes the metrics of) a run dir. The lock ends with its process, however it ends (SIGKILL
    included). While a process runs the dir (:meth:`claim`) the file's text names it for the one-line refusal;
    the text is cleared on release, so a process that only looked (a finished dir, skipped) changes no byte."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.fd: int | None = None
        self.claimed = False

    def acquire(self, wait: bool = False) -> None:
        """Take the lock, or raise :class:`RunDirBusy` naming the holder (``wait``: block until it is free)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in NO_FLOCK:  # e.g. Lustre mounted without -o flock: run, unguarded, and say so
                os.close(fd)
                print(f"[opd-exp] warning: {self.run_dir}'s file system does not support flock; running without "
                      f"the run-dir lock (one process per run dir is up to you)", file=sys.stderr)
                return
            if not isinstance(err, BlockingIOError):
                os.close(fd)
                raise
            busy = f"{self.run_dir} is in use by {self.holder()}"
            if not wait:
                os.close(fd)
                raise RunDirBusy(f"{busy}; wait for it to end, or run the same command with --wait") from None
            print(f"[opd-exp] {busy}; waiting for it to end (--wait)", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        self.fd = fd

    def claim(self) -> None:
        """Write this process (pid, host, time) into the lock file, for the refusal of the next one."""
        if self.fd is None:  # no flock on this file system
            return
        self.claimed = True
        text = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        if self.fd is not None:
            if self.claimed:
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def last_write_time(run_dir: str | Path) -> float | None:
    """The newest mtime among the files a run writes while training (None when it wrote none): how far a
    killed attempt got, for its share of the wall time."""
    run_dir = Path(run_dir)
    paths = [run_dir / METRICS, run_dir / "checkpoints" / "last.pt"]
    times = [p.stat().st_mtime for p in paths if p.exists()]
    return max(times) if times else None


class MetricsLog:
    """Append-only ``metrics.jsonl``. On resume, lines at or past ``truncate_from_step`` are dropped so that
    a resumed run's file equals an uninterrupted run's."""

    def __init__(self, run_dir: str | Path, truncate_from_step: int | None = None):
        self.path = Path(run_dir) / METRICS
        if truncate_from_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if _complete_line_step(line) is not None and _complete_line_step(line) < truncate_from_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        line = json.dumps(_jsonable({"step": step, **metrics}), sort_keys=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()


def _complete_line_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All complete lines of ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def metrics_order_problem(rows: list[dict]) -> str | None:
    """Where metrics.jsonl stops being one writer's log, as one line; None when every key's steps strictly
    increase (a key logged twice at one step, or at a step before its previous one, means two processes wrote
    the file, or a file was spliced)."""
    last: dict[str, int] = {}
    for line, row in enumerate(rows, 1):
        step = row.get("step")
        if not isinstance(step, int):
            return f"line {line}: no integer step"
        for key in row:
            prev = last.get(key)
            if key != "step" and prev is not None and step <= prev:
                what = "duplicated" if step == prev else "out of order"
                return f"line {line}: {key} at step {step} after step {prev} ({what}; two writers?)"
            last[key] = step
    return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# what a dirty flag ignores: what the suite itself writes while reproducing (results/, with timings.tsv appended
# by scripts/reproduce_paper.sh during the run) and prose
NOT_CODE = (":(top,exclude)results", ":(top,exclude)*.md")


def git_dirty(cwd: Path | None = None) -> bool | None:
    """True when tracked files of the code's checkout (``cwd``: this package's) differ from its commit outside
    ``NOT_CODE`` (the run used uncommitted code or config), None outside a git checkout (an installed package)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", *NOT_CODE],
                             capture_output=True, text=True, timeout=10, cwd=cwd or Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("opd-exp", "torch", "transformers", "tokenizers", "hydra-core", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions
