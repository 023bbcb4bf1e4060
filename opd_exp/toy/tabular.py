"""A tabular autoregressive student and a coupled teacher over V tokens and T steps, with exact gradients.

Context c_t is the previous token (c_0 = BOS = index V), so both models are tables of logits (V + 1, V):

    student   log pi(v | c) = log_softmax(theta[c])[v]
    teacher   log q(v | c)  = log_softmax(a + kappa * B[c])[v]        kappa = the coupling strength

With kappa = 0 the teacher ignores the history; larger kappa makes each step's target depend more on the
token before it, so a student's action changes its later rewards (the future-reward coupling).

Objectives (theta enters pi only):
    sequence level  J_seq(theta) = KL(pi(y_1:T) || q(y_1:T)) = E_pi[sum_t r_t],  r_t = log pi(y_t|c_t) - log q(y_t|c_t)
    token level     J_tok(theta) = sum_t E_{c_t ~ d_t}[KL(pi(.|c_t) || q(.|c_t))] with the state distribution d_t
                    held fixed at the current theta (its gradient ignores how earlier actions move later terms)
E[g_1] = grad J_seq and E[g_0] = grad J_tok (PAPER.md, "Theory"); the gap is the dropped coupling.

Gradients are returned as (V + 1, V) tensors, the shape of theta.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from opd_exp.toy.estimators import reward_to_go


@dataclass
class TabularPair:
    """Student logits theta (V + 1, V) and teacher logits (V + 1, V); row V is the BOS context."""

    theta: torch.Tensor
    teacher_logits: torch.Tensor

    @property
    def vocab(self) -> int:
        return self.theta.shape[1]

    def log_pi(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        return torch.log_softmax(self.theta if theta is None else theta, dim=-1)

    def log_q(self) -> torch.Tensor:
        return torch.log_softmax(self.teacher_logits, dim=-1)


def make_pair(vocab: int, coupling: float, student_coupling: float, logit_scale: float,
              gen: torch.Generator, dtype=torch.float64) -> TabularPair:
    """Random pair: teacher a + coupling * B[c]; student theta0 + student_coupling * E[c], entries N(0, scale^2).
    a, B, theta0 and E are drawn in a fixed order, so pairs differing only in the couplings share them."""
    a, theta0 = (logit_scale * torch.randn(vocab, generator=gen, dtype=dtype) for _ in range(2))
    b, e = (logit_scale * torch.randn(vocab + 1, vocab, generator=gen, dtype=dtype) for _ in range(2))
    return TabularPair(theta=theta0 + student_coupling * e, teacher_logits=a + coupling * b)


# --------------------------------------------------------------------------------------------- sequences
def contexts(y_NT: torch.Tensor, vocab: int) -> torch.Tensor:
    """c (N, T): BOS (= vocab) at t = 0, else the previous token."""
    bos = torch.full_like(y_NT[:, :1], vocab)
    return torch.cat([bos, y_NT[:, :-1]], dim=1)


def all_sequences(vocab: int, T: int) -> torch.Tensor:
    """Every sequence (V^T, T), long."""
    return torch.tensor(list(itertools.product(range(vocab), repeat=T)), dtype=torch.long).reshape(-1, T)


def sample_sequences(pair: TabularPair, T: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n student rollouts (n, T) sampled token by token."""
    probs = pair.log_pi().exp()
    y = torch.empty(n, T, dtype=torch.long)
    prev = torch.full((n,), pair.vocab, dtype=torch.long)
    for t in range(T):
        prev = torch.multinomial(probs[prev], 1, generator=gen).squeeze(1)
        y[:, t] = prev
    return y


def seq_logprob(log_table: torch.Tensor, y_NT: torch.Tensor) -> torch.Tensor:
    """Per-step log-probs (N, T) of the tokens y under a (V + 1, V) log-prob table."""
    return log_table[contexts(y_NT, log_table.shape[1]), y_NT]


