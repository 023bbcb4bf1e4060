"""Regression tests of four fixes to the objectives (each fails on the pre-split opd_exp/estimators.py):

a. masked-out positions holding -inf / NaN (student hidden states, logits, teacher and old log-probs) give a
   finite loss and exactly zero gradient there, for every estimator;
b. the V4/V5 tail weight divides by the sampler's log-prob (top-p applied), not by pi_old;
c. ``tail: sampled_is_official`` is the official code's biased form, with the bias arXiv 2603.25562's code has;
d. losses use the head's temperature, so PPO ratios are taken at the sampling distribution.
"""

from __future__ import annotations

import pytest
import torch
from test_estimators import ALL_CONFIGS, F64, expected_over_tokens, make_batch, random_pair, run

from opd_exp.config import EstimatorConfig
from opd_exp.objectives import ESTIMATORS, LogitsHead
from opd_exp.objectives.kernels import token_stats

# --- a. garbage outside the mask ------------------------------------------------------------------------


def _poison(batch, mask_BT):
    """-inf / NaN in every batch tensor at masked-out positions."""
    t, out = batch.teacher, ~mask_BT
    t.sampled_logprobs_BT[out] = float("-inf")
    t.topk_logprobs_BTK[out] = float("-inf")
    t.at_student_topk_logprobs_BTK[out] = float("-inf")
    t.full.hidden_BTH[out] = float("nan")
    batch.old_logprobs_BT[out] = float("nan")
    batch.sampler_logprobs_BT[out] = float("-inf")


def _projected_grads(cfg_kwargs, hidden_BTH, W_VH, batch):
    h, W = hidden_BTH.clone().requires_grad_(True), W_VH.clone().requires_grad_(True)
    cfg = EstimatorConfig(**cfg_kwargs)
    loss = ESTIMATORS[cfg.name].loss(LogitsHead(h, W, None, 0.8), batch, cfg).loss
    grads = torch.autograd.grad(loss, (h, W), allow_unused=True)
    return loss.detach(), *(torch.zeros_like(x) if g is None else g for x, g in zip((h, W), grads, strict=True))


def _mask():
    mask_BT = torch.ones(3, 6, dtype=torch.bool)
    mask_BT[0, 4:], mask_BT[1, 0], mask_BT[2, 2] = False, False, False
    return mask_BT


@pytest.mark.parametrize("variant", sorted(ALL_CONFIGS))
def test_dense_head_with_inf_and_nan_outside_the_mask(variant):
    """Student logits -inf (a whole row) and NaN at masked-out positions; teacher/old values -inf / NaN."""
    z_BTV, lq_BTV = random_pair(B=3, T=6)
    mask_BT = _mask()
    clean = make_batch(z_BTV, lq_BTV, mask_BT=mask_BT)
    dirty = make_batch(z_BTV, lq_BTV, mask_BT=mask_BT)
    _poison(dirty, mask_BT)
    z_dirty = z_BTV.clone()
    z_dirty[0, 4:] = float("-inf")
    z_dirty[1, 0], z_dirty[2, 2, 3] = float("nan"), float("-inf")
    loss, grad = run(ALL_CONFIGS[variant], z_dirty, dirty)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[~mask_BT].abs().max() == 0
    loss_ref, grad_ref = run(ALL_CONFIGS[variant], z_BTV, clean)
    assert torch.allclose(loss, loss_ref, atol=1e-12) and torch.allclose(grad, grad_ref, atol=1e-12)


