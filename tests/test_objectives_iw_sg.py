"""IW-OPD position reweighting (arXiv 2606.22600) and the stop-gradient top-K objective (arXiv 2605.11182):
identities, limit cases, hand-computed weights and masking, on dense float64 heads with the fixtures of
tests/test_estimators.py.

Run: pytest tests/test_objectives_iw_sg.py -q
"""

from __future__ import annotations

import pytest
import torch
from test_estimators import F64, make_batch, random_pair, run

from opd_exp.config import EstimatorConfig
from opd_exp.config.validation import ConfigError
from opd_exp.objectives import ESTIMATORS, LogitsHead
from opd_exp.objectives.score_function import iw_opd_weights_BT

IW = {
    "iw_sampled_token": dict(name="sampled_token", iw_opd_weight_max=1.5),
    "iw_power_opd": dict(name="power_opd", power_alpha=1.0, iw_opd_weight_max=2.0),
    "iw_vopd": dict(name="vopd", iw_opd_weight_max=1.5),
}
SG = {
    "sg_student": dict(name="topk_rkl", top_k=4, support="student", normalize="none", topk_stop_grad=True),
    "sg_teacher": dict(name="topk_rkl", top_k=4, support="teacher", normalize="none", topk_stop_grad=True),
}
# the shared checks (zero at student = teacher, masked positions, an all-masked batch) run on IW and SG in
# tests/test_objectives_new.py beside vOPD and PowerOPD


# --- IW-OPD -------------------------------------------------------------------------------------------


def test_iw_weights_hand_computed_with_a_gap():
    """d = |log q - log pi_old| = (1, -, 0, 3) with position 1 masked (NaN there): total 4, the share before each
    loss token F = (0, -, 1/4, 1/4), g = 1 + 0.5 (1 - F) = (1.5, 0, 1.375, 1.375)."""
    logq_BT = torch.tensor([[-1.0, float("nan"), -2.0, -4.0]], dtype=F64)
    old_BT = torch.tensor([[-2.0, float("inf"), -2.0, -1.0]], dtype=F64)
    mask_BT = torch.tensor([[True, False, True, True]])
    w_BT = iw_opd_weights_BT(logq_BT, old_BT, mask_BT, 1.5)
    assert torch.allclose(w_BT, torch.tensor([[1.5, 0.0, 1.375, 1.375]], dtype=F64), atol=1e-7, rtol=0)
    # w_max = 1: every loss token weighs 1; a row with no discrepancy keeps w_max everywhere (F = 0)
    assert torch.equal(iw_opd_weights_BT(logq_BT, old_BT, mask_BT, 1.0), mask_BT.to(F64))
    flat = iw_opd_weights_BT(torch.zeros(1, 3, dtype=F64), torch.zeros(1, 3, dtype=F64), torch.ones(1, 3,
                             dtype=torch.bool), 1.5)
    assert torch.equal(flat, torch.full((1, 3), 1.5, dtype=F64))


def test_iw_weights_start_at_w_max_and_do_not_increase():
    z_BTV, lq_BTV = random_pair(B=4, T=9)
    batch = make_batch(z_BTV, lq_BTV)
    w_BT = iw_opd_weights_BT(batch.teacher.sampled_logprobs_BT, batch.old_logprobs_BT, batch.loss_mask_BT, 1.5)
    assert torch.equal(w_BT[:, 0], torch.full((4,), 1.5, dtype=F64))
    assert (w_BT[:, 1:] <= w_BT[:, :-1]).all() and (w_BT >= 1.0).all() and (w_BT[:, -1] < 1.5).all()


def test_iw_advantage_is_weight_times_log_ratio():
    z_BTV, lq_BTV = random_pair()
    batch = make_batch(z_BTV, lq_BTV)
    cfg = EstimatorConfig(**IW["iw_sampled_token"])
    adv = ESTIMATORS["sampled_token"].loss(LogitsHead.dense(z_BTV.clone()), batch, cfg).advantages_BT
    log_ratio = batch.teacher.sampled_logprobs_BT - batch.old_logprobs_BT
    w = iw_opd_weights_BT(batch.teacher.sampled_logprobs_BT, batch.old_logprobs_BT, batch.loss_mask_BT, 1.5)
    assert torch.allclose(adv, w * log_ratio, atol=1e-12)


