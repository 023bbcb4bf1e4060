"""Training-state checkpoints: written atomically, holding everything a bit-exact resume needs.

``<run_dir>/checkpoints/last.pt`` holds the student's weights (whole, also when the student is sharded over
torchrun's ranks: gathered onto rank 0, which writes the file), the optimizer and scheduler states, the RNG
states (torch, numpy, python), the next step (the data position: prompts of step s are a pure function of
the run seed and s) and the loop's own state (the evaluation before training, counters).

A checkpoint that cannot be used (truncated, not a checkpoint, or weights of another model) raises
:class:`CheckpointError` naming the file and the problem; the entrypoint prints it as one line.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opd_exp.train import fsdp

CHECKPOINT = Path("checkpoints") / "last.pt"
KEYS = ("step", "model", "optimizer", "scheduler", "rng", "loop_state")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be resumed from; the message names the file and the problem."""


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: str | Path, *, step: int, model_state: dict, optimizer_state: dict, scheduler,
         loop_state: dict) -> Path:
    """Write the checkpoint to a temp file and rename it over ``last.pt`` (a kill never leaves half a file).
    ``model_state``, ``optimizer_state``: from :func:`train_states`."""
    path = Path(run_dir) / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"step": step, "model": model_state, "optimizer": optimizer_state,
               "scheduler": scheduler.state_dict(), "rng": rng_state(), "loop_state": loop_state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".last.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # the rename must never publish a file whose bytes are not on disk yet
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(run_dir: str | Path) -> dict | None:
    """The last checkpoint, or None when the run has none. A corrupt file raises :class:`CheckpointError`."""
    path = Path(run_dir) / CHECKPOINT
    for stale in path.parent.glob(".last.*.tmp"):  # left by a kill during a save; never renamed, never read
        stale.unlink(missing_ok=True)
    if not path.exists():
        return None
    hint = "delete it (or the run dir) to restart the run from scratch"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated/corrupt files
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {first}); {hint}") from None
    missing = [k for k in KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint (missing {', '.join(missing)}); "
                              f"{hint}")
    ckpt["path"] = str(path)
    return ckpt


def train_states(model, optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's state dicts as a checkpoint holds them. A sharded model's (FSDP2) are
    gathered whole onto rank 0 (a collective: every rank calls it; the other ranks get empty dicts), so its
    model weights have the keys and shapes of the unsharded model; its optimizer state is keyed by parameter
    name (``torch.distributed.checkpoint.state_dict``), so it resumes only under ``train.parallel=fsdp``."""
    if fsdp.is_sharded(model):
        return fsdp.full_states(model, optimizer)
    return model.state_dict(), optimizer.state_dict()


def restore(ckpt: dict, *, model, optimizer, scheduler) -> None:
    """Load every state of ``ckpt`` (from :func:`load`) in place; a mismatch raises :class:`CheckpointError`.
    A sharded model takes its shard of the whole weights and optimizer state (every rank calls it)."""
    try:
        if fsdp.is_sharded(model):
            fsdp.load_full_states(model, optimizer, ckpt["model"], ckpt["optimizer"])
        else:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:  # another model's weights, a changed config
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint {ckpt.get('path', CHECKPOINT)} does not fit this run "
                              f"({type(err).__name__}: {first}); delete it to restart from scratch") from None
