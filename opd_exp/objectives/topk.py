"""Top-K local support matching (LSM), the fix of arXiv 2603.25562, and its support-set variants V1-V5.

Per response position t, with S_t a set of K token ids (K + 1 with the sampled token),

    sum_{v in S_t} p_s(v) [log p_s(v) - log p_t(v)]  (+ a tail term for the mass outside S_t)

back-propagated analytically through the student's head (not an advantage) and aggregated over the mask
(``loss_agg``; "Estimators": LSM and the support-set variants of the paper's Table 4 ablation):

    V1  teacher top-K, renormalised over S_t (the paper's default)      support=teacher
    V2  student (pi_old) top-K + the sampled token, renormalised        support=student add_sampled=true
    V3  teacher top-K + the sampled token, renormalised                 support=teacher add_sampled=true
    V4  student top-K, full-vocabulary log-probs + a sampled tail term  support=student normalize=none tail=...
    V5  teacher top-K, full-vocabulary log-probs + a sampled tail term  support=teacher normalize=none tail=...

``tail: sampled_is`` is the text's importance-weighted tail (weighted by the sampler's own probability, so
unbiased); ``tail: sampled_is_official`` is what the official verl-agent code computes (biased, see
:func:`_sampled_tail_BT`); ``tail: bucket`` one bucket holding each model's mass outside S_t.

``topk_stop_grad: true`` (with ``normalize: none``, ``tail: none``) is the stop-gradient top-K objective of "The
Many Faces of On-Policy Distillation" (arXiv 2605.11182; official code ulab-uiuc/Open-On-Policy-Distillation,
slime/backends/megatron_utils/loss.py, ``--opd-kl-mode topk_reverse_kl_notail_sg``, K = 20 on pi_old's top-K):
sum_{v in S_t} p_s(v) [sg(log p_s(v)) - log p_t(v)], whose gradient sum_S p_s (log p_s - log p_t) grad log p_s
is the full reverse-KL gradient's terms on S_t: the + grad P_s(S_t) that pushes mass off the support without
the stop-gradient (F6(a)) is gone, and at K = V it is the full reverse-KL gradient.

``normalize: unnormalized_gkl`` is MOPD's top-K objective (arXiv 2606.30406, Eq. 5): full-vocabulary
(unrenormalised) probabilities in the generalised KL of unnormalised measures,
sum_{v in S_t} [p_s (log p_s - log p_t) - p_s + p_t], non-negative per term, zero with zero gradient at
p_s = p_t, and the full reverse KL at K = V; no tail term.
"""

from __future__ import annotations

import math

import torch

from opd_exp.config import EstimatorConfig
from opd_exp.config.validation import ConfigError
from opd_exp.objectives.base import ESTIMATORS, EstimatorSpec, LossOutput, Needs, aggregate, masked_mean, zero_outside
from opd_exp.objectives.batch import Batch
from opd_exp.objectives.head import LogitsHead
from opd_exp.objectives.kernels import compute_dtype, selected_logprobs, support_logits

SAMPLED_TAILS = ("sampled_is", "sampled_is_official")


def _check_topk_cfg(cfg: EstimatorConfig) -> None:
    if cfg.tail != "none" and cfg.normalize == "renormalized":
        raise ConfigError("estimator.tail", f"got {cfg.tail!r} with normalize='renormalized'; a tail term needs "
                          "full-vocabulary log-probs: set estimator.normalize=none")
    if cfg.tail != "none" and cfg.normalize == "unnormalized_gkl":
        raise ConfigError("estimator.tail", f"got {cfg.tail!r} with normalize='unnormalized_gkl'; MOPD's "
                          "generalised KL has no tail term: set estimator.tail=none")
    if cfg.topk_stop_grad and (cfg.normalize != "none" or cfg.tail != "none"):
        raise ConfigError("estimator.topk_stop_grad", f"got true with normalize={cfg.normalize!r}, "
                          f"tail={cfg.tail!r}; the stop-gradient top-K objective (arXiv 2605.11182) is defined on "
                          "full-vocabulary log-probs without a tail: set normalize=none tail=none (renormalised, "
                          "the stop-gradient changes nothing: sum_S grad p~ = 0)")
    if cfg.tail in SAMPLED_TAILS and cfg.add_sampled:
        raise ConfigError("estimator.add_sampled", f"got true with tail={cfg.tail!r}: the sampled token would "
                          "be counted both in the support and in the tail (biased); set add_sampled=false")


