"""vOPD (arXiv 2605.07865) and PowerOPD (arXiv 2606.17199): identities, exact enumeration and masking, on dense
float64 heads with the fixtures of tests/test_estimators.py.

Run: pytest tests/test_objectives_new.py -q
"""

from __future__ import annotations

import pytest
import torch
from test_estimators import F64, expected_over_tokens, make_batch, masked_pair, random_pair, run
from test_objectives_iw_sg import IW, SG

from opd_exp.config import EstimatorConfig
from opd_exp.objectives import ESTIMATORS, LogitsHead
from opd_exp.objectives.kernels import full_divergence_BT

VOPD = {
    "vopd_full": dict(name="vopd", vopd_value="full"),
    "vopd_student_topk": dict(name="vopd", vopd_value="student_topk", top_k=4),
    "vopd_teacher_topk": dict(name="vopd", vopd_value="teacher_topk", top_k=4),
}
POWER = {
    "power_a5": dict(name="power_opd", power_alpha=5.0),
    "power_a05_g05": dict(name="power_opd", power_alpha=0.5, gamma=0.5),
    "power_a1_official": dict(name="power_opd", power_alpha=1.0, power_rescale=False),
}
NEW = VOPD | POWER | IW | SG  # IW-OPD and stop-gradient top-K: tests/test_objectives_iw_sg.py


def per_token_advantages(cfg_kwargs, z_BTV, batch):
    cfg = EstimatorConfig(**cfg_kwargs)
    return ESTIMATORS[cfg.name].loss(LogitsHead.dense(z_BTV.clone()), batch, cfg).advantages_BT


@pytest.mark.parametrize("variant", sorted(NEW))
def test_student_equal_teacher_gives_zero_loss_and_gradient(variant):
    z_BTV, _ = random_pair()
    batch = make_batch(z_BTV, torch.log_softmax(z_BTV, -1))
    loss, grad = run(NEW[variant], z_BTV, batch)
    assert abs(float(loss)) < 1e-12 and grad.abs().max() < 1e-12
    adv_BT = per_token_advantages(NEW[variant], z_BTV, batch)
    assert (adv_BT is None) == (NEW[variant]["name"] == "topk_rkl")  # top-K objectives have no advantage
    assert adv_BT is None or adv_BT.abs().max() < 1e-12  # r_t = 0 (and V_t = 0)


@pytest.mark.parametrize("variant", sorted(VOPD))
def test_vopd_expected_gradient_equals_sampled_token(variant):
    """On-policy, one position, y enumerated: E_y[grad vOPD] = E_y[grad sampled_token] (the baseline is detached
    and independent of y), while the per-y gradients differ (the baseline is not 0)."""
    gen = torch.Generator().manual_seed(3)
    z_1V = 2.0 * torch.randn(1, 7, generator=gen, dtype=F64)
    t_1V = 2.0 * torch.randn(1, 7, generator=gen, dtype=F64)
    value_v, grad_v = expected_over_tokens(VOPD[variant], z_1V, t_1V, k=4)
    value_s, grad_s = expected_over_tokens(dict(name="sampled_token"), z_1V, t_1V, k=4)
    assert torch.allclose(grad_v, grad_s, atol=1e-12, rtol=0)
    assert grad_s.abs().max() > 1e-3
    # per-sample gradients: identical mean, strictly different samples, smaller spread at this context
    spread = {}
    for name, kwargs in (("vopd", VOPD[variant]), ("sampled", dict(name="sampled_token"))):
        p_V = torch.softmax(z_1V[0], -1)
        grads = [run(kwargs, z_1V[None], make_batch(z_1V[None], torch.log_softmax(t_1V, -1)[None],
                                                    ids_BT=torch.tensor([[v]]), k=4))[1] for v in range(7)]
        mean = sum(p * g for p, g in zip(p_V, grads, strict=True))
        spread[name] = float(sum(p * (g - mean).square().sum() for p, g in zip(p_V, grads, strict=True)))
    assert spread["vopd"] < spread["sampled"]


def test_vopd_advantage_is_log_ratio_plus_full_kl():
    z_BTV, lq_BTV = random_pair()
    batch = make_batch(z_BTV, lq_BTV)
    kl_BT = full_divergence_BT(LogitsHead.dense(z_BTV), batch.teacher.full, batch.loss_mask_BT, "rkl")
    expected = batch.teacher.sampled_logprobs_BT - batch.old_logprobs_BT + kl_BT
    assert torch.allclose(per_token_advantages(VOPD["vopd_full"], z_BTV, batch), expected, atol=1e-12)


