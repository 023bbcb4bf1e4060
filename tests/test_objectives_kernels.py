"""The chunked kernels of opd_exp/objectives/kernels.py against float64 dense references, and every estimator
on a projected head (hidden states + a padded output projection) against the same estimator on its logits."""

from __future__ import annotations

import pytest
import torch
from test_estimators import ALL_CONFIGS, F64, make_batch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from opd_exp.config import EstimatorConfig
from opd_exp.objectives import ESTIMATORS, LogitsHead
from opd_exp.objectives.kernels import full_divergence_BT, selected_logprobs, support_logits, token_stats

B, T, H, V, PAD, TAU = 2, 5, 6, 11, 3, 0.7
CHUNKS = (1, 3, 1024)


def projection(h_dim=H, pad=PAD, seed=0, dtype=torch.float32):
    """hidden (B, T, h), a padded weight (V + pad, h) whose pad rows are huge (they would dominate any
    normaliser they entered) and a padded bias (V + pad,)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, h_dim, generator=gen, dtype=F64)
    W_full = torch.randn(V + pad, h_dim, generator=gen, dtype=F64)
    W_full[V:] = 50.0
    b_full = torch.randn(V + pad, generator=gen, dtype=F64)
    return hidden.to(dtype), W_full.to(dtype), b_full.to(dtype)


def reference_logits(hidden, W_full, b_full):
    """float64 z over the first V rows; a dense head (b_full None) divides hidden by TAU."""
    if W_full is None:
        return hidden.to(F64) / TAU
    return (hidden.to(F64) @ W_full[:V].to(F64).T + b_full[:V].to(F64)) / TAU


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def head_of(hidden, W_full, b_full):
    return LogitsHead(hidden, None if W_full is None else W_full[:V], None if b_full is None else b_full[:V], TAU)


def inputs(kind: str, dtype=torch.float32):
    if kind == "dense":
        return (torch.randn(B, T, V, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype) * 2, None, None)
    return projection(dtype=dtype)


MASK_BT = torch.tensor([[True, False, True, True, True], [False, True, True, False, True]])
IDS_BTK = torch.randint(0, V, (B, T, 4), generator=torch.Generator().manual_seed(2))  # repeats allowed
UPSTREAM_BTK = torch.rand(B, T, 4, generator=torch.Generator().manual_seed(3), dtype=F64)


def check_against_reference(kernel, reference, kind, upstream, atol=2e-6):
    """kernel(head) vs reference(z64) in value (0 outside the mask) and in the gradient of sum(out * upstream)
    wrt hidden, weight and bias (the padded weight/bias rows exactly 0), for several chunk sizes."""
    ref_leaves = leaves(*(None if t is None else t.to(F64) for t in inputs(kind)))
    ref_out = reference(reference_logits(*ref_leaves))
    ref_grads = torch.autograd.grad((ref_out * upstream).sum(), [t for t in ref_leaves if t is not None])
    for chunk in CHUNKS:
        new_leaves = leaves(*inputs(kind))
        out = kernel(head_of(*new_leaves), chunk)
        grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), [t for t in new_leaves if t is not None])
        assert out.dtype == torch.float32
        assert torch.allclose(out.double(), ref_out, atol=atol)
        for g, g_ref in zip(grads, ref_grads, strict=True):
            assert g.dtype == torch.float32 and torch.allclose(g.double(), g_ref, atol=atol)
        if kind == "projected":
            assert grads[1][V:].abs().max() == 0 and grads[2][V:].abs().max() == 0


def _masked(x_BT_, mask_BT=MASK_BT):
    return torch.where(mask_BT.reshape(mask_BT.shape + (1,) * (x_BT_.dim() - 2)), x_BT_, 0.0)


@pytest.mark.parametrize("kind", ["dense", "projected"])
def test_selected_logprobs_matches_float64_reference(kind):
    check_against_reference(lambda head, c: selected_logprobs(head, IDS_BTK, c, MASK_BT),
                            lambda z: _masked(torch.log_softmax(z, -1).gather(-1, IDS_BTK)), kind, UPSTREAM_BTK)


@pytest.mark.parametrize("kind", ["dense", "projected"])
def test_support_logits_matches_float64_reference(kind):
    check_against_reference(lambda head, c: support_logits(head, IDS_BTK, c, MASK_BT),
                            lambda z: _masked(z.gather(-1, IDS_BTK)), kind, UPSTREAM_BTK)


def reference_divergence_BT(z_BTV, logq_BTV, kind, beta):
    logp = torch.log_softmax(z_BTV, -1)
    p, q = logp.exp(), logq_BTV.exp()
    if kind == "rkl":
        return (p * (logp - logq_BTV)).sum(-1)
    if kind == "fkl":
        return (q * (logq_BTV - logp)).sum(-1)
    logm = torch.log(beta * q + (1 - beta) * p)
    return beta * (q * (logq_BTV - logm)).sum(-1) + (1 - beta) * (p * (logp - logm)).sum(-1)


@pytest.mark.parametrize("kind,beta", [("rkl", 1.0), ("fkl", 0.0), ("jsd", 0.3)])
@pytest.mark.parametrize("head_kind", ["dense", "projected"])
def test_full_divergence_matches_float64_reference(kind, beta, head_kind):
    """The teacher: its own projected head (H_t = 4, padded, temperature 1), log-probs recomputed per chunk."""
    t_hidden, t_W, t_b = projection(h_dim=4, pad=2, seed=5)
    teacher = LogitsHead(t_hidden, t_W[:V], t_b[:V], 1.0)
    logq_BTV = torch.log_softmax(t_hidden.double() @ t_W[:V].double().T + t_b[:V].double(), -1)
    upstream_BT = torch.rand(B, T, generator=torch.Generator().manual_seed(4), dtype=F64)
    check_against_reference(lambda head, c: full_divergence_BT(head, teacher, MASK_BT, kind, beta, c),
                            lambda z: _masked(reference_divergence_BT(z, logq_BTV, kind, beta)), head_kind,
                            upstream_BT)


def test_token_stats_matches_reference():
    hidden, W_full, b_full = inputs("projected")
    ids_BT = IDS_BTK[..., 0]
    logp_BTV = torch.log_softmax(reference_logits(hidden, W_full, b_full), -1)
    for chunk in CHUNKS:
        stats = token_stats(head_of(hidden, W_full, b_full), ids_BT, top_k=3, chunk_size=chunk, mask_BT=MASK_BT)
        top = logp_BTV.topk(3, -1)
        assert torch.allclose(stats.logprobs_BT.double(), _masked(logp_BTV.gather(-1, ids_BT[..., None])[..., 0]),
                              atol=2e-6)
        assert torch.allclose(stats.entropy_BT.double(), _masked(-(logp_BTV.exp() * logp_BTV).sum(-1)), atol=2e-6)
        assert torch.equal(stats.topk_ids_BTK, _masked(top.indices))
        assert torch.allclose(stats.topk_logprobs_BTK.double(), _masked(top.values), atol=2e-6)
    assert token_stats(head_of(hidden, W_full, b_full), ids_BT).topk_ids_BTK is None


def test_gradcheck_float64_projected_head():
    hidden, W_full, b_full = (t.double() for t in projection(h_dim=3, pad=1))
    h, W, b = leaves(hidden[:1, :3], W_full, b_full)
    ids = IDS_BTK[:1, :3]
    teacher = LogitsHead(torch.randn(1, 3, V, dtype=F64))
    mask = torch.tensor([[True, False, True]])
    for fn in (lambda h, W, b: selected_logprobs(head_of(h, W, b), ids, 2, mask),
               lambda h, W, b: support_logits(head_of(h, W, b), ids, 2, mask),
               lambda h, W, b: full_divergence_BT(head_of(h, W, b), teacher, mask, "jsd", 0.3, 2)):
        assert torch.autograd.gradcheck(fn, (h, W, b))


def test_bfloat16_projected_head():
    """bf16 hidden and weight: float32 compute, gradients in bf16, close to float32 on the rounded inputs."""
    hidden, W_full, b_full = (t.bfloat16() for t in projection())
    h16, W16, b16 = leaves(hidden, W_full, b_full)
    out16 = selected_logprobs(head_of(h16, W16, b16), IDS_BTK, 3, MASK_BT)
    out16.sum().backward()
    h32, W32, b32 = leaves(hidden.float(), W_full.float(), b_full.float())
    out32 = selected_logprobs(head_of(h32, W32, b32), IDS_BTK, 3, MASK_BT)
    out32.sum().backward()
    assert out16.dtype == torch.float32 and h16.grad.dtype == W16.grad.dtype == torch.bfloat16
    assert torch.allclose(out16, out32, atol=5e-2)
    for g16, g32 in ((h16.grad, h32.grad), (W16.grad, W32.grad), (b16.grad, b32.grad)):
        assert torch.allclose(g16.float(), g32, rtol=2e-2, atol=2e-2)


# --- every estimator on a projected head ------------------------------------------------------------------


def _estimator_on(cfg_kwargs, head_fn, batch):
    cfg = EstimatorConfig(**cfg_kwargs, chunk_size=3)
    h, W, b = leaves(*projection(dtype=F64))
    loss = ESTIMATORS[cfg.name].loss(head_fn(h, W, b), batch, cfg).loss
    return (loss.detach(), *torch.autograd.grad(loss, (h, W, b)))


@pytest.fixture(scope="module")
def projected_batch():
    """An on-policy batch at temperature TAU; the teacher a projected head of its own."""
    hidden, W_full, b_full = projection(dtype=F64)
    t_hidden, t_W, _ = projection(h_dim=4, pad=2, seed=5, dtype=F64)
    lq_BTV = torch.log_softmax(t_hidden @ t_W[:V].T, -1)
    batch = make_batch(hidden @ W_full[:V].T + b_full[:V], lq_BTV, mask_BT=MASK_BT, temperature=TAU)
    batch.teacher.full = LogitsHead(t_hidden, t_W[:V])
    return batch


@pytest.mark.parametrize("variant", sorted(ALL_CONFIGS))
def test_projected_head_equals_its_materialised_logits(variant, projected_batch):
    """Same loss and gradients (hidden, W, b) as the estimator on the dense logits h W[:V]^T + b[:V]; the
    padded rows get exactly zero gradient and never enter a normaliser (they are huge)."""
    projected = _estimator_on(ALL_CONFIGS[variant], head_of, projected_batch)
    dense = _estimator_on(ALL_CONFIGS[variant], lambda h, W, b: LogitsHead.dense(h @ W[:V].T + b[:V], TAU),
                          projected_batch)
    for x, ref in zip(projected, dense, strict=True):
        assert torch.allclose(x, ref, atol=1e-12)
    assert projected[2][V:].abs().max() == 0 and projected[3][V:].abs().max() == 0
    assert projected[1].abs().max() > 0 and projected[2].abs().max() > 0


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("variant", sorted(ALL_CONFIGS))
def test_no_estimator_materialises_the_logits_of_a_projected_head(variant, projected_batch):
    """Forward and backward at chunk_size 3 never produce a tensor of B * T * V elements (the largest are
    (V + pad, H) weight gradients and (3, V) chunks)."""
    with _LargestTensor() as probe:
        _estimator_on(ALL_CONFIGS[variant], head_of, projected_batch)
    assert probe.max_numel < B * T * V