def support_BTK(batch: Batch, cfg: EstimatorConfig):
    """The support S_t: ids (B, T, K') long, teacher log q at them (B, T, K') and a bool validity mask.

    ``support`` teacher|student picks whose top-K; ``add_sampled`` appends y_t (K' = K + 1) with log q(y_t);
    that extra entry is valid only where y_t is not already in the top-K (duplicate-safe). Ids and log q are
    zeroed outside ``batch.loss_mask_BT`` (whatever they held there: -inf, NaN, out-of-range ids).
    """
    t = batch.teacher
    if cfg.support == "teacher":
        ids_BTK, logq_BTK = t.topk_ids_BTK, t.topk_logprobs_BTK
    else:
        ids_BTK, logq_BTK = t.student_topk_ids_BTK, t.at_student_topk_logprobs_BTK
    if ids_BTK is None or logq_BTK is None:
        raise ValueError(f"support={cfg.support!r} needs its top-K ids and teacher log-probs (Needs)")
    valid_BTK = torch.ones(ids_BTK.shape, dtype=torch.bool, device=ids_BTK.device)
    if cfg.add_sampled:
        if t.sampled_logprobs_BT is None:
            raise ValueError("add_sampled needs teacher.sampled_logprobs_BT (Needs.teacher_sampled)")
        y_BT1 = batch.ids_BT[..., None]
        outside_BT1 = (ids_BTK != y_BT1).all(-1, keepdim=True)
        ids_BTK = torch.cat([ids_BTK, y_BT1], -1)
        logq_BTK = torch.cat([logq_BTK, t.sampled_logprobs_BT[..., None].to(logq_BTK.dtype)], -1)
        valid_BTK = torch.cat([valid_BTK, outside_BT1], -1)
    mask_BT = batch.loss_mask_BT
    return zero_outside(ids_BTK, mask_BT), zero_outside(logq_BTK, mask_BT), valid_BTK


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 (x clamped to <= -1e-12: a support holding all the mass has tail ~0)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _bucket_term_BT(logp_BTK, logq_BTK, valid_BTK) -> torch.Tensor:
    """P (log P - log Q) with P = 1 - sum_S p, Q = 1 - sum_S q: the tail bucket of the (|S| + 1)-category
    coarse-graining (its KL is a lower bound on the full reverse KL, zero with zero gradient at p = q)."""
    neg_inf = torch.tensor(float("-inf"), dtype=logp_BTK.dtype, device=logp_BTK.device)
    logP_BT = _log1mexp(torch.logsumexp(torch.where(valid_BTK, logp_BTK, neg_inf), -1))
    logQ_BT = _log1mexp(torch.logsumexp(torch.where(valid_BTK, logq_BTK, neg_inf), -1))
    return logP_BT.exp() * (logP_BT - logQ_BT)


