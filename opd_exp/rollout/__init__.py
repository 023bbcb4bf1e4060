"""Rollout backends: sample completions of prompts and return a :class:`Rollout` (see :mod:`.base`).

    from opd_exp.rollout import make_backend, rollout, stop_ids
"""

from opd_exp.rollout.base import (
    BACKENDS,
    Rollout,
    RolloutBackend,
    completion_mask,
    left_pad,
    make_backend,
    rollout,
    stop_ids,
)
from opd_exp.rollout.hf import HFGenerateBackend

__all__ = ["BACKENDS", "HFGenerateBackend", "Rollout", "RolloutBackend", "completion_mask", "left_pad",
           "make_backend", "rollout", "stop_ids"]
