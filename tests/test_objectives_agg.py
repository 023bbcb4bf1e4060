"""The "as the official code ran it" switches of arXiv 2603.25562 (issue #14), each on hand-computed tensors:

- ``estimator.loss_agg``: token-mean | seq-mean-token-mean | seq-mean-token-sum (verl's ``agg_loss`` names)
- ``estimator.clip_ratio_c``: verl's dual-clip PPO for the score-function objectives
- ``estimator.reset_at_gaps``: the reward-to-go restarts at gaps in the loss mask
- ``estimator.normalize: unnormalized_gkl``: MOPD's unnormalised top-K generalised KL (arXiv 2606.30406, Eq. 5)

Every default keeps the previous behaviour bit-for-bit (token-mean is literally ``token_mean``; the other
switches are off by default and tested to change nothing where they should not).

Run: pytest -q -p no:cacheprovider tests/test_objectives_agg.py
"""

from __future__ import annotations

import math

import pytest
import torch
from test_estimators import ALL_CONFIGS, F64, make_batch, random_pair, run
from test_objectives_fixes import _mask, _poison

from opd_exp.config import EstimatorConfig, load_run_config
from opd_exp.config.validation import ConfigError
from opd_exp.objectives import ESTIMATORS, LogitsHead
from opd_exp.objectives.base import LOSS_AGG_MODES, aggregate, token_mean
from opd_exp.objectives.score_function import discounted_returns_BT, ppo_surrogate

INF, NAN = float("inf"), float("nan")


# --- 1. loss aggregation ----------------------------------------------------------------------------------


