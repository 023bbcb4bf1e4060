"""Score-function estimators: sampled-token OPD and sequence-level reverse KL, as an advantage fed to PPO.

arXiv 2603.25562 writes both as one discounted estimator of the reverse-KL gradient,

    g_gamma = sum_t (sum_{t' >= t} gamma^(t' - t) r_t') grad log pi_theta(y_t | c_t),   r_t = log q - log pi_old,

gamma = 0 being token-level (sampled-token) OPD, the paper's baseline, and gamma = 1 the sequence-level reverse
KL. As in the paper's official code (a verl-agent fork) the return is an advantage in a PPO clipped surrogate;
no normalisation, no baseline unless ``baseline: mean``. Two switches reproduce what that code computes where it
departs from the text (both off by default): ``reset_at_gaps`` (the return restarts at gaps in the loss mask)
and ``clip_ratio_c`` (verl's dual-clip bound on negative-advantage tokens). ``iw_opd_weight_max`` > 1 reweights
the token-level advantages by position (IW-OPD, arXiv 2606.22600; :func:`iw_opd_weights_BT`).
"""

from __future__ import annotations

import torch

from opd_exp.config import EstimatorConfig
from opd_exp.config.validation import ConfigError
from opd_exp.objectives.base import (
    ESTIMATORS,
    EstimatorSpec,
    LossOutput,
    Needs,
    aggregate,
    masked_mean,
    zero_outside,
)
from opd_exp.objectives.batch import Batch
from opd_exp.objectives.head import LogitsHead
from opd_exp.objectives.kernels import compute_dtype, full_divergence_BT, selected_logprobs


def kl_reward_BT(teacher_logprobs_BT, old_logprobs_BT, kl_form: str) -> torch.Tensor:
    """Per-token reward r_t = -k(y_t) with k a single-sample estimate of KL(pi_old || q) at y_t ~ pi_old.

    With log rho = log q(y_t) - log pi_old(y_t) (Schulman, "Approximating KL divergence", 2020):
      k1 = -log rho             -> r = log q - log pi_old (the paper's A_t; unbiased, either sign)
      k2 = (log rho)^2 / 2      -> r <= 0 (biased, low variance)
      k3 = (rho - 1) - log rho  -> r <= 0 (unbiased for the KL value, log rho clamped to [-20, 20] as verl
                                   does, since rho = q/pi_old overflows on tokens the student finds unlikely)
    Only k1's score-function gradient is the reverse-KL gradient; k2/k3 as rewards give other objectives.
    (B, T) in, (B, T) float32 out (float64 for float64 inputs).
    """
    cdtype = compute_dtype(teacher_logprobs_BT.dtype)
    log_rho = teacher_logprobs_BT.to(cdtype) - old_logprobs_BT.to(cdtype)
    if kl_form == "k1":
        return log_rho
    if kl_form == "k2":
        return -0.5 * log_rho.square()
    if kl_form == "k3":
        log_rho = log_rho.clamp(-20.0, 20.0)
        return -(log_rho.exp() - 1.0 - log_rho)
    raise ValueError(f"kl_form must be k1|k2|k3, got {kl_form!r}")


def power_reward_BT(teacher_logprobs_BT, old_logprobs_BT, alpha: float, rescale: bool = True) -> torch.Tensor:
    """PowerOPD's per-token reward (arXiv 2606.17199; official code EIT-NLP/PowerOPD, opd_dynamics/trainer.py,
    ``power_diff_full``): the Box-Cox power transform B_alpha(x) = (x^alpha - 1)/alpha applied to the teacher's
    and the old student's probability of the sampled token, differenced,

        r_t = B_alpha(q(y_t)) - B_alpha(pi_old(y_t)) = (q(y_t)^alpha - pi_old(y_t)^alpha) / alpha,

    which tends to log q - log pi_old (the k1 log-ratio) as alpha -> 0, lies in [-1/alpha, 1/alpha] for alpha > 0
    and has the sign of the log-ratio. ``rescale`` false drops the 1/alpha: r_t = q^alpha - pi_old^alpha in
    [-1, 1], what the official code and README compute (a constant factor alpha on every advantage). Computed as
    expm1(alpha log q) - expm1(alpha log pi_old) so small alpha keeps full precision. (B, T) in, (B, T) float32
    out (float64 for float64 inputs).
    """
    cdtype = compute_dtype(teacher_logprobs_BT.dtype)
    r_BT = torch.expm1(alpha * teacher_logprobs_BT.to(cdtype)) - torch.expm1(alpha * old_logprobs_BT.to(cdtype))
    return r_BT / alpha if rescale else r_BT


