"""Issue 4 (reliability): faults are injected and each outcome is checked.

Pre-emption (SIGKILL, SIGTERM) and resume, determinism, non-finite losses and gradients, random invalid configs,
missing / truncated / malformed input files, finished run dirs, and the bootstrap cache under concurrency.
Runs are smoke scale (tests/conftest.py); the uninterrupted `reference_run` is the yardstick.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import signal
import subprocess
import threading
import time
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd_exp import rundir
from opd_exp.config import RunConfig, load_run_config
from opd_exp.config.validation import ConfigError
from opd_exp.models import bootstrap
from opd_exp.objectives import ESTIMATORS, EstimatorSpec
from opd_exp.processes import descendant_pids

CKPT = "checkpoints/last.pt"


def ckpt_step(run_dir) -> int:
    return torch.load(run_dir / CKPT, map_location="cpu", weights_only=False)["step"]


# ----------------------------------------------------------------------------- pre-emption, resume, determinism


def test_sigkill_mid_training_then_rerun_resumes_to_the_uninterrupted_result(smoke, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = smoke.popen(run_dir=run_dir)
    smoke.wait_for(lambda: (run_dir / CKPT).exists(), proc, "the first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed = smoke.summary(run_dir)
    assert killed["status"] == "running" and 0 < ckpt_step(run_dir) < 6  # really killed mid-training
    with open(run_dir / "metrics.jsonl", "a") as f:  # a kill in the middle of a write leaves a torn line
        f.write('{"step": 5, "train/lo')
    killed_share = rundir.last_write_time(run_dir) - killed["started_at"]

    step = ckpt_step(run_dir)
    res = smoke.cli(run_dir=run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming {run_dir} at step {step}/6" in res.stdout
    assert smoke.metrics(run_dir) == smoke.metrics(reference_run)
    done = smoke.summary(run_dir)
    assert done["status"] == "completed" and done["results"] == smoke.summary(reference_run)["results"]
    # wall time = the killed attempt up to its last write + the resumed attempt
    this_attempt = (run_dir / "run_summary.json").stat().st_mtime - done["started_at"]
    assert done["attempt"] == 2 and done["wall_time_s"] == pytest.approx(killed_share + this_attempt, abs=1.0)


def test_sigterm_checkpoints_exits_143_and_rerun_resumes(smoke, reference_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = smoke.popen(run_dir=run_dir)
    smoke.wait_for(lambda: bool(rundir.read_metrics(run_dir)), proc, "the first training step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "interrupted; checkpoint saved" in err and "Traceback" not in err
    summary = smoke.summary(run_dir)
    assert summary["status"] == "interrupted"
    assert ckpt_step(run_dir) == summary["interrupted_at_step"] < 6
    assert smoke.execute(run_dir)["status"] == "completed"  # the same command again (here in-process)
    assert "resuming" in capsys.readouterr().out
    assert smoke.metrics(run_dir) == smoke.metrics(reference_run)
    assert smoke.summary(run_dir)["results"] == smoke.summary(reference_run)["results"]


def alive(pid: int) -> bool:
    """Running (not exited, not a zombie awaiting its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_sigterm_to_a_parallel_sweep_reaches_its_workers(smoke, tmp_path):
    """joblib runs the cells in worker processes: SIGTERM to the launching process must stop them too (not
    leave them training, orphaned), each cell checkpointed and marked interrupted, so a rerun resumes."""
    sweep = tmp_path / "sweep"
    argv = smoke.argv("seed=0,1", "train.steps=500", "hydra/launcher=local_parallel", "threads=1",
                      sweep_dir=sweep)
    proc = subprocess.Popen(argv, cwd=smoke.root, env=smoke.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    training = lambda: sum(bool(rundir.read_metrics(d)) for d in sweep.glob("*") if d.is_dir()) == 2  # noqa: E731
    smoke.wait_for(training, proc, "both cells training")
    workers = descendant_pids(proc.pid)
    assert workers
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    # no worker outlives the sweep (orphans would train on); the resource tracker ends just after its parent
    deadline = time.time() + 15
    while [pid for pid in workers if alive(pid)] and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)]
    cells = [d for d in sweep.glob("*") if (d / "run_summary.json").exists()]
    statuses = [smoke.summary(d)["status"] for d in cells]
    errors = [smoke.summary(d).get("error") for d in cells]
    assert statuses == ["interrupted", "interrupted"], (statuses, errors, err[-3000:])
    assert all(ckpt_step(d) == smoke.summary(d)["interrupted_at_step"] < 500 for d in cells)


