"""The paper's toy, replicated: one student distilled from two task teachers with the discounted estimator g_gamma.

Usage:
    opd-exp experiment=toy_gamma                                   # the sweep: 5 gammas x 5 seeds
    opd-exp runner=toy_gamma experiment=toy_gamma toy.gamma=1.0    # one cell (hydra.mode=RUN)

Per iteration i: task k = i mod 2; sample ``batch`` student trajectories of task k; per-step reward
r_t = log pi(a_t | x_t) - log q_k(a_t | x_t) (Gaussian log-densities); descend
g_gamma = sum_t (sum_{t' >= t} gamma^(t' - t) r_t') grad log pi(a_t | x_t) (batch mean) with Adam.
The variance proxy splits the batch into ``micro_batches`` and takes the variance of the output layer's
gradient across them (opd_exp.toy.estimators.microbatch_grad_variance).

Run-dir files: metrics.jsonl (train/*: window means over ``log_every`` iterations; eval/*: both tasks, a fixed
noise stream), visitation.npz (position-by-time counts per task: ``final`` from the last eval, ``train`` over
all training rollouts) and run_summary.json.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from opd_exp.config import RunConfig
from opd_exp.config.validation import ConfigError, spec, validate
from opd_exp.rundir import MetricsLog
from opd_exp.toy.env import TASKS, MirrorTasks, final_distance, rollout, visitation
from opd_exp.toy.estimators import microbatch_grad_variance, output_layer_grads, surrogate_per_traj
from opd_exp.toy.policy import GaussianMLP, gaussian_kl, gaussian_logprob, n_params
from opd_exp.toy.teachers import TeacherSpec, load_or_train, teacher_distance


@dataclass
class ToyGammaConfig:
    """``toy:`` settings of runner=toy_gamma. Values the paper does not give are marked (choice)."""

    gamma: float = spec(0.0, "discount of the reward-to-go: 0 token-level OPD, 1 sequence-level", ge=0.0, le=1.0)
    horizon: int = spec(20, "steps per trajectory T (choice; unknown in the paper)", ge=1)
    start: float = spec(2.0, "task 0 starts at +start, task 1 at -start", gt=0.0)
    goal: float = spec(3.0, "task 0's goal is -goal, task 1's +goal", gt=0.0)
    max_step: float | None = spec(None, "bound of the applied step max_step * tanh(a / max_step) (choice: "
                                  "reaching the goal takes half the horizon); null or 0: unbounded", ge=0.0)
    env_noise: float = spec(0.0, "std of the transition noise xi_t (choice: uncorrected it drifts beyond "
                            "success_radius; one step can correct it)", ge=0.0)
    position_scale: float = spec(3.0, "positions are divided by this in the policy input", gt=0.0)
    hidden: int = spec(60, "MLP width (60 gives 3962 parameters, the paper's ~4K)", ge=1)
    min_std: float = spec(0.1, "lower bound of the policy std (choice; keeps log-ratios finite)", gt=0.0)
    iterations: int = spec(2000, "student iterations (tasks alternate)", ge=1)
    batch: int = spec(64, "trajectories per iteration", ge=1)
    micro_batches: int = spec(8, "micro-batches of the variance proxy (must divide batch)", ge=2)
    lr: float = spec(1e-3, "student Adam learning rate (choice)", gt=0.0)
    teacher_iterations: int = spec(500, "REINFORCE iterations per teacher (choice: enough to converge)", ge=0)
    teacher_batch: int = spec(64, "trajectories per teacher iteration", ge=1)
    teacher_lr: float = spec(3e-3, "teacher Adam learning rate", gt=0.0)
    teacher_action_cost: float = spec(0.0, "teacher reward -= this * a_t^2 (choice: a control cost that keeps "
                                      "the pre-squash action out of tanh saturation)", ge=0.0)
    teacher_cache: str | None = spec(None, "teacher cache dir (null: <run_dir>/../.toy_teachers)")
    log_every: int = spec(10, "train/* metrics are means over this many iterations", ge=1)
    eval_every: int = spec(100, "evaluate both tasks every N iterations", ge=1)
    eval_batch: int = spec(256, "trajectories per task at evaluation", ge=1)
    success_radius: float = spec(0.5, "a trajectory reaches the goal when |s_T - goal| < this", gt=0.0)
    vis_bins: int = spec(48, "position bins of the visitation histograms", ge=2)
    vis_range: float = spec(6.0, "visitation histograms cover positions in [-vis_range, vis_range]", gt=0.0)


def load_config(cfg: RunConfig) -> ToyGammaConfig:
    toy = validate(ToyGammaConfig, cfg.toy, "toy")
    if toy.batch % toy.micro_batches:
        raise ConfigError("toy.micro_batches", f"got {toy.micro_batches}, must divide toy.batch ({toy.batch})")
    return toy


def make_env(toy: ToyGammaConfig) -> MirrorTasks:
    return MirrorTasks(toy.horizon, toy.start, toy.goal, toy.env_noise, toy.position_scale, toy.max_step)


# --------------------------------------------------------------------------------------------- one iteration
def train_step(student, teacher, opt, ro, env: MirrorTasks, toy: ToyGammaConfig) -> dict[str, float]:
    """One g_gamma update on a rollout batch; returns the iteration's diagnostics (before the update)."""
    feat_NTH = student.features(ro.obs_NT3)
    out_NT2 = student.out(feat_NTH)
    out_NT2.retain_grad()
    mean_NT, std_NT = student.head(out_NT2)
    logp_NT = gaussian_logprob(ro.actions_NT, mean_NT, std_NT)
    with torch.no_grad():
        mean_q, std_q = teacher(ro.obs_NT3)
        rewards_NT = logp_NT.detach() - gaussian_logprob(ro.actions_NT, mean_q, std_q)
        kl_NT = gaussian_kl(mean_NT, std_NT, mean_q, std_q)
    loss = surrogate_per_traj(logp_NT, rewards_NT, toy.gamma).mean()
    opt.zero_grad()
    loss.backward()
    # out.grad is d(mean_n L_n)/d out; times N it is each trajectory's own d L_n / d out
    grads_NP = output_layer_grads(feat_NTH.detach(), out_NT2.grad * ro.actions_NT.shape[0])
    grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in student.parameters()))
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        opt.step()
    return {"grad_var": float(microbatch_grad_variance(grads_NP, toy.micro_batches)),
            "grad_norm": float(grad_norm), "dist_to_goal": float(final_distance(env, ro).mean()),
            "kl_to_teacher": float(kl_NT.mean()), "seq_kl_mc": float(rewards_NT.sum(1).mean()),
            "finite": float(finite)}


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(env: MirrorTasks, student, teachers, toy: ToyGammaConfig, seed: int):
    """Both tasks on a fixed noise stream: metrics {eval/...} and the final visitation (2, T + 1, bins)."""
    metrics, hists = {}, []
    for task in TASKS:
        gen = torch.Generator().manual_seed(1_000_003 * (seed + 1) + task)
        ro = rollout(env, student, task, toy.eval_batch, gen)
        dist = final_distance(env, ro)
        kl = gaussian_kl(*student(ro.obs_NT3), *teachers[task](ro.obs_NT3))
        metrics[f"eval/dist_to_goal/task{task}"] = float(dist.mean())
        metrics[f"eval/success/task{task}"] = float((dist < toy.success_radius).float().mean())
        metrics[f"eval/kl_to_teacher/task{task}"] = float(kl.mean())
        hists.append(visitation(ro.states_NT1, -toy.vis_range, toy.vis_range, toy.vis_bins))
    for name in ("dist_to_goal", "success", "kl_to_teacher"):
        metrics[f"eval/{name}"] = float(np.mean([metrics[f"eval/{name}/task{k}"] for k in TASKS]))
    return metrics, torch.stack(hists)


