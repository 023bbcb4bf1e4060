"""Issue 17 (reliability, second round): each numbered reproduction of the issue, injected and checked.

1 two processes on one run dir; 2 a sweep cell's process killed (the OOM killer); 3 a cell dir that cannot be
written; 4 the report and the cells that never ran; 5 a corrupted cached pair; 6 one-line errors (full disk, an
unwritable run dir, OPD_EXP_CACHE at a file, bad mask.tokens, a seed past numpy's bound, a summary that cannot
be written); 8 threads / device keep sweep cells apart. Each checks that nothing finished is lost, that every
message is one line naming the field or the file, and (where cheap) that a rerun completes the work.
Runs are smoke scale (tests/conftest.py); tests using the `smoke` fixture are marked slow.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opd_exp import rundir
from opd_exp.models import bootstrap
from opd_exp.processes import descendant_pids, ignores_sigterm
from opd_exp.report import cli as report
from opd_exp.report.runs import find_run_dirs, load_run, missing_cells

CONF = Path(__file__).resolve().parent.parent / "conf"
QUICK = ("train.steps=2", "train.diag_every=0", "eval.teacher=false")  # a cheap cell that still trains


def one_line(err: str, needle: str) -> str:
    """The single stderr line holding ``needle``; no traceback anywhere."""
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if needle in ln]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def finished_copy(reference_run: Path, dst: Path, overrides: list[str]) -> None:
    """A finished cell: the reference run's files, its summary naming ``overrides`` (what the sweep plans)."""
    shutil.copytree(reference_run, dst)
    summary = json.loads((dst / rundir.SUMMARY).read_text()) | {"overrides": overrides}
    rundir.atomic_write_json(dst / rundir.SUMMARY, summary)


# ----------------------------------------------------------------------------- 1: two processes, one run dir