def test_same_seed_gives_identical_metrics_across_processes(smoke, reference_run, sweep4):
    """The reference (in this process) and the sweep's cell with the same config (another process)."""
    sweep_dir, _ = sweep4
    cell = sweep_dir / "estimator=sampled_token,seed=0"
    other_seed = sweep_dir / "estimator=sampled_token,seed=1"
    assert (cell / "metrics.jsonl").read_text() != (reference_run / "metrics.jsonl").read_text()  # time/ differs
    assert smoke.metrics(cell) == smoke.metrics(reference_run)
    assert smoke.summary(cell)["results"] == smoke.summary(reference_run)["results"]
    assert smoke.metrics(other_seed) != smoke.metrics(reference_run)


# ----------------------------------------------------------------------------- non-finite losses and gradients


def poisoned(bad_loss: set[int] = frozenset(), bad_grad: set[int] = frozenset(), from_call: int | None = None):
    """sampled_token, except that call i (one per PPO mini-batch; 2 per step here) returns a NaN loss when i is in
    ``bad_loss`` or i >= ``from_call``, or a finite loss with a NaN gradient (d sqrt(x)/dx at 0) in ``bad_grad``."""
    real, calls = ESTIMATORS["sampled_token"], []

    def loss(head, batch, cfg):
        out, i = real.loss(head, batch, cfg), len(calls)
        calls.append(i)
        if i in bad_loss or (from_call is not None and i >= from_call):
            return dataclasses.replace(out, loss=out.loss * float("nan"))
        if i in bad_grad:
            return dataclasses.replace(out, loss=out.loss + torch.sqrt((head.hidden_BTH * 0).sum()))
        return out

    return EstimatorSpec(loss=loss, needs=real.needs)


def test_nan_loss_and_nan_gradient_are_skipped_counted_and_logged(smoke, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ESTIMATORS, "sampled_token", poisoned(bad_loss={3}, bad_grad={8}))
    summary = smoke.execute(tmp_path / "run")
    assert summary["status"] == "completed" and summary["results"]["train/nonfinite_skips"] == 2
    rows = {r["step"]: r for r in smoke.metrics(tmp_path / "run")}
    nan_loss, nan_grad = rows[1], rows[4]  # calls 3 and 8: the second update of step 1, the first of step 4
    assert nan_loss["train/nonfinite/updates"] == 1 and nan_loss["train/updates"] == 1
    assert nan_loss["train/nonfinite/loss"] is None  # NaN is written as null
    assert nan_grad["train/nonfinite/grad_norm"] is None and nan_grad["train/nonfinite/loss"] is not None
    for row in (nan_loss, nan_grad):  # the offending batch's summary: lengths and the estimator's rewards
        assert {"train/nonfinite/loss_tokens", "train/nonfinite/len_mean", "train/nonfinite/reward"} <= set(row)
    assert [rows[s]["train/nonfinite_skips"] for s in range(6)] == [0, 1, 1, 1, 2, 2]
    assert all("train/nonfinite/updates" not in rows[s] for s in (0, 2, 3, 5))
    err = capsys.readouterr().err
    assert "step 1: skipped 1 non-finite update(s) (loss nan" in err and "step 4: skipped 1" in err


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_as_diverged(smoke, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ESTIMATORS, "sampled_token", poisoned(from_call=2))  # every update from step 1 on
    run_dir = tmp_path / "run"
    summary = smoke.execute(run_dir, "train.max_nonfinite=2")
    assert summary["status"] == "diverged" and smoke.summary(run_dir)["status"] == "diverged"
    assert [r["step"] for r in smoke.metrics(run_dir)] == [0, 1, 2, 6]  # stopped after step 2; final eval
    assert summary["results"]["train/nonfinite_skips"] == 4
    assert "2 steps in a row with non-finite updates at step 2" in capsys.readouterr().err
    assert rundir.is_finished(run_dir)  # a sweep's re-run keeps the diverged result