def _agg_case():
    """values (3, 4) with inf / NaN outside the mask; row 2 has no loss token.

        row 0: 1 2 3 | inf    mask 1 1 1 0   n = 3, sum 6, token mean 2
        row 1: 6 | nan 0 0    mask 1 0 0 0   n = 1, sum 6, token mean 6
        row 2: 5 5 5 5        mask 0 0 0 0   n = 0 (left out of the row count: B' = 2)
    """
    values = torch.tensor([[1.0, 2.0, 3.0, INF], [6.0, NAN, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    return values, mask


# mode -> (value, d value / d x at row 0's and row 1's loss tokens)
#   token-mean:          (1 + 2 + 3 + 6) / 4 = 3;          gradient 1/4 at every loss token
#   seq-mean-token-mean: (6/3 + 6/1) / 2 = (2 + 6) / 2 = 4; gradient 1/(2 * 3) = 1/6 in row 0, 1/(2 * 1) in row 1
#   seq-mean-token-sum:  (6 + 6) / 2 = 6;                   gradient 1/2 at every loss token
AGG_EXPECTED = {"token-mean": (3.0, 1 / 4, 1 / 4), "seq-mean-token-mean": (4.0, 1 / 6, 1 / 2),
                "seq-mean-token-sum": (6.0, 1 / 2, 1 / 2)}


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_by_hand(mode):
    values, mask = _agg_case()
    x = values.clone().requires_grad_(True)
    loss = aggregate(x, mask, mode)
    (grad,) = torch.autograd.grad(loss, x)
    value, g0, g1 = AGG_EXPECTED[mode]
    assert float(loss.detach()) == pytest.approx(value, abs=1e-15)
    expected = torch.zeros(3, 4, dtype=F64)
    expected[0, :3], expected[1, 0] = g0, g1
    assert torch.equal(grad, expected)  # exactly zero (and finite) at the inf / NaN / empty-row positions


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_all_masked_is_exactly_zero(mode):
    values, _ = _agg_case()
    x = values.clone().requires_grad_(True)
    loss = aggregate(x, torch.zeros(3, 4, dtype=torch.bool), mode)
    (grad,) = torch.autograd.grad(loss, x)
    assert float(loss.detach()) == 0.0 and not torch.isnan(loss) and torch.equal(grad, torch.zeros_like(grad))


def test_token_mean_default_is_the_old_token_mean_bit_for_bit():
    values, mask = _agg_case()
    assert EstimatorConfig().loss_agg == "token-mean"
    assert torch.equal(aggregate(values, mask, "token-mean"), token_mean(values, mask))
    gen = torch.Generator().manual_seed(3)
    v, m = torch.randn(5, 7, generator=gen), torch.rand(5, 7, generator=gen) > 0.4
    assert torch.equal(aggregate(v, m, "token-mean"), token_mean(v, m))
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate(v, m, "seq-sum")


def test_seq_kd_aggregation_by_hand():
    """Uniform student over V = 4: -log p = log 4 at every token. Rows with 3 and 1 loss tokens (a third row
    without any): token-mean = log 4, seq-mean-token-mean = (log 4 + log 4) / 2 = log 4,
    seq-mean-token-sum = (3 log 4 + 1 log 4) / 2 = 2 log 4."""
    z = torch.zeros(3, 4, 4, dtype=F64)
    _, mask = _agg_case()
    batch = make_batch(z, torch.log_softmax(z, -1), mask_BT=mask)
    expected = {"token-mean": math.log(4), "seq-mean-token-mean": math.log(4), "seq-mean-token-sum": 2 * math.log(4)}
    for mode, value in expected.items():
        loss, _ = run(dict(name="seq_kd", loss_agg=mode), z, batch)
        assert float(loss) == pytest.approx(value, abs=1e-12)


# seq_rkl with baseline: mean couples rows (a batch mean per position), so its micro-batch-1 run differs
ROW_SEPARABLE = sorted(k for k in ALL_CONFIGS if k != "seq_rkl_mean")


@pytest.mark.parametrize("variant", ROW_SEPARABLE)
def test_seq_mean_token_mean_is_micro_batch_one_with_accumulation(variant):
    """What the official runs computed: one row per micro-batch, token-mean within it, the loss divided by the
    accumulation count. seq-mean-token-mean on the whole batch gives the same value and gradient."""
    z_BTV, lq_BTV = random_pair(B=3, T=6)
    mask = _mask()
    batch = make_batch(z_BTV, lq_BTV, mask_BT=mask)
    loss, grad = run(ALL_CONFIGS[variant] | {"loss_agg": "seq-mean-token-mean"}, z_BTV, batch)
    acc_loss, acc_grad = torch.zeros((), dtype=F64), torch.zeros_like(z_BTV)
    for b in range(3):
        lb, gb = run(ALL_CONFIGS[variant], z_BTV[b:b + 1], batch.rows([b]))
        acc_loss, acc_grad[b] = acc_loss + lb / 3, gb[0] / 3
    assert torch.allclose(loss, acc_loss, atol=1e-12) and torch.allclose(grad, acc_grad, atol=1e-12)


def dirty_pair():
    """(z, log q, z with -inf/NaN outside the mask, mask, clean batch, batch poisoned outside the mask)."""
    z_BTV, lq_BTV = random_pair(B=3, T=6)
    mask = _mask()
    clean, dirty = make_batch(z_BTV, lq_BTV, mask_BT=mask), make_batch(z_BTV, lq_BTV, mask_BT=mask)
    _poison(dirty, mask)
    z_dirty = z_BTV.clone()
    z_dirty[0, 4:], z_dirty[1, 0] = -INF, NAN
    return z_BTV, lq_BTV, z_dirty, mask, clean, dirty


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("variant", sorted(ALL_CONFIGS))
def test_new_aggregations_with_inf_and_nan_outside_the_mask(variant, mode):
    z_BTV, lq_BTV, z_dirty, mask, clean, dirty = dirty_pair()
    cfg = ALL_CONFIGS[variant] | {"loss_agg": mode}
    loss, grad = run(cfg, z_dirty, dirty)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[~mask].abs().max() == 0
    loss_ref, grad_ref = run(cfg, z_BTV, clean)
    assert torch.allclose(loss, loss_ref, atol=1e-12) and torch.allclose(grad, grad_ref, atol=1e-12)
    empty = make_batch(z_BTV, lq_BTV, mask_BT=torch.zeros_like(mask))
    loss0, grad0 = run(cfg, z_BTV, empty)
    assert float(loss0) == 0.0 and grad0.abs().max() == 0


# --- 2. dual-clip PPO -------------------------------------------------------------------------------------


def _dual_clip_case():
    """Four tokens, eps = 0.2, c = 3; rho = [4, 2, 4, 0.5], A = [-1, -1, +1, -2]. Per-token loss:

        plain  l = max(-A rho, -A clip(rho, 0.8, 1.2))      dual  l' = min(l, -A c) where A < 0
        t0: max(4, 1.2) = 4     (grad wrt log pi: -A rho = 4)   -> min(4, 3) = 3   (constant: grad 0)
        t1: max(2, 1.2) = 2     (grad 2)                        -> min(2, 3) = 2   (grad 2)
        t2: max(-4, -1.2) = -1.2 (clipped, grad 0)              -> A > 0: -1.2     (grad 0)
        t3: max(1, 1.6) = 1.6   (clipped, grad 0)               -> min(1.6, 6) = 1.6 (grad 0)

    token-mean: plain (4 + 2 - 1.2 + 1.6) / 4 = 1.6, grad [1, 0.5, 0, 0]; dual (3 + 2 - 1.2 + 1.6) / 4 = 1.35,
    grad [0, 0.5, 0, 0]. clip_frac = 2/4 (t2, t3), clip_frac_lower = 1/4 (t0).
    """
    old = torch.log(torch.tensor([[0.1, 0.1, 0.1, 0.4]], dtype=F64))
    logp = torch.log(torch.tensor([[0.4, 0.2, 0.4, 0.2]], dtype=F64))
    adv = torch.tensor([[-1.0, -1.0, 1.0, -2.0]], dtype=F64)
    return logp, old, adv, torch.ones(1, 4, dtype=torch.bool)


@pytest.mark.parametrize("c, value, grad0", [(None, 1.6, 1.0), (3.0, 1.35, 0.0)])
def test_dual_clip_by_hand(c, value, grad0):
    logp, old, adv, mask = _dual_clip_case()
    x = logp.clone().requires_grad_(True)
    loss, metrics = ppo_surrogate(x, old, adv, mask, 0.2, "token-mean", c)
    (grad,) = torch.autograd.grad(loss, x)
    assert float(loss.detach()) == pytest.approx(value, abs=1e-12)
    assert torch.allclose(grad, torch.tensor([[grad0, 0.5, 0.0, 0.0]], dtype=F64), atol=1e-12)
    assert metrics["clip_frac"] == pytest.approx(0.5)
    assert ("clip_frac_lower" in metrics) == (c is not None)
    if c is not None:
        assert metrics["clip_frac_lower"] == pytest.approx(0.25)


def test_dual_clip_equals_plain_clipping_without_a_large_ratio_on_a_negative_advantage():
    """Drop t0 (the only token with rho > c and A < 0): the dual clip changes nothing, bit for bit."""
    logp, old, adv, mask = _dual_clip_case()
    mask[0, 0] = False
    outs = []
    for c in (None, 3.0):
        x = logp.clone().requires_grad_(True)
        loss, metrics = ppo_surrogate(x, old, adv, mask, 0.2, "token-mean", c)
        outs.append((loss.detach(), torch.autograd.grad(loss, x)[0]))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert float(outs[0][0]) == pytest.approx((2 - 1.2 + 1.6) / 3, abs=1e-12)
    assert metrics["clip_frac_lower"] == 0.0


@pytest.mark.parametrize("name", ["sampled_token", "seq_rkl"])
def test_dual_clip_in_the_estimators(name):
    """On-policy (rho = 1 < c) the estimator is unchanged bit for bit; with pi_old 2 nats below the current
    policy (rho = e^2 ~ 7.4 > 3) the negative-advantage tokens get the bound and zero gradient."""
    z_BTV, lq_BTV = random_pair()
    batch = make_batch(z_BTV, lq_BTV)
    plain, dual = run(dict(name=name), z_BTV, batch), run(dict(name=name, clip_ratio_c=3.0), z_BTV, batch)
    assert torch.equal(plain[0], dual[0]) and torch.equal(plain[1], dual[1])
    batch.old_logprobs_BT = batch.old_logprobs_BT - 2.0
    cfg = EstimatorConfig(name=name, clip_ratio_c=3.0)
    out = ESTIMATORS[name].loss(LogitsHead.dense(z_BTV), batch, cfg)
    negative = out.advantages_BT < 0
    assert 0 < negative.sum() < negative.numel()
    assert out.metrics["clip_frac_lower"] == pytest.approx(float(negative.double().mean()))
    _, grad = run(dict(name=name, clip_ratio_c=3.0), z_BTV, batch)
    assert grad[negative].abs().max() == 0  # dual-clipped (A < 0) and clipped (A > 0, rho > 1.2): all constant
    assert grad[~negative].abs().max() == 0
    _, grad_plain = run(dict(name=name), z_BTV, batch)
    assert grad_plain[negative].abs().max() > 0  # without the bound, A < 0 tokens keep a gradient ~ rho


@pytest.mark.parametrize("c", [1.0, 0.5, -3.0])
def test_clip_ratio_c_must_exceed_one(c):
    with pytest.raises(ConfigError) as err:
        load_run_config({"estimator": {"name": "sampled_token", "clip_ratio_c": c}})
    assert err.value.field == "estimator.clip_ratio_c"
    assert load_run_config({"estimator": {"clip_ratio_c": 3.0}}).estimator.clip_ratio_c == 3.0


# --- 3. reward-to-go reset at gaps ------------------------------------------------------------------------


def test_reset_at_gaps_by_hand():
    """r = [1, 2, inf, nan, 16, 32], mask [1, 1, 0, 0, 1, 1] (an observation at t = 2, 3), gamma = 0.5.

    default (one return, time counting through the gap): G_1 = 2 + 0.5^3 16 + 0.5^4 32 = 6,
        G_0 = 1 + 0.5 2 + 0.5^4 16 + 0.5^5 32 = 4, G_4 = 16 + 0.5 32 = 32, G_5 = 32 -> [4, 6, 0, 0, 32, 32]
    reset: G_1 = 2, G_0 = 1 + 0.5 2 = 2, the second segment as before           -> [2, 2, 0, 0, 32, 32]
    gamma = 1: default [51, 50, 0, 0, 48, 32]; reset [3, 2, 0, 0, 48, 32]. gamma = 0: both r on the mask.
    """
    r = torch.tensor([[1.0, 2.0, INF, NAN, 16.0, 32.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    cases = {(0.5, False): [4, 6, 0, 0, 32, 32], (0.5, True): [2, 2, 0, 0, 32, 32],
             (1.0, False): [51, 50, 0, 0, 48, 32], (1.0, True): [3, 2, 0, 0, 48, 32],
             (0.0, False): [1, 2, 0, 0, 16, 32], (0.0, True): [1, 2, 0, 0, 16, 32]}
    for (gamma, reset), expected in cases.items():
        G = discounted_returns_BT(r, mask, gamma, reset)
        assert torch.equal(G, torch.tensor([expected], dtype=F64)), (gamma, reset, G)


def test_reset_at_gaps_changes_nothing_without_interior_gaps():
    gen = torch.Generator().manual_seed(5)
    r = torch.randn(3, 6, generator=gen, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(discounted_returns_BT(r, mask, 0.5), discounted_returns_BT(r, mask, 0.5, True))
    assert torch.allclose(discounted_returns_BT(r, mask, 1.0), discounted_returns_BT(r, mask, 1.0, True),
                          atol=1e-12)


@pytest.mark.parametrize("name, gamma", [("sampled_token", 0.5), ("seq_rkl", 1.0), ("sampled_token", 0.0)])
def test_reset_at_gaps_in_the_estimators(name, gamma):
    """The estimators' advantage is the reset return of r = log q - log pi_old; at gamma = 0 the switch is a
    no-op (bit for bit), with gamma > 0 it changes the advantage before the gap."""
    z_BTV, lq_BTV = random_pair(B=2, T=6)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    batch = make_batch(z_BTV, lq_BTV, mask_BT=mask)
    outs = {reset: ESTIMATORS[name].loss(LogitsHead.dense(z_BTV), batch,
                                         EstimatorConfig(name=name, gamma=gamma, reset_at_gaps=reset))
            for reset in (False, True)}
    r = batch.teacher.sampled_logprobs_BT - batch.old_logprobs_BT
    assert torch.allclose(outs[True].advantages_BT, discounted_returns_BT(r, mask, gamma, True), atol=1e-6)
    if gamma == 0.0:
        assert torch.equal(outs[True].advantages_BT, outs[False].advantages_BT)
        assert torch.equal(outs[True].loss, outs[False].loss)
    else:
        assert (outs[True].advantages_BT[0, :2] - outs[False].advantages_BT[0, :2]).abs().min() > 1e-6
        assert torch.allclose(outs[True].advantages_BT[1], outs[False].advantages_BT[1], atol=1e-6)


# --- 4. MOPD's unnormalised generalised KL ----------------------------------------------------------------

GKL = dict(name="topk_rkl", top_k=4, normalize="unnormalized_gkl")


def test_unnormalized_gkl_by_hand():
    """V = 3, K = 2. p_s = [0.5, 0.25, 0.25], q = [0.2, 0.5, 0.3]: the teacher's top-2 is S = {1, 2}.

    loss = sum_{v in S} p (log p - log q) - p + q
         = 0.25 ln(0.25/0.5) - 0.25 + 0.5  +  0.25 ln(0.25/0.3) - 0.25 + 0.3
         = 0.25 ln(5/12) + 0.3 = -0.2188672 + 0.3 = 0.0811328
    (normalize=none, no tail: 0.25 ln(5/12) alone; the GKL adds q(S) - p(S) = 0.8 - 0.5.)
    Gradient wrt the logits: dL/dp_v = ln(p_v/q_v) =: g_v on S, 0 off S; dL/dz_j = p_j (g_j - sum_v p_v g_v),
    g = [0, ln 0.5, ln(5/6)], sum_v p_v g_v = 0.25 ln(5/12):
        dz_0 = 0.5 (0 - 0.25 ln(5/12)),  dz_1 = 0.25 (ln 0.5 - 0.25 ln(5/12)),  dz_2 = 0.25 (ln(5/6) - 0.25 ln(5/12))
    """
    z = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]], dtype=F64))
    lq = torch.log(torch.tensor([[[0.2, 0.5, 0.3]]], dtype=F64))
    batch = make_batch(z, lq, ids_BT=torch.tensor([[0]]), k=2)
    loss, grad = run(GKL | {"top_k": 2}, z, batch)
    s = 0.25 * math.log(5 / 12)
    assert float(loss) == pytest.approx(s + 0.3, abs=1e-12)
    expected = torch.tensor([[[0.5 * (0 - s), 0.25 * (math.log(0.5) - s), 0.25 * (math.log(5 / 6) - s)]]],
                            dtype=F64)
    assert torch.allclose(grad, expected, atol=1e-12)
    loss_none, _ = run(dict(name="topk_rkl", top_k=2, normalize="none"), z, batch)
    assert float(loss_none) == pytest.approx(s, abs=1e-12)


def test_unnormalized_gkl_zero_at_equal():
    z_BTV, _ = random_pair()
    batch = make_batch(z_BTV, torch.log_softmax(z_BTV, -1))
    for cfg in (GKL, GKL | {"support": "student", "add_sampled": True}):
        loss, grad = run(cfg, z_BTV, batch)
        assert abs(float(loss)) < 1e-12 and grad.abs().max() < 1e-12


@pytest.mark.parametrize("support", ["teacher", "student"])
def test_unnormalized_gkl_with_k_equal_v_is_the_full_reverse_kl(support):
    z_BTV, lq_BTV = random_pair()
    batch = make_batch(z_BTV, lq_BTV, k=11)
    loss, grad = run(GKL | {"top_k": 11, "support": support}, z_BTV, batch)
    loss_full, grad_full = run(dict(name="full_rkl"), z_BTV, batch)
    assert torch.allclose(loss, loss_full, atol=1e-12) and torch.allclose(grad, grad_full, atol=1e-12)


def test_unnormalized_gkl_masked_positions_and_inf_nan():
    z_BTV, lq_BTV, z_dirty, mask, clean, dirty = dirty_pair()
    loss, grad = run(GKL, z_dirty, dirty)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[~mask].abs().max() == 0 and grad[mask].abs().max() > 0
    loss_ref, grad_ref = run(GKL, z_BTV, clean)
    assert torch.allclose(loss, loss_ref, atol=1e-12) and torch.allclose(grad, grad_ref, atol=1e-12)
    assert float(loss) > 0  # every per-token term is >= 0


@pytest.mark.parametrize("tail", ["sampled_is", "sampled_is_official", "bucket"])
def test_unnormalized_gkl_rejects_a_tail(tail):
    with pytest.raises(ConfigError) as err:
        load_run_config({"estimator": {"normalize": "unnormalized_gkl", "tail": tail}})
    assert err.value.field == "estimator.tail"
    z_BTV, lq_BTV = random_pair()
    with pytest.raises(ConfigError):
        run(GKL | {"tail": tail}, z_BTV, make_batch(z_BTV, lq_BTV))