def vopd_value_BT(student: LogitsHead, batch: Batch, cfg: EstimatorConfig) -> torch.Tensor:
    """vOPD's per-position value baseline V_t = -KL_t(p || q) (arXiv 2605.07865, "KL for a KL"; official code
    holi-lab/vOPD, src/opd_trainer.py), no grad, (B, T) float32 (float64 for a float64 head), 0 outside the mask.

    p = softmax(student z) is the current student's distribution at position t (pi_old's at the first PPO
    epoch), q the teacher's. ``vopd_value`` picks where the KL is taken:

      full          sum_v p(v) (log p(v) - log q(v)) over the V ids, chunked (needs the teacher's head)
      student_topk  over pi_old's top-K ids, both distributions renormalised over those K (the paper's top-k
                    approximation; the official code takes the student's top-K, ``kl_top_k`` = 100)
      teacher_topk  the same over the teacher's top-K ids

    V_t does not depend on the sampled y_t, so subtracting it leaves the expected gradient unchanged.
    """
    mask_BT = batch.loss_mask_BT
    with torch.no_grad():
        if cfg.vopd_value == "full":
            if batch.teacher.full is None:
                raise ValueError("needs teacher.full, the teacher's head (Needs.teacher_full)")
            kl_BT = full_divergence_BT(student, batch.teacher.full, mask_BT, "rkl", 1.0, cfg.chunk_size)
        else:
            if cfg.vopd_value == "student_topk":
                ids_BTK, logq_BTK = batch.teacher.student_topk_ids_BTK, batch.teacher.at_student_topk_logprobs_BTK
            elif cfg.vopd_value == "teacher_topk":
                ids_BTK, logq_BTK = batch.teacher.topk_ids_BTK, batch.teacher.topk_logprobs_BTK
            else:
                raise ValueError(f"vopd_value must be full|student_topk|teacher_topk, got {cfg.vopd_value!r}")
            if ids_BTK is None or logq_BTK is None:
                raise ValueError(f"vopd_value={cfg.vopd_value} needs the batch's top-K ids and teacher log-probs")
            ids_BTK = zero_outside(ids_BTK, mask_BT)
            logp_BTK = selected_logprobs(student, ids_BTK, cfg.chunk_size, mask_BT)
            logq_BTK = zero_outside(logq_BTK, mask_BT).to(logp_BTK.dtype)
            logp_BTK = logp_BTK - logp_BTK.logsumexp(-1, keepdim=True)
            logq_BTK = logq_BTK - logq_BTK.logsumexp(-1, keepdim=True)
            kl_BTK = logp_BTK.exp() * (logp_BTK - logq_BTK)
            kl_BT = kl_BTK.sum(-1)
        return zero_outside(-kl_BT, mask_BT)


