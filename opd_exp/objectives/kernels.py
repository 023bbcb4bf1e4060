"""Chunked kernels over a :class:`LogitsHead`: log-probs, support logits and full-vocabulary divergences.

No kernel materialises the (B, T, V) logits of a projected head. Each is a custom autograd Function whose
inputs are the head's tensors (hidden_BTH, weight_VH, bias_V), so the gradient reaches both the hidden states
and the output projection; forward computes z = head.logits over ``chunk_size`` positions at a time and keeps
only (B, T) or (B, T, K) results, backward recomputes each chunk's z and turns the analytic d loss / d z into

    d hidden = (dz / temperature) W,   d W += (dz / temperature)^T h,   d b += sum_n dz / temperature.

This is the fused linear + loss chunking of Liger-Kernel (arXiv 2410.10989, Sec. 3.3) and the chunked
gather-logsumexp of verl's log-prob computation, applied to the objectives of arXiv 2603.25562 ("Estimators").
A dense head (``weight_VH is None``: hidden IS the logits) follows the same path; its gradient buffer is
(B, T, V) by nature.

Dtypes: compute in float32 (float64 for float64 inputs); gradients are returned in each input's dtype (the
weight gradient accumulates in float32 over the chunks before the cast). Masks: every kernel takes an
optional ``mask_BT``; positions outside it are never computed (their hidden states, logits or teacher values
may be -inf or NaN), their outputs are 0 and their gradient is exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from opd_exp.objectives.head import LogitsHead


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (bf16/fp16 are promoted inside every kernel), else the input's dtype."""
    return torch.promote_types(dtype, torch.float32)


def _active_rows_N(mask_BT: torch.Tensor | None, head: LogitsHead) -> torch.Tensor:
    """Flat indices (long) of the positions to compute: those in ``mask_BT``, or all B * T."""
    device = head.hidden_BTH.device
    if mask_BT is None:
        return torch.arange(head.n_positions, device=device)
    return mask_BT.reshape(-1).to(device).nonzero().view(-1)


CHUNK_ELEMENTS = 1 << 22  # positions x V per chunk of full-vocabulary logits: 16 MB per float32 temporary


