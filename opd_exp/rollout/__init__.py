"""Rollout backends: sample completions of prompts and return a :class:`Rollout` (see :mod:`.base`).

    from opd_exp.rollout import make_backend, rollout, stop_ids
"""

from opd_exp.rollout.base import Rollout, RolloutBackend, completion_mask, left_pad, stop_ids
from opd_exp.rollout.hf import HFGenerateBackend
from opd_exp.rollout.registry import BACKENDS, make_backend, rollout

__all__ = ["BACKENDS", "HFGenerateBackend", "Rollout", "RolloutBackend", "completion_mask", "left_pad",
           "make_backend", "rollout", "stop_ids"]
