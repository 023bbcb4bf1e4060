"""The real entrypoint in a subprocess at smoke scale (tests/conftest.py: the `smoke` fixture).

Sweeps run every estimator end to end and write one sweep dir; a re-run skips finished cells; bad configs stop
before any work with one line naming the field, the value and the allowed values (never a traceback).
"""

from __future__ import annotations

import pytest

ESTIMATORS = ["sampled_token", "seq_rkl", "full_rkl", "forward_kl", "jsd", "topk_rkl", "seq_kd"]


def test_four_cell_sweep_writes_one_sweep_dir(smoke, sweep4):
    sweep_dir, _ = sweep4
    # cells are named by their overrides
    cells = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert cells == [f"estimator={e},seed={s}" for e in ("sampled_token", "topk_rkl")
                     for s in (0, 1)]
    for cell in cells:
        summary = smoke.summary(sweep_dir / cell)
        assert summary["status"] == "completed", summary.get("error")
        rows = smoke.metrics(sweep_dir / cell)
        assert [r["step"] for r in rows] == list(range(6)) + [6]  # 6 train steps, then the final evaluation
        assert "student_after/id/avg@2" in summary["results"]
    assert smoke.metrics(sweep_dir / cells[0]) != smoke.metrics(sweep_dir / cells[1])  # seeds differ


def test_rerun_of_a_finished_sweep_skips_every_cell_untouched(smoke, sweep4):
    sweep_dir, _ = sweep4
    cells = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    before = {c.name: smoke.files(c) for c in cells}
    res = smoke.cli(*smoke.SWEEP4, sweep_dir=sweep_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("already finished; skipping") == 4
    assert {c.name: smoke.files(c) for c in cells} == before


def test_every_estimator_runs_end_to_end_as_one_sweep(smoke, tmp_path):
    sweep_dir = tmp_path / "all"
    res = smoke.cli(f"estimator={','.join(ESTIMATORS)}", "train.steps=2", "eval.teacher=false",
                    "eval.n_prompts=2", sweep_dir=sweep_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ESTIMATORS:
        (cell,) = sweep_dir.glob(f"estimator={name},*")
        summary = smoke.summary(cell)
        assert summary["status"] == "completed", (name, summary.get("error"))
        train_rows = [r for r in smoke.metrics(cell) if "train/loss" in r]
        assert len(train_rows) == 2 and all(r["train/loss"] is not None for r in train_rows), name
        assert all(r["train/updates"] == 2 and r["train/nonfinite_skips"] == 0 for r in train_rows), name


@pytest.mark.parametrize("override, words", [
    ("estimator.name=topk", ["estimator.name", "'topk'", "topk_rkl", "did you mean"]),
    ("estimator=bogus", ["estimator", "bogus", "Available options", "topk_rkl", "sampled_token"]),
    ("model=bogus", ["model", "bogus", "Available options", "tiny"]),
    ("sampling.top_p=1.5", ["sampling.top_p", "1.5", "> 0.0 and <= 1.0"]),
    ("sampling.top_p=0", ["sampling.top_p", "0", "> 0.0 and <= 1.0"]),
    ("estimator.top_k=0", ["estimator.top_k", "0", ">= 1"]),
    ("train.lr=-0.001", ["train.lr", "-0.001", "> 0.0"]),
    ("train.lrr=0.1", ["train.lrr", "unknown key", "did you mean 'lr'", "mini_batch_size"]),
    ("estimator.topk=3", ["estimator.topk", "did you mean 'top_k'"]),
])
def test_bad_config_stops_before_any_work_naming_field_value_and_allowed(smoke, tmp_path, override, words):
    run_dir = tmp_path / "run"
    res = smoke.cli(override, run_dir=run_dir, timeout=120)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout
    for word in words:
        assert word in res.stderr, (word, res.stderr)
    assert not any((run_dir / name).exists() for name in ("checkpoints", "metrics.jsonl", "run_summary.json"))


def test_topk_rkl_default_k_fits_the_default_pair(smoke):
    """`opd-exp estimator=topk_rkl` must run on the default pair (spine issue): K within its vocabulary."""
    from opd_exp.models.tokenization import build_tokenizer

    assert smoke.run_config("estimator=topk_rkl").estimator.top_k <= len(build_tokenizer())


def test_missing_checkpoint_dir_is_one_line_naming_the_path(smoke, tmp_path):
    missing = tmp_path / "no_such_model"
    res = smoke.cli("model.kind=pretrained", f"model.teacher_path={missing}",
                    f"model.student_path={smoke.entry}/student", f"model.tokenizer_path={smoke.entry}/tokenizer",
                    run_dir=tmp_path / "run", timeout=300)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert f"teacher checkpoint {missing}: no such directory" in res.stderr.splitlines()
    summary = smoke.summary(tmp_path / "run")
    assert summary["status"] == "failed" and str(missing) in summary["error"]