def positions_per_chunk(chunk_size: int, vocab_size: int) -> int:
    """``chunk_size`` positions, fewer where V is large: a chunk's (n, V) temporaries stay ~16 MB each, so the
    peak does not grow with V (V = 152k: 27 positions; the tiny pair's V = 30: ``chunk_size``)."""
    return max(1, min(chunk_size, CHUNK_ELEMENTS // vocab_size))


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _logits_nV(h_nH, weight_VH, bias_V, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """z at n gathered positions, by the one definition in :meth:`LogitsHead.logits`."""
    return LogitsHead(h_nH[None], weight_VH, bias_V, temperature).logits(0, h_nH.shape[0], dtype)


def _support_logits_nK(h_NH, rows_n, ids_nK, weight_VH, bias_V, temperature: float, dtype: torch.dtype):
    """z[ids] at positions ``rows_n`` from the K gathered rows of W (for a dense head, a gather of the logits:
    no (n, V) copy). Returns (z_nK, W_nKH) so that backward can reuse the gathered rows (None if dense)."""
    if weight_VH is None:
        return h_NH[rows_n[:, None], ids_nK].to(dtype) / temperature, None
    W_nKH = weight_VH[ids_nK]
    lin_nK = torch.bmm(W_nKH, h_NH[rows_n][:, :, None])[..., 0]
    if bias_V is not None:
        lin_nK = lin_nK + bias_V[ids_nK]
    return lin_nK.to(dtype) / temperature, W_nKH


class _HeadGrads:
    """Gradient buffers of (hidden, weight, bias), filled chunk by chunk from d loss / d z."""

    def __init__(self, needs_input_grad, hidden_BTH, weight_VH, bias_V, temperature: float):
        self.shape, self.temperature = hidden_BTH.shape, temperature
        self.weight_VH = weight_VH
        need_h, need_w, need_b = needs_input_grad[:3]
        h_NH = hidden_BTH.reshape(-1, hidden_BTH.shape[-1])
        self.dh_NH = torch.zeros_like(h_NH) if need_h else None
        self.dW_VH = (torch.zeros(weight_VH.shape, dtype=compute_dtype(weight_VH.dtype), device=weight_VH.device)
                      if need_w else None)
        self.db_V = (torch.zeros(bias_V.shape, dtype=compute_dtype(bias_V.dtype), device=bias_V.device)
                     if need_b else None)
        self.dtypes = (hidden_BTH.dtype, None if weight_VH is None else weight_VH.dtype,
                       None if bias_V is None else bias_V.dtype)

    def add_full(self, rows_n, h_nH, dz_nV) -> None:
        """Accumulate a chunk's full-vocabulary dz (n, V) at flat positions ``rows_n``."""
        dlin_nV = dz_nV / self.temperature if self.temperature != 1.0 else dz_nV
        if self.weight_VH is None:
            if self.dh_NH is not None:
                self.dh_NH.index_copy_(0, rows_n, dlin_nV.to(self.dh_NH.dtype))
            return
        if self.dh_NH is not None:
            self.dh_NH.index_copy_(0, rows_n, (dlin_nV.to(self.weight_VH.dtype) @ self.weight_VH).to(self.dh_NH.dtype))
        if self.dW_VH is not None:
            self.dW_VH.addmm_(dlin_nV.T.to(self.dW_VH.dtype), h_nH.to(self.dW_VH.dtype))
        if self.db_V is not None:
            self.db_V.add_(dlin_nV.sum(0).to(self.db_V.dtype))

    def add_support(self, rows_n, h_nH, ids_nK, W_nKH, dz_nK) -> None:
        """Accumulate a chunk's dz at the ids only, (n, K); ``W_nKH`` the gathered rows, ``h_nH`` the hidden
        states at ``rows_n`` (both None for a dense head: dz goes straight into the logits' gradient)."""
        dlin_nK = dz_nK / self.temperature if self.temperature != 1.0 else dz_nK
        if self.weight_VH is None:
            if self.dh_NH is not None:
                self.dh_NH.index_put_((rows_n[:, None].expand_as(ids_nK), ids_nK), dlin_nK.to(self.dh_NH.dtype),
                                      accumulate=True)
            return
        if self.dh_NH is not None:
            dh_nH = torch.bmm(dlin_nK[:, None, :].to(W_nKH.dtype), W_nKH)[:, 0]
            self.dh_NH.index_copy_(0, rows_n, dh_nH.to(self.dh_NH.dtype))
        flat_ids = ids_nK.reshape(-1)
        if self.dW_VH is not None:
            rows_mH = (dlin_nK[..., None].to(self.dW_VH.dtype) * h_nH[:, None, :].to(self.dW_VH.dtype))
            self.dW_VH.index_add_(0, flat_ids, rows_mH.reshape(-1, h_nH.shape[-1]))
        if self.db_V is not None:
            self.db_V.index_add_(0, flat_ids, dlin_nK.reshape(-1).to(self.db_V.dtype))

    def result(self):
        """(d hidden, d weight, d bias) in the inputs' shapes and dtypes (None where not needed)."""
        dh = None if self.dh_NH is None else self.dh_NH.view(self.shape)
        dW = None if self.dW_VH is None else self.dW_VH.to(self.dtypes[1])
        db = None if self.db_V is None else self.db_V.to(self.dtypes[2])
        return dh, dW, db


# --- log-probs of a few ids per position ----------------------------------------------------------------


class _SelectedLogProbs(torch.autograd.Function):
    """log softmax(z)[ids] = z[ids] - logsumexp_V(z), (B, T, K); forward keeps only the (M,) logsumexp of the
    M active positions; backward: dz = scatter(g) - (sum_k g_k) softmax(z), chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden_BTH, weight_VH, bias_V, ids_BTK, rows_M, temperature, chunk_size):
        h_NH, ids_NK = hidden_BTH.reshape(-1, hidden_BTH.shape[-1]), ids_BTK.reshape(-1, ids_BTK.shape[-1])
        cdtype = compute_dtype(hidden_BTH.dtype)
        out_NK = torch.zeros(ids_NK.shape, dtype=cdtype, device=hidden_BTH.device)
        lse_M = torch.empty(rows_M.shape[0], dtype=cdtype, device=hidden_BTH.device)
        for s, e in _chunks(rows_M.shape[0], chunk_size):
            rows_n = rows_M[s:e]
            z_nV = _logits_nV(h_NH[rows_n], weight_VH, bias_V, temperature, cdtype)
            lse_M[s:e] = torch.logsumexp(z_nV, -1)
            out_NK[rows_n] = z_nV.gather(1, ids_NK[rows_n]) - lse_M[s:e, None]
        ctx.save_for_backward(hidden_BTH, weight_VH, bias_V, ids_BTK, rows_M, lse_M)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out_NK.view(ids_BTK.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_BTK):
        hidden_BTH, weight_VH, bias_V, ids_BTK, rows_M, lse_M = ctx.saved_tensors
        grads = _HeadGrads(ctx.needs_input_grad, hidden_BTH, weight_VH, bias_V, ctx.temperature)
        h_NH, ids_NK = hidden_BTH.reshape(-1, hidden_BTH.shape[-1]), ids_BTK.reshape(-1, ids_BTK.shape[-1])
        g_NK = grad_BTK.reshape(ids_NK.shape).to(lse_M.dtype)
        for s, e in _chunks(rows_M.shape[0], ctx.chunk_size):
            rows_n = rows_M[s:e]
            h_nH, g_nK = h_NH[rows_n], g_NK[rows_n]
            soft_nV = (_logits_nV(h_nH, weight_VH, bias_V, ctx.temperature, lse_M.dtype) - lse_M[s:e, None]).exp_()
            dz_nV = soft_nV.mul_(-g_nK.sum(-1, keepdim=True)).scatter_add_(1, ids_NK[rows_n], g_nK)
            grads.add_full(rows_n, h_nH, dz_nV)
        return *grads.result(), None, None, None, None


def selected_logprobs(head: LogitsHead, ids_BTK: torch.Tensor, chunk_size: int = 1024,
                      mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(z)[ids]: (B, T, K) float32 (float64 for a float64 head), normalised over the head's V ids.

    ids_BTK long in [0, V) (repeats allowed); positions outside ``mask_BT`` give 0 and zero gradient."""
    rows_M = _active_rows_N(mask_BT, head)
    return _SelectedLogProbs.apply(head.hidden_BTH, head.weight_VH, head.bias_V, ids_BTK, rows_M,
                                   head.temperature, positions_per_chunk(chunk_size, head.vocab_size))


# --- logits at a few ids per position (the support of LSM) ------------------------------------------------


class _SupportLogits(torch.autograd.Function):
    """z[ids], (B, T, K), from the K gathered rows of W per position (never the other V - K logits)."""

    @staticmethod
    def forward(ctx, hidden_BTH, weight_VH, bias_V, ids_BTK, rows_M, temperature, chunk_size):
        h_NH, ids_NK = hidden_BTH.reshape(-1, hidden_BTH.shape[-1]), ids_BTK.reshape(-1, ids_BTK.shape[-1])
        cdtype = compute_dtype(hidden_BTH.dtype)
        out_NK = torch.zeros(ids_NK.shape, dtype=cdtype, device=hidden_BTH.device)
        for s, e in _chunks(rows_M.shape[0], chunk_size):
            rows_n = rows_M[s:e]
            out_NK[rows_n] = _support_logits_nK(h_NH, rows_n, ids_NK[rows_n], weight_VH, bias_V, temperature,
                                                cdtype)[0]
        ctx.save_for_backward(hidden_BTH, weight_VH, bias_V, ids_BTK, rows_M)
        ctx.temperature, ctx.chunk_size, ctx.cdtype = temperature, chunk_size, cdtype
        return out_NK.view(ids_BTK.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_BTK):
        hidden_BTH, weight_VH, bias_V, ids_BTK, rows_M = ctx.saved_tensors
        grads = _HeadGrads(ctx.needs_input_grad, hidden_BTH, weight_VH, bias_V, ctx.temperature)
        h_NH, ids_NK = hidden_BTH.reshape(-1, hidden_BTH.shape[-1]), ids_BTK.reshape(-1, ids_BTK.shape[-1])
        g_NK = grad_BTK.reshape(ids_NK.shape).to(ctx.cdtype)
        for s, e in _chunks(rows_M.shape[0], ctx.chunk_size):
            rows_n = rows_M[s:e]
            ids_nK = ids_NK[rows_n]
            h_nH, W_nKH = (None, None) if weight_VH is None else (h_NH[rows_n], weight_VH[ids_nK])
            grads.add_support(rows_n, h_nH, ids_nK, W_nKH, g_NK[rows_n])
        return *grads.result(), None, None, None, None


def support_logits(head: LogitsHead, ids_BTK: torch.Tensor, chunk_size: int = 1024,
                   mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """z[ids] = (h W[ids]^T + b[ids]) / temperature, (B, T, K) float32 (float64 for a float64 head).

    Gathers K rows of W per position chunk (memory O(chunk K H)); for a dense head a gather of the logits. The
    LSM renormalisation (V1-V3) needs nothing else. Positions outside ``mask_BT`` give 0 and zero gradient."""
    rows_M = _active_rows_N(mask_BT, head)
    return _SupportLogits.apply(head.hidden_BTH, head.weight_VH, head.bias_V, ids_BTK, rows_M,
                                head.temperature, chunk_size)


# --- full-vocabulary divergences --------------------------------------------------------------------------


def divergence_chunk(z_nV, logq_nV, kind: str, beta: float, want_grad: bool):
    """Per-position divergence between p = softmax(z) and q = exp(logq), and optionally d/dz (n, V).

    rkl: sum_v p (log p - log q);                      d/dz = p (f - L), f = log p - log q, L the value
    fkl: sum_v q (log q - log p);                      d/dz = p - q
    jsd: beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p (TRL's generalized_jsd_loss
         convention); d/dz = p (g - sum_v p g), g = (1 - beta)(log p - log m).
    Terms with q = 0 are 0 (x log x -> 0). ``jsd`` needs 0 < beta < 1.
    """
    logp = torch.log_softmax(z_nV, -1)
    p = logp.exp()
    if kind == "rkl":
        f = logp.sub_(logq_nV)  # in place: two (n, V) temporaries in all
        value = _rowdot(p, f)
        return value, (p.mul_(f.sub_(value[:, None])) if want_grad else None)
    q = logq_nV.exp()
    if kind == "fkl":
        d = logp.neg_().add_(logq_nV).masked_fill_(q == 0, 0.0)  # log q - log p, 0 where q = 0
        return _rowdot(q, d), (p.sub_(q) if want_grad else None)
    logm = torch.logaddexp(logp + math.log1p(-beta), logq_nV + math.log(beta))
    value = beta * torch.where(q > 0, q * (logq_nV - logm), 0.0).sum(-1) + (1 - beta) * (p * (logp - logm)).sum(-1)
    if not want_grad:
        return value, None
    g = logp.sub_(logm).mul_(1 - beta)
    return value, p.mul_(g.sub_((p * g).sum(-1, keepdim=True)))


def _rowdot(a_nV: torch.Tensor, b_nV: torch.Tensor) -> torch.Tensor:
    """sum_v a b per row without an (n, V) product temporary."""
    return torch.bmm(a_nV[:, None, :], b_nV[:, :, None]).view(-1)


class _FullDivergence(torch.autograd.Function):
    """Per-position divergence (B, T) over the V ids; the teacher's log-probs are recomputed per chunk from its
    head (no grad), so neither model's (B, T, V) logits exist at once."""

    @staticmethod
    def forward(ctx, hidden_BTH, weight_VH, bias_V, teacher, rows_M, temperature, kind, beta, chunk_size):
        h_NH = hidden_BTH.reshape(-1, hidden_BTH.shape[-1])
        cdtype = compute_dtype(hidden_BTH.dtype)
        out_N = torch.zeros(h_NH.shape[0], dtype=cdtype, device=hidden_BTH.device)
        for s, e in _chunks(rows_M.shape[0], chunk_size):
            rows_n = rows_M[s:e]
            z_nV = _logits_nV(h_NH[rows_n], weight_VH, bias_V, temperature, cdtype)
            out_N[rows_n] = divergence_chunk(z_nV, _teacher_logprobs_nV(teacher, rows_n, cdtype), kind, beta,
                                             False)[0]
        ctx.save_for_backward(hidden_BTH, weight_VH, bias_V, rows_M)
        ctx.teacher, ctx.temperature, ctx.kind, ctx.beta, ctx.chunk_size = teacher, temperature, kind, beta, chunk_size
        return out_N.view(hidden_BTH.shape[:2])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_BT):
        hidden_BTH, weight_VH, bias_V, rows_M = ctx.saved_tensors
        grads = _HeadGrads(ctx.needs_input_grad, hidden_BTH, weight_VH, bias_V, ctx.temperature)
        h_NH = hidden_BTH.reshape(-1, hidden_BTH.shape[-1])
        cdtype = compute_dtype(hidden_BTH.dtype)
        g_N = grad_BT.reshape(-1).to(cdtype)
        for s, e in _chunks(rows_M.shape[0], ctx.chunk_size):
            rows_n = rows_M[s:e]
            h_nH = h_NH[rows_n]
            z_nV = _logits_nV(h_nH, weight_VH, bias_V, ctx.temperature, cdtype)
            logq_nV = _teacher_logprobs_nV(ctx.teacher, rows_n, cdtype)
            dz_nV = divergence_chunk(z_nV, logq_nV, ctx.kind, ctx.beta, True)[1].mul_(g_N[rows_n, None])
            grads.add_full(rows_n, h_nH, dz_nV)
        return *grads.result(), None, None, None, None, None, None


def _teacher_logprobs_nV(teacher: LogitsHead, rows_n: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    h_nH = teacher.flat_hidden()[rows_n]
    z_nV = _logits_nV(h_nH, teacher.weight_VH, teacher.bias_V, teacher.temperature, compute_dtype(h_nH.dtype))
    return torch.log_softmax(z_nV, -1).to(dtype)


def full_divergence_BT(head: LogitsHead, teacher_head: LogitsHead, mask_BT: torch.Tensor | None, kind: str,
                       beta: float = 0.5, chunk_size: int = 1024) -> torch.Tensor:
    """Per-position divergence (B, T) between softmax(head) and softmax(teacher_head) (see
    :func:`divergence_chunk` for ``kind`` rkl | fkl | jsd), float32 (float64 for a float64 head), with the
    analytic gradient wrt the student head's tensors. The teacher head holds no grad (it is detached here);
    both heads must cover the same V ids. Positions outside ``mask_BT`` give 0 and zero gradient."""
    if teacher_head.vocab_size != head.vocab_size:
        raise ValueError(f"student V = {head.vocab_size} but teacher V = {teacher_head.vocab_size}")
    rows_M = _active_rows_N(mask_BT, head)
    return _FullDivergence.apply(head.hidden_BTH, head.weight_VH, head.bias_V, teacher_head.detach(), rows_M,
                                 head.temperature, kind, beta, positions_per_chunk(chunk_size, head.vocab_size))


# --- no-grad statistics (pi_old and teacher scoring) -------------------------------------------------------


@dataclass
class TokenStats:
    """No-grad statistics of p = softmax(z) per position, float32 (float64 for a float64 head); 0 (ids 0)
    outside the mask.

    logprobs_BT:        log p(ids_BT), the given token's log-prob
    entropy_BT:         -sum_v p(v) log p(v)
    topk_ids_BTK:       long, the ``top_k`` most likely ids, descending (None when top_k = 0)
    topk_logprobs_BTK:  log p at them (None when top_k = 0)
    """

    logprobs_BT: torch.Tensor
    entropy_BT: torch.Tensor
    topk_ids_BTK: torch.Tensor | None = None
    topk_logprobs_BTK: torch.Tensor | None = None


@torch.no_grad()
def token_stats(head: LogitsHead, ids_BT: torch.Tensor, top_k: int = 0, chunk_size: int = 1024,
                mask_BT: torch.Tensor | None = None) -> TokenStats:
    """:class:`TokenStats` of ``head`` at the tokens ``ids_BT`` (long), ``chunk_size`` positions at a time."""
    B, T = head.shape_BT
    cdtype, device = compute_dtype(head.hidden_BTH.dtype), head.hidden_BTH.device
    logp_N, ent_N = torch.zeros(B * T, dtype=cdtype, device=device), torch.zeros(B * T, dtype=cdtype, device=device)
    top_ids_NK = torch.zeros(B * T, top_k, dtype=torch.long, device=device) if top_k else None
    top_lp_NK = torch.zeros(B * T, top_k, dtype=cdtype, device=device) if top_k else None
    ids_N, h_NH, rows_M = ids_BT.reshape(-1), head.flat_hidden(), _active_rows_N(mask_BT, head)
    for s, e in _chunks(rows_M.shape[0], positions_per_chunk(chunk_size, head.vocab_size)):
        rows_n = rows_M[s:e]
        logp_nV = torch.log_softmax(_logits_nV(h_NH[rows_n], head.weight_VH, head.bias_V, head.temperature, cdtype), -1)
        logp_N[rows_n] = logp_nV.gather(1, ids_N[rows_n, None])[:, 0]
        ent_N[rows_n] = -(logp_nV.exp() * logp_nV).sum(-1)
        if top_k:
            top = logp_nV.topk(top_k, dim=-1)
            top_ids_NK[rows_n], top_lp_NK[rows_n] = top.indices, top.values
    return TokenStats(logp_N.view(B, T), ent_N.view(B, T),
                      None if top_ids_NK is None else top_ids_NK.view(B, T, top_k),
                      None if top_lp_NK is None else top_lp_NK.view(B, T, top_k))