@pytest.mark.parametrize("variant", sorted(ALL_CONFIGS))
def test_projected_head_with_nan_hidden_outside_the_mask(variant):
    """NaN hidden states at masked-out positions (e.g. fully masked attention rows) reach neither the loss, nor
    the hidden gradient there, nor the weight gradient (a sum over all positions)."""
    gen = torch.Generator().manual_seed(11)
    h_BTH, W_VH = torch.randn(3, 6, 5, generator=gen, dtype=F64), torch.randn(11, 5, generator=gen, dtype=F64)
    lq_BTV = torch.log_softmax(torch.randn(3, 6, 11, generator=gen, dtype=F64), -1)
    mask_BT = _mask()
    z_BTV = h_BTH @ W_VH.T
    clean = make_batch(z_BTV, lq_BTV, mask_BT=mask_BT, temperature=0.8)
    dirty = make_batch(z_BTV, lq_BTV, mask_BT=mask_BT, temperature=0.8)
    _poison(dirty, mask_BT)
    h_dirty = h_BTH.clone()
    h_dirty[~mask_BT] = float("nan")
    loss, g_h, g_W = _projected_grads(ALL_CONFIGS[variant], h_dirty, W_VH, dirty)
    loss_ref, g_h_ref, g_W_ref = _projected_grads(ALL_CONFIGS[variant], h_BTH, W_VH, clean)
    assert torch.isfinite(loss) and torch.isfinite(g_h).all() and torch.isfinite(g_W).all()
    assert g_h[~mask_BT].abs().max() == 0 and g_W.abs().max() > 0
    assert torch.allclose(loss, loss_ref, atol=1e-12)
    assert torch.allclose(g_h, g_h_ref, atol=1e-12) and torch.allclose(g_W, g_W_ref, atol=1e-12)


# --- b. the V4/V5 importance weight divides by the sampler ---------------------------------------------


