"""Reuse a finished run whose training is the same as this one's (``reuse=true``).

The paper's tables share cells: Ours at seed 0 is a cell of Table 1 (matched pair, no mask), Table 3, Table 4 (V1)
and Figure 6, and sampled-token OPD one of Tables 1 and 3. Their resolved configs are equal but for the
experiment's name and report layout, and a run is a deterministic function of its config, its code and its pair
(the same cells agree to the digit across sweeps, README "Paper tables"), so a cell whose key matches a finished
run copies that run's outputs instead of training again.

    key = sha256(resolved config without IGNORED, git commit)

A run is recorded (``<cache>/runs/<key>.json``: where it is) when it completes on a clean checkout; a later cell
with the same key copies its metrics.jsonl, diag/ and results (not its checkpoints) and says so in its summary
(``reused_from``). Nothing is reused from a dirty or unknown checkout, a run that is not ``completed``, a run dir
that has started (it resumes instead), or a record whose run dir moved, changed key or lost its summary.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from opd_exp import rundir

# keys that name or lay out a run, never change what it computes
IGNORED = ("experiment", "report", "overwrite", "wandb", "reuse")
# a reused run's summary keeps these from its source (what the run computed)
COPIED = ("status", "results", "pair", "eval_prompts", "interrupted_at_step")


def run_key(resolved_cfg: dict, commit: str | None, dirty: bool | None) -> str | None:
    """The run's identity, or None when its code is not one clean commit (nothing is reused or recorded then)."""
    if not commit or dirty is not False:
        return None
    kept = {k: v for k, v in resolved_cfg.items() if k not in IGNORED}
    text = json.dumps(kept, sort_keys=True, default=str) + commit
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _record_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "runs" / f"{key}.json"


def record(cache_dir: Path, key: str, run_dir: Path) -> None:
    """Remember that ``run_dir`` (completed, its summary carrying ``reuse_key``) computed ``key``."""
    path = _record_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write_json(path, {"run_dir": str(Path(run_dir).resolve())})


def find(cache_dir: Path, key: str, run_dir: Path) -> Path | None:
    """A completed run dir recorded under ``key`` (not ``run_dir`` itself), else None."""
    path = _record_path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        source = Path(rundir.read_json(path)["run_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    summary = rundir.read_summary(source)
    if source == Path(run_dir).resolve() or not summary:
        return None
    if summary.get("status") != "completed" or summary.get("reuse_key") != key:
        return None
    return source


def copy_into(source: Path, run_dir: Path) -> dict:
    """Copy ``source``'s metrics and raw samples into ``run_dir``; returns what its summary says it computed,
    with ``reused_from``."""
    shutil.copy2(source / rundir.METRICS, run_dir / rundir.METRICS)
    if (source / "diag").is_dir():
        shutil.copytree(source / "diag", run_dir / "diag", dirs_exist_ok=True)
    summary = rundir.read_summary(source) or {}
    return {k: summary[k] for k in COPIED if k in summary} | {"reused_from": str(source)}