# --------------------------------------------------------------------------------------------- estimator
def g_gamma(pair: TabularPair, y_NT: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sequence estimates (N, V + 1, V) of g_gamma = sum_t G_t grad log pi(y_t | c_t).

    For a softmax row, grad_theta[c] log pi(v | c) = onehot(v) - pi(. | c), and it is zero in other rows.
    """
    log_pi = pair.log_pi()
    c_NT = contexts(y_NT, pair.vocab)
    rewards_NT = log_pi[c_NT, y_NT] - pair.log_q()[c_NT, y_NT]
    g_NT = reward_to_go(rewards_NT, gamma)
    n, V = y_NT.shape[0], pair.vocab
    score_NTV = torch.nn.functional.one_hot(y_NT, V).to(log_pi.dtype) - log_pi.exp()[c_NT]
    out = torch.zeros(n, V + 1, V, dtype=log_pi.dtype)
    out.scatter_add_(1, c_NT[..., None].expand(-1, -1, V), g_NT[..., None] * score_NTV)
    return out


# --------------------------------------------------------------------------------------------- exact
def exact_expected_g(pair: TabularPair, T: int, gamma: float) -> torch.Tensor:
    """E_pi[g_gamma] (V + 1, V) by dynamic programming over (t, context), O(T V^2):

        d_0 = onehot(BOS),  d_{t+1}(v) = sum_c d_t(c) pi(v|c)                   state distribution
        W_T = 0,  W_t(c) = sum_v pi(v|c) (rho(c,v) + gamma W_{t+1}(v))         discounted value
        Q_t(c,v) = rho(c,v) + gamma W_{t+1}(v),  rho = log pi - log q
        E[g_gamma][c] = sum_t d_t(c) pi(.|c) * (Q_t(c,.) - sum_v pi(v|c) Q_t(c,v))

    gamma = 1 gives grad J_seq and gamma = 0 grad J_tok exactly (tests check both against autograd)."""
    log_pi = pair.log_pi()
    pi, rho = log_pi.exp(), log_pi - pair.log_q()
    V = pair.vocab
    d = torch.zeros(T, V + 1, dtype=pi.dtype)
    d[0, V] = 1.0
    for t in range(T - 1):
        d[t + 1, :V] = d[t] @ pi
    grad = torch.zeros_like(pi)
    w_next = torch.zeros(V, dtype=pi.dtype)  # W_{t+1}(v) for v a real token (the next context)
    for t in range(T - 1, -1, -1):
        q_t = rho + gamma * w_next[None, :]  # (V + 1, V)
        v_t = (pi * q_t).sum(dim=1, keepdim=True)  # (V + 1, 1)
        grad += d[t][:, None] * pi * (q_t - v_t)
        w_next = v_t[:V, 0]
    return grad


def enumerated_objectives(pair: TabularPair, theta: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(J_seq, J_tok) as differentiable functions of ``theta`` by summing over all V^T sequences.
    J_tok weights each sequence by pi at the *detached* theta, so only the per-step KLs carry gradient."""
    y = all_sequences(pair.vocab, T)
    log_pi = torch.log_softmax(theta, dim=-1)
    log_q = pair.log_q()
    logp_NT, logq_NT = seq_logprob(log_pi, y), seq_logprob(log_q, y)
    weight_N = logp_NT.sum(1).exp()
    j_seq = (weight_N * (logp_NT - logq_NT).sum(1)).sum()
    kl_rows = (log_pi.exp() * (log_pi - log_q)).sum(-1)  # (V + 1,) KL(pi(.|c) || q(.|c))
    j_tok = (weight_N.detach() * kl_rows[contexts(y, pair.vocab)].sum(1)).sum()
    return j_seq, j_tok


def enumerated_moments(pair: TabularPair, T: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (E[g_gamma] (V + 1, V), trace Cov[g_gamma]) by enumerating all V^T sequences."""
    y = all_sequences(pair.vocab, T)
    weight_N = seq_logprob(pair.log_pi(), y).sum(1).exp()
    g_NP = g_gamma(pair, y, gamma).flatten(1)
    mean_P = weight_N @ g_NP
    trace = weight_N @ ((g_NP - mean_P) ** 2).sum(1)
    return mean_P.reshape(pair.theta.shape), trace
