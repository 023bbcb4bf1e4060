"""Training-state checkpoints: written atomically, holding everything a bit-exact resume needs.

``<run_dir>/checkpoints/last.pt`` holds the student's weights, the optimizer and scheduler states, the RNG
states (torch, numpy, python), the next step (the data position: prompts of step s are a pure function of
the run seed and s) and the loop's own state (the evaluation before training, counters).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = Path("checkpoints") / "last.pt"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: str | Path, *, step: int, model, optimizer, scheduler, loop_state: dict) -> Path:
    """Write the checkpoint to a temp file and rename it over ``last.pt`` (a kill never leaves half a file)."""
    path = Path(run_dir) / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "rng": rng_state(), "loop_state": loop_state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".last.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(run_dir: str | Path) -> dict | None:
    """The last checkpoint, or None when the run has none. A corrupt file raises naming the file."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated/corrupt files
        raise RuntimeError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                           "delete it to restart the run from scratch") from err


def restore(ckpt: dict, *, model, optimizer, scheduler) -> None:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