def test_1_a_second_process_on_a_busy_run_dir_refuses_or_waits(smoke, reference_run, tmp_path):
    """This process holds the run dir (as a training process does, for its whole run): another process on it is
    refused in one line naming the holder and writes nothing; with --wait it waits for the holder to end."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    (run_dir / rundir.SUMMARY).unlink()  # unfinished: a process let in would resume it and write
    holder = rundir.RunLock(run_dir)
    holder.acquire()
    holder.claim()
    before = smoke.files(run_dir)
    second = smoke.cli(run_dir=run_dir)
    assert second.returncode == 75, second.stderr[-3000:]
    line = one_line(second.stderr, "in use by")
    assert f"{run_dir} is in use by pid {os.getpid()} on " in line and "--wait" in line
    assert smoke.files(run_dir) == before  # nothing written by the refused process
    log = tmp_path / "waiting.err"
    with open(log, "w") as err:
        waiting = subprocess.Popen(smoke.argv("--wait", run_dir=run_dir), cwd=smoke.root, env=smoke.env(),
                                   stdout=subprocess.PIPE, stderr=err, text=True)
        smoke.wait_for(lambda: "waiting for it to end (--wait)" in log.read_text(), waiting, "the wait")
        assert smoke.files(run_dir) == before
        shutil.copy(reference_run / rundir.SUMMARY, run_dir)  # the holder finishes the run, then ends
        holder.release()
        out, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, log.read_text()[-3000:]
    assert "already finished; skipping" in out
    assert smoke.metrics(run_dir) == smoke.metrics(reference_run)  # every step once, in order


def test_1_the_report_rejects_metrics_that_two_processes_wrote(reference_run, tmp_path):
    rows = rundir.read_metrics(reference_run)
    assert rundir.metrics_order_problem(rows) is None
    assert "duplicated" in rundir.metrics_order_problem(rows + rows[-1:])
    assert "out of order" in rundir.metrics_order_problem(rows[:3] + rows[1:2])
    good, bad = tmp_path / "sweep" / "good", tmp_path / "sweep" / "bad"
    shutil.copytree(reference_run, good)
    shutil.copytree(reference_run, bad)
    text = (bad / rundir.METRICS).read_text().splitlines(keepends=True)
    (bad / rundir.METRICS).write_text("".join(text[:4] + text[2:]))  # a second writer that started late
    runs = {r.path.name: r for r in map(load_run, find_run_dirs([str(tmp_path / "sweep")]))}
    assert runs["good"].usable and runs["bad"].status == "rejected" and not runs["bad"].usable
    assert runs["bad"].summary["error"].startswith(f"{bad / rundir.METRICS}: line 5: ")
    assert "out of order" in runs["bad"].summary["error"]


# ----------------------------------------------------------------------------- 2: a killed cell, joblib


def _cell_process(sweep_proc: subprocess.Popen, cell: Path) -> int:
    """The process running ``cell``: the holder its run-dir lock names (before the fix: a joblib worker)."""
    lock = cell / rundir.LOCK
    if lock.is_file() and lock.read_text().strip():
        return int(lock.read_text().split()[1])
    return next(pid for pid in descendant_pids(sweep_proc.pid) if not ignores_sigterm(pid))


def test_2_a_killed_cell_process_fails_that_cell_and_the_sweep_goes_on(smoke, reference_run, tmp_path):
    """joblib, 2 workers: the long cell is SIGKILLed while training (as by the OOM killer); the other running cell
    finishes, and the cell queued behind them starts (finished already: skipped); the killed cell is failed."""
    sweep = tmp_path / "sweep"
    six = sweep / "eval.teacher=False,train.checkpoint_every=1,train.diag_every=0,train.steps=6"
    finished_copy(reference_run, six, ["experiment=smoke", "train.steps=6"])
    argv = smoke.argv("train.steps=40,2,6", "train.checkpoint_every=1", "hydra/launcher=local_parallel",
                      "hydra.launcher.n_jobs=2", "train.diag_every=0", "eval.teacher=false", sweep_dir=sweep)
    proc = subprocess.Popen(argv, cwd=smoke.root, env=smoke.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    long_cell = sweep / "eval.teacher=False,train.checkpoint_every=1,train.diag_every=0,train.steps=40"
    smoke.wait_for(lambda: (long_cell / "checkpoints" / "last.pt").exists(), proc, "the long cell training")
    os.kill(_cell_process(proc, long_cell), signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    line = one_line(err, "killed by SIGKILL")
    assert str(long_cell) in line and "out of memory?" in line
    killed = smoke.summary(long_cell)
    assert killed["status"] == "failed" and killed["error"] in line
    short = sweep / "eval.teacher=False,train.checkpoint_every=1,train.diag_every=0,train.steps=2"
    assert smoke.summary(short)["status"] == "completed"
    assert smoke.metrics(six) == smoke.metrics(reference_run)  # the queued cell started: skipped, untouched


# ----------------------------------------------------------------------------- 3 and 4: unwritable cell dir, plan


@pytest.fixture(scope="module")
def blocked_sweep(smoke, tmp_path_factory, reference_run):
    """A basic-launcher sweep of seed=0,1,2 whose first cell cannot be written (a file is in the way) and whose
    later cells already finished (so that reaching them costs no training): (sweep dir, CompletedProcess)."""
    sweep = tmp_path_factory.mktemp("blocked") / "sweep"
    sweep.mkdir()
    (sweep / "seed=0,train.steps=1").write_text("in the way")
    for seed in (1, 2):
        finished_copy(reference_run, sweep / f"seed={seed},train.steps=1",
                      ["experiment=smoke", f"seed={seed}", "train.steps=1"])
    return sweep, smoke.cli("seed=0,1,2", "train.steps=1", sweep_dir=sweep)


def test_3_a_cell_dir_that_cannot_be_written_fails_only_that_cell(blocked_sweep, smoke):
    sweep, res = blocked_sweep
    assert res.returncode == 0, res.stderr[-3000:]
    line = one_line(res.stderr, "cannot set up the cell")
    assert str(sweep / "seed=0,train.steps=1") in line and "File exists" in line and "the sweep goes on" in line
    assert res.stdout.count("already finished; skipping") == 2  # the sweep went on to every later cell


def test_4_the_report_lists_planned_cells_that_never_ran(blocked_sweep):
    sweep, _ = blocked_sweep
    runs = [load_run(p) for p in find_run_dirs([str(sweep)])]
    missing = missing_cells(runs, [str(sweep)])
    assert [(r.status, r.seed) for r in missing] == [("not run", 0)]  # seeds 1, 2 have their run dirs
    failed = "\n".join(report.cell_sections(runs + missing)).split("## Failed, diverged or unfinished runs")[1]
    (row,) = [ln for ln in failed.splitlines() if "not run" in ln]
    assert "| 0 | not run | planned in " in row and "multirun.yaml" in row


# ----------------------------------------------------------------------------- 5: a corrupted cached pair


def _zero(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start:start + 400_000] = bytes(len(data[start:start + 400_000]))
    path.write_bytes(bytes(data))


def _random(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-4096:] = os.urandom(4096)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_zero, _random, _truncate])
def test_5_a_corrupted_cached_pair_is_never_loaded(smoke, tmp_path, capsys, damage):
    cache = f"model.cache_dir={tmp_path / 'cache'}"
    cfg = smoke.run_config(cache)
    entry = bootstrap.entry_dir(cfg.model, cfg.task)
    shutil.copytree(smoke.entry, entry)
    weights = entry / "teacher" / "model.safetensors"
    damage(weights)
    with pytest.raises(SystemExit) as exit_:
        smoke.execute(tmp_path / "run", cache)
    assert exit_.value.code == 1
    line = one_line(capsys.readouterr().err, str(weights))
    assert "corrupted (sha256" in line and f"rm -r {entry}" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_5_verifying_a_cache_entry_is_cheap(smoke):
    from opd_exp.models.integrity import verify_entry

    start = time.perf_counter()
    assert verify_entry(smoke.entry) is None  # hashed (unless this process already did)
    first = time.perf_counter() - start
    start = time.perf_counter()
    assert verify_entry(smoke.entry) is None  # remembered: a stat per file
    again = time.perf_counter() - start
    assert first < 1.0 and again < 0.01, (first, again)


# ----------------------------------------------------------------------------- 6: one line, not a traceback


def test_6_a_full_disk_is_one_line_the_summary_is_not_left_running_and_a_rerun_completes(
        smoke, tmp_path, capsys, monkeypatch):
    """The disk fills at the first checkpoint: torch reports the failed write as a RuntimeError raised while
    handling the OSError; every later write fails too, the summary's included."""
    from opd_exp.train import checkpoint

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:664] unexpected pos 64 vs 0") from None

    def full_unless_running(path, obj):
        if Path(path).name == rundir.SUMMARY and obj.get("status") != "running":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, obj)

    write = rundir.atomic_write_json
    run_dir = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: full())
    monkeypatch.setattr(rundir, "atomic_write_json", full_unless_running)
    with pytest.raises(SystemExit) as exit_:
        smoke.execute(run_dir, *QUICK, "train.checkpoint_every=1")
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    line = one_line(err, "no space left on device (errno 28)")
    assert "run the same command again to resume" in line
    assert one_line(err, str(run_dir / rundir.SUMMARY))
    assert rundir.read_summary(run_dir) is None  # not a stale "running": the dir reads as unfinished
    monkeypatch.undo()  # space freed
    assert smoke.execute(run_dir, *QUICK, "train.checkpoint_every=1")["status"] == "completed"


