"""Exact full-vocabulary divergences between the student and the teacher at every response position.

Both models' distributions are recomputed from their heads ``chunk_size`` positions at a time
(:func:`~opd_exp.objectives.kernels.full_divergence_BT`), so neither (B, T, V) tensor exists; the gradient is
analytic. These are the quantities the sampled-token and top-K estimators of arXiv 2603.25562 approximate
("Estimators": the per-token reverse KL that sampled-token OPD estimates with one sample and that LSM reaches
at K = V), plus the forward KL and the generalised JSD of GKD (Agarwal et al., 2024) as references.
"""

from __future__ import annotations

from opd_exp.config import EstimatorConfig
from opd_exp.objectives.base import ESTIMATORS, EstimatorSpec, LossOutput, Needs, aggregate
from opd_exp.objectives.batch import Batch
from opd_exp.objectives.head import LogitsHead
from opd_exp.objectives.kernels import full_divergence_BT


def _full_loss(student: LogitsHead, batch: Batch, cfg: EstimatorConfig, kind: str, beta: float) -> LossOutput:
    if batch.teacher.full is None:
        raise ValueError("needs teacher.full, the teacher's head (Needs.teacher_full)")
    per_pos_BT = full_divergence_BT(student, batch.teacher.full, batch.loss_mask_BT, kind, beta, cfg.chunk_size)
    loss = aggregate(per_pos_BT, batch.loss_mask_BT, cfg.loss_agg)
    return LossOutput(loss=loss, metrics={"kl": float(loss.detach())})


def full_rkl_loss(student: LogitsHead, batch: Batch, cfg: EstimatorConfig) -> LossOutput:
    """Exact per-token reverse KL, aggregated over ``batch.loss_mask_BT`` (``loss_agg``, default token-mean):

        sum_v p_s(v) (log p_s(v) - log q(v)),   p_s = softmax(student z), q = softmax(teacher z)

    over the tokenizer's V ids (arXiv 2603.25562, "Estimators": what sampled-token OPD estimates with one
    sample; LSM's K = V limit). student: head with grad (any float dtype, float32 inside); teacher.full: the
    teacher's head, no grad. Analytic gradient wrt the student's hidden states and output projection; positions
    outside the mask are never computed (exactly zero gradient there).
    """
    return _full_loss(student, batch, cfg, "rkl", 1.0)


def forward_kl_loss(student: LogitsHead, batch: Batch, cfg: EstimatorConfig) -> LossOutput:
    """Forward KL, token-mean: sum_v q(v) (log q(v) - log p_s(v)) (supervised KD; GKD with beta = 0).
    Shapes, dtypes and masking as :func:`full_rkl_loss`."""
    return _full_loss(student, batch, cfg, "fkl", 0.0)


def jsd_loss(student: LogitsHead, batch: Batch, cfg: EstimatorConfig) -> LossOutput:
    """Generalised JSD (GKD, Agarwal et al. 2024; TRL's generalized_jsd_loss convention), token-mean:
    beta KL(q || m) + (1 - beta) KL(p_s || m), m = beta q + (1 - beta) p_s. That formula vanishes at both
    ends, so as in TRL beta = 0 is the forward KL(q || p_s) and beta = 1 the reverse KL(p_s || q)
    (near the ends JSD ~ beta FKL and ~ (1 - beta) RKL). Shapes, dtypes and masking as :func:`full_rkl_loss`.
    """
    if cfg.beta == 0.0:
        return _full_loss(student, batch, cfg, "fkl", 0.0)
    if cfg.beta == 1.0:
        return _full_loss(student, batch, cfg, "rkl", 1.0)
    return _full_loss(student, batch, cfg, "jsd", cfg.beta)


def _needs_full(cfg: EstimatorConfig) -> Needs:
    return Needs(teacher_full=True)


ESTIMATORS["full_rkl"] = EstimatorSpec(loss=full_rkl_loss, needs=_needs_full)
ESTIMATORS["forward_kl"] = EstimatorSpec(loss=forward_kl_loss, needs=_needs_full)
ESTIMATORS["jsd"] = EstimatorSpec(loss=jsd_loss, needs=_needs_full)
