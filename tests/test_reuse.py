"""reuse=true (opd_exp/reuse.py): a cell whose training config and clean commit equal a finished run's copies it
instead of training; names and report layout do not count; a dirty checkout, another seed or a started run dir
never reuse."""

from __future__ import annotations

import pytest

from opd_exp import reuse, rundir


def test_run_key_ignores_names_and_layout_only():
    cfg = {"seed": 0, "experiment": "math_main", "report": {"title": "T1"}, "train": {"lr": 1e-4}, "reuse": True}
    same = cfg | {"experiment": "ablation_components", "report": {"title": "T3"}, "overwrite": True}
    key = reuse.run_key(cfg, "abc", dirty=False)
    assert key == reuse.run_key(same, "abc", dirty=False)
    assert key != reuse.run_key(cfg | {"seed": 1}, "abc", dirty=False)
    assert key != reuse.run_key(cfg | {"train": {"lr": 2e-4}}, "abc", dirty=False)
    assert key != reuse.run_key(cfg, "abd", dirty=False)  # other code
    assert reuse.run_key(cfg, "abc", dirty=True) is None and reuse.run_key(cfg, "abc", dirty=None) is None
    assert reuse.run_key(cfg, None, dirty=False) is None


@pytest.fixture
def clean_commit(monkeypatch):
    monkeypatch.setattr(rundir, "git_commit", lambda: "0123456789abcdef")
    monkeypatch.setattr(rundir, "git_dirty", lambda cwd=None: False)


@pytest.mark.slow
def test_a_second_cell_with_the_same_config_copies_the_first(smoke, tmp_path, clean_commit, monkeypatch):
    first = smoke.execute(tmp_path / "a", "reuse=true", "train.steps=2")
    assert first["status"] == "completed" and "reused_from" not in first
    second = smoke.execute(tmp_path / "b", "reuse=true", "train.steps=2", "++report.title=Another table")
    assert second["reused_from"] == str((tmp_path / "a").resolve())
    assert second["results"] == first["results"] and second["reuse_key"] == first["reuse_key"]
    assert smoke.metrics(tmp_path / "b") == smoke.metrics(tmp_path / "a")
    assert not (tmp_path / "b" / "checkpoints").exists()  # outputs, not checkpoints
    # another seed trains
    assert "reused_from" not in smoke.execute(tmp_path / "c", "reuse=true", "train.steps=2", "seed=1")
    # reuse=false (the default) trains
    assert "reused_from" not in smoke.execute(tmp_path / "d", "train.steps=2")
    # a dirty checkout neither reuses nor records
    monkeypatch.setattr(rundir, "git_dirty", lambda cwd=None: True)
    dirty = smoke.execute(tmp_path / "e", "reuse=true", "train.steps=2")
    assert "reused_from" not in dirty and "reuse_key" not in dirty


def test_a_moved_or_unfinished_source_is_not_reused(tmp_path):
    cache, key = tmp_path / "cache", "k" * 24
    source = tmp_path / "src"
    source.mkdir()
    reuse.record(cache, key, source)
    assert reuse.find(cache, key, tmp_path / "new") is None  # no summary
    rundir.atomic_write_json(source / rundir.SUMMARY, {"status": "failed", "reuse_key": key})
    assert reuse.find(cache, key, tmp_path / "new") is None
    rundir.atomic_write_json(source / rundir.SUMMARY, {"status": "completed", "reuse_key": "other"})
    assert reuse.find(cache, key, tmp_path / "new") is None  # the dir now holds another run
    rundir.atomic_write_json(source / rundir.SUMMARY, {"status": "completed", "reuse_key": key})
    assert reuse.find(cache, key, tmp_path / "new") == source.resolve()
    assert reuse.find(cache, key, source) is None  # never itself
