"""The discounted OPD estimator g_gamma and the micro-batch gradient-variance proxy (shared by both toy studies).

    r_t      = log pi(y_t | c_t) - log q(y_t | c_t)                  per-step log-ratio (reward, no grad)
    G_t      = sum_{t' >= t} gamma^(t' - t) r_t'                      discounted reward-to-go
    g_gamma  = sum_t G_t grad log pi(y_t | c_t)                       (PAPER.md, "Estimators")

gamma = 0 is token-level OPD (G_t = r_t), gamma = 1 the sequence-level reverse-KL score-function gradient.
Training descends g_gamma via the surrogate loss sum_t stop_grad(G_t) log pi(y_t | c_t).
"""

from __future__ import annotations

import torch


def discount_matrix(T: int, gamma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """D (T, T) with D[t', t] = gamma^(t' - t) for t' >= t and 0 otherwise (0^0 = 1), so G = r @ D."""
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    powers = torch.tensor(float(gamma), dtype=torch.float64) ** lag.clamp(min=0)
    return torch.where(lag >= 0, powers, 0.0).to(dtype)


def reward_to_go(rewards_NT: torch.Tensor, gamma: float) -> torch.Tensor:
    """G (N, T) with G_t = sum_{t' >= t} gamma^(t' - t) r_t' (one matmul with :func:`discount_matrix`)."""
    return rewards_NT @ discount_matrix(rewards_NT.shape[1], gamma, rewards_NT.dtype)


def surrogate_per_traj(logp_NT: torch.Tensor, rewards_NT: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-trajectory surrogate L_n = sum_t stop_grad(G_nt) log pi_nt (N,); grad L_n = g_gamma of trajectory n."""
    return (reward_to_go(rewards_NT.detach(), gamma) * logp_NT).sum(dim=1)


def output_layer_grads(feat_NTH: torch.Tensor, dout_NTO: torch.Tensor) -> torch.Tensor:
    """Per-trajectory gradient of a linear output layer out = W h + b, flattened as [W (O x H), b (O)].

    Args:
        feat_NTH: the layer's inputs h at each step of each trajectory.
        dout_NTO: d L_n / d out_nt, the gradient of trajectory n's own loss w.r.t. its outputs
            (trajectories are independent, so this is the gradient of sum_n L_n w.r.t. out).
    Returns:
        (N, O * H + O): sum_t dout_nt h_nt^T and sum_t dout_nt, i.e. grad_{W, b} L_n.
    """
    grad_w = torch.einsum("nto,nth->noh", dout_NTO, feat_NTH)
    return torch.cat([grad_w.flatten(1), dout_NTO.sum(dim=1)], dim=1)


def microbatch_grad_variance(grads_NP: torch.Tensor, n_micro: int) -> torch.Tensor:
    """The paper's variance proxy: split N per-trajectory gradients into ``n_micro`` consecutive micro-batches,
    take each micro-batch's mean gradient (n_micro, P), and return the unbiased variance across micro-batches
    averaged over the P coordinates (a scalar)."""
    n, p = grads_NP.shape
    if n % n_micro:
        raise ValueError(f"{n} trajectories do not split into {n_micro} micro-batches")
    micro_MP = grads_NP.reshape(n_micro, n // n_micro, p).mean(dim=1)
    return micro_MP.var(dim=0, unbiased=True).mean()