# ----------------------------------------------------------------------------- config validation


def _schema_path_ok(field: str, message: str) -> bool:
    """``field`` is a schema field, or an unknown key directly under a schema group (message says so)."""
    cls, parts = RunConfig, re.sub(r"\[\d+\]", "", field).split(".")
    for i, part in enumerate(parts):
        fields = {f.name for f in dataclasses.fields(cls)}
        if part not in fields:
            return i == len(parts) - 1 and "unknown key" in message
        tp = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(tp):
            return i == len(parts) - 1
        cls = tp
    return True


def _leaves(cls, prefix=""):
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


LEAVES = sorted(_leaves(RunConfig))
GROUPS = sorted({p.split(".")[0] for p in LEAVES if "." in p})
junk = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.sampled_from([0, 1, 0.5, -1]))
names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
paths = st.one_of(st.sampled_from(LEAVES), st.sampled_from(GROUPS), names,
                  st.builds(lambda g, n: f"{g}.{n}", st.sampled_from(GROUPS), names))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(paths, junk, min_size=1, max_size=5))
def test_random_invalid_configs_always_give_a_config_error_naming_a_field(assignments):
    """Several random keys and values at once, at any depth: the validator accepts, or raises ConfigError (any
    other exception fails this test) whose field is in the schema or is an unknown key it names."""
    node: dict = {}
    for path, value in sorted(assignments.items()):
        *parents, leaf = path.split(".")
        cur = node
        for p in parents:
            if not isinstance(cur.get(p, {}), dict):
                break
            cur = cur.setdefault(p, {})
        else:
            cur[leaf] = value
    try:
        load_run_config(node)
    except ConfigError as err:
        assert str(err).startswith(f"config error: {err.field}: ") and "\n" not in str(err)
        assert _schema_path_ok(err.field, str(err)) or err.field == "<root>", str(err)


@pytest.mark.parametrize("node, field, words", [
    ({"model": {"teacher_path": "/x"}}, "model.teacher_path", ["'/x'", "model.kind=pretrained"]),
    ({"model": {"kind": "pretrained", "student_path": "/s"}}, "model.teacher_path", ["required"]),
    ({"eval": {"n_prompts": 300}}, "eval.n_prompts", ["300", "<= task.n_eval (200)"]),
    ({"train": {"prompts_per_step": 3, "mini_batch_size": 8}}, "train.mini_batch_size", ["8", "12"]),
])
def test_cross_field_checks_name_the_field(node, field, words):
    with pytest.raises(ConfigError) as err:
        load_run_config({"train": {"mini_batch_size": 16}} | node)
    assert err.value.field == field and all(w in str(err.value) for w in words), str(err.value)


def test_k_larger_than_the_vocabulary_fails_once_the_pair_is_loaded(smoke, tmp_path, capsys):
    from opd_exp.models.tokenization import build_tokenizer

    V = len(build_tokenizer())
    with pytest.raises(SystemExit) as exit_:
        smoke.execute(tmp_path / "run", "estimator=topk_rkl", f"estimator.top_k={V + 1}")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err  # a config error, even when found after loading
    assert f"config error: estimator.top_k: got {V + 1}, allowed: 1..{V} (vocab size)" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tokenizer_audit_passes_identical_warns_on_special_tokens_stops_on_vocabulary(caplog):
    from types import SimpleNamespace

    from opd_exp.models.tokenization import ALT_EOS, Convention, build_tokenizer
    from opd_exp.train.loop import check_pair_tokenizers

    task = SimpleNamespace(convention=Convention())

    def pair(teacher_tokenizer):  # no models: their generation configs add no stop ids to the probes
        return SimpleNamespace(teacher_tokenizer=teacher_tokenizer, tokenizer=build_tokenizer(), student=None,
                               teacher=None)

    check_pair_tokenizers(pair(build_tokenizer()), task)
    assert not caplog.records  # an identical pair passes silently
    other_eos = build_tokenizer()
    other_eos.eos_token = ALT_EOS
    check_pair_tokenizers(pair(other_eos), task)
    assert "EOS differs" in caplog.text and "tokenizer audit" in caplog.text  # the report, and training goes on
    bigger = build_tokenizer()
    bigger.add_tokens(["<extra>"])
    with pytest.raises(ConfigError) as err:
        check_pair_tokenizers(pair(bigger), task)
    assert err.value.field == "model.teacher_path" and "vocabularies differ" in str(err.value)