def _sampled_tail_BT(logp_y_BT, batch: Batch, ids_BTK, official: bool) -> torch.Tensor:
    """The sampled token's tail term, 1[y_t not in S_t] times (B, T):

    sampled_is:           w_t (log p_s(y_t) - log q(y_t)),  w_t = p_s(y_t) / pi_sampler(y_t), grad through
                          both p_s factors; pi_sampler = ``batch.sampler_logprobs_BT`` (temperature and top-p
                          applied: the distribution that drew y_t).
    sampled_is_official:  sg(log p_s(y) - log q(y)) exp(log p_s(y) - sg(log p_s(y))): value the log-ratio,
                          gradient (log p_s - log q) grad log p_s, no weight (the official code's form).
    """
    mask_BT = batch.loss_mask_BT
    if batch.teacher.sampled_logprobs_BT is None:
        raise ValueError("a sampled tail needs teacher.sampled_logprobs_BT (Needs.teacher_sampled)")
    log_ratio_BT = logp_y_BT - zero_outside(batch.teacher.sampled_logprobs_BT, mask_BT).to(logp_y_BT.dtype)
    if official:
        term_BT = log_ratio_BT.detach() * (logp_y_BT - logp_y_BT.detach()).exp()
    else:
        if batch.sampler_logprobs_BT is None:
            raise ValueError("tail='sampled_is' needs batch.sampler_logprobs_BT (the log-prob of y_t under the "
                             "distribution that sampled it)")
        log_sampler_BT = zero_outside(batch.sampler_logprobs_BT, mask_BT).to(logp_y_BT.dtype)
        term_BT = (logp_y_BT - log_sampler_BT).exp() * log_ratio_BT
    outside_BT = (ids_BTK != batch.ids_BT[..., None]).all(-1) & mask_BT
    return torch.where(outside_BT, term_BT, torch.zeros((), dtype=term_BT.dtype, device=term_BT.device))


def _support_logprobs(student: LogitsHead, batch: Batch, cfg: EstimatorConfig, ids_BTK, logq_BTK, valid_BTK):
    """(log p_s on S, log p_t on S, log p_s(y_t) or None): renormalised over S_t, or full-vocabulary
    (``normalize`` none and unnormalized_gkl)."""
    mask_BT, K = batch.loss_mask_BT, ids_BTK.shape[-1]
    cdtype = compute_dtype(student.hidden_BTH.dtype)
    logq_BTK = logq_BTK.to(cdtype)
    if cfg.normalize == "renormalized":
        neg_inf = torch.tensor(float("-inf"), dtype=cdtype, device=ids_BTK.device)
        z_BTK = support_logits(student, ids_BTK, cfg.chunk_size, mask_BT)
        return (torch.log_softmax(torch.where(valid_BTK, z_BTK, neg_inf), -1),
                torch.log_softmax(torch.where(valid_BTK, logq_BTK, neg_inf), -1), None)
    extra = [batch.ids_BT[..., None]] if cfg.tail in SAMPLED_TAILS else []
    logp_all = selected_logprobs(student, torch.cat([ids_BTK, *extra], -1), cfg.chunk_size, mask_BT)
    return logp_all[..., :K], logq_BTK, (logp_all[..., K] if extra else None)


