"""The distillation objectives: pure tensor functions over student logits, teacher scores and masks.

Interface (the training loop relies on exactly this; see opd_exp/train.py):

- ``ESTIMATORS[name] = EstimatorSpec(loss=..., needs=...)``.
- ``spec.needs(cfg) -> Needs``: what the loop must provide (teacher sampled-token log-probs, teacher top-K,
  full teacher log-probs, teacher log-probs at the old student's top-K ids, and whose rollouts to train on).
- ``spec.loss(student_logits_BTV, batch, cfg) -> LossOutput``: ``student_logits_BTV`` are the current
  student's logits at the completion positions (position t predicts ``batch.tokens_BT[:, t]``), with grad.
  The loss is already aggregated (token-mean over ``batch.mask_BT`` of the mini-batch); an all-masked batch
  gives 0, not NaN.

Shapes: B rollouts, T completion positions, V vocabulary, K support size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from opd_exp.config import EstimatorConfig


@dataclass(frozen=True)
class Needs:
    """What an estimator asks the loop for."""

    teacher_sampled: bool = False  # log q(y_t) of the sampled tokens
    teacher_topk: int = 0  # teacher top-K ids and log-probs (0 = none)
    teacher_full: bool = False  # full teacher log-probs (B, T, V)
    student_topk: int = 0  # old student's top-K ids and the teacher's log-probs at them (0 = none)
    rollout_policy: str = "student"  # "student" (on-policy) or "teacher" (seq_kd, off-policy)


@dataclass
class TeacherScores:
    """Teacher-side tensors, all float32 log-probs over the full vocabulary (log q), at completion positions."""

    sampled_logprobs_BT: torch.Tensor | None = None  # log q(y_t)
    topk_ids_BTK: torch.Tensor | None = None  # teacher's top-K ids (long)
    topk_logprobs_BTK: torch.Tensor | None = None  # log q at those ids (un-renormalised)
    full_logprobs_BTV: torch.Tensor | None = None
    student_topk_ids_BTK: torch.Tensor | None = None  # old student's top-K ids (long)
    at_student_topk_logprobs_BTK: torch.Tensor | None = None  # log q at the student's top-K ids


@dataclass
class EstimatorBatch:
    """One (mini-)batch of rollouts as the estimator sees it."""

    tokens_BT: torch.Tensor  # sampled completion ids (long)
    mask_BT: torch.Tensor  # bool: positions that enter the loss (completion, not special-masked, ...)
    old_logprobs_BT: torch.Tensor  # log pi_old(y_t) before this update (float32, no grad), for PPO ratios
    teacher: TeacherScores = field(default_factory=TeacherScores)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. "clip_frac", "kl"
    advantages_BT: torch.Tensor | None = None  # per-token advantage/reward when the estimator has one


@dataclass(frozen=True)
class EstimatorSpec:
    loss: Callable[[torch.Tensor, EstimatorBatch, EstimatorConfig], LossOutput]
    needs: Callable[[EstimatorConfig], Needs]


ESTIMATORS: dict[str, EstimatorSpec] = {}
