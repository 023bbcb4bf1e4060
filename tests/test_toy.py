"""The toy studies: estimator math by identities and exact references, env and variance proxy on known answers,
and the real CLI + report at smoke scale."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from opd_exp.config import RunConfig
from opd_exp.config.validation import ConfigError
from opd_exp.toy import exact, gamma, report, stats
from opd_exp.toy.env import MirrorTasks, bounded_step, final_distance, rollout, visitation
from opd_exp.toy.estimators import microbatch_grad_variance, output_layer_grads, reward_to_go, surrogate_per_traj
from opd_exp.toy.policy import GaussianMLP, gaussian_kl, gaussian_logprob, n_params
from opd_exp.toy.tabular import (
    enumerated_moments,
    enumerated_objectives,
    exact_expected_g,
    g_gamma,
    make_pair,
    sample_sequences,
)
from opd_exp.toy.teachers import teacher_rewards

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------- estimator
@pytest.mark.parametrize("gamma_", [0.0, 0.3, 1.0])
def test_reward_to_go_matches_double_loop(gamma_):
    r = torch.randn(4, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    naive = torch.tensor([[sum(gamma_ ** (u - t) * r[n, u].item() for u in range(t, 7)) for t in range(7)]
                          for n in range(4)], dtype=torch.float64)
    torch.testing.assert_close(reward_to_go(r, gamma_), naive)


def test_gaussian_logprob_and_kl_match_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mp, mq, a = (torch.randn(10, generator=g) for _ in range(3))
    sp, sq = (torch.rand(10, generator=g) + 0.1 for _ in range(2))
    p, q = torch.distributions.Normal(mp, sp), torch.distributions.Normal(mq, sq)
    torch.testing.assert_close(gaussian_logprob(a, mp, sp), p.log_prob(a))
    torch.testing.assert_close(gaussian_kl(mp, sp, mq, sq), torch.distributions.kl_divergence(p, q))
    assert gaussian_kl(mp, sp, mp, sp).abs().max() < 1e-6


def test_continuous_score_function_estimator_matches_kl_gradient():
    """T = 1, a Gaussian with a learnable mean: E[g] = d/dmu KL(N(mu, s) || N(mq, sq)) = (mu - mq) / sq^2."""
    mu = torch.tensor(0.7, requires_grad=True)
    s, mq, sq, n = 0.5, -0.2, 0.8, 400_000
    a = (mu.detach() + s * torch.randn(n, generator=torch.Generator().manual_seed(2)))[:, None]
    logp = gaussian_logprob(a, mu, torch.tensor(s))
    rewards = logp.detach() - gaussian_logprob(a, torch.tensor(mq), torch.tensor(sq))
    surrogate_per_traj(logp, rewards, 1.0).mean().backward()
    assert mu.grad.item() == pytest.approx((0.7 - mq) / sq**2, abs=0.02)


# --------------------------------------------------------------------------------------------- environment
class ConstantPolicy(torch.nn.Module):
    """pi(a | x) = N(mean, std^2) whatever x (the env test's known answer)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, obs):
        n = obs.shape[0]
        return torch.full((n,), self.mean), torch.full((n,), self.std)


def test_env_dynamics_known_answer():
    env = MirrorTasks(horizon=10, start=2.0, goal=3.0)
    ro = rollout(env, ConstantPolicy(-0.5, 0.3), 0, 50_000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ro.states_NT1[:, 1:] - ro.states_NT1[:, :-1], ro.actions_NT)
    assert torch.all(ro.states_NT1[:, 0] == 2.0)
    final = ro.states_NT1[:, -1]
    assert final.mean().item() == pytest.approx(2.0 - 10 * 0.5, abs=0.02)  # s_0 + T mean
    assert final.var().item() == pytest.approx(10 * 0.3**2, rel=0.03)  # T std^2
    torch.testing.assert_close(ro.obs_NT3[:, :, 1], ro.states_NT1[:, :-1] / env.position_scale)
    torch.testing.assert_close(ro.obs_NT3[0, :, 2], torch.arange(10) / 10)
    assert torch.all(ro.obs_NT3[:, :, 0] == 1.0)
    torch.testing.assert_close(final_distance(env, ro), (final + 3.0).abs())
    mirror = rollout(env, ConstantPolicy(0.5, 0.0), 1, 3, torch.Generator().manual_seed(0))
    assert mirror.states_NT1[0, -1].item() == pytest.approx(-2.0 + 5.0) and env.goal_of(1) == 3.0
    assert torch.all(mirror.obs_NT3[:, :, 0] == -1.0)


def test_env_noise_adds_variance():
    env = MirrorTasks(horizon=8, env_noise=0.4)
    ro = rollout(env, ConstantPolicy(0.0, 0.3), 0, 50_000, torch.Generator().manual_seed(4))
    assert ro.states_NT1[:, -1].var().item() == pytest.approx(8 * (0.3**2 + 0.4**2), rel=0.03)


class LearnableMean(torch.nn.Module):
    """pi(a | x) = N(mu, std^2) with a learnable mu, whatever x (shape (...) of the observations' batch dims)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mu, self.std = torch.nn.Parameter(torch.tensor(mean)), torch.tensor(std)

    def forward(self, obs):
        return self.mu.expand(obs.shape[:-1]), self.std.expand(obs.shape[:-1])


def old_rollout_states(env: MirrorTasks, policy, task: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """The rollout before the step bound (commit a320a3f), written out: s_{t+1} = s_t + a_t + env_noise xi_t."""
    T = env.horizon
    states = torch.full((n, T + 1), env.start_of(task))
    noise, xi = torch.randn(n, T, generator=gen), torch.randn(n, T, generator=gen) if env.env_noise > 0 else None
    for t in range(T):
        obs = torch.stack([torch.full((n,), env.task_id(task)), states[:, t] / env.position_scale,
                           torch.full((n,), t / T)], dim=-1)
        mean, std = policy(obs)
        states[:, t + 1] = states[:, t] + torch.addcmul(mean, std, noise[:, t])
        if xi is not None:
            states[:, t + 1] += env.env_noise * xi[:, t]
    return states


@pytest.mark.parametrize("max_step", [None, 0.0])
@pytest.mark.parametrize("env_noise", [0.0, 0.3])
@torch.no_grad()
def test_unbounded_step_reproduces_the_old_trajectories_bit_for_bit(max_step, env_noise):
    torch.manual_seed(0)
    policy = GaussianMLP(16)
    env = MirrorTasks(horizon=12, env_noise=env_noise, max_step=max_step)
    for task in (0, 1):
        new = rollout(env, policy, task, 32, torch.Generator().manual_seed(9)).states_NT1
        assert torch.equal(new, old_rollout_states(env, policy, task, 32, torch.Generator().manual_seed(9)))
        bounded = rollout(MirrorTasks(horizon=12, env_noise=env_noise, max_step=0.5), policy, task, 32,
                          torch.Generator().manual_seed(9)).states_NT1
        assert not torch.equal(bounded, new)  # the comparison can tell a bound from none


def test_bounded_step_never_exceeds_max_step():
    env = MirrorTasks(horizon=10, max_step=0.4)
    ro = rollout(env, ConstantPolicy(0.3, 2.0), 0, 20_000, torch.Generator().manual_seed(6))
    steps = ro.states_NT1[:, 1:] - ro.states_NT1[:, :-1]
    assert ro.actions_NT.abs().max() > 4.0  # the sampled actions do go far beyond the bound ...
    assert steps.abs().max() <= 0.4 + 1e-6 and steps.abs().max() > 0.39  # ... the applied steps do not
    torch.testing.assert_close(steps, 0.4 * torch.tanh(ro.actions_NT / 0.4))
    small = torch.tensor([1e-3, -2e-3])
    torch.testing.assert_close(bounded_step(small, 0.4), small, rtol=1e-5, atol=0)  # ~identity well inside


def test_env_noise_applied_as_configured():
    """s_{t+1} - s_t = step(a_t) + env_noise xi_t with a_t = mean + std eps_t, eps and xi from ``gen`` in that
    order: the draws are replayed from a second generator with the same seed."""
    env = MirrorTasks(horizon=6, env_noise=0.25, max_step=0.5)
    ro = rollout(env, ConstantPolicy(-0.2, 0.7), 1, 1000, torch.Generator().manual_seed(8))
    replay = torch.Generator().manual_seed(8)
    eps, xi = torch.randn(1000, 6, generator=replay), torch.randn(1000, 6, generator=replay)
    torch.testing.assert_close(ro.actions_NT, -0.2 + 0.7 * eps)
    torch.testing.assert_close(ro.states_NT1[:, 1:] - ro.states_NT1[:, :-1],
                               bounded_step(ro.actions_NT, 0.5) + 0.25 * xi)


def test_bounded_env_score_function_estimator_is_exact():
    """T = 1 through the bounded env: the estimator uses log pi of the stored (pre-squash) action, so
    E[g_1] = d/dmu KL(N(mu, s) || N(mq, sq)) = (mu - mq) / sq^2 whatever the bound (tanh is invertible, so this
    is the KL of the trajectories). Scoring the applied step instead would give a different mean."""
    policy, (mq, sq) = LearnableMean(0.7, 0.5), (-0.2, 0.8)
    env = MirrorTasks(horizon=1, max_step=0.3)
    ro = rollout(env, policy, 0, 400_000, torch.Generator().manual_seed(2))
    assert ro.actions_NT.mean().item() == pytest.approx(0.7, abs=0.005)  # the sample, not the step (< 0.3)
    logp = gaussian_logprob(ro.actions_NT, *policy(ro.obs_NT3))
    rewards = logp.detach() - gaussian_logprob(ro.actions_NT, torch.tensor(mq), torch.tensor(sq))
    surrogate_per_traj(logp, rewards, 1.0).mean().backward()
    assert policy.mu.grad.item() == pytest.approx((0.7 - mq) / sq**2, abs=0.02)


def test_teacher_rewards_known_answer():
    env = MirrorTasks(horizon=2, max_step=0.5)
    ro = rollout(env, ConstantPolicy(-1.0, 0.0), 0, 3, torch.Generator().manual_seed(0))
    step = 0.5 * math.tanh(-2.0)  # task 0: start +2, goal -3
    want = torch.tensor([-abs(2 + step + 3) - 0.1, -abs(2 + 2 * step + 3) - 0.1]).expand(3, 2)
    torch.testing.assert_close(teacher_rewards(env, ro, 0.1), want)
    torch.testing.assert_close(teacher_rewards(env, ro, 0.0), want + 0.1)


def test_visitation_counts_every_state_once():
    states = torch.tensor([[0.0, 1.0, 9.0], [-9.0, 0.5, 0.2]])
    hist = visitation(states, -2.0, 2.0, 4)
    assert hist.sum().item() == 6 and torch.all(hist.sum(1) == 2)
    assert hist[2, 3] == 1 and hist[0, 0] == 1  # out-of-range states land in the edge bins


def test_policy_has_about_4k_parameters():
    assert 3500 <= n_params(GaussianMLP(60)) <= 4500


# --------------------------------------------------------------------------------------------- variance proxy
def test_output_layer_grads_match_per_trajectory_autograd():
    torch.manual_seed(5)
    policy = GaussianMLP(8)
    obs, actions, rewards = torch.randn(6, 4, 3), torch.randn(6, 4), torch.randn(6, 4)
    feat = policy.features(obs)
    out = policy.out(feat)
    out.retain_grad()
    logp = gaussian_logprob(actions, *policy.head(out))
    surrogate_per_traj(logp, rewards, 0.5).sum().backward()
    fast = output_layer_grads(feat.detach(), out.grad)
    for n in range(6):
        policy.zero_grad()
        logp_n = gaussian_logprob(actions[n:n + 1], *policy(obs[n:n + 1]))
        surrogate_per_traj(logp_n, rewards[n:n + 1], 0.5).sum().backward()
        torch.testing.assert_close(fast[n], torch.cat([policy.out.weight.grad.flatten(), policy.out.bias.grad]))


def test_microbatch_variance_known_answers():
    # micro-batch k's 8 members all have gradient k in each of 5 coordinates: variance of 0..7 = 6
    grads = torch.arange(8.0).repeat_interleave(8)[:, None].expand(64, 5)
    assert microbatch_grad_variance(grads, 8).item() == pytest.approx(6.0)
    # i.i.d. N(0, s^2) per-trajectory gradients: a micro-batch mean of m has variance s^2 / m
    iid = 3.0 * torch.randn(64, 20_000, generator=torch.Generator().manual_seed(6))
    assert microbatch_grad_variance(iid, 8).item() == pytest.approx(9.0 / 8, rel=0.03)
    with pytest.raises(ValueError):
        microbatch_grad_variance(iid[:60], 8)


# --------------------------------------------------------------------------------------------- exact study
PAIRS = [(2, 3, 0.0, 0.0), (3, 4, 1.0, 0.0), (3, 5, 2.0, 0.7), (4, 3, 0.5, 1.0)]  # V, T, kappa, student coupling


@pytest.mark.parametrize("vocab,T,kappa,student", PAIRS)
def test_exact_gradient_matches_autograd_on_enumerated_objectives(vocab, T, kappa, student):
    pair = make_pair(vocab, kappa, student, 1.0, torch.Generator().manual_seed(7))
    theta = pair.theta.clone().requires_grad_(True)
    j_seq, j_tok = enumerated_objectives(pair, theta, T)
    grad_seq = torch.autograd.grad(j_seq, theta, retain_graph=True)[0]
    grad_tok = torch.autograd.grad(j_tok, theta)[0]
    torch.testing.assert_close(exact_expected_g(pair, T, 1.0), grad_seq, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(exact_expected_g(pair, T, 0.0), grad_tok, rtol=1e-10, atol=1e-12)
    # J_seq is a true KL: non-negative, and its value matches the sum of expected per-step KLs
    assert j_seq.item() >= 0 and j_seq.item() == pytest.approx(j_tok.item(), rel=1e-10)


@pytest.mark.parametrize("vocab,T,kappa,student", PAIRS)
def test_g_gamma_unbiased_by_enumeration(vocab, T, kappa, student):
    """Sum over every sequence of pi(y) g_gamma(y): gamma = 1 gives grad J_seq, gamma = 0 grad J_tok."""
    pair = make_pair(vocab, kappa, student, 1.0, torch.Generator().manual_seed(8))
    for gamma_ in (0.0, 0.5, 1.0):
        mean, trace = enumerated_moments(pair, T, gamma_)
        torch.testing.assert_close(mean, exact_expected_g(pair, T, gamma_), rtol=1e-10, atol=1e-12)
        assert trace.item() > 0


def test_monte_carlo_g_gamma_converges_to_exact_and_bias_is_visible():
    pair = make_pair(3, 2.0, 0.0, 1.0, torch.Generator().manual_seed(9))
    T, n = 6, 100_000
    y = sample_sequences(pair, T, n, torch.Generator().manual_seed(10))
    for gamma_, target in ((1.0, exact_expected_g(pair, T, 1.0)), (0.0, exact_expected_g(pair, T, 0.0))):
        g = g_gamma(pair, y, gamma_).flatten(1)
        se = g.std(0) / n**0.5
        assert torch.all((g.mean(0) - target.flatten()).abs() <= 5 * se + 1e-12)
    # the gamma = 0 estimate is far (in standard errors) from the sequence-level gradient
    g0 = g_gamma(pair, y, 0.0).flatten(1)
    z = (g0.mean(0) - exact_expected_g(pair, T, 1.0).flatten()).abs() / (g0.std(0) / n**0.5 + 1e-12)
    assert z.max() > 20
    # MC trace of the covariance agrees with the enumerated one
    mc = ((g0 - g0.mean(0)) ** 2).sum(1).mean()
    assert mc.item() == pytest.approx(enumerated_moments(pair, T, 0.0)[1].item(), rel=0.03)


def test_token_bias_zero_without_coupling_and_linear_in_gamma():
    """Context-free student: with kappa = 0 no later reward depends on an earlier token (bias 0); with a
    previous-token teacher only the next reward does, so E[g_gamma] - grad J_seq = (1 - gamma)(E[g_0] - grad J_seq)."""
    free = make_pair(3, 0.0, 0.0, 1.0, torch.Generator().manual_seed(11))
    torch.testing.assert_close(exact_expected_g(free, 7, 0.0), exact_expected_g(free, 7, 1.0), rtol=0, atol=1e-12)
    coupled = make_pair(3, 1.5, 0.0, 1.0, torch.Generator().manual_seed(11))
    seq, tok = exact_expected_g(coupled, 7, 1.0), exact_expected_g(coupled, 7, 0.0)
    assert (tok - seq).norm() > 1e-3
    torch.testing.assert_close(exact_expected_g(coupled, 7, 0.25) - seq, 0.75 * (tok - seq))


# --------------------------------------------------------------------------------------------- config + cells
def test_configs_reject_bad_values_by_name():
    with pytest.raises(ConfigError, match="toy.gama"):
        gamma.load_config(RunConfig(runner="toy_gamma", toy={"gama": 0.5}))
    with pytest.raises(ConfigError, match="toy.micro_batches"):
        gamma.load_config(RunConfig(runner="toy_gamma", toy={"batch": 60, "micro_batches": 8}))
    with pytest.raises(ConfigError, match="toy.max_step"):
        gamma.load_config(RunConfig(runner="toy_gamma", toy={"max_step": -0.5}))
    assert gamma.make_env(gamma.load_config(RunConfig(runner="toy_gamma", toy={"max_step": None}))).max_step is None
    with pytest.raises(ConfigError, match="toy.gammas"):
        exact.load_config(RunConfig(runner="toy_exact", toy={"gammas": [0.0, 1.5]}))


TINY_GAMMA = {"iterations": 6, "teacher_iterations": 2, "horizon": 5, "batch": 16, "micro_batches": 4,
              "eval_batch": 16, "log_every": 2, "eval_every": 3}


def test_gamma_cell_writes_metrics_visitation_and_results(tmp_path):
    (tmp_path / "cell").mkdir()
    cfg = RunConfig(runner="toy_gamma", seed=1, toy={**TINY_GAMMA, "gamma": 1.0})
    out = gamma.run(cfg, tmp_path / "cell")
    assert out["status"] == "completed" and out["results"]["gamma"] == 1.0
    assert all(np.isfinite(v) for v in out["results"].values())
    rows = [json.loads(line) for line in (tmp_path / "cell" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/grad_var" in r] == [2, 4, 6]
    assert [r["step"] for r in rows if "eval/dist_to_goal" in r] == [0, 3, 6]
    vis = np.load(tmp_path / "cell" / "visitation.npz")
    assert vis["final"].shape == (2, 6, 48) and vis["final"][0].sum() == 6 * 16
    assert len(list((tmp_path / ".toy_teachers").glob("*.pt"))) == 1  # cached next to the cell


def test_exact_cell_rows_and_exponents(tmp_path):
    cfg = RunConfig(runner="toy_exact", seed=0, toy={"horizons": [2, 3, 4], "n_mc": 256, "bias_horizon": 3,
                                                     "coupling": 1.0})
    out = exact.run(cfg, tmp_path)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == 3 * 5 and all(np.isfinite(r["var_exact"]) for r in rows)
    assert out["results"]["rel_bias_exact/T3/gamma1.0"] == 0.0
    assert out["results"]["var_exponent/gamma1.0"] > 0


@pytest.mark.slow  # the real CLI in subprocesses
@pytest.mark.skipif(os.environ.get("OPD_EXP_SKIP_CLI") == "1", reason="CLI smoke disabled")
def test_cli_sweeps_and_report(tmp_path):
    """The real entrypoint (hydra.mode=MULTIRUN from the experiment files, no -m), then the report."""
    base = [sys.executable, "-m", "opd_exp", "hydra/launcher=basic"]
    tiny = [f"toy.{k}={v}" for k, v in TINY_GAMMA.items()]
    subprocess.run(base + ["experiment=toy_gamma", f"hydra.sweep.dir={tmp_path}/g", "seed=0", "toy.gamma=0.0,1.0",
                           *tiny],
                   check=True, cwd=REPO, capture_output=True, timeout=300)
    subprocess.run(base + ["experiment=toy_exact", f"hydra.sweep.dir={tmp_path}/e", "seed=0",
                           "toy.coupling=0.0,2.0", "toy.horizons=[2,3,4]", "toy.bias_horizon=3", "toy.n_mc=64"],
                   check=True, cwd=REPO, capture_output=True, timeout=300)
    runs = report.find_runs([tmp_path / "g", tmp_path / "e"])
    assert len(runs) == 2 + 2
    report.write_toy_report(runs, tmp_path / "out")
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "opd-exp experiment=toy_gamma" in readme and "token-level (gamma = 0) bias" in readme
    for name in ("gamma_grad_var.png", "gamma_visitation.png", "exact_variance_vs_T.png", "gamma_summary.csv",
                 "exact_exponents.md", "exact_bias.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 0


# ----------------------------------------------------------------------------- verdicts of the toy claims
def test_toy_claim_verdicts_use_the_tables_vocabulary():
    up, down, noise = (1.0, 1.2, 0.9, 1.1, 1.05), (-1.0, -1.2, -0.9, -1.1, -1.05), (0.3, -0.5, 0.1, -0.2, 0.4)
    for values, expected in ((up, "reproduces"), (down, "opposite (significant)"), (noise, "not significant (MDE")):
        (row,) = stats.judge([{}], [stats.ClaimTest(parts=(values,))])
        assert row["verdict"].startswith(expected), (values, row)
    # every part must show the direction: the largest part's p decides
    mixed = stats.ClaimTest(parts=(up, noise))
    assert mixed.p == pytest.approx(stats.ClaimTest(parts=(noise,)).p)
    assert stats.judge([{}], [mixed])[0]["verdict"].startswith("not significant")
    assert stats.judge([{}], [stats.ClaimTest(parts=(up,))] * 1)[0]["p (raw / Holm)"].split(" / ")[0] == (
        f"{stats.ClaimTest(parts=(up,)).p:.2g}")
    # one seed: nothing to test
    assert stats.judge([{}], [stats.ClaimTest(parts=((1.0,),))])[0]["verdict"].startswith("untestable at this scale")


def test_a_small_significant_drift_inside_the_margin_is_equivalent_not_reproduced():
    """The paper's drift (gamma = 1 never reaches the goal) is a size: a +0.004 gap, significant, within the
    0.5 goal radius is 'equivalent'; a gap past the radius on every seed is not."""
    tiny_gap = (0.0031, 0.0042, 0.0035, 0.0029, 0.0040)
    test = stats.ClaimTest(parts=(tiny_gap,), margin=0.5, equiv=tiny_gap)
    verdict = stats.judge([{}], [test], [" (the goal radius)"])[0]["verdict"]
    assert verdict.startswith("equivalent (within +-0.5 (the goal radius)")
    assert "direction alone is significant" in verdict
    drift = (2.1, 2.4, 1.9, 2.2, 2.0)
    drifted = stats.ClaimTest(parts=(drift,), margin=0.5, equiv=drift)
    assert stats.judge([{}], [drifted])[0]["verdict"] == "reproduces"
    # reaching both goals: +1 on a seed where gamma = 0 does and gamma = 1 does not
    assert stats.judge([{}], [stats.ClaimTest(parts=((0.0,) * 5,), margin=0.5, equiv=(0.0,) * 5)])[0][
        "verdict"].startswith("equivalent")
    assert stats.judge([{}], [stats.ClaimTest(parts=((1.0,) * 5,), margin=0.5, equiv=(1.0,) * 5)])[0][
        "verdict"] == "reproduces"


def test_toy_claims_are_holm_adjusted_as_one_family():
    """Two claims each significant alone (p ~ 0.03) are not after Holm: the smaller p doubles, the larger is
    raised to it (monotone)."""
    weak, weaker = (0.5, 0.1, 0.9, 0.2, 0.6), (0.5, 0.1, 0.9, 0.15, 0.6)
    tests = [stats.ClaimTest(parts=(weak,)), stats.ClaimTest(parts=(weaker,))]
    assert tests[0].p < tests[1].p < 0.05
    (p_weak, p_equiv), (p_weaker, _) = stats.holm_family(tests)
    assert p_weak == pytest.approx(2 * tests[0].p) and p_weaker == pytest.approx(2 * tests[0].p)
    assert math.isnan(p_equiv)  # no margin, no equivalence test
    assert all(row["verdict"].startswith("not significant") for row in stats.judge([{}, {}], tests))
