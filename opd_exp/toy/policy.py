"""The toy's Gaussian policy: a 3-layer MLP from (task id, position, normalised time) to N(mean, std).

With ``hidden = 60`` the MLP has 3*60+60 + 60*60+60 + 60*2+2 = 4022 parameters (the paper's "~4K").
The last linear layer (``policy.out``) is the "output layer" whose gradient the variance proxy measures.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

OBS_DIM = 3  # (task id in {-1, +1}, position / position_scale, t / T)
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class GaussianMLP(nn.Module):
    """pi(a | x) = N(mean(x), std(x)^2), std = softplus(raw) + min_std (bounded below so log-ratios stay finite)."""

    def __init__(self, hidden: int = 60, min_std: float = 0.1):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(OBS_DIM, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.out = nn.Linear(hidden, 2)
        self.min_std = min_std

    def features(self, obs_N3: torch.Tensor) -> torch.Tensor:
        """The output layer's input h (..., hidden). Written with F.linear rather than calling ``self.body``:
        per-call overhead dominates at this size and the rollout calls it T times per batch."""
        first, second = self.body[0], self.body[2]
        return torch.relu(F.linear(torch.relu(F.linear(obs_N3, first.weight, first.bias)),
                                   second.weight, second.bias))

    def head(self, out_N2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map the output layer's pre-activations (..., 2) to (mean, std), each (...)."""
        return out_N2[..., 0], F.softplus(out_N2[..., 1]) + self.min_std

    def forward(self, obs_N3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(F.linear(self.features(obs_N3), self.out.weight, self.out.bias))


def gaussian_logprob(action: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(action; mean, std^2), elementwise."""
    z = (action - mean) / std
    return -0.5 * z * z - torch.log(std) - LOG_SQRT_2PI


def gaussian_kl(mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std_p^2) || N(mean_q, std_q^2)), elementwise: the reverse KL when p is the student."""
    return (torch.log(std_q / std_p) + (std_p**2 + (mean_p - mean_q) ** 2) / (2.0 * std_q**2) - 0.5)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
