"""The launching process and its workers: SIGTERM to a sweep reaches every cell's process, and one cell's death
never takes the sweep with it.

A parallel launcher (joblib/loky) runs cells in worker processes that would train on, orphaned, when the
launching process is terminated (a scheduler's pre-emption). :func:`forward_sigterm` is the launching process's
SIGTERM handler: it passes the signal on to its descendants, waits for them to checkpoint, and exits 143.

Cell isolation, with every launcher: :func:`run_forked` runs a sweep cell in a forked child of the process the
launcher gave it (the sweep's own process, a loky worker, a submitit job): a cell killed by a signal (the OOM
killer's SIGKILL) ends only that child; the launcher's process records the cell as failed and the sweep goes on.
(A cell whose dir cannot be written: opd_exp/launchers.py.)
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_INTERRUPTED = 143  # 128 + SIGTERM, as a shell reports a TERM'd job


def descendant_pids(pid: int, min_depth: int = 1) -> list[int]:
    """Every live process at least ``min_depth`` levels below ``pid`` (children first), read from /proc; [] where
    there is no /proc."""
    parent_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        except (OSError, IndexError):
            continue  # exited while we read
        if fields[0] != "Z":
            parent_of[int(stat.parent.name)] = int(fields[1])
    found, frontier, depth = [], [pid], 0
    while frontier:
        children = [c for c, parent in parent_of.items() if parent in frontier]
        depth += 1
        found += children if depth >= min_depth else []
        frontier = children
    return found


def ignores_sigterm(pid: int) -> bool:
    """The process ignores SIGTERM (SigIgn in /proc/<pid>/status), as multiprocessing's resource tracker does:
    it ends when the process that started it does."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    mask = next((int(line.split()[1], 16) for line in lines if line.startswith("SigIgn:")), 0)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def forward_sigterm(signum, frame) -> None:
    """SIGTERM to the launching process of a sweep: pass it on to the cells' worker processes (joblib/loky
    workers would otherwise train on, orphaned), give them a minute to checkpoint and write their summaries
    (status: interrupted), then exit 143. A cell running in this process has its own handler meanwhile
    (opd_exp/train/loop.py), so this one only sees the signal between cells or in a parallel launcher."""
    workers = [pid for pid in descendant_pids(os.getpid()) if not ignores_sigterm(pid)]
    for pid in workers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 60
    while time.time() < deadline and set(workers) & set(descendant_pids(os.getpid())):
        time.sleep(0.2)
    print(f"[opd-exp] SIGTERM: passed on to {len(workers)} worker process(es); rerun the same command to resume",
          file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def wait_for_other_cells(launcher_pid: int, timeout: float = 60.0) -> None:
    """In a parallel launcher's worker whose cell was interrupted, before the worker exits: wait until no other
    cell process is left below the launcher (launcher -> worker -> cell: two levels down), or ``timeout``.
    loky answers a worker's exit by SIGKILLing every other worker's process tree (a broken pool,
    ``kill_process_tree`` in joblib/externals/loky), which would kill cells still writing their checkpoint."""
    deadline = time.time() + timeout
    while time.time() < deadline and [pid for pid in descendant_pids(launcher_pid, min_depth=2)
                                      if not ignores_sigterm(pid)]:
        time.sleep(0.1)


# ----------------------------------------------------------------------------- one cell in a forked child


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def run_forked(work: Callable[[], Any]) -> tuple[int, str | None]:
    """Run ``work()`` in a forked child and wait for it: (exit status, None), or (128 + n, its name) when a
    signal killed it. The child inherits open files (a run dir's lock included) and imported modules; it exits
    with ``SystemExit``'s code, 1 on another exception (traceback on stderr), else 0. While waiting, SIGTERM
    is passed on to the child (which checkpoints) and Ctrl-C is left to it."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's stack
        code = 0
        try:
            work()
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(pid, signal.SIGTERM))
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except KeyboardInterrupt:  # Ctrl-C reaches the child too; it checkpoints and exits 130
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status), signal_name(os.WTERMSIG(status))
    return os.waitstatus_to_exitcode(status), None
