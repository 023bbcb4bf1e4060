"""The estimator family on dense heads, tested by identities and exact references (float64 where precision
matters). The shared fixtures below are imported by tests/test_objectives_*.py.

Run: pytest tests/test_estimators.py tests/test_objectives_kernels.py tests/test_objectives_fixes.py -q
"""

from __future__ import annotations

import itertools

import pytest
import torch

from opd_exp.config import EstimatorConfig
from opd_exp.config.validation import ConfigError
from opd_exp.objectives import ESTIMATORS, Batch, LogitsHead, TeacherScores
from opd_exp.objectives.kernels import full_divergence_BT
from opd_exp.objectives.score_function import discounted_returns_BT

F64 = torch.float64

# every estimator (and the topk variants V1-V5) whose value and gradient vanish at student == teacher
ZERO_AT_EQUAL = {
    "sampled_token_k1": dict(name="sampled_token"),
    "sampled_token_k2_g05": dict(name="sampled_token", kl_form="k2", gamma=0.5),
    "sampled_token_k3_g1": dict(name="sampled_token", kl_form="k3", gamma=1.0),
    "seq_rkl_mean": dict(name="seq_rkl", baseline="mean"),
    "full_rkl": dict(name="full_rkl"),
    "forward_kl": dict(name="forward_kl"),
    "jsd": dict(name="jsd", beta=0.5),
    "topk_v1": dict(name="topk_rkl", top_k=4),
    "topk_v2": dict(name="topk_rkl", top_k=4, support="student", add_sampled=True),
    "topk_v3": dict(name="topk_rkl", top_k=4, add_sampled=True),
    "topk_bucket": dict(name="topk_rkl", top_k=4, normalize="none", tail="bucket"),
}
# everything, for the masking, dtype and projected-head tests
ALL_CONFIGS = ZERO_AT_EQUAL | {
    "topk_v4": dict(name="topk_rkl", top_k=4, support="student", normalize="none", tail="sampled_is"),
    "topk_v5": dict(name="topk_rkl", top_k=4, normalize="none", tail="sampled_is"),
    "topk_v5_official": dict(name="topk_rkl", top_k=4, normalize="none", tail="sampled_is_official"),
    "seq_kd": dict(name="seq_kd"),
}


# --- fixtures -----------------------------------------------------------------------------------------


def teacher_scores(teacher_logprobs_BTV, ids_BT, student_logits_BTV, k: int) -> TeacherScores:
    """Everything any estimator may ask for, from full teacher log-probs (a dense teacher head: log-probs are
    logits of the same distribution)."""
    top = teacher_logprobs_BTV.topk(k, dim=-1)
    s_ids_BTK = student_logits_BTV.detach().topk(k, dim=-1).indices
    return TeacherScores(
        sampled_logprobs_BT=teacher_logprobs_BTV.gather(-1, ids_BT[..., None])[..., 0],
        topk_ids_BTK=top.indices, topk_logprobs_BTK=top.values, full=LogitsHead.dense(teacher_logprobs_BTV.clone()),
        student_topk_ids_BTK=s_ids_BTK, at_student_topk_logprobs_BTK=teacher_logprobs_BTV.gather(-1, s_ids_BTK))


def make_batch(student_logits_BTV, teacher_logprobs_BTV, ids_BT=None, mask_BT=None, k=4, seed=0,
               temperature=1.0) -> Batch:
    """On-policy batch: tokens sampled from softmax(z / temperature), pi_old = sampler = that distribution."""
    B, T, _ = student_logits_BTV.shape
    logp_BTV = torch.log_softmax(student_logits_BTV.detach().to(F64) / temperature, -1)
    if ids_BT is None:
        gen = torch.Generator().manual_seed(seed)
        ids_BT = torch.multinomial(logp_BTV.exp().reshape(B * T, -1), 1, generator=gen).view(B, T)
    if mask_BT is None:
        mask_BT = torch.ones(B, T, dtype=torch.bool)
    old_BT = logp_BTV.gather(-1, ids_BT[..., None])[..., 0].to(teacher_logprobs_BTV.dtype)
    return Batch(ids_BT=ids_BT, loss_mask_BT=mask_BT, old_logprobs_BT=old_BT, sampler_logprobs_BT=old_BT.clone(),
                 teacher=teacher_scores(teacher_logprobs_BTV, ids_BT, student_logits_BTV, k))