def test_vopd_topk_value_is_renormalised_kl_on_the_student_topk():
    z_BTV, lq_BTV = random_pair()
    batch = make_batch(z_BTV, lq_BTV, k=4)
    ids = batch.teacher.student_topk_ids_BTK
    lp = torch.log_softmax(z_BTV, -1).gather(-1, ids)
    lq = lq_BTV.gather(-1, ids)
    lp, lq = lp - lp.logsumexp(-1, keepdim=True), lq - lq.logsumexp(-1, keepdim=True)
    kl_BT = (lp.exp() * (lp - lq)).sum(-1)
    expected = batch.teacher.sampled_logprobs_BT - batch.old_logprobs_BT + kl_BT
    assert torch.allclose(per_token_advantages(VOPD["vopd_student_topk"], z_BTV, batch), expected, atol=1e-12)


def test_vopd_needs_follow_the_value_support():
    needs = {k: ESTIMATORS["vopd"].needs(EstimatorConfig(**v)) for k, v in VOPD.items()}
    assert needs["vopd_full"].teacher_full and needs["vopd_full"].teacher_sampled
    assert needs["vopd_student_topk"].student_topk == 4 and not needs["vopd_student_topk"].teacher_full
    assert needs["vopd_teacher_topk"].teacher_topk == 4 and not needs["vopd_teacher_topk"].teacher_full
    assert ESTIMATORS["power_opd"].needs(EstimatorConfig(name="power_opd")).teacher_sampled


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_power_opd_small_alpha_is_sampled_token(gamma):
    z_BTV, lq_BTV = random_pair()
    batch = make_batch(z_BTV, lq_BTV)
    loss_p, grad_p = run(dict(name="power_opd", power_alpha=1e-8, gamma=gamma), z_BTV, batch)
    loss_s, grad_s = run(dict(name="sampled_token", gamma=gamma), z_BTV, batch)
    assert abs(float(loss_p - loss_s)) < 1e-6 and (grad_p - grad_s).abs().max() < 1e-6


def test_power_reward_is_box_cox_difference_bounded_and_sign_consistent():
    z_BTV, lq_BTV = random_pair(scale=4.0)
    batch = make_batch(z_BTV, lq_BTV)
    q, p = batch.teacher.sampled_logprobs_BT.exp(), batch.old_logprobs_BT.exp()
    for alpha in (0.5, 5.0):
        adv = per_token_advantages(dict(name="power_opd", power_alpha=alpha), z_BTV, batch)
        assert torch.allclose(adv, (q ** alpha - p ** alpha) / alpha, atol=1e-12)
        assert adv.abs().max() <= 1.0 / alpha
        assert torch.equal(adv.sign(), (q.log() - p.log()).sign())
        raw = per_token_advantages(dict(name="power_opd", power_alpha=alpha, power_rescale=False), z_BTV, batch)
        assert torch.allclose(raw, q ** alpha - p ** alpha, atol=1e-12) and raw.abs().max() <= 1.0


@pytest.mark.parametrize("variant", sorted(NEW))
def test_masked_positions_get_exactly_zero_gradient(variant):
    z_BTV, lq_BTV, mask, batch = masked_pair()
    t = batch.teacher
    t.sampled_logprobs_BT[~mask] = float("nan")
    batch.old_logprobs_BT[~mask] = float("inf")
    t.full.hidden_BTH[~mask] = float("nan")
    t.topk_logprobs_BTK[~mask] = float("-inf")
    t.at_student_topk_logprobs_BTK[~mask] = float("nan")
    t.topk_ids_BTK[~mask] = 10 ** 6
    t.student_topk_ids_BTK[~mask] = -5
    loss, grad = run(NEW[variant], z_BTV, batch)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[~mask].abs().max() == 0 and grad[mask].abs().max() > 0
    keep = make_batch(z_BTV, lq_BTV, mask_BT=mask)
    assert torch.allclose(loss, run(NEW[variant], z_BTV, keep)[0], atol=1e-12)


@pytest.mark.parametrize("variant", sorted(NEW))
def test_all_masked_batch_gives_zero_not_nan(variant):
    z_BTV, lq_BTV = random_pair(B=2, T=3)
    loss, grad = run(NEW[variant], z_BTV, make_batch(z_BTV, lq_BTV, mask_BT=torch.zeros(2, 3, dtype=torch.bool)))
    assert float(loss) == 0.0 and grad.abs().max() == 0
