"""The distillation objectives: pure tensor functions over student logits, teacher scores and masks.

Interface (the training loop relies on exactly this; see opd_exp/train/loop.py):

- ``ESTIMATORS[name] = EstimatorSpec(loss=..., needs=...)``.
- ``spec.needs(cfg) -> Needs``: what the loop must provide (teacher sampled-token log-probs, teacher top-K,
  full teacher log-probs, teacher log-probs at the old student's top-K ids, and whose rollouts to train on).
- ``spec.loss(student_logits_BTV, batch, cfg) -> LossOutput``: ``student_logits_BTV`` are the current
  student's logits at the completion positions (position t predicts ``batch.tokens_BT[:, t]``), with grad.
  The loss is already aggregated (token-mean over ``batch.mask_BT`` of the mini-batch); an all-masked batch
  gives 0, not NaN.

Shapes: B rollouts, T completion positions, V vocabulary, K support size.

The family: ``sampled_token`` and ``seq_rkl`` (per-token reward, discounted return, PPO surrogate);
``full_rkl``, ``forward_kl``, ``jsd`` (exact full-vocabulary divergences, chunked, analytic gradient);
``topk_rkl`` (the paper's LSM and its support variants V1-V5, conf/estimator/topk_*.yaml); ``seq_kd`` (SFT on
teacher rollouts). Loss masks (special tokens, entropy top-q) are in opd_exp/objectives/masks.py. Every loss computes in
float32 (float64 for float64 logits) whatever the logits' dtype, and returns a gradient in the logits' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from opd_exp.config import EstimatorConfig
from opd_exp.config.validation import ConfigError


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


# --- helpers --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (bf16/fp16 logits are promoted inside every loss), else the input's dtype."""
    return torch.promote_types(dtype, torch.float32)


def _token_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """sum_{mask} values / max(#mask, 1). ``where`` (not a product) so that inf/NaN at masked-out positions
    neither leaks into the value nor into the gradient; an all-masked batch gives exactly 0."""
    total = torch.where(mask_BT, values_BT, torch.zeros((), dtype=values_BT.dtype, device=values_BT.device))
    return total.sum() / mask_BT.sum().clamp(min=1)


def _masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """Metric version of :func:`_token_mean` (no grad, python float)."""
    with torch.no_grad():
        return float(_token_mean(values_BT.detach().float(), mask_BT))


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


class _SelectedLogProbs(torch.autograd.Function):
    """log p(ids) = z[ids] - logsumexp_V(z) for a few ids per position, chunked over positions.

    logits_BTV (any float dtype) and ids_BTK (long) -> (B, T, K) in the compute dtype. Forward keeps only the
    (B, T) logsumexp; backward writes d/dz = scatter(g) - (sum_k g_k) softmax(z) chunk by chunk into ONE
    gradient buffer of the logits' dtype, so no (B, T, V) float32 temporary outlives a chunk (autograd's
    gather + logsumexp would allocate two (B, T, V) gradients plus a softmax).
    """

    @staticmethod
    def forward(ctx, logits_BTV, ids_BTK, chunk_size):
        V, K = logits_BTV.shape[-1], ids_BTK.shape[-1]
        z_NV, ids_NK = logits_BTV.reshape(-1, V), ids_BTK.reshape(-1, K)
        cdtype = _compute_dtype(logits_BTV.dtype)
        out_NK = torch.empty(ids_NK.shape, dtype=cdtype, device=logits_BTV.device)
        lse_N = torch.empty(z_NV.shape[0], dtype=cdtype, device=logits_BTV.device)
        for s, e in _chunks(z_NV.shape[0], chunk_size):
            z = z_NV[s:e].to(cdtype)
            lse_N[s:e] = torch.logsumexp(z, -1)
            out_NK[s:e] = z.gather(-1, ids_NK[s:e]) - lse_N[s:e, None]
        ctx.save_for_backward(logits_BTV, ids_BTK, lse_N)
        ctx.chunk_size = chunk_size
        return out_NK.view(ids_BTK.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_BTK):
        logits_BTV, ids_BTK, lse_N = ctx.saved_tensors
        V, K = logits_BTV.shape[-1], ids_BTK.shape[-1]
        z_NV, ids_NK = logits_BTV.reshape(-1, V), ids_BTK.reshape(-1, K)
        g_NK = grad_BTK.reshape(-1, K).to(lse_N.dtype)
        grad_NV = torch.empty(z_NV.shape, dtype=logits_BTV.dtype, device=logits_BTV.device)
        for s, e in _chunks(z_NV.shape[0], ctx.chunk_size):
            soft = (z_NV[s:e].to(lse_N.dtype) - lse_N[s:e, None]).exp_()
            soft.mul_(-g_NK[s:e].sum(-1, keepdim=True)).scatter_add_(-1, ids_NK[s:e], g_NK[s:e])
            grad_NV[s:e] = soft
        return grad_NV.view(logits_BTV.shape), None, None