def test_6_an_unwritable_run_dir_is_one_line_exit_2(smoke, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for run_dir in (Path("/sys/opd-exp-test/run"), blocker / "run"):  # sysfs takes no new dirs; under a file
        res = smoke.cli(run_dir=run_dir)
        assert res.returncode == 2, res.stderr[-3000:]
        line = one_line(res.stderr, "config error: hydra.run.dir")
        assert str(run_dir) in line and "cannot be written" in line


def test_6_opd_exp_cache_at_a_file_is_one_line_exit_2(smoke, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("")
    monkeypatch.setenv("OPD_EXP_CACHE", str(cache))
    with pytest.raises(SystemExit) as exit_:
        smoke.execute(tmp_path / "run")
    assert exit_.value.code == 2
    line = one_line(capsys.readouterr().err, "config error: model.cache_dir")
    assert str(cache) in line and "not a directory" in line and "OPD_EXP_CACHE" in line


@pytest.mark.parametrize("tokens, words", [("[nosuch]", "'nosuch' is not in the tokenizer's vocabulary"),
                                           ("[999]", "token id 999 is outside the vocabulary"),
                                           ("[-1]", "got -1 in [-1], allowed: token strings or ids >= 0")])
def test_6_bad_mask_tokens_name_the_field(smoke, tmp_path, capsys, tokens, words):
    with pytest.raises(SystemExit) as exit_:
        smoke.execute(tmp_path / "run", "mask.enabled=true", f"mask.tokens={tokens}")
    assert exit_.value.code == 2  # a config error, found once the tokenizer is loaded
    line = one_line(capsys.readouterr().err, "config error: mask.tokens")
    assert words in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_6_a_seed_past_numpys_bound_names_the_field(smoke, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        smoke.execute(tmp_path / "run", "seed=4294967296")
    assert exit_.value.code == 2
    assert "got 4294967296, allowed: >= 0 and <= 2147483647" in one_line(capsys.readouterr().err, "config error: seed")


# ----------------------------------------------------------------------------- 8: cells that must not collapse


@pytest.mark.parametrize("key, values", [("threads", ("1", "2")), ("device", ("cpu", "auto"))])
def test_8_threads_and_device_name_different_cell_dirs(key, values):
    """They change the numbers (CPU vs GPU kernels; torch's multi-threaded reductions sum in another order), so
    -m threads=1,2 plans two cells: Hydra's cell dir names differ."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    names = set()
    for value in values:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            names.add(compose("config", overrides=[f"{key}={value}", "seed=0"],
                              return_hydra_config=True).hydra.job.override_dirname)
    assert len(names) == 2, names


def test_waiting_for_other_cells_sees_only_processes_two_levels_down():
    """processes.wait_for_other_cells: a launcher's workers are one level down, their cells two; the wait ends
    when no cell is left, not when the workers are (loky SIGKILLs the other workers' trees when one exits)."""
    from opd_exp.processes import wait_for_other_cells

    cell = "import time; time.sleep(3)"
    worker = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {cell!r}]); time.sleep(60)"
    launcher = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                                 f"subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(60)"])
    try:
        deadline = time.time() + 30
        while not descendant_pids(launcher.pid, min_depth=2) and time.time() < deadline:
            time.sleep(0.05)
        (cell_pid,) = descendant_pids(launcher.pid, min_depth=2)
        (worker_pid, _) = descendant_pids(launcher.pid)
        assert worker_pid != cell_pid
        start = time.time()
        wait_for_other_cells(launcher.pid, timeout=30)
        assert time.time() - start < 20 and not descendant_pids(launcher.pid, min_depth=2)
        assert descendant_pids(launcher.pid) == [worker_pid]  # the worker itself is not waited for
    finally:
        for pid in descendant_pids(launcher.pid):
            os.kill(pid, signal.SIGKILL)
        launcher.kill()
        launcher.wait()