def iw_opd_weights_BT(teacher_logprobs_BT, old_logprobs_BT, mask_BT, weight_max: float) -> torch.Tensor:
    """IW-OPD's position weights (arXiv 2606.22600, "On the Position Bias of On-Policy Distillation", Algorithm 1;
    official code YannX1e/Importance-Weighted-On-Policy-Distillation, verl/verl/workers/actor/dp_actor.py,
    ``iw_opd_weight_enable``; TRL's ``IWOPDTrainer`` computes the same with gamma = w_max - 1):

        d_t = m_t |log q(y_t) - log pi_old(y_t)|,   F_{t-1} = sum_{k<t} d_k / (sum_k d_k + 1e-8),
        g_t = 1 + (w_max - 1) (1 - F_{t-1})   in [1, w_max],

    a stop-gradient weight that is w_max at the first loss token and decreases as the row's accumulated
    teacher-student discrepancy grows (later, drifted tokens weigh less). w_max = 1 gives g = 1 (plain OPD).
    The weight reads the whole row (its total discrepancy), so the reweighted estimator is not unbiased for any
    fixed objective and the paper does not claim it is. (B, T) float in, (B, T) out without grad, 0 outside the
    mask; -inf / NaN there are never read.
    """
    cdtype = compute_dtype(teacher_logprobs_BT.dtype)
    d_BT = zero_outside((teacher_logprobs_BT.to(cdtype) - old_logprobs_BT.to(cdtype)).abs(), mask_BT).detach()
    before_BT = d_BT.cumsum(-1) - d_BT
    share_BT = before_BT / (d_BT.sum(-1, keepdim=True) + 1e-8)
    return zero_outside(1.0 + (weight_max - 1.0) * (1.0 - share_BT).clamp(0.0, 1.0), mask_BT)


def discounted_returns_BT(reward_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float,
                          reset_at_gaps: bool = False) -> torch.Tensor:
    """G_t = m_t r_t + gamma G_{t+1}, backwards within each row (arXiv 2603.25562, "Estimators": g_gamma).

    Masked-out positions contribute no reward; the time index keeps counting through them (gamma^(t'-t) uses
    real positions). Padding after EOS therefore adds nothing: the sum resets at the end of each response.
    gamma = 0 gives G = r (token-level OPD), gamma = 1 the causal reward-to-go (sequence-level reverse KL).

    ``reset_at_gaps`` (``estimator.reset_at_gaps``): G_t = m_t (r_t + gamma G_{t+1}), i.e. the running sum
    restarts at every masked-out position, so the return of a contiguous segment of loss tokens holds no reward
    of a later segment (the official verl-agent code's multi-turn reading, where observations sit between
    action segments; a masked special token or an entropy-filtered token inside a response is a gap too).
    Identical to the default at gamma = 0 and on masks without interior gaps.
    (B, T) float in, (B, T) out, zero at masked-out positions.
    """
    r_BT = zero_outside(reward_BT, mask_BT)
    if gamma == 0.0:
        return r_BT
    if reset_at_gaps:
        G_BT = torch.empty_like(r_BT)
        running_B = torch.zeros_like(r_BT[:, 0])
        zero = torch.zeros((), dtype=r_BT.dtype, device=r_BT.device)
        for t in range(r_BT.shape[1] - 1, -1, -1):
            running_B = torch.where(mask_BT[:, t], r_BT[:, t] + gamma * running_B, zero)
            G_BT[:, t] = running_B
        return G_BT
    if gamma == 1.0:
        G_BT = r_BT.flip(1).cumsum(1).flip(1)
    else:
        G_BT = torch.empty_like(r_BT)
        running_B = torch.zeros_like(r_BT[:, 0])
        for t in range(r_BT.shape[1] - 1, -1, -1):
            running_B = r_BT[:, t] + gamma * running_B
            G_BT[:, t] = running_B
    return zero_outside(G_BT, mask_BT)