def selected_logprobs(logits_BTV: torch.Tensor, ids_BTK: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Full-vocabulary log-probs log softmax(z)[ids], (B, T, K) float32 (float64 for float64 logits)."""
    return _SelectedLogProbs.apply(logits_BTV, ids_BTK, chunk_size)


# --- sampled-token OPD and sequence-level reverse KL (score-function estimators + PPO) -------------------


def kl_reward_BT(teacher_logprobs_BT, old_logprobs_BT, kl_form: str) -> torch.Tensor:
    """Per-token reward r_t = -k(y_t) with k a single-sample estimate of KL(pi_old || q) at y_t ~ pi_old.

    With log rho = log q(y_t) - log pi_old(y_t) (Schulman, "Approximating KL divergence", 2020):
      k1 = -log rho             -> r = log q - log pi_old (the paper's A_t; unbiased, either sign)
      k2 = (log rho)^2 / 2      -> r <= 0 (biased, low variance)
      k3 = (rho - 1) - log rho  -> r <= 0 (unbiased for the KL value, log rho clamped to [-20, 20] as verl
                                   does, since rho = q/pi_old overflows on tokens the student finds unlikely)
    Only k1's score-function gradient is the reverse-KL gradient; k2/k3 as rewards give other objectives.
    """
    cdtype = _compute_dtype(teacher_logprobs_BT.dtype)
    log_rho = teacher_logprobs_BT.to(cdtype) - old_logprobs_BT.to(cdtype)
    if kl_form == "k1":
        return log_rho
    if kl_form == "k2":
        return -0.5 * log_rho.square()
    if kl_form == "k3":
        log_rho = log_rho.clamp(-20.0, 20.0)
        return -(log_rho.exp() - 1.0 - log_rho)
    raise ValueError(f"kl_form must be k1|k2|k3, got {kl_form!r}")


def discounted_returns_BT(reward_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = m_t r_t + gamma G_{t+1}, backwards within each row (PAPER.md "Estimators", g_gamma).

    Masked-out positions contribute no reward; the time index keeps counting through them (gamma^(t'-t) uses
    real positions). Padding after EOS therefore adds nothing: the sum resets at the end of each response.
    gamma = 0 gives G = r (token-level OPD), gamma = 1 the causal reward-to-go (sequence-level reverse KL).
    (B, T) float32 in, (B, T) float32 out, zero at masked-out positions.
    """
    r_BT = torch.where(mask_BT, reward_BT, torch.zeros((), dtype=reward_BT.dtype, device=reward_BT.device))
    if gamma == 0.0:
        return r_BT
    if gamma == 1.0:
        G_BT = r_BT.flip(1).cumsum(1).flip(1)
    else:
        G_BT = torch.empty_like(r_BT)
        running_B = torch.zeros_like(r_BT[:, 0])
        for t in range(r_BT.shape[1] - 1, -1, -1):
            running_B = r_BT[:, t] + gamma * running_B
            G_BT[:, t] = running_B
    return torch.where(mask_BT, G_BT, torch.zeros_like(G_BT))


def _position_mean_baseline(G_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """b_t = mean over the rows still running at t of G_t (a per-position batch mean; includes the row
    itself, so it is biased by O(1/B), as the plain batch mean of GRPO-style baselines is)."""
    G0_BT = torch.where(mask_BT, G_BT, torch.zeros_like(G_BT))
    b_T = G0_BT.sum(0) / mask_BT.sum(0).clamp(min=1)
    return torch.where(mask_BT, G_BT - b_T, torch.zeros_like(G_BT))


def ppo_surrogate(logprobs_BT, old_logprobs_BT, adv_BT, mask_BT, clip_eps: float):
    """PPO clipped surrogate, token-mean over the mask: -min(rho A, clip(rho, 1-eps, 1+eps) A),
    rho = exp(log pi_theta - log pi_old). Returns (loss, clip_frac, ppo_kl) with clip_frac the fraction of
    masked tokens whose clipped branch is active and ppo_kl the k3 estimate of KL(pi_old || pi_theta)."""
    log_ratio_BT = logprobs_BT - old_logprobs_BT.to(logprobs_BT.dtype)
    ratio_BT = log_ratio_BT.exp()
    surr1_BT = ratio_BT * adv_BT
    surr2_BT = ratio_BT.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv_BT
    loss = _token_mean(-torch.minimum(surr1_BT, surr2_BT), mask_BT)
    clip_frac = _masked_mean((surr2_BT < surr1_BT).float(), mask_BT)
    ppo_kl = _masked_mean(ratio_BT - 1.0 - log_ratio_BT, mask_BT)
    return loss, clip_frac, ppo_kl


def _score_function_loss(student_logits_BTV, batch: EstimatorBatch, cfg: EstimatorConfig, gamma: float):
    t = batch.teacher
    if t.sampled_logprobs_BT is None:
        raise ValueError("needs teacher.sampled_logprobs_BT (Needs.teacher_sampled)")
    mask_BT = batch.mask_BT
    logp_BT = selected_logprobs(student_logits_BTV, batch.tokens_BT[..., None], cfg.chunk_size)[..., 0]
    r_BT = kl_reward_BT(t.sampled_logprobs_BT, batch.old_logprobs_BT, cfg.kl_form)
    adv_BT = discounted_returns_BT(r_BT, mask_BT, gamma)
    if cfg.baseline == "mean":
        adv_BT = _position_mean_baseline(adv_BT, mask_BT)
    loss, clip_frac, ppo_kl = ppo_surrogate(logp_BT, batch.old_logprobs_BT, adv_BT.to(logp_BT.dtype),
                                            mask_BT, cfg.clip_eps)
    metrics = {"clip_frac": clip_frac, "reward": _masked_mean(r_BT, mask_BT), "ppo_kl": ppo_kl,
               "kl": _masked_mean(batch.old_logprobs_BT.float() - t.sampled_logprobs_BT.float(), mask_BT),
               "advantage": _masked_mean(adv_BT, mask_BT)}
    return LossOutput(loss=loss, metrics=metrics, advantages_BT=adv_BT.detach())


def sampled_token_loss(student_logits_BTV, batch: EstimatorBatch, cfg: EstimatorConfig) -> LossOutput:
    """Sampled-token OPD, the paper's baseline (PAPER.md "Estimators": Sampled-token OPD; g_gamma).

    r_t = log q(y_t) - log pi_old(y_t) (``kl_form`` k1; k2/k3 see :func:`kl_reward_BT`), A_t = sum_{t'>=t}
    gamma^(t'-t) r_t' (``gamma`` = 0: A_t = r_t), no normalisation, no baseline unless ``baseline: mean``;
    loss = token-mean over mask of the PPO clipped surrogate (``clip_eps``) with rho = pi_theta/pi_old.
    On-policy (rho = 1) and gamma = 0, E_y[grad] = grad sum_v p(v)(log p(v) - log q(v)) per position.

    student_logits_BTV: (B, T, V) any float dtype, with grad; tokens_BT long; mask_BT bool (positions in the
    loss); old_logprobs_BT and teacher.sampled_logprobs_BT (B, T) float32. Reward and return are computed in
    float32 without grad; masked-out positions get no reward, no loss and exactly zero gradient.
    Metrics: clip_frac, reward (mean r_t), kl (mean log pi_old - log q), ppo_kl, advantage.
    """
    return _score_function_loss(student_logits_BTV, batch, cfg, cfg.gamma)


def seq_rkl_loss(student_logits_BTV, batch: EstimatorBatch, cfg: EstimatorConfig) -> LossOutput:
    """Sequence-level reverse KL: :func:`sampled_token_loss` with gamma forced to 1 (``cfg.gamma`` ignored).

    grad = E[sum_t (sum_{t'>=t} r_t') s_t] (PAPER.md "Estimators": Sequence-level reverse KL), the unbiased
    score-function gradient of KL(P_theta(y_{1:T}) || Q(y_{1:T})) on-policy. ``baseline: mean`` subtracts,
    per position t, the batch mean of G_t over the rows still running at t (see _position_mean_baseline).
    """
    return _score_function_loss(student_logits_BTV, batch, cfg, 1.0)


def _needs_sampled(cfg: EstimatorConfig) -> Needs:
    return Needs(teacher_sampled=True)


# --- full-vocabulary divergences (chunked, analytic gradient) -------------------------------------------


def divergence_chunk(z_NV, logq_NV, kind: str, beta: float, want_grad: bool):
    """Per-position divergence between p = softmax(z) and q = exp(logq), and optionally d/dz (N, V).

    rkl: sum_v p (log p - log q);                      d/dz = p (f - L), f = log p - log q
    fkl: sum_v q (log q - log p);                      d/dz = p - q
    jsd: beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p (TRL's generalized_jsd_loss
         convention); d/dz = p (g - sum_v p g), g = (1 - beta)(log p - log m).
    Terms with q = 0 are 0 (x log x -> 0).
    """
    logp = torch.log_softmax(z_NV, -1)
    p = logp.exp()
    if kind == "rkl":
        f = logp.sub_(logq_NV)  # in place: two (N, V) temporaries in all
        value = _rowdot(p, f)
        return value, (p.mul_(f.sub_(value[:, None])) if want_grad else None)
    q = logq_NV.exp()
    if kind == "fkl":
        d = logp.neg_().add_(logq_NV).masked_fill_(q == 0, 0.0)  # log q - log p, 0 where q = 0
        return _rowdot(q, d), (p.sub_(q) if want_grad else None)
    logm = torch.logaddexp(logp + math.log1p(-beta), logq_NV + math.log(beta))
    value = beta * torch.where(q > 0, q * (logq_NV - logm), 0.0).sum(-1) + (1 - beta) * (p * (logp - logm)).sum(-1)
    if not want_grad:
        return value, None
    g = logp.sub_(logm).mul_(1 - beta)
    return value, p.mul_(g.sub_((p * g).sum(-1, keepdim=True)))


def _rowdot(a_NV: torch.Tensor, b_NV: torch.Tensor) -> torch.Tensor:
    """sum_v a b per row without an (N, V) product temporary."""
    return torch.bmm(a_NV[:, None, :], b_NV[:, :, None]).view(-1)


class _FullDivergence(torch.autograd.Function):
    """Per-position divergence (B, T) over the full vocabulary, processed ``chunk_size`` positions at a time.

    Choice (documented per the brief): a custom autograd Function that saves only its inputs; forward keeps
    the (B, T) values, backward recomputes each chunk and writes its analytic gradient into one buffer of the
    logits' dtype. Peak extra memory = that (B, T, V) gradient (which any loss on the logits returns) plus a
    few (chunk, V) temporaries; torch.utils.checkpoint would also work but its per-chunk slice backward
    materialises a full-size zero gradient per chunk. Masked-out positions get exactly zero gradient.
    """

    @staticmethod
    def forward(ctx, logits_BTV, teacher_logprobs_BTV, mask_BT, kind, beta, chunk_size):
        V = logits_BTV.shape[-1]
        cdtype = _compute_dtype(logits_BTV.dtype)
        z_NV, lq_NV = logits_BTV.reshape(-1, V), teacher_logprobs_BTV.reshape(-1, V)
        out_N = torch.zeros(z_NV.shape[0], dtype=cdtype, device=logits_BTV.device)
        with torch.no_grad():
            for s, e in _chunks(z_NV.shape[0], chunk_size):
                out_N[s:e] = divergence_chunk(z_NV[s:e].to(cdtype), lq_NV[s:e].to(cdtype), kind, beta, False)[0]
        ctx.save_for_backward(logits_BTV, teacher_logprobs_BTV, mask_BT)
        ctx.kind, ctx.beta, ctx.chunk_size = kind, beta, chunk_size
        return out_N.view(mask_BT.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_BT):
        logits_BTV, teacher_logprobs_BTV, mask_BT = ctx.saved_tensors
        V = logits_BTV.shape[-1]
        cdtype = _compute_dtype(logits_BTV.dtype)
        z_NV, lq_NV = logits_BTV.reshape(-1, V), teacher_logprobs_BTV.reshape(-1, V)
        g_N = torch.where(mask_BT, grad_BT, 0.0).reshape(-1).to(cdtype)
        grad_NV = torch.zeros(z_NV.shape, dtype=logits_BTV.dtype, device=logits_BTV.device)
        rows_N = mask_BT.reshape(-1)
        for s, e in _chunks(z_NV.shape[0], ctx.chunk_size):
            if not bool(rows_N[s:e].any()):
                continue  # all masked-out: the gradient stays exactly zero
            _, d = divergence_chunk(z_NV[s:e].to(cdtype), lq_NV[s:e].to(cdtype), ctx.kind, ctx.beta, True)
            d.mul_(g_N[s:e, None])
            grad_NV[s:e] = torch.where(rows_N[s:e, None], d, 0.0)
        return grad_NV.view(logits_BTV.shape), None, None, None, None, None


def full_divergence_BT(student_logits_BTV, teacher_logprobs_BTV, mask_BT, kind: str, beta: float = 0.5,
                       chunk_size: int = 1024) -> torch.Tensor:
    """Per-position divergence (B, T) in float32 (float64 for float64 logits); see :func:`divergence_chunk`."""
    return _FullDivergence.apply(student_logits_BTV, teacher_logprobs_BTV, mask_BT, kind, beta, chunk_size)


def _full_loss(student_logits_BTV, batch: EstimatorBatch, cfg: EstimatorConfig, kind: str, beta: float):
    if batch.teacher.full_logprobs_BTV is None:
        raise ValueError("needs teacher.full_logprobs_BTV (Needs.teacher_full)")
    per_pos_BT = full_divergence_BT(student_logits_BTV, batch.teacher.full_logprobs_BTV, batch.mask_BT,
                                    kind, beta, cfg.chunk_size)
    loss = _token_mean(per_pos_BT, batch.mask_BT)
    return LossOutput(loss=loss, metrics={"kl": float(loss.detach())})


def full_rkl_loss(student_logits_BTV, batch: EstimatorBatch, cfg: EstimatorConfig) -> LossOutput:
    """Exact per-token reverse KL, token-mean: sum_v p_s(v) (log p_s(v) - log q(v)) (PAPER.md "Estimators":
    the quantity sampled-token OPD estimates with one sample; LSM's K = V limit).

    student_logits_BTV (B, T, V) any float dtype (promoted to float32 inside); teacher.full_logprobs_BTV
    (B, T, V) float32; mask_BT bool. Analytic gradient through the student logits, chunked (``chunk_size``).
    """
    return _full_loss(student_logits_BTV, batch, cfg, "rkl", 1.0)


def forward_kl_loss(student_logits_BTV, batch: EstimatorBatch, cfg: EstimatorConfig) -> LossOutput:
    """Forward KL, token-mean: sum_v q(v) (log q(v) - log p_s(v)) (supervised KD / GKD with beta = 0).
    Shapes, dtypes and masking as :func:`full_rkl_loss`."""
    return _full_loss(student_logits_BTV, batch, cfg, "fkl", 0.0)


def jsd_loss(student_logits_BTV, batch: EstimatorBatch, cfg: EstimatorConfig) -> LossOutput:
    """Generalised JSD (GKD, Agarwal et al. 2024; TRL's generalized_jsd_loss convention), token-mean:
    beta KL(q || m) + (1 - beta) KL(p_s || m), m = beta q + (1 - beta) p_s. That formula vanishes at both
    ends, so as in TRL beta = 0 is the forward KL(q || p_s) and beta = 1 the reverse KL(p_s || q)
    (near the ends JSD ~ beta FKL and ~ (1 - beta) RKL). Shapes, dtypes and masking as :func:`full_rkl_loss`.
    """
    if cfg.beta == 0.0:
        return _full_loss(student_logits_BTV, batch, cfg, "fkl", 0.0)
    if cfg.beta == 1.0:
        return _full_loss(student_logits_BTV, batch, cfg, "rkl", 1.0)
    return _full_loss(student_logits_BTV, batch, cfg, "jsd", cfg.beta)


def _needs_full(cfg: EstimatorConfig) -> Needs:
    return Needs(teacher_full=True)


# --- sequence-level KD (off-policy control) ---------------------------------------------------------------


def seq_kd_loss(student_logits_BTV, batch: EstimatorBatch, cfg: EstimatorConfig) -> LossOutput:
    """SFT on teacher-sampled completions (sequence-level KD, Kim & Rush 2016; the off-policy control):
    loss = token-mean over mask of -log p_s(y_t), y ~ q. Needs rollout_policy="teacher" and no teacher
    scores. student_logits_BTV (B, T, V) any float dtype; tokens_BT long; mask_BT bool."""
    logp_BT = selected_logprobs(student_logits_BTV, batch.tokens_BT[..., None], cfg.chunk_size)[..., 0]
    loss = _token_mean(-logp_BT, batch.mask_BT)
    return LossOutput(loss=loss, metrics={"nll": float(loss.detach())})


def _needs_seq_kd(cfg: EstimatorConfig) -> Needs:
    return Needs(rollout_policy="teacher")


# --- teacher/student top-K local support matching (LSM) ---------------------------------------------------


def _check_topk_cfg(cfg: EstimatorConfig) -> None:
    if cfg.tail != "none" and cfg.normalize == "renormalized":
        raise ConfigError("estimator.tail", f"got {cfg.tail!r} with normalize='renormalized'; a tail term needs "
                          "full-vocabulary log-probs: set estimator.normalize=none")
    if cfg.tail == "sampled_is" and cfg.add_sampled:
        raise ConfigError("estimator.add_sampled", "got true with tail='sampled_is': the sampled token would "
                          "be counted both in the support and in the tail (biased); set add_sampled=false")


def support_BTK(batch: EstimatorBatch, cfg: EstimatorConfig):
    """The support S_t: ids (B, T, K'), teacher log q at them (B, T, K') and a bool validity mask.

    ``support`` teacher|student picks whose top-K; ``add_sampled`` appends y_t (K' = K + 1) with log q(y_t);
    that extra entry is valid only where y_t is not already in the top-K (duplicate-safe).
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
        y_BT1 = batch.tokens_BT[..., None]
        outside_BT1 = (ids_BTK != y_BT1).all(-1, keepdim=True)
        ids_BTK = torch.cat([ids_BTK, y_BT1], -1)
        logq_BTK = torch.cat([logq_BTK, t.sampled_logprobs_BT[..., None].to(logq_BTK.dtype)], -1)
        valid_BTK = torch.cat([valid_BTK, outside_BT1], -1)
    return ids_BTK, logq_BTK, valid_BTK


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


def topk_rkl_loss(student_logits_BTV, batch: EstimatorBatch, cfg: EstimatorConfig) -> LossOutput:
    """Top-K local support matching (LSM, the paper's fix; PAPER.md "Estimators": LSM and the support-set
    variants V1-V5), token-mean over mask of

        sum_{v in S_t} p_s(v) [log p_s(v) - log p_t(v)]  (+ tail term)

    - ``normalize: renormalized``: p_s, p_t = softmax over S_t of the gathered student logits / teacher
      log-probs (V1-V3); ``none``: full-vocabulary log-probs on S_t (V4/V5). Analytic (not an advantage).
    - ``support``: teacher top-K (teacher.topk_*) or old-student top-K (teacher.student_topk_ids_BTK,
      teacher.at_student_topk_logprobs_BTK); ``add_sampled`` appends y_t when outside (K + 1, duplicate-safe).
    - ``tail: sampled_is`` adds 1[y_t not in S_t] w_t (log p_s(y_t) - log q(y_t)), w_t = p_s(y_t)/pi_old(y_t)
      with grad through w_t and log p_s. With y_t ~ pi_old, E[term] = sum_{v not in S} p_s(v)(log p_s - log q)
      and E[grad] = sum_{v not in S} p_s grad log p_s (log p_s - log q + 1) = grad of that tail: unbiased for
      the full reverse KL in value and gradient (the +1 comes from differentiating w_t); unclipped.
      ``tail: bucket`` adds one bucket of mass 1 - sum_S for each model (see _bucket_term_BT).
    Note ``normalize: none`` without a tail is zero at p_s = q but its gradient is not: it pushes student
    mass off the support (the paper's collapse without renormalisation, Fig. 6a).

    student_logits_BTV (B, T, V) any float dtype (float32 inside); ids long; log-probs float32; mask_BT bool.
    Renormalized without tail never touches the other V - K logits (forward memory O(B T K)).
    """
    _check_topk_cfg(cfg)
    ids_BTK, logq_BTK, valid_BTK = support_BTK(batch, cfg)
    cdtype = _compute_dtype(student_logits_BTV.dtype)
    logq_BTK, K = logq_BTK.to(cdtype), ids_BTK.shape[-1]
    neg_inf = torch.tensor(float("-inf"), dtype=cdtype, device=ids_BTK.device)
    if cfg.normalize == "renormalized":
        z_BTK = torch.where(valid_BTK, student_logits_BTV.gather(-1, ids_BTK).to(cdtype), neg_inf)
        logp_BTK = torch.log_softmax(z_BTK, -1)
        logq_BTK = torch.log_softmax(torch.where(valid_BTK, logq_BTK, neg_inf), -1)
    else:
        extra = [batch.tokens_BT[..., None]] if cfg.tail == "sampled_is" else []
        logp_all = selected_logprobs(student_logits_BTV, torch.cat([ids_BTK, *extra], -1), cfg.chunk_size)
        logp_BTK = logp_all[..., :K]
    zero = torch.zeros((), dtype=cdtype, device=ids_BTK.device)
    logp0_BTK, logq0_BTK = torch.where(valid_BTK, logp_BTK, zero), torch.where(valid_BTK, logq_BTK, zero)
    per_pos_BT = (torch.where(valid_BTK, logp0_BTK.exp(), zero) * (logp0_BTK - logq0_BTK)).sum(-1)
    metrics = {"support_kl": _masked_mean(per_pos_BT, batch.mask_BT),
               "teacher_support_mass": _masked_mean(
                   torch.where(valid_BTK, logq0_BTK.exp(), zero).sum(-1), batch.mask_BT)}
    if cfg.add_sampled:
        metrics["sampled_outside_frac"] = _masked_mean(valid_BTK[..., -1].float(), batch.mask_BT)
    if cfg.tail == "bucket":
        per_pos_BT = per_pos_BT + _bucket_term_BT(logp_BTK, logq_BTK, valid_BTK)
    elif cfg.tail == "sampled_is":
        per_pos_BT = per_pos_BT + _sampled_is_tail_BT(logp_all[..., K], batch, ids_BTK, metrics)
    loss = _token_mean(per_pos_BT, batch.mask_BT)
    metrics["kl"] = float(loss.detach())
    return LossOutput(loss=loss, metrics=metrics)


def _sampled_is_tail_BT(logp_y_BT, batch: EstimatorBatch, ids_BTK, metrics: dict) -> torch.Tensor:
    """1[y_t not in S_t] (p_s(y_t)/pi_old(y_t)) (log p_s(y_t) - log q(y_t)); see :func:`topk_rkl_loss`."""
    t = batch.teacher
    if t.sampled_logprobs_BT is None:
        raise ValueError("tail='sampled_is' needs teacher.sampled_logprobs_BT (Needs.teacher_sampled)")
    outside_BT = (ids_BTK != batch.tokens_BT[..., None]).all(-1)
    w_BT = (logp_y_BT - batch.old_logprobs_BT.to(logp_y_BT.dtype)).exp()
    term_BT = w_BT * (logp_y_BT - t.sampled_logprobs_BT.to(logp_y_BT.dtype))
    metrics["tail_outside_frac"] = _masked_mean(outside_BT.float(), batch.mask_BT)
    return torch.where(outside_BT, term_BT, torch.zeros_like(term_BT))


def _needs_topk(cfg: EstimatorConfig) -> Needs:
    _check_topk_cfg(cfg)
    sampled = cfg.add_sampled or cfg.tail == "sampled_is"
    if cfg.support == "teacher":
        return Needs(teacher_sampled=sampled, teacher_topk=cfg.top_k)
    return Needs(teacher_sampled=sampled, student_topk=cfg.top_k)


ESTIMATORS.update({
    "sampled_token": EstimatorSpec(loss=sampled_token_loss, needs=_needs_sampled),
    "seq_rkl": EstimatorSpec(loss=seq_rkl_loss, needs=_needs_sampled),
    "full_rkl": EstimatorSpec(loss=full_rkl_loss, needs=_needs_full),
    "forward_kl": EstimatorSpec(loss=forward_kl_loss, needs=_needs_full),
    "jsd": EstimatorSpec(loss=jsd_loss, needs=_needs_full),
    "topk_rkl": EstimatorSpec(loss=topk_rkl_loss, needs=_needs_topk),
    "seq_kd": EstimatorSpec(loss=seq_kd_loss, needs=_needs_seq_kd),
})