def run(cfg_kwargs: dict, logits_BTV, batch, temperature=1.0):
    """loss and d loss / d logits for one config, on a dense head."""
    cfg = EstimatorConfig(**cfg_kwargs)
    logits_BTV = logits_BTV.detach().clone().requires_grad_(True)
    out = ESTIMATORS[cfg.name].loss(LogitsHead.dense(logits_BTV, temperature), batch, cfg)
    (grad_BTV,) = torch.autograd.grad(out.loss, logits_BTV, allow_unused=True)
    return out.loss.detach(), (torch.zeros_like(logits_BTV) if grad_BTV is None else grad_BTV)


def random_pair(B=3, T=5, V=11, seed=0, dtype=F64, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    z_BTV = (scale * torch.randn(B, T, V, generator=gen)).to(dtype)
    lq_BTV = torch.log_softmax(scale * torch.randn(B, T, V, generator=gen, dtype=F64), -1).to(dtype)
    return z_BTV, lq_BTV


def expected_over_tokens(cfg_kwargs, z_1V, teacher_1V, old_1V=None, k=3, sampler_V=None, recorded_V=None):
    """Exact E_{y ~ sampler}[loss] and E[d loss / d z] at one context by enumerating y.

    pi_old = softmax(old_1V) (the student if None) gives the student top-K and old log-probs; the sampler is
    ``sampler_V`` (probabilities; default pi_old); the batch records ``recorded_V`` (log-probs; default log
    sampler) as ``sampler_logprobs_BT``."""
    V = z_1V.shape[-1]
    old_1V = z_1V if old_1V is None else old_1V
    logp_old_V = torch.log_softmax(old_1V.to(F64), -1)[0]
    sampler_V = logp_old_V.exp() if sampler_V is None else sampler_V
    recorded_V = sampler_V.log() if recorded_V is None else recorded_V
    z_11V, lq_11V = z_1V[None], torch.log_softmax(teacher_1V, -1)[None]
    value, grad = 0.0, torch.zeros_like(z_11V)
    for v in range(V):
        if sampler_V[v] == 0:
            continue
        batch = make_batch(old_1V[None], lq_11V, ids_BT=torch.tensor([[v]]), k=k)
        batch.sampler_logprobs_BT = recorded_V[v].reshape(1, 1).clone()
        loss, g = run(cfg_kwargs, z_11V, batch)
        value, grad = value + sampler_V[v] * loss, grad + sampler_V[v] * g
    return value, grad


# --- identities ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(ZERO_AT_EQUAL))
def test_student_equals_teacher_gives_zero_loss_and_gradient(variant):
    z_BTV, _ = random_pair()
    batch = make_batch(z_BTV, torch.log_softmax(z_BTV, -1))
    loss, grad = run(ZERO_AT_EQUAL[variant], z_BTV, batch)
    assert abs(float(loss)) < 1e-12
    assert grad.abs().max() < 1e-12


def test_sampled_is_tail_zero_at_equal_in_expectation():
    """V4/V5's per-sample gradient is not zero at p = q (w grad log p(y) remains), only its expectation."""
    gen = torch.Generator().manual_seed(1)
    z_1V = torch.randn(1, 7, generator=gen, dtype=F64)
    for variant in ("topk_v4", "topk_v5"):
        value, grad = expected_over_tokens(ALL_CONFIGS[variant], z_1V, z_1V)
        assert abs(float(value)) < 1e-12 and grad.abs().max() < 1e-12


def test_unnormalized_without_tail_pushes_mass_off_the_support():
    """normalize=none, tail=none: zero at p = q but its gradient is not (grad = grad P_S): documents F6(a)."""
    z_BTV, _ = random_pair()
    batch = make_batch(z_BTV, torch.log_softmax(z_BTV, -1))
    loss, grad = run(dict(name="topk_rkl", top_k=4, normalize="none"), z_BTV, batch)
    assert abs(float(loss)) < 1e-12
    # gradient descent lowers the support logits: d loss / d z_v > 0 for v in S (mass leaves the support)
    assert (grad.gather(-1, batch.teacher.topk_ids_BTK) > 0).all()


def test_seq_kd_expected_gradient_zero_at_equal():
    """SFT on samples of the student itself: E_y[grad -log p(y)] = 0 (the NLL value is the entropy)."""
    gen = torch.Generator().manual_seed(2)
    z_1V = torch.randn(1, 6, generator=gen, dtype=F64)
    value, grad = expected_over_tokens({"name": "seq_kd"}, z_1V, z_1V)
    p = torch.softmax(z_1V, -1)
    assert torch.allclose(value, -(p * p.log()).sum(), atol=1e-12)
    assert grad.abs().max() < 1e-12


@pytest.mark.parametrize("support", ["teacher", "student"])
def test_topk_with_k_equal_v_equals_full_rkl(support):
    z_BTV, lq_BTV = random_pair(V=9)
    batch = make_batch(z_BTV, lq_BTV, k=9)
    loss_k, grad_k = run(dict(name="topk_rkl", top_k=9, support=support), z_BTV, batch)
    loss_f, grad_f = run(dict(name="full_rkl"), z_BTV, batch)
    assert torch.allclose(loss_k, loss_f, atol=1e-12) and float(loss_f) > 0.1
    assert torch.allclose(grad_k, grad_f, atol=1e-12)


def test_topk_is_truncated_and_renormalized():
    """V1 against a direct formula on the teacher's top-K, and different from the full reverse KL."""
    z_BTV, lq_BTV = random_pair(V=9)
    batch = make_batch(z_BTV, lq_BTV, k=3)
    loss, _ = run(dict(name="topk_rkl", top_k=3), z_BTV, batch)
    ids = batch.teacher.topk_ids_BTK
    logp, logq = torch.log_softmax(z_BTV.gather(-1, ids), -1), torch.log_softmax(lq_BTV.gather(-1, ids), -1)
    ref = (logp.exp() * (logp - logq)).sum(-1).mean()
    assert torch.allclose(loss, ref, atol=1e-12)
    assert not torch.allclose(loss, run(dict(name="full_rkl"), z_BTV, batch)[0], atol=1e-3)


def test_add_sampled_is_duplicate_safe():
    """y_t inside the top-K adds nothing; outside, the support is K + 1 (V3 vs a direct formula)."""
    z_BTV, lq_BTV = random_pair(B=1, T=2, V=7)
    ids_top = lq_BTV.topk(3, -1).indices
    ids = torch.stack([ids_top[0, 0, 1], lq_BTV[0, 1].argmin()])[None]  # inside at t=0, outside at t=1
    batch = make_batch(z_BTV, lq_BTV, ids_BT=ids, k=3)
    loss3, _ = run(dict(name="topk_rkl", top_k=3, add_sampled=True), z_BTV, batch)
    per_pos = []
    for t in range(2):
        S = ids_top[0, t].tolist() + ([] if t == 0 else [int(ids[0, 1])])
        logp, logq = torch.log_softmax(z_BTV[0, t, S], -1), torch.log_softmax(lq_BTV[0, t, S], -1)
        per_pos.append((logp.exp() * (logp - logq)).sum())
    assert torch.allclose(loss3, torch.stack(per_pos).mean(), atol=1e-12)


def test_bucket_is_the_coarse_grained_kl():
    z_BTV, lq_BTV = random_pair(V=9)
    batch = make_batch(z_BTV, lq_BTV, k=3)
    loss, _ = run(dict(name="topk_rkl", top_k=3, normalize="none", tail="bucket"), z_BTV, batch)
    ids = batch.teacher.topk_ids_BTK
    logp_all = torch.log_softmax(z_BTV, -1)
    p = torch.cat([logp_all.gather(-1, ids).exp(), 1 - logp_all.gather(-1, ids).exp().sum(-1, keepdim=True)], -1)
    q = torch.cat([lq_BTV.gather(-1, ids).exp(), 1 - lq_BTV.gather(-1, ids).exp().sum(-1, keepdim=True)], -1)
    ref = (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(loss, ref, atol=1e-10)
    assert float(loss) <= float(run(dict(name="full_rkl"), z_BTV, batch)[0])  # data-processing inequality


def test_topk_rejects_incoherent_switches():
    with pytest.raises(ConfigError, match="estimator.tail"):
        ESTIMATORS["topk_rkl"].needs(EstimatorConfig(name="topk_rkl", tail="sampled_is"))
    for tail in ("sampled_is", "sampled_is_official"):
        with pytest.raises(ConfigError, match="estimator.add_sampled"):
            ESTIMATORS["topk_rkl"].needs(EstimatorConfig(name="topk_rkl", normalize="none", tail=tail,
                                                         add_sampled=True))


def test_needs():
    needs = {name: ESTIMATORS[name].needs(EstimatorConfig(name=name, top_k=32)) for name in ESTIMATORS}
    assert set(needs) == {"sampled_token", "seq_rkl", "full_rkl", "forward_kl", "jsd", "topk_rkl", "seq_kd",
                          "vopd", "power_opd"}
    assert needs["sampled_token"].teacher_sampled and not needs["sampled_token"].teacher_full
    assert needs["full_rkl"].teacher_full and needs["jsd"].teacher_full and needs["forward_kl"].teacher_full
    assert needs["topk_rkl"].teacher_topk == 32 and not needs["topk_rkl"].teacher_sampled
    assert needs["seq_kd"].rollout_policy == "teacher" and not needs["seq_kd"].teacher_sampled
    for tail in ("sampled_is", "sampled_is_official"):
        v4 = ESTIMATORS["topk_rkl"].needs(EstimatorConfig(name="topk_rkl", top_k=8, support="student",
                                                          normalize="none", tail=tail))
        assert v4.student_topk == 8 and v4.teacher_sampled and v4.teacher_topk == 0


# --- gradients: Monte Carlo and exact references --------------------------------------------------------


def test_sampled_token_mc_gradient_matches_full_rkl():
    """gamma = 0, on-policy: E_{y ~ p}[grad] = grad KL(p || q) at one context. N = 200k samples; the
    per-sample gradient has std < 3 here, so the standard error is < 7e-3 and the tolerance 2.5e-2."""
    gen = torch.Generator().manual_seed(3)
    z_1V, lq_1V = torch.randn(1, 6, generator=gen, dtype=F64), torch.randn(1, 6, generator=gen, dtype=F64)
    lq_1V = torch.log_softmax(lq_1V, -1)
    N = 200_000
    z_N1V, lq_N1V = z_1V.expand(N, 1, 6), lq_1V.expand(N, 1, 6)
    batch = make_batch(z_N1V, lq_N1V, k=2, seed=4)
    _, grad_N1V = run(dict(name="sampled_token", chunk_size=N), z_N1V, batch)
    _, grad_full = run(dict(name="full_rkl"), z_1V[None], make_batch(z_1V[None], lq_1V[None], k=2))
    assert (grad_N1V.sum(0) - grad_full[0]).abs().max() < 2.5e-2
    assert grad_full.abs().max() > 0.1  # the reference is not trivially zero


def test_sampled_token_exact_gradient_matches_full_rkl():
    """Same identity with the expectation enumerated (tolerance 1e-12)."""
    gen = torch.Generator().manual_seed(5)
    z_1V, t_1V = torch.randn(1, 6, generator=gen, dtype=F64), torch.randn(1, 6, generator=gen, dtype=F64)
    _, grad = expected_over_tokens(dict(name="sampled_token"), z_1V, t_1V)
    batch = make_batch(z_1V[None], torch.log_softmax(t_1V, -1)[None], k=2)
    _, grad_full = run(dict(name="full_rkl"), z_1V[None], batch)
    assert torch.allclose(grad, grad_full, atol=1e-12)


class TabularPolicy:
    """A tiny autoregressive tabular policy: one logit row per prefix, T = 3, V = 3 (13 prefixes)."""

    T, V = 3, 3

    def __init__(self, table):
        self.table = table  # (13, V)

    @staticmethod
    def prefix_index(seq, t):
        idx = 0
        for y in seq[:t]:
            idx = idx * 3 + y
        return (3**t - 1) // 2 + idx

    def logits_1TV(self, seq):
        return torch.stack([self.table[self.prefix_index(seq, t)] for t in range(self.T)])[None]

    def seq_logprob(self, seq):
        logp = torch.log_softmax(self.logits_1TV(seq), -1)[0]
        return sum(logp[t, y] for t, y in enumerate(seq))


def _expected_sequence_gradient(cfg_kwargs, student: TabularPolicy, teacher: TabularPolicy):
    """sum_y P_s(y) grad loss(y) with the loss on the single rollout y (B = 1, token-mean over T)."""
    total = torch.zeros_like(student.table)
    for seq in itertools.product(range(3), repeat=3):
        table = student.table.detach().clone().requires_grad_(True)
        logits = TabularPolicy(table).logits_1TV(seq)
        lq_1TV = torch.log_softmax(teacher.logits_1TV(seq), -1)
        batch = make_batch(logits.detach(), lq_1TV, ids_BT=torch.tensor([seq]), k=2)
        cfg = EstimatorConfig(**cfg_kwargs)
        out = ESTIMATORS[cfg.name].loss(LogitsHead.dense(logits), batch, cfg)
        (g,) = torch.autograd.grad(out.loss, table)
        total += student.seq_logprob(seq).detach().exp() * g
    return total


@pytest.fixture(scope="module")
def tabular_pair():
    gen = torch.Generator().manual_seed(6)
    return (TabularPolicy(torch.randn(13, 3, generator=gen, dtype=F64)),
            TabularPolicy(torch.randn(13, 3, generator=gen, dtype=F64)))


def test_gamma_one_matches_exact_sequence_kl_gradient(tabular_pair):
    student, teacher = tabular_pair
    table = student.table.clone().requires_grad_(True)
    seqs = list(itertools.product(range(3), repeat=3))
    logP = torch.stack([TabularPolicy(table).seq_logprob(s) for s in seqs])
    logQ = torch.stack([teacher.seq_logprob(s) for s in seqs])
    (grad_exact,) = torch.autograd.grad((logP.exp() * (logP - logQ)).sum(), table)
    for cfg in (dict(name="sampled_token", gamma=1.0), dict(name="seq_rkl")):
        grad_est = _expected_sequence_gradient(cfg, student, teacher)
        assert torch.allclose(grad_est, grad_exact / 3, atol=1e-12)  # token-mean over T = 3
    # gamma = 0 drops the future-reward coupling: biased for the sequence KL (arXiv 2603.25562, "Theory")
    grad_tok = _expected_sequence_gradient(dict(name="sampled_token"), student, teacher)
    assert (grad_tok - grad_exact / 3).abs().max() > 1e-2


def test_gamma_zero_matches_per_token_full_rkl_on_visited_prefixes(tabular_pair):
    student, teacher = tabular_pair
    assert torch.allclose(_expected_sequence_gradient(dict(name="sampled_token"), student, teacher),
                          _expected_sequence_gradient(dict(name="full_rkl"), student, teacher), atol=1e-12)


@pytest.mark.parametrize("support", ["teacher", "student"])
def test_sampled_is_tail_is_unbiased_for_full_rkl(support):
    """V4/V5 off-policy (pi_old != pi_theta), sampler = pi_old (top-p 1): E of value and gradient = the full
    reverse KL."""
    gen = torch.Generator().manual_seed(7)
    z_1V, t_1V, old_1V = (torch.randn(1, 8, generator=gen, dtype=F64) for _ in range(3))
    cfg = dict(name="topk_rkl", top_k=3, support=support, normalize="none", tail="sampled_is")
    value, grad = expected_over_tokens(cfg, z_1V, t_1V, old_1V=old_1V)
    full_value, full_grad = run(dict(name="full_rkl"), z_1V[None],
                                make_batch(z_1V[None], torch.log_softmax(t_1V, -1)[None], k=3))
    assert torch.allclose(value, full_value, atol=1e-12)
    assert torch.allclose(grad, full_grad, atol=1e-12)
    _, grad_no_tail = expected_over_tokens(cfg | {"tail": "none"}, z_1V, t_1V, old_1V=old_1V)
    assert (grad_no_tail - full_grad).abs().max() > 1e-2  # without the tail it is biased


def test_discounted_returns_reset_at_padding():
    r = torch.tensor([[1.0, 2.0, 3.0, 99.0], [1.0, -5.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    G = discounted_returns_BT(r, mask, 0.5)
    assert torch.allclose(G, torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0, 0.0], [1 + 0.25 + 0.125, 0, 1.5, 1]]))
    assert torch.equal(discounted_returns_BT(r, mask, 1.0)[0], torch.tensor([6.0, 5.0, 3.0, 0.0]))


def test_mean_baseline_centres_each_position():
    z_BTV, lq_BTV = random_pair(B=4, T=3)
    mask = torch.tensor([[True] * 3] * 3 + [[True, False, False]])
    out = ESTIMATORS["seq_rkl"].loss(LogitsHead.dense(z_BTV), make_batch(z_BTV, lq_BTV, mask_BT=mask),
                                     EstimatorConfig(name="seq_rkl", baseline="mean"))
    assert torch.allclose(out.advantages_BT.sum(0), torch.zeros(3, dtype=F64), atol=1e-6)


def test_ppo_clipping():
    """Off-policy ratios beyond 1 +- eps: the clipped branch is active and its gradient is zero."""
    z_BTV, lq_BTV = random_pair()
    batch = make_batch(z_BTV, lq_BTV)
    batch.old_logprobs_BT = batch.old_logprobs_BT - 1.0  # rho = e > 1.2 everywhere
    out = ESTIMATORS["sampled_token"].loss(LogitsHead.dense(z_BTV), batch, EstimatorConfig(name="sampled_token"))
    positive = out.advantages_BT > 0
    assert out.metrics["clip_frac"] == pytest.approx(float(positive.double().mean()))
    _, grad = run(dict(name="sampled_token"), z_BTV, batch)
    assert grad[positive].abs().max() == 0 and grad[~positive].abs().max() > 0


# --- JSD ----------------------------------------------------------------------------------------------


def test_jsd_endpoints_equal_forward_and_reverse_kl():
    z_BTV, lq_BTV = random_pair()
    batch = make_batch(z_BTV, lq_BTV)
    for beta, other in ((0.0, "forward_kl"), (1.0, "full_rkl")):
        loss_j, grad_j = run(dict(name="jsd", beta=beta), z_BTV, batch)
        loss_o, grad_o = run(dict(name=other), z_BTV, batch)
        assert torch.allclose(loss_j, loss_o, atol=1e-12) and torch.allclose(grad_j, grad_o, atol=1e-12)


def test_jsd_mixture_tends_to_the_endpoints():
    """Near the ends the mixture formula is ~ beta FKL and ~ (1 - beta) RKL (checks the mixture's math)."""
    z_BTV, lq_BTV = random_pair()
    batch = make_batch(z_BTV, lq_BTV)
    eps = 1e-6
    fkl, rkl = run(dict(name="forward_kl"), z_BTV, batch)[0], run(dict(name="full_rkl"), z_BTV, batch)[0]
    assert torch.allclose(run(dict(name="jsd", beta=eps), z_BTV, batch)[0] / eps, fkl, rtol=1e-4)
    assert torch.allclose(run(dict(name="jsd", beta=1 - eps), z_BTV, batch)[0] / eps, rkl, rtol=1e-4)


# --- masks and dtypes, every estimator --------------------------------------------------------------------


def masked_pair():
    """A (3, 6) student/teacher pair and its batch with masked-out positions at the end, the start and the
    middle of a row: (z, log q, mask, batch)."""
    z_BTV, lq_BTV = random_pair(B=3, T=6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:], mask[1, 0], mask[2, 2] = False, False, False
    return z_BTV, lq_BTV, mask, make_batch(z_BTV, lq_BTV, mask_BT=mask)


@pytest.mark.parametrize("variant", sorted(ALL_CONFIGS))
def test_masked_positions_get_exactly_zero_gradient(variant):
    z_BTV, lq_BTV, mask, batch = masked_pair()
    # garbage teacher/old values at masked-out positions (large but finite) must not leak
    t = batch.teacher
    t.sampled_logprobs_BT[~mask] = -1e4
    batch.old_logprobs_BT[~mask] = 50.0
    t.full.hidden_BTH[~mask] = -1e4 * torch.arange(11, dtype=F64)
    t.topk_logprobs_BTK[~mask] = -1e4
    loss, grad = run(ALL_CONFIGS[variant], z_BTV, batch)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[~mask].abs().max() == 0
    assert grad[mask].abs().max() > 0
    # and the loss equals the loss of the masked-in positions alone
    keep = make_batch(z_BTV, lq_BTV, mask_BT=mask)
    assert torch.allclose(loss, run(ALL_CONFIGS[variant], z_BTV, keep)[0], atol=1e-12)


@pytest.mark.parametrize("variant", sorted(ALL_CONFIGS))
def test_all_masked_batch_gives_zero_not_nan(variant):
    z_BTV, lq_BTV = random_pair(B=2, T=3)
    batch = make_batch(z_BTV, lq_BTV, mask_BT=torch.zeros(2, 3, dtype=torch.bool))
    loss, grad = run(ALL_CONFIGS[variant], z_BTV, batch)
    assert float(loss) == 0.0 and not torch.isnan(loss)
    assert grad.abs().max() == 0


@pytest.mark.parametrize("variant", sorted(ALL_CONFIGS))
def test_bfloat16_logits_no_nan_no_negative_kl(variant):
    z32, lq32 = random_pair(B=2, T=8, V=64, dtype=torch.float32, scale=8.0)
    z16 = z32.bfloat16()
    batch = make_batch(z16.float(), lq32)
    cfg = EstimatorConfig(**ALL_CONFIGS[variant])
    logits = z16.clone().requires_grad_(True)
    out = ESTIMATORS[cfg.name].loss(LogitsHead.dense(logits), batch, cfg)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()
    # same result as float32 on the bf16-rounded logits
    loss32, grad32 = run(ALL_CONFIGS[variant], z16.float(), batch)
    assert torch.allclose(out.loss, loss32, rtol=1e-5, atol=1e-5)
    assert torch.allclose(logits.grad.float(), grad32, rtol=1e-2, atol=1e-3)
    if cfg.name in ("full_rkl", "forward_kl", "jsd"):
        kind = {"full_rkl": "rkl", "forward_kl": "fkl"}.get(cfg.name, "jsd")
        per_pos = full_divergence_BT(LogitsHead.dense(z16), batch.teacher.full, batch.loss_mask_BT, kind, cfg.beta)
        assert (per_pos >= 0).all()
    if cfg.name == "topk_rkl" and not cfg.tail.startswith("sampled_is"):
        assert float(out.loss.detach()) >= 0