def position_mean_baseline_BT(G_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """G_t - b_t with b_t the mean over the rows still running at t of G_t (a per-position batch mean; it
    includes the row itself, so it is biased by O(1/B), as the plain batch mean of GRPO-style baselines is)."""
    b_T = zero_outside(G_BT, mask_BT).sum(0) / mask_BT.sum(0).clamp(min=1)
    return zero_outside(G_BT - b_T, mask_BT)


def ppo_surrogate(logprobs_BT, old_logprobs_BT, adv_BT, mask_BT, clip_eps: float, loss_agg: str = "token-mean",
                  clip_ratio_c: float | None = None):
    """PPO clipped surrogate, per token l_t = -min(rho A, clip(rho, 1-eps, 1+eps) A) = max(-A rho, -A clip(rho)),
    rho = exp(log pi_theta - log pi_old), aggregated over the mask by :func:`aggregate` (``loss_agg``).

    ``clip_ratio_c`` = c (dual-clip PPO, Ye et al. 2020, arXiv 1912.09729; verl's ``compute_policy_loss`` in
    verl/trainer/ppo/core_algos.py): where A < 0, l_t = min(max(-A rho, -A clip(rho)), -A c), so a token with
    rho > c and a negative advantage has a constant loss -A c (zero gradient) instead of a loss growing with rho;
    elsewhere, and with c = None, plain clipping. All inputs (B, T), finite (zeroed) outside the mask. Returns
    (loss, metrics): clip_frac the fraction of masked-in tokens whose clipped branch is active, ppo_kl the k3
    estimate of KL(pi_old || pi_theta) (0 iff every ratio is 1) and, with c set, clip_frac_lower the fraction
    whose dual-clip bound is active (verl's pg_clipfrac_lower: A < 0 and max(-A rho, -A clip(rho)) > -A c)."""
    log_ratio_BT = logprobs_BT - old_logprobs_BT.to(logprobs_BT.dtype)
    ratio_BT = log_ratio_BT.exp()
    surr1_BT = ratio_BT * adv_BT
    surr2_BT = ratio_BT.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv_BT
    loss_BT = -torch.minimum(surr1_BT, surr2_BT)
    metrics = {}
    if clip_ratio_c is not None:
        bound_BT = -adv_BT * clip_ratio_c
        lower_BT = (adv_BT < 0) & (loss_BT > bound_BT)
        loss_BT = torch.where(lower_BT, bound_BT, loss_BT)
        metrics["clip_frac_lower"] = masked_mean(lower_BT.float(), mask_BT)
    loss = aggregate(loss_BT, mask_BT, loss_agg)
    metrics["clip_frac"] = masked_mean((surr2_BT < surr1_BT).float(), mask_BT)
    metrics["ppo_kl"] = masked_mean(ratio_BT - 1.0 - log_ratio_BT, mask_BT)
    return loss, metrics


def _score_function_loss(student: LogitsHead, batch: Batch, cfg: EstimatorConfig, gamma: float,
                         reward: str = "kl") -> LossOutput:
    """``reward``: "kl" (:func:`kl_reward_BT`, ``kl_form``), "power" (:func:`power_reward_BT`) or "vopd"
    (k1 minus the detached value baseline of :func:`vopd_value_BT`; token-level, ``gamma``/``baseline`` unread).
    ``iw_opd_weight_max`` > 1 multiplies the advantage by :func:`iw_opd_weights_BT` (token-level only)."""
    if batch.teacher.sampled_logprobs_BT is None:
        raise ValueError("needs teacher.sampled_logprobs_BT (Needs.teacher_sampled)")
    mask_BT = batch.loss_mask_BT
    logq_BT = zero_outside(batch.teacher.sampled_logprobs_BT, mask_BT)
    old_BT = zero_outside(batch.old_logprobs_BT, mask_BT)
    logp_BT = selected_logprobs(student, batch.ids_BT[..., None], cfg.chunk_size, mask_BT)[..., 0]
    extra = {}
    if reward == "vopd":
        r_BT = kl_reward_BT(logq_BT, old_BT, "k1")
        value_BT = vopd_value_BT(student, batch, cfg).to(r_BT.dtype)
        adv_BT = zero_outside(r_BT - value_BT, mask_BT)
        extra["value"] = masked_mean(value_BT, mask_BT)
    else:
        if reward == "power":
            r_BT = power_reward_BT(logq_BT, old_BT, cfg.power_alpha, cfg.power_rescale)
        else:
            r_BT = kl_reward_BT(logq_BT, old_BT, cfg.kl_form)
        adv_BT = discounted_returns_BT(r_BT, mask_BT, gamma, cfg.reset_at_gaps)
        if cfg.baseline == "mean":
            adv_BT = position_mean_baseline_BT(adv_BT, mask_BT)
    if cfg.iw_opd_weight_max != 1.0:
        weight_BT = iw_opd_weights_BT(logq_BT, old_BT, mask_BT, cfg.iw_opd_weight_max)
        adv_BT = adv_BT * weight_BT.to(adv_BT.dtype)
        extra["iw_weight"] = masked_mean(weight_BT, mask_BT)
    loss, ppo_metrics = ppo_surrogate(logp_BT, old_BT, adv_BT.to(logp_BT.dtype), mask_BT, cfg.clip_eps,
                                      cfg.loss_agg, cfg.clip_ratio_c)
    metrics = {"clip_frac": ppo_metrics.pop("clip_frac"), "reward": masked_mean(r_BT, mask_BT),
               "ppo_kl": ppo_metrics.pop("ppo_kl"), "kl": masked_mean(old_BT.float() - logq_BT.float(), mask_BT),
               "advantage": masked_mean(adv_BT, mask_BT), **extra, **ppo_metrics}
    return LossOutput(loss=loss, metrics=metrics, advantages_BT=adv_BT.detach())


def sampled_token_loss(student: LogitsHead, batch: Batch, cfg: EstimatorConfig) -> LossOutput:
    """Sampled-token OPD, the paper's baseline (arXiv 2603.25562, "Estimators": sampled-token OPD, g_gamma).

    r_t = log q(y_t) - log pi_old(y_t) (``kl_form`` k1; k2/k3 see :func:`kl_reward_BT`), A_t = sum_{t'>=t}
    gamma^(t'-t) r_t' (``gamma`` = 0: A_t = r_t), no normalisation, no baseline unless ``baseline: mean``;
    loss = aggregate over the mask (``loss_agg``, default token-mean) of the PPO clipped surrogate (``clip_eps``;
    dual-clip with ``clip_ratio_c``, see :func:`ppo_surrogate`), rho = pi_theta/pi_old with
    pi_theta = softmax(student z), z already divided by ``student.temperature``: the ratio is taken at the
    sampling temperature, like ``batch.old_logprobs_BT``. On-policy (rho = 1) and gamma = 0,
    E_y[grad] = grad sum_v p(v)(log p(v) - log q(v)) per position.

    student: head with grad; batch.ids_BT long; loss_mask_BT bool; old_logprobs_BT and
    teacher.sampled_logprobs_BT (B, T) float32. Reward and return are float32 without grad; masked-out positions
    get no reward, no loss and exactly zero gradient.
    ``reset_at_gaps``: the return restarts at gaps in the mask (:func:`discounted_returns_BT`).
    Metrics: clip_frac, reward (mean r_t), kl (mean log pi_old - log q), ppo_kl, advantage, and with
    ``clip_ratio_c`` set clip_frac_lower.
    """
    return _score_function_loss(student, batch, cfg, cfg.gamma)


def seq_rkl_loss(student: LogitsHead, batch: Batch, cfg: EstimatorConfig) -> LossOutput:
    """Sequence-level reverse KL: :func:`sampled_token_loss` with gamma forced to 1 (``cfg.gamma`` ignored).

    grad = E[sum_t (sum_{t'>=t} r_t') s_t] (arXiv 2603.25562, "Estimators": sequence-level reverse KL), the
    unbiased score-function gradient of KL(P_theta(y_{1:T}) || Q(y_{1:T})) on-policy. ``baseline: mean``
    subtracts, per position t, the batch mean of G_t over the rows still running at t
    (:func:`position_mean_baseline_BT`).
    """
    return _score_function_loss(student, batch, cfg, 1.0)


def vopd_loss(student: LogitsHead, batch: Batch, cfg: EstimatorConfig) -> LossOutput:
    """vOPD: sampled-token OPD with a detached value baseline (arXiv 2605.07865, "KL for a KL: On-Policy
    Distillation with Control Variate Baseline"; official code holi-lab/vOPD, src/opd_trainer.py).

    A_t = r_t - V_t = (log q(y_t) - log pi_old(y_t)) + KL_t(p || q),   V_t = -KL_t from :func:`vopd_value_BT`
    (``vopd_value`` full | student_topk | teacher_topk, K = ``top_k``), fed to the same PPO clipped surrogate as
    :func:`sampled_token_loss` (``clip_eps``, ``clip_ratio_c``, ``loss_agg``). V_t is the closed-form value of
    the token-level OPD reward: E_{y ~ p}[r_t] = -KL_t(p || q) on-policy. It is detached and independent of y_t,
    so on-policy E_y[grad] equals sampled-token OPD's (sum_y p(y) grad log p(y) = 0) with lower variance. The
    official code computes log p(y_t) with the current student (detached); here pi_old's log-prob, identical
    on-policy. Token-level only: ``gamma``, ``baseline`` and ``kl_form`` are not read (the reward is k1).
    Shapes and masking as :func:`sampled_token_loss`; metrics add ``value`` (mean V_t).
    """
    return _score_function_loss(student, batch, cfg, 0.0, reward="vopd")


def power_opd_loss(student: LogitsHead, batch: Batch, cfg: EstimatorConfig) -> LossOutput:
    """PowerOPD (arXiv 2606.17199, "PowerOPD: Stabilizing On-Policy Distillation with Bounded Power
    Transformation"; official code EIT-NLP/PowerOPD): :func:`sampled_token_loss` with the log-ratio reward
    replaced by the Box-Cox power reward of :func:`power_reward_BT`,

        r_t = (q(y_t)^alpha - pi_old(y_t)^alpha) / alpha   (``power_alpha`` = alpha > 0; ``power_rescale`` false:
                                                             no 1/alpha, the official code's q^a - pi_old^a)

    bounded and sign-consistent with log q - log pi_old, which it recovers as alpha -> 0. ``gamma``,
    ``reset_at_gaps``, ``baseline``, PPO clipping and ``loss_agg`` as in sampled_token; ``kl_form`` unread.
    """
    return _score_function_loss(student, batch, cfg, cfg.gamma, reward="power")


def _check_iw_opd(cfg: EstimatorConfig, gamma: float) -> None:
    if cfg.iw_opd_weight_max != 1.0 and gamma != 0.0:
        raise ConfigError("estimator.iw_opd_weight_max", f"got {cfg.iw_opd_weight_max} with {cfg.name} at gamma = "
                          f"{gamma}; IW-OPD reweights token-level advantages: set estimator.gamma=0 "
                          "(sampled_token, power_opd, vopd) or iw_opd_weight_max=1")


def _needs_sampled(cfg: EstimatorConfig) -> Needs:
    _check_iw_opd(cfg, 1.0 if cfg.name == "seq_rkl" else cfg.gamma)
    return Needs(teacher_sampled=True)


def _needs_vopd(cfg: EstimatorConfig) -> Needs:
    if cfg.vopd_value == "full":
        return Needs(teacher_sampled=True, teacher_full=True)
    if cfg.vopd_value == "student_topk":
        return Needs(teacher_sampled=True, student_topk=cfg.top_k)
    return Needs(teacher_sampled=True, teacher_topk=cfg.top_k)


ESTIMATORS["sampled_token"] = EstimatorSpec(loss=sampled_token_loss, needs=_needs_sampled)
ESTIMATORS["seq_rkl"] = EstimatorSpec(loss=seq_rkl_loss, needs=_needs_sampled)
ESTIMATORS["vopd"] = EstimatorSpec(loss=vopd_loss, needs=_needs_vopd)
ESTIMATORS["power_opd"] = EstimatorSpec(loss=power_opd_loss, needs=_needs_sampled)