# ----------------------------------------------------------------------------- missing, truncated, malformed files


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _pretrained(smoke, tmp_path, role_to_break: str):
    """Overrides loading the smoke pair as model.kind=pretrained, with a copy of ``role_to_break`` to damage."""
    broken = tmp_path / role_to_break
    shutil.copytree(smoke.entry / role_to_break, broken)
    dirs = {r: smoke.entry / r for r in ("teacher", "student", "tokenizer")} | {role_to_break: broken}
    return broken, ["model.kind=pretrained", f"model.teacher_path={dirs['teacher']}",
                    f"model.student_path={dirs['student']}", f"model.tokenizer_path={dirs['tokenizer']}"]


FILE_FAULTS = {  # name -> (role to copy and damage, damage(dir), words expected in the one-line error)
    "truncated_weights": ("student", lambda d: _truncate(d / "model.safetensors"),
                          ["student checkpoint", "cannot be loaded"]),
    "malformed_config": ("student", lambda d: (d / "config.json").write_text("{\"hidden_size\": 3"),
                         ["student checkpoint", "config.json is malformed"]),
    "missing_weights": ("teacher", lambda d: (d / "model.safetensors").unlink(), ["teacher checkpoint", "no weights"]),
    "missing_tokenizer": ("tokenizer", lambda d: [p.unlink() for p in d.iterdir()],
                          ["student tokenizer", "no tokenizer files"]),
    "malformed_tokenizer": ("tokenizer", lambda d: (d / "tokenizer.json").write_text("{not json"),
                            ["student tokenizer", "cannot be loaded"]),
}


@pytest.mark.parametrize("fault", sorted(FILE_FAULTS))
def test_broken_model_files_give_one_line_naming_the_file(smoke, tmp_path, capsys, fault):
    role, damage, words = FILE_FAULTS[fault]
    broken, overrides = _pretrained(smoke, tmp_path, role)
    damage(broken)
    with pytest.raises(SystemExit) as exit_:
        smoke.execute(tmp_path / "run", *overrides)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if str(broken) in ln]
    assert all(w in line for w in words), line
    assert smoke.summary(tmp_path / "run")["error"] == line


@pytest.mark.parametrize("text, words", [
    ("{not json\n", ["not valid JSONL"]),
    ('{"question": "1 + 2", "answer": 3}\n{"question": "2 + ', ["not valid JSONL"]),  # torn last line
    ('{"question": "1 + 2"}\n', ["rows lack", "answer"]),
])
def test_malformed_dataset_file_names_the_file_and_the_problem(smoke, tmp_path, capsys, text, words):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    with pytest.raises(SystemExit):
        smoke.execute(tmp_path / "run", f"task.dataset_path={path}")
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"config error: task.dataset_path: {path}" in err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("damage, words", [
    (lambda p: _truncate(p), "is unreadable"),
    (lambda p: p.write_bytes(b"not a checkpoint"), "is unreadable"),
    (lambda p: torch.save({"step": 3}, p), "is not a training checkpoint (missing model, optimizer"),
])
def test_corrupt_training_checkpoint_names_the_file(smoke, reference_run, tmp_path, capsys, damage, words):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "run_summary.json").unlink()  # an unfinished run, so that it resumes from the checkpoint
    damage(run_dir / CKPT)
    with pytest.raises(SystemExit):
        smoke.execute(run_dir)
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"checkpoint {run_dir / CKPT} {words}" in err


