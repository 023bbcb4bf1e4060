"""Sequence-level KD (Kim & Rush, 2016): SFT on the teacher's own rollouts, the off-policy control of
arXiv 2603.25562."""

from __future__ import annotations

from opd_exp.config import EstimatorConfig
from opd_exp.objectives.base import ESTIMATORS, EstimatorSpec, LossOutput, Needs, aggregate
from opd_exp.objectives.batch import Batch
from opd_exp.objectives.head import LogitsHead
from opd_exp.objectives.kernels import selected_logprobs


def seq_kd_loss(student: LogitsHead, batch: Batch, cfg: EstimatorConfig) -> LossOutput:
    """loss = aggregate over ``batch.loss_mask_BT`` (``loss_agg``, default token-mean) of -log p_s(y_t), y ~ q
    (the teacher sampled the rows).

    Needs rollout_policy="teacher" and no teacher scores. student: head with grad (any float dtype, float32
    inside); batch.ids_BT long. Positions outside the mask are never computed (exactly zero gradient there).
    """
    logp_BT = selected_logprobs(student, batch.ids_BT[..., None], cfg.chunk_size, batch.loss_mask_BT)[..., 0]
    loss = aggregate(-logp_BT, batch.loss_mask_BT, cfg.loss_agg)
    return LossOutput(loss=loss, metrics={"nll": float(loss.detach())})


def _needs_seq_kd(cfg: EstimatorConfig) -> Needs:
    return Needs(rollout_policy="teacher")


ESTIMATORS["seq_kd"] = EstimatorSpec(loss=seq_kd_loss, needs=_needs_seq_kd)
