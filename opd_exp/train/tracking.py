"""Metrics go to ``metrics.jsonl`` always; wandb mirrors them only when enabled (imported only then).

wandb runs of one sweep share a group named after the experiment; a run's name shows its swept values
(Hydra's override dirname); the resolved config is attached. ``WANDB_MODE=offline`` needs no key or network.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from opd_exp.config import RunConfig
from opd_exp.rundir import MetricsLog


class Tracker:
    def __init__(self, run_dir: Path, cfg: RunConfig, resume_step: int = 0):
        self.log_file = MetricsLog(run_dir, truncate_from_step=resume_step)
        self.wandb_run = _init_wandb(run_dir, cfg) if cfg.wandb.enabled else None

    def log(self, step: int, metrics: dict[str, float], time_s: float | None = None) -> None:
        """Write one line; wall-time fields live under ``time/`` so that determinism checks can drop them."""
        row = dict(metrics)
        if time_s is not None:
            row["time/step_s"] = time_s
        self.log_file.log(step, row)
        if self.wandb_run is not None:
            self.wandb_run.log(row, step=step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _init_wandb(run_dir: Path, cfg: RunConfig):
    import wandb  # optional: only imported when enabled

    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, mode=cfg.wandb.mode,
                      group=cfg.wandb.group or cfg.experiment, name=run_dir.name, dir=str(run_dir),
                      config=dataclasses.asdict(cfg), id=_stable_id(run_dir), resume="allow")


def _stable_id(run_dir: Path) -> str:
    """The same run dir maps to the same wandb id, so a resumed run continues its wandb run."""
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