# ----------------------------------------------------------------------------- nothing written is lost


def test_finished_run_is_left_untouched_unless_overwrite(smoke, reference_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    before = smoke.files(run_dir)
    assert smoke.execute(run_dir)["status"] == "completed"
    assert "already finished; skipping" in capsys.readouterr().out
    assert smoke.files(run_dir) == before
    assert smoke.execute(run_dir, "overwrite=true")["status"] == "completed"
    assert "resuming" not in capsys.readouterr().out  # trained from scratch, not "resumed" at the last step
    assert smoke.summary(run_dir)["attempt"] == 1
    assert smoke.metrics(run_dir) == smoke.metrics(reference_run)


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "run_summary.json"
    rundir.atomic_write_json(path, {"status": "completed"})
    with pytest.raises(TypeError):
        rundir.atomic_write_json(path, {"status": object()})  # fails half-way through serialising
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert [p.name for p in tmp_path.iterdir()] == ["run_summary.json"]  # no temp file left behind


# ----------------------------------------------------------------------------- the bootstrap cache


@pytest.fixture
def fake_training(smoke, monkeypatch):
    """bootstrap.train_member replaced by a slow copy of the session's pair; returns the roles it built."""
    built = []

    def train_member(role, m, boot, task_cfg, tokenizer, out):
        built.append(role)
        time.sleep(0.3)  # long enough for a concurrent bootstrap to arrive while this one holds the lock
        shutil.copytree(smoke.entry / role, out / role)
        return {"accuracy": {}}

    monkeypatch.setattr(bootstrap, "train_member", train_member)
    return built


def test_concurrent_bootstraps_of_one_pair_train_it_once(smoke, tmp_path, fake_training):
    from opd_exp.models.pair import load_pair

    cfg = smoke.run_config(f"model.cache_dir={tmp_path / 'cache'}")
    barrier, entries, errors = threading.Barrier(2), [], []

    def bootstrap_it():
        barrier.wait()
        try:
            entries.append(bootstrap.ensure_tiny_pair(cfg.model, cfg.task))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=bootstrap_it) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(entries) == 2 and entries[0] == entries[1]
    assert fake_training == ["teacher", "student"]  # one bootstrap trained, the other waited on the lock
    assert bootstrap.is_complete(entries[0])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [entries[0].name, entries[0].name + ".lock"]
    assert load_pair(cfg.model, cfg.task).student is not None


def test_half_written_cache_entry_is_never_loaded(smoke, tmp_path, fake_training):
    cfg = smoke.run_config(f"model.cache_dir={tmp_path / 'cache'}")
    entry = bootstrap.entry_dir(cfg.model, cfg.task)
    shutil.copytree(smoke.entry, entry)
    (entry / bootstrap.COMPLETE).unlink()  # killed before the marker: its files may be half-written
    _truncate(entry / "student" / "model.safetensors")
    assert bootstrap.ensure_tiny_pair(cfg.model, cfg.task) == entry
    assert fake_training == ["teacher", "student"]  # rebuilt, not loaded
    assert (entry / "student" / "model.safetensors").read_bytes() == \
        (smoke.entry / "student" / "model.safetensors").read_bytes()


def test_git_dirty_flags_code_and_config_not_results_or_prose(tmp_path):
    """A run is dirty when code or config differ from the commit; results/ (timings.tsv is appended while
    scripts/reproduce_paper.sh runs) and Markdown do not count."""
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for path in ("results/timings.tsv", "README.md", "conf/x.yaml", "pkg/mod.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("a\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (tmp_path / "pkg" / "new.py").write_text("untracked\n")
    assert rundir.git_dirty(tmp_path / "pkg") is False
    (tmp_path / "results" / "timings.tsv").write_text("b\n")
    (tmp_path / "README.md").write_text("b\n")
    assert rundir.git_dirty(tmp_path / "pkg") is False
    (tmp_path / "conf" / "x.yaml").write_text("b\n")
    assert rundir.git_dirty(tmp_path / "pkg") is True
