"""One REINFORCE-trained teacher per task, cached on disk so that the gamma sweep trains them once per seed.

Teacher objective (the paper does not give it; this is the simplest that reaches the goal): maximise
E[sum_t -|s_{t+1} - goal| - action_cost * a_t^2] with REINFORCE, reward-to-go returns, a per-step batch-mean
baseline and advantages scaled by their batch std; Adam. The control cost on the pre-squash action is needed once
the step is bounded (opd_exp.toy.env.bounded_step): in tanh saturation every a_t gives nearly the same step, so
the advantage hardly depends on a_t and Adam's normalised steps let the mean run off (measured at max_step 0.5,
env_noise 0.2, 5 seeds, no cost: pre-squash means up to 1.5-324, one of ten teachers ending 5.0 from its goal;
cost 0.1: all ten 0.16-0.22 from the goal, |mean| <= 2.4). The teachers depend only on the seed and the teacher
settings, never on gamma, so every gamma of a seed distils from the same pair.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from opd_exp.toy.env import TASKS, MirrorTasks, Rollout, final_distance, rollout
from opd_exp.toy.estimators import reward_to_go
from opd_exp.toy.policy import GaussianMLP, gaussian_logprob


@dataclass(frozen=True)
class TeacherSpec:
    """What determines a teacher (its cache key)."""

    env: MirrorTasks
    hidden: int
    min_std: float
    iterations: int
    batch: int
    lr: float
    seed: int
    action_cost: float = 0.0

    def key(self) -> str:
        blob = json.dumps({**self.__dict__, "env": self.env.__dict__}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def teacher_rewards(env: MirrorTasks, ro: Rollout, action_cost: float) -> torch.Tensor:
    """r_t = -|s_{t+1} - goal| - action_cost * a_t^2 (N, T), a_t the pre-squash action."""
    return -(ro.states_NT1[:, 1:] - env.goal_of(ro.task)).abs() - action_cost * ro.actions_NT**2


def train_teacher(spec: TeacherSpec, task: int) -> GaussianMLP:
    """REINFORCE on one task; returns the trained policy (eval mode, no grad needed)."""
    torch.manual_seed(10_000 * spec.seed + 17 + task)
    policy = GaussianMLP(spec.hidden, spec.min_std)
    opt = torch.optim.Adam(policy.parameters(), lr=spec.lr)
    gen = torch.Generator().manual_seed(10_000 * spec.seed + 29 + task)
    for _ in range(spec.iterations):
        ro = rollout(spec.env, policy, task, spec.batch, gen)
        mean, std = policy(ro.obs_NT3)
        logp_NT = gaussian_logprob(ro.actions_NT, mean, std)
        returns_NT = reward_to_go(teacher_rewards(spec.env, ro, spec.action_cost), 1.0)
        adv_NT = returns_NT - returns_NT.mean(dim=0, keepdim=True)
        adv_NT = adv_NT / (adv_NT.std() + 1e-8)
        loss = -(adv_NT * logp_NT).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy.eval()


def load_or_train(spec: TeacherSpec, cache_dir: Path) -> list[GaussianMLP]:
    """Both tasks' teachers, from ``cache_dir/<key>.pt`` when present (file-locked for parallel cells)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"teachers_{spec.key()}.pt"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            states = torch.load(path, weights_only=True)
        else:
            states = [train_teacher(spec, task).state_dict() for task in TASKS]
            tmp = path.with_suffix(".tmp")
            torch.save(states, tmp)
            tmp.replace(path)
    teachers = []
    for state in states:
        teacher = GaussianMLP(spec.hidden, spec.min_std)
        teacher.load_state_dict(state)
        teachers.append(teacher.eval().requires_grad_(False))
    return teachers


@torch.no_grad()
def teacher_distance(spec: TeacherSpec, teacher: GaussianMLP, task: int, n: int = 256) -> float:
    """Mean final distance to the goal of a teacher on its own task (a sanity number for the report)."""
    gen = torch.Generator().manual_seed(123_456 + task)
    return float(final_distance(spec.env, rollout(spec.env, teacher, task, n, gen)).mean())
