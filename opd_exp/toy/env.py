"""The toy's environment: 1-D continuous control with two mirror tasks (PAPER.md, "The toy study").

    task 0: start s_0 = +start, goal -goal        task 1: start s_0 = -start, goal +goal
    s_{t+1} = s_t + step(a_t) + env_noise * xi_t,  a_t ~ pi(. | x_t),  xi_t ~ N(0, 1),  t = 0 .. T-1
    step(a) = max_step * tanh(a / max_step)   (step(a) = a when max_step is None or 0: unbounded)
    x_t = (task id, s_t / position_scale, t / T), task id = +1 for task 0 and -1 for task 1

The bound is part of the transition, not of the policy: the stored action is the pre-squash Gaussian sample
a_t, so log pi(a_t | x_t) stays the exact Gaussian log-density and the score-function estimators stay exact
(the states are a deterministic function of the actions and xi, and xi has the same law under student and
teacher, so the sequence KL is the KL of the action sequences). tanh rather than a clip: it is invertible,
smooth, and close to the identity for |a| << max_step.

Everything is vectorised over N trajectories. Rollouts are sampled without grad; the log-probs are
re-computed afterwards from the stored observations and actions (a score-function estimator never
differentiates through the states).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_exp.toy.policy import GaussianMLP

TASKS = (0, 1)


@dataclass(frozen=True)
class MirrorTasks:
    """The two tasks' geometry and the horizon."""

    horizon: int = 20
    start: float = 2.0
    goal: float = 3.0
    env_noise: float = 0.0
    position_scale: float = 3.0
    max_step: float | None = None

    def start_of(self, task: int) -> float:
        return self.start if task == 0 else -self.start

    def goal_of(self, task: int) -> float:
        return -self.goal if task == 0 else self.goal

    def task_id(self, task: int) -> float:
        return 1.0 if task == 0 else -1.0

    def observe(self, task: int, pos_N: torch.Tensor, t: int) -> torch.Tensor:
        """Observations (N, 3) at time t for positions (N,)."""
        n = pos_N.shape[0]
        return torch.stack([torch.full((n,), self.task_id(task)), pos_N / self.position_scale,
                            torch.full((n,), t / self.horizon)], dim=-1)


def bounded_step(actions: torch.Tensor, max_step: float | None) -> torch.Tensor:
    """The applied step max_step * tanh(a / max_step), elementwise; ``a`` itself when max_step is None or 0."""
    return max_step * torch.tanh(actions / max_step) if max_step else actions


@dataclass
class Rollout:
    """N trajectories of one task: obs (N, T, 3), pre-squash actions (N, T), states (N, T + 1), states[:, 0] = s_0."""

    task: int
    obs_NT3: torch.Tensor
    actions_NT: torch.Tensor
    states_NT1: torch.Tensor


@torch.no_grad()
def rollout(env: MirrorTasks, policy: GaussianMLP, task: int, n: int, gen: torch.Generator) -> Rollout:
    """Sample n trajectories of ``task`` from ``policy`` (all noise from ``gen``). Buffers are preallocated:
    per-op overhead, not arithmetic, is the cost at this size."""
    T = env.horizon
    obs_NT3 = torch.empty(n, T, 3)
    obs_NT3[:, :, 0] = env.task_id(task)
    obs_NT3[:, :, 2] = torch.arange(T) / T
    states_NT1 = torch.empty(n, T + 1)
    states_NT1[:, 0] = env.start_of(task)
    noise_NT = torch.randn(n, T, generator=gen)
    xi_NT = env.env_noise * torch.randn(n, T, generator=gen) if env.env_noise > 0 else None
    actions_NT = torch.empty(n, T)
    for t in range(T):
        obs_NT3[:, t, 1] = states_NT1[:, t] / env.position_scale
        mean, std = policy(obs_NT3[:, t])
        torch.addcmul(mean, std, noise_NT[:, t], out=actions_NT[:, t])
        torch.add(states_NT1[:, t], bounded_step(actions_NT[:, t], env.max_step), out=states_NT1[:, t + 1])
        if xi_NT is not None:
            states_NT1[:, t + 1] += xi_NT[:, t]
    return Rollout(task, obs_NT3, actions_NT, states_NT1)


def final_distance(env: MirrorTasks, ro: Rollout) -> torch.Tensor:
    """|s_T - goal| per trajectory (N,)."""
    return (ro.states_NT1[:, -1] - env.goal_of(ro.task)).abs()


def visitation(states_NT1: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """Counts (T + 1, bins) of positions per time step; positions outside [lo, hi) go to the edge bins."""
    idx = ((states_NT1 - lo) / (hi - lo) * bins).floor().clamp(0, bins - 1).long()  # (N, T+1)
    hist = torch.zeros(states_NT1.shape[1], bins)
    hist.scatter_add_(1, idx.T.contiguous(), torch.ones_like(idx.T, dtype=hist.dtype))
    return hist