def topk_rkl_loss(student: LogitsHead, batch: Batch, cfg: EstimatorConfig) -> LossOutput:
    """LSM and V1-V5 (module docstring), aggregated over ``batch.loss_mask_BT`` (``loss_agg``) of

        sum_{v in S_t} p_s(v) [log p_s(v) - log p_t(v)]  (+ tail term)

    - ``normalize: renormalized``: p_s, p_t = softmax over S_t of the student's logits z[S_t] (K rows of W
      gathered, never the other V - K logits) and of the teacher's log-probs (V1-V3); ``none``: full-vocabulary
      log-probs on S_t (V4/V5); ``unnormalized_gkl``: full-vocabulary, per position
      sum_{v in S_t} [p_s (log p_s - log p_t) - p_s + p_t] (MOPD, arXiv 2606.30406 Eq. 5; no tail).
    - ``tail: sampled_is``, y_t ~ pi_sampler: E[tail] = sum_{v not in S, pi_sampler(v) > 0} p_s (log p_s - log q)
      in value and gradient (the +1 of grad [p (log p - log q)] comes from differentiating w_t); with top-p = 1
      this makes the loss unbiased for the full reverse KL. ``sampled_is_official``: E[grad] =
      sum_S grad[p_s (log p_s - log q)] + sum_{v not in S} pi_sampler(v) (log p_s - log q) grad log p_s(v),
      i.e. grad RKL + grad P_theta(S) when pi_sampler = p_s (arXiv 2603.25562's official code, not its text).
      ``bucket``: one tail bucket of mass 1 - sum_S for each model (:func:`_bucket_term_BT`).
    - Without a tail ``normalize: none`` is zero at p_s = q but its gradient is not: it pushes student mass
      off the support (the paper's collapse without renormalisation, Fig. 6a).
    - ``topk_stop_grad`` (normalize none, no tail): p_s (sg[log p_s] - log p_t) per support term; same value,
      gradient sum_S p_s (log p_s - log p_t) grad log p_s (arXiv 2605.11182's stop-gradient top-K): zero at
      p_s = q, the full reverse-KL gradient at K = V.

    student: head with grad (any float dtype, float32 inside); ids long; log-probs float32; masks bool.
    Metrics: kl, support_kl, teacher_support_mass, sampled_outside_frac (add_sampled), tail_outside_frac.
    """
    _check_topk_cfg(cfg)
    mask_BT = batch.loss_mask_BT
    ids_BTK, logq_BTK, valid_BTK = support_BTK(batch, cfg)
    logp_BTK, logq_BTK, logp_y_BT = _support_logprobs(student, batch, cfg, ids_BTK, logq_BTK, valid_BTK)
    zero = torch.zeros((), dtype=logp_BTK.dtype, device=logp_BTK.device)
    logp0_BTK, logq0_BTK = torch.where(valid_BTK, logp_BTK, zero), torch.where(valid_BTK, logq_BTK, zero)
    p0_BTK = torch.where(valid_BTK, logp0_BTK.exp(), zero)
    # topk_stop_grad: the gradient is sum_S p_s (log p_s - log q) grad log p_s, without the + grad P_s(S) term
    logp_factor_BTK = logp0_BTK.detach() if cfg.topk_stop_grad else logp0_BTK
    per_pos_BT = (p0_BTK * (logp_factor_BTK - logq0_BTK)).sum(-1)
    if cfg.normalize == "unnormalized_gkl":
        per_pos_BT = per_pos_BT + (torch.where(valid_BTK, logq0_BTK.exp(), zero) - p0_BTK).sum(-1)
    metrics = {"support_kl": masked_mean(per_pos_BT, mask_BT),
               "teacher_support_mass": masked_mean(torch.where(valid_BTK, logq0_BTK.exp(), zero).sum(-1), mask_BT)}
    if cfg.add_sampled:
        metrics["sampled_outside_frac"] = masked_mean(valid_BTK[..., -1].float(), mask_BT)
    if cfg.tail == "bucket":
        per_pos_BT = per_pos_BT + _bucket_term_BT(logp_BTK, logq_BTK, valid_BTK)
    elif cfg.tail in SAMPLED_TAILS:
        per_pos_BT = per_pos_BT + _sampled_tail_BT(logp_y_BT, batch, ids_BTK, cfg.tail == "sampled_is_official")
        metrics["tail_outside_frac"] = masked_mean((ids_BTK != batch.ids_BT[..., None]).all(-1).float(), mask_BT)
    loss = aggregate(per_pos_BT, mask_BT, cfg.loss_agg)
    metrics["kl"] = float(loss.detach())
    return LossOutput(loss=loss, metrics=metrics)


def _needs_topk(cfg: EstimatorConfig) -> Needs:
    _check_topk_cfg(cfg)
    sampled = cfg.add_sampled or cfg.tail in SAMPLED_TAILS
    if cfg.support == "teacher":
        return Needs(teacher_sampled=sampled, teacher_topk=cfg.top_k)
    return Needs(teacher_sampled=sampled, student_topk=cfg.top_k)


ESTIMATORS["topk_rkl"] = EstimatorSpec(loss=topk_rkl_loss, needs=_needs_topk)