@pytest.mark.parametrize("name", ["sampled_token", "power_opd", "vopd"])
def test_iw_weight_max_one_is_the_plain_objective(name):
    """The limit case: w_max = 1 gives every token weight 1, the objective without IW-OPD, value and gradient."""
    z_BTV, lq_BTV = random_pair()
    batch = make_batch(z_BTV, lq_BTV)
    loss_1, grad_1 = run(dict(name=name, iw_opd_weight_max=1.0 + 1e-15), z_BTV, batch)
    loss_0, grad_0 = run(dict(name=name), z_BTV, batch)
    assert torch.allclose(loss_1, loss_0, atol=1e-12) and torch.allclose(grad_1, grad_0, atol=1e-12)
    assert not torch.allclose(run(dict(name=name, iw_opd_weight_max=1.5), z_BTV, batch)[1], grad_0, atol=1e-6)


def test_iw_needs_token_level():
    with pytest.raises(ConfigError, match="iw_opd_weight_max"):
        ESTIMATORS["seq_rkl"].needs(EstimatorConfig(name="seq_rkl", iw_opd_weight_max=1.5))
    with pytest.raises(ConfigError, match="gamma"):
        ESTIMATORS["sampled_token"].needs(EstimatorConfig(name="sampled_token", gamma=0.5, iw_opd_weight_max=1.5))
    assert ESTIMATORS["sampled_token"].needs(EstimatorConfig(name="sampled_token", iw_opd_weight_max=1.5))


# --- stop-gradient top-K ------------------------------------------------------------------------------


@pytest.mark.parametrize("support", ["student", "teacher"])
def test_sg_topk_with_k_equal_v_equals_full_rkl(support):
    """K = V: the support holds every id, the value is the full reverse KL and the gradient its gradient
    (sum_v grad p = 0 makes the stop-gradient change nothing there)."""
    z_BTV, lq_BTV = random_pair(V=7)
    batch = make_batch(z_BTV, lq_BTV, k=7)
    loss_sg, grad_sg = run(dict(SG["sg_student"], support=support, top_k=7), z_BTV, batch)
    loss_full, grad_full = run(dict(name="full_rkl"), z_BTV, batch)
    assert torch.allclose(loss_sg, loss_full, atol=1e-12) and torch.allclose(grad_sg, grad_full, atol=1e-12)


@pytest.mark.parametrize("variant", sorted(SG))
def test_sg_topk_gradient_is_the_rkl_gradient_terms_on_the_support(variant):
    """Against a direct formula: value sum_S p (log p - log q) (the plain normalize=none value), gradient
    sum_S p (log p - log q) grad log p, i.e. the plain truncated gradient minus grad P_s(S)."""
    z_BTV, lq_BTV = random_pair()
    batch = make_batch(z_BTV, lq_BTV)
    cfg = SG[variant]
    ids_BTK = batch.teacher.student_topk_ids_BTK if cfg["support"] == "student" else batch.teacher.topk_ids_BTK
    z = z_BTV.clone().requires_grad_(True)
    logp_BTK = torch.log_softmax(z, -1).gather(-1, ids_BTK)
    weight_BTK = (logp_BTK.exp() * (logp_BTK - lq_BTV.gather(-1, ids_BTK))).detach()
    n = batch.loss_mask_BT.sum()
    (expected_grad,) = torch.autograd.grad((weight_BTK * logp_BTK).sum() / n, z)
    loss, grad = run(cfg, z_BTV, batch)
    plain_loss, plain_grad = run(dict(cfg, topk_stop_grad=False), z_BTV, batch)
    assert torch.allclose(grad, expected_grad, atol=1e-12)
    assert torch.allclose(loss, plain_loss, atol=1e-12)
    (mass_grad,) = torch.autograd.grad(torch.log_softmax(z, -1).gather(-1, ids_BTK).exp().sum() / n, z)
    assert torch.allclose(plain_grad - grad, mass_grad, atol=1e-12) and mass_grad.abs().max() > 1e-3


def test_sg_topk_rejects_renormalised_or_tail():
    for bad in (dict(normalize="renormalized"), dict(tail="bucket"), dict(normalize="unnormalized_gkl")):
        with pytest.raises(ConfigError, match="topk_stop_grad"):
            ESTIMATORS["topk_rkl"].needs(EstimatorConfig(**dict(SG["sg_student"], **bad)))