# --------------------------------------------------------------------------------------------- the run
def run(cfg: RunConfig, run_dir: Path) -> dict:
    """Train the teachers (or load them), distil the student for ``toy.iterations``, log, summarise."""
    torch.set_num_threads(cfg.threads or 1)
    cpu_start = time.process_time()
    toy = load_config(cfg)
    env = make_env(toy)
    tspec = TeacherSpec(env, toy.hidden, toy.min_std, toy.teacher_iterations, toy.teacher_batch,
                        toy.teacher_lr, cfg.seed, toy.teacher_action_cost)
    cache = Path(toy.teacher_cache).expanduser() if toy.teacher_cache else run_dir.parent / ".toy_teachers"
    teachers = load_or_train(tspec, cache)
    # the student's init and noise depend on the seed only, so the gammas of a seed are paired
    torch.manual_seed(7_919 * cfg.seed + 1)
    student = GaussianMLP(toy.hidden, toy.min_std)
    opt = torch.optim.Adam(student.parameters(), lr=toy.lr)
    gen = torch.Generator().manual_seed(104_729 * cfg.seed + 3)
    log = MetricsLog(run_dir, truncate_from_step=0)
    train_hist = torch.zeros(len(TASKS), toy.horizon + 1, toy.vis_bins)
    window, var_trace, start = [], [], time.time()
    eval_metrics, final_hist = evaluate(env, student, teachers, toy, cfg.seed)
    log.log(0, eval_metrics)
    for it in range(toy.iterations):
        task = it % len(TASKS)
        ro = rollout(env, student, task, toy.batch, gen)
        train_hist[task] += visitation(ro.states_NT1, -toy.vis_range, toy.vis_range, toy.vis_bins)
        window.append(train_step(student, teachers[task], opt, ro, env, toy))
        var_trace.append(window[-1]["grad_var"])
        step = it + 1
        row = {}
        if step % toy.log_every == 0 or step == toy.iterations:
            row.update({f"train/{k}": float(np.mean([w[k] for w in window])) for k in window[0]})
            window = []
        if step % toy.eval_every == 0 or step == toy.iterations:
            eval_metrics, final_hist = evaluate(env, student, teachers, toy, cfg.seed)
            row.update(eval_metrics)
        if row:
            log.log(step, row)
    np.savez_compressed(run_dir / "visitation.npz", final=final_hist.numpy(), train=train_hist.numpy(),
                        edges=np.linspace(-toy.vis_range, toy.vis_range, toy.vis_bins + 1),
                        goals=np.array([env.goal_of(k) for k in TASKS]),
                        starts=np.array([env.start_of(k) for k in TASKS]))
    results = summarise(toy.gamma, eval_metrics, np.array(var_trace), teachers, tspec, student, time.time() - start)
    results["cpu_seconds"] = time.process_time() - cpu_start  # load-independent cost (wall time is not)
    return {"status": "completed", "toy": asdict(toy), "results": results}


def summarise(gamma: float, eval_metrics: dict, var_trace: np.ndarray, teachers, tspec: TeacherSpec, student,
              train_s: float) -> dict[str, float]:
    """Flat results: final eval metrics, the variance proxy's log10 summaries, teacher sanity numbers."""
    log_var = np.log10(np.maximum(var_trace, 1e-30))
    quarter = max(1, len(log_var) // 4)
    results = {f"final/{k[len('eval/'):]}": v for k, v in eval_metrics.items()}
    results.update({
        "gamma": gamma,
        "grad_var/log10_mean": float(log_var.mean()),
        "grad_var/log10_first_quarter": float(log_var[:quarter].mean()),
        "grad_var/log10_last_quarter": float(log_var[-quarter:].mean()),
        "n_params": float(n_params(student)),
        "train_seconds": train_s,
    })
    for task, teacher in enumerate(teachers):
        results[f"teacher/dist_to_goal/task{task}"] = teacher_distance(tspec, teacher, task)
    return results