def top_p_probs(logp_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling's distribution: the most likely ids until their mass reaches top_p, renormalised."""
    p_V = logp_V.exp()
    p_sorted, order = p_V.sort(descending=True)
    keep_sorted = (p_sorted.cumsum(0) - p_sorted) < top_p
    kept_V = torch.zeros_like(p_V).scatter(0, order, torch.where(keep_sorted, p_sorted, 0.0))
    return kept_V / kept_V.sum()


def _restricted_rkl(z_1V, t_1V, ids_V: torch.Tensor):
    """sum_{v in ids} p (log p - log q) and its gradient wrt z (float64 autograd)."""
    z = z_1V.clone().requires_grad_(True)
    logp, logq = torch.log_softmax(z, -1)[0], torch.log_softmax(t_1V, -1)[0]
    value = (logp.exp() * (logp - logq))[ids_V].sum()
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


@pytest.fixture(scope="module")
def triple_V30():
    gen = torch.Generator().manual_seed(21)
    # student, teacher, pi_old; pi_old flatter, so that its top-p 0.9 nucleus (16 ids) exceeds K = 8
    return tuple(scale * torch.randn(1, 30, generator=gen, dtype=F64) for scale in (2.0, 2.0, 1.0))


@pytest.mark.parametrize("support", ["teacher", "student"])
def test_sampled_is_weight_divides_by_the_top_p_sampler(triple_V30, support):
    """y ~ top-p 0.9 of pi_old, V = 30, K = 8, off-policy (pi_theta != pi_old), enumerated exactly:
    E[V4/V5 loss] = sum_{v in S} p (log p - log q) + sum_{v not in S, pi_sampler(v) > 0} p (log p - log q),
    and E[grad] is the gradient of that. With the old weight p_s / pi_old it is not (the gap is asserted)."""
    z_1V, t_1V, old_1V = triple_V30
    cfg = dict(name="topk_rkl", top_k=8, support=support, normalize="none", tail="sampled_is")
    logp_old_V = torch.log_softmax(old_1V, -1)[0]
    sampler_V = top_p_probs(logp_old_V, 0.9)
    S_V = (t_1V if support == "teacher" else old_1V)[0].topk(8).indices
    covered_V = torch.zeros(30, dtype=torch.bool).index_fill(0, S_V, True) | (sampler_V > 0)
    assert not covered_V.all()  # the nucleus misses some of the tail: the test discriminates
    value, grad = expected_over_tokens(cfg, z_1V, t_1V, old_1V=old_1V, k=8, sampler_V=sampler_V)
    ref_value, ref_grad = _restricted_rkl(z_1V, t_1V, covered_V.nonzero()[:, 0])
    assert torch.allclose(value, ref_value, atol=1e-12) and torch.allclose(grad, ref_grad, atol=1e-12)
    # the pre-fix weight p_s / pi_old with y drawn by the top-p sampler: biased in value and gradient
    old_value, old_grad = expected_over_tokens(cfg, z_1V, t_1V, old_1V=old_1V, k=8, sampler_V=sampler_V,
                                               recorded_V=logp_old_V)
    assert abs(float(old_value - ref_value)) > 1e-3 and (old_grad - ref_grad).abs().max() > 1e-3
    # top-p = 1: the sampler is pi_old and the estimator is unbiased for the full reverse KL
    value1, grad1 = expected_over_tokens(cfg, z_1V, t_1V, old_1V=old_1V, k=8)
    full_value, full_grad = _restricted_rkl(z_1V, t_1V, torch.arange(30))
    assert torch.allclose(value1, full_value, atol=1e-12) and torch.allclose(grad1, full_grad, atol=1e-12)
    assert abs(float(full_value - ref_value)) > 1e-4


def test_sampled_is_needs_the_sampler_logprobs():
    z_BTV, lq_BTV = random_pair()
    batch = make_batch(z_BTV, lq_BTV)
    batch.sampler_logprobs_BT = None
    with pytest.raises(ValueError, match="sampler_logprobs_BT"):
        run(ALL_CONFIGS["topk_v5"], z_BTV, batch)


# --- c. the official code's tail -------------------------------------------------------------------------


def test_official_tail_value_and_gradient_by_hand():
    """One position, y outside S: the official term adds log p(y) - log q(y) to the value and
    (log p(y) - log q(y)) d log p(y) / dz = (log p(y) - log q(y)) (e_y - p) / temperature to the gradient,
    whatever the sampler's log-prob."""
    z_11V = torch.tensor([[[1.0, 0.5, -0.3, 0.2, -1.0]]], dtype=F64)
    lq_11V = torch.log_softmax(torch.tensor([[[0.3, 1.2, 0.1, -0.5, 0.4]]], dtype=F64), -1)
    y, tau = 3, 0.9  # teacher top-2 = {1, 4}: y = 3 is outside
    batch = make_batch(z_11V, lq_11V, ids_BT=torch.tensor([[y]]), k=2, temperature=tau)
    batch.sampler_logprobs_BT = torch.full((1, 1), -7.0, dtype=F64)  # ignored by the official form
    base = dict(name="topk_rkl", top_k=2, normalize="none")
    loss_off, grad_off = run(base | {"tail": "sampled_is_official"}, z_11V, batch, temperature=tau)
    loss_none, grad_none = run(base, z_11V, batch, temperature=tau)
    p_V = torch.softmax(z_11V[0, 0] / tau, -1)
    log_ratio = float(p_V[y].log() - lq_11V[0, 0, y])
    e_y = torch.zeros(5, dtype=F64).index_fill(0, torch.tensor([y]), 1.0)
    assert float(loss_off - loss_none) == pytest.approx(log_ratio, abs=1e-12)
    assert torch.allclose(grad_off - grad_none, log_ratio * (e_y - p_V) / tau, atol=1e-12)


def test_official_tail_expected_gradient_has_the_support_mass_bias(triple_V30):
    """Enumerated, y ~ pi_sampler: E[grad] = sum_S grad[p (log p - log q)] + sum_{v not in S} pi_sampler(v)
    (log p - log q) grad log p(v). On-policy at top-p 1 that is grad RKL + grad P_theta(S): not the RKL gradient."""
    z_1V, t_1V, old_1V = triple_V30
    cfg = dict(name="topk_rkl", top_k=8, normalize="none", tail="sampled_is_official")
    S_V = t_1V[0].topk(8).indices
    for sampler_V, old in ((torch.softmax(z_1V, -1)[0], None), (top_p_probs(torch.log_softmax(old_1V, -1)[0], 0.9),
                                                                 old_1V)):
        value, grad = expected_over_tokens(cfg, z_1V, t_1V, old_1V=old, k=8, sampler_V=sampler_V)
        z = z_1V.clone().requires_grad_(True)
        logp, logq = torch.log_softmax(z, -1)[0], torch.log_softmax(t_1V, -1)[0]
        in_S = torch.zeros(30, dtype=torch.bool).index_fill(0, S_V, True)
        support = (logp.exp() * (logp - logq))[in_S].sum()
        tail = (sampler_V * (logp - logq).detach() * logp)[~in_S].sum()  # surrogate: its gradient is the formula
        (ref_grad,) = torch.autograd.grad(support + tail, z)
        ref_value = support.detach() + (sampler_V * (logp - logq))[~in_S].sum().detach()
        assert torch.allclose(value, ref_value, atol=1e-12) and torch.allclose(grad, ref_grad, atol=1e-12)
    # the on-policy case (the last sampler was top-p): grad RKL + grad P_theta(S), and not grad RKL
    _, grad_on = expected_over_tokens(cfg, z_1V, t_1V, k=8)
    _, full_grad = _restricted_rkl(z_1V, t_1V, torch.arange(30))
    z = z_1V.clone().requires_grad_(True)
    (grad_PS,) = torch.autograd.grad(torch.softmax(z, -1)[0, S_V].sum(), z)
    assert torch.allclose(grad_on, full_grad + grad_PS, atol=1e-12)
    assert (grad_on - full_grad).abs().max() > 1e-3


# --- d. temperature ----------------------------------------------------------------------------------------


def _tempered_setup(tau=0.7):
    gen = torch.Generator().manual_seed(31)
    h_BTH, W_VH = torch.randn(2, 4, 5, generator=gen, dtype=F64), torch.randn(9, 5, generator=gen, dtype=F64)
    lq_BTV = torch.log_softmax(torch.randn(2, 4, 9, generator=gen, dtype=F64), -1)
    batch = make_batch(h_BTH @ W_VH.T, lq_BTV, temperature=tau)  # old = sampler = log softmax(z / tau)[y]
    return h_BTH, W_VH, batch


def test_ppo_ratio_is_one_at_the_sampling_temperature():
    """pi_old recorded at temperature 0.7 (what the rollout samples from): with the head at 0.7 the first
    mini-batch's ratio is 1 (ppo_kl 0, no clipping, loss = -mean A); the raw-logit head (temperature 1, what
    the pre-fix loss received) is off by the temperature."""
    tau = 0.7
    h_BTH, W_VH, batch = _tempered_setup(tau)
    head = LogitsHead(h_BTH, W_VH, None, tau)
    assert torch.allclose(token_stats(head, batch.ids_BT).logprobs_BT, batch.old_logprobs_BT, atol=1e-12)
    cfg = EstimatorConfig(name="sampled_token")
    out = ESTIMATORS["sampled_token"].loss(head, batch, cfg)
    assert out.metrics["ppo_kl"] < 1e-12 and out.metrics["clip_frac"] == 0.0
    assert float(out.loss) == pytest.approx(-float(out.advantages_BT.mean()), abs=1e-12)
    raw = ESTIMATORS["sampled_token"].loss(LogitsHead(h_BTH, W_VH, None, 1.0), batch, cfg)
    assert raw.metrics["ppo_kl"] > 1e-3


def test_sampled_token_expected_gradient_at_temperature_is_the_tempered_rkl_gradient():
    """y ~ softmax(z / tau), enumerated at one position: E[grad] (wrt hidden and W) = grad KL(p_tau || q) of
    full_rkl on the same head; a temperature-1 head on the same samples gives another vector."""
    tau = 0.7
    h_BTH, W_VH, batch = _tempered_setup(tau)
    h_11H, lq_11V = h_BTH[:1, :1], torch.log_softmax(batch.teacher.full.hidden_BTH[:1, :1], -1)
    p_V = torch.softmax(h_11H[0, 0] @ W_VH.T / tau, -1)

    def grads(cfg_kwargs, y, head_tau):
        b = make_batch(h_11H @ W_VH.T, lq_11V, ids_BT=torch.tensor([[y]]), temperature=tau)
        h, W = h_11H.clone().requires_grad_(True), W_VH.clone().requires_grad_(True)
        cfg = EstimatorConfig(**cfg_kwargs)
        return torch.autograd.grad(ESTIMATORS[cfg.name].loss(LogitsHead(h, W, None, head_tau), b, cfg).loss, (h, W))

    for head_tau, expect_equal in ((tau, True), (1.0, False)):
        expected = [sum(p_V[y] * grads(dict(name="sampled_token"), y, head_tau)[i] for y in range(9)) for i in (0, 1)]
        full = grads(dict(name="full_rkl"), 0, tau)
        close = all(torch.allclose(e, f, atol=1e-12) for e, f in zip(expected, full, strict=True))
        assert close == expect_equal
