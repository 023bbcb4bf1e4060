"""The estimator interface: a registry of (loss, needs) pairs and the aggregation they all share.

The training loop relies on exactly this:

- ``ESTIMATORS[name] = EstimatorSpec(loss=..., needs=...)``, filled by importing the estimator modules
  (``import opd_exp.objectives`` does).
- ``spec.needs(cfg) -> Needs``: what the loop must score before the update (teacher log-probs of the sampled
  tokens, the teacher's top-K, the teacher's head for full-vocabulary objectives, the teacher at pi_old's
  top-K ids) and whose rollouts to train on.
- ``spec.loss(student, batch, cfg) -> LossOutput``: ``student`` is the current student's
  :class:`~opd_exp.objectives.head.LogitsHead` at the response positions (position t predicts
  ``batch.ids_BT[:, t]``), with grad; ``batch`` a :class:`~opd_exp.objectives.batch.Batch`. The loss is
  already aggregated over ``batch.loss_mask_BT`` by :func:`aggregate` (``estimator.loss_agg``; default the
  token mean of the (mini-)batch); an all-masked batch gives 0, not NaN. Positions outside the mask may hold
  anything (-inf, NaN) in the student's hidden states and in every batch tensor: they never reach the value,
  and their gradient is exactly 0.

Shapes: B rollouts, T response positions, V vocabulary (the tokenizer's ids), H hidden size, K support size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from opd_exp.config import EstimatorConfig
from opd_exp.objectives.batch import Batch
from opd_exp.objectives.head import LogitsHead


@dataclass(frozen=True)
class Needs:
    """What an estimator asks the loop for (fields of :class:`~opd_exp.objectives.batch.TeacherScores`)."""

    teacher_sampled: bool = False  # log q(y_t) of the sampled tokens
    teacher_topk: int = 0  # teacher top-K ids and log-probs (0 = none)
    teacher_full: bool = False  # the teacher's hidden states and head (TeacherScores.full)
    student_topk: int = 0  # pi_old's top-K ids and the teacher's log-probs at them (0 = none)
    rollout_policy: str = "student"  # "student" (on-policy) or "teacher" (seq_kd, off-policy)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable, float32 (float64 for a float64 head)
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. "clip_frac", "kl"
    advantages_BT: torch.Tensor | None = None  # per-token advantage/reward when the estimator has one


@dataclass(frozen=True)
class EstimatorSpec:
    loss: Callable[[LogitsHead, Batch, EstimatorConfig], LossOutput]
    needs: Callable[[EstimatorConfig], Needs]


ESTIMATORS: dict[str, EstimatorSpec] = {}


def zero_outside(x: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """x with exact zeros at positions outside ``mask_BT`` (x is (B, T) or (B, T, ...)): a ``where``, not a
    product, so -inf / NaN there reach neither a value nor a gradient. Applied to every batch tensor an
    estimator reads before any arithmetic."""
    m = mask_BT.reshape(mask_BT.shape + (1,) * (x.dim() - mask_BT.dim()))
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def token_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """sum_{mask} values / max(#mask, 1); an all-masked batch gives exactly 0 (``where``: see zero_outside)."""
    return zero_outside(values_BT, mask_BT).sum() / mask_BT.sum().clamp(min=1)


LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def aggregate(values_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str) -> torch.Tensor:
    """The per-token loss ``values_BT`` (B, T) reduced to a scalar over ``mask_BT`` (B, T) bool
    (``estimator.loss_agg``; names and semantics of verl's ``agg_loss``, verl/trainer/ppo/core_algos.py).

    With n_b = sum_t m_bt and B' = #{b : n_b >= 1} (at least 1):

      token-mean           sum_{b,t} m_bt x_bt / max(sum_b n_b, 1)   (the text's global token mean; default)
      seq-mean-token-mean  (1/B') sum_{b: n_b >= 1} (1/n_b) sum_t m_bt x_bt
                           what arXiv 2603.25562's runs computed: micro-batch 1, token-mean per micro-batch,
                           the loss divided by the accumulation count, i.e. every sequence weighs the same
      seq-mean-token-sum   (1/B') sum_b sum_t m_bt x_bt

    Rows without a loss token are left out of B' (verl gives NaN for such a row in seq-mean-token-mean and
    counts it in the denominator of seq-mean-token-sum; the two agree whenever every row has a loss token).
    An all-masked batch gives exactly 0; positions outside the mask reach neither value nor gradient, whatever
    they hold (a ``where``, see :func:`zero_outside`).
    """
    if mode == "token-mean":
        return token_mean(values_BT, mask_BT)
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {mode!r}")
    row_sum_B = zero_outside(values_BT, mask_BT).sum(-1)
    n_B = mask_BT.sum(-1)
    rows = (n_B > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        row_sum_B = row_sum_B / n_B.clamp(min=1)
    return row_sum_B.sum() / rows


def masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """Metric version of :func:`token_mean` (no grad, python float)."""
    with torch.no_grad():
        return float(token_mean(values_BT.detach().float(), mask_BT))
