"""The theory, checked exactly (beyond the paper): bias and variance of g_gamma against the exact gradient.

Usage:
    opd-exp experiment=toy_exact                                     # the sweep: couplings x 5 seeds
    opd-exp runner=toy_exact experiment=toy_exact toy.coupling=2.0   # one cell (hydra.mode=RUN)

A cell fixes a seed and a coupling kappa, draws a random tabular pair (opd_exp.toy.tabular) and, for every
horizon T and discount gamma, measures with ``n_mc`` Monte Carlo rollouts of the student:

    bias      || E[g_gamma] - grad J_seq ||       (exact E by dynamic programming; MC estimate beside it)
    variance  tr Cov[g_gamma] (one trajectory)   (MC; exact by enumerating V^T sequences when V^T <= enum_limit)

and fits, per gamma, the growth exponent b of tr Cov ~ T^b (least squares in log-log), to set beside the
paper's worst-case bounds E||g_0||^2 = O(T^2) and E||g_1||^2 = O(T^4). The student's evaluation point is
context-free by default (``student_coupling = 0``): then every dependence of later rewards on earlier tokens
comes from the teacher's coupling, and the token-level bias is exactly 0 at kappa = 0.

Run-dir files: rows.json (one row per (T, gamma)), metrics.jsonl (one line per T), run_summary.json.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from opd_exp.config import RunConfig
from opd_exp.config.validation import ConfigError, spec, validate
from opd_exp.rundir import MetricsLog, atomic_write_json
from opd_exp.toy.tabular import TabularPair, enumerated_moments, exact_expected_g, g_gamma, make_pair, sample_sequences


@dataclass
class ToyExactConfig:
    """``toy:`` settings of runner=toy_exact."""

    coupling: float = spec(1.0, "teacher coupling kappa: how much q(.|c) depends on the previous token", ge=0.0)
    vocab: int = spec(3, "vocabulary size V", ge=2)
    horizons: list[int] = spec(default_factory=lambda: [2, 3, 4, 6, 8, 12, 16, 24, 32], doc="horizons T")
    gammas: list[float] = spec(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], doc="discounts gamma")
    n_mc: int = spec(4096, "Monte Carlo rollouts per (T, cell); all gammas share them", ge=2)
    enum_limit: int = spec(60000, "enumerate all V^T sequences for the exact variance when V^T <= this", ge=1)
    student_coupling: float = spec(0.0, "context dependence of the student's evaluation point", ge=0.0)
    logit_scale: float = spec(1.0, "std of the random logits of both models", gt=0.0)
    bias_horizon: int = spec(8, "the T at which the report reads bias against coupling", ge=1)


def load_config(cfg: RunConfig) -> ToyExactConfig:
    toy = validate(ToyExactConfig, cfg.toy, "toy")
    if any(not 0.0 <= g <= 1.0 for g in toy.gammas):
        raise ConfigError("toy.gammas", f"got {toy.gammas}, each must be in [0, 1]")
    if any(t < 1 for t in toy.horizons) or toy.bias_horizon not in toy.horizons:
        raise ConfigError("toy.horizons", f"got {toy.horizons}, need T >= 1 and toy.bias_horizon in the list")
    return toy


def measure(pair: TabularPair, T: int, toy: ToyExactConfig, gen: torch.Generator) -> list[dict]:
    """One row per gamma at horizon T: exact and MC bias against grad J_seq, MC (and exact) variance."""
    grad_seq = exact_expected_g(pair, T, 1.0).flatten()
    seq_norm = float(grad_seq.norm())
    y = sample_sequences(pair, T, toy.n_mc, gen)
    enumerable = pair.vocab**T <= toy.enum_limit
    rows = []
    for gamma in toy.gammas:
        g_NP = g_gamma(pair, y, gamma).flatten(1)
        mean_P = g_NP.mean(0)
        var_mc = float(((g_NP - mean_P) ** 2).sum(1).sum() / (toy.n_mc - 1))
        exact_mean = exact_expected_g(pair, T, gamma).flatten()
        bias = float((exact_mean - grad_seq).norm())
        rows.append({
            "T": T, "gamma": gamma, "grad_seq_norm": seq_norm,
            "bias_exact": bias, "rel_bias_exact": bias / max(seq_norm, 1e-300),
            "cos_to_seq": float(exact_mean @ grad_seq / max(float(exact_mean.norm()) * seq_norm, 1e-300)),
            "bias_mc": float((mean_P - grad_seq).norm()), "bias_mc_floor": math.sqrt(var_mc / toy.n_mc),
            "var_mc": var_mc, "second_moment_mc": float((g_NP**2).sum(1).mean()),
            "var_exact": float(enumerated_moments(pair, T, gamma)[1]) if enumerable else float("nan"),
        })
    return rows


def growth_exponent(horizons: list[int], values: list[float]) -> float:
    """Least-squares slope b of log(value) = a + b log(T)."""
    return float(np.polyfit(np.log(horizons), np.log(np.maximum(values, 1e-300)), 1)[0])


def run(cfg: RunConfig, run_dir: Path) -> dict:
    torch.set_num_threads(cfg.threads or 1)
    cpu_start = time.process_time()
    toy = load_config(cfg)
    # the pair's random tables depend on the seed only, so the couplings of a seed are paired
    pair = make_pair(toy.vocab, toy.coupling, toy.student_coupling, toy.logit_scale,
                     torch.Generator().manual_seed(cfg.seed))
    log = MetricsLog(run_dir, truncate_from_step=0)
    rows = []
    for T in toy.horizons:
        t_rows = measure(pair, T, toy, torch.Generator().manual_seed(1_000 * cfg.seed + T))
        rows += t_rows
        log.log(T, {f"diag/{k}/gamma{r['gamma']}": r[k] for r in t_rows
                    for k in ("var_mc", "var_exact", "bias_exact", "rel_bias_exact")})
    for r in rows:
        r.update(seed=cfg.seed, coupling=toy.coupling)
    atomic_write_json(run_dir / "rows.json", rows)
    results = summarise(rows, toy)
    results["cpu_seconds"] = time.process_time() - cpu_start  # load-independent cost (wall time is not)
    return {"status": "completed", "toy": asdict(toy), "results": results}


def summarise(rows: list[dict], toy: ToyExactConfig) -> dict[str, float]:
    """Flat results: growth exponents per gamma and the bias/variance at ``bias_horizon``."""
    results: dict[str, float] = {"coupling": toy.coupling}
    for gamma in toy.gammas:
        mine = sorted((r for r in rows if r["gamma"] == gamma), key=lambda r: r["T"])
        horizons = [r["T"] for r in mine]
        results[f"var_exponent/gamma{gamma}"] = growth_exponent(horizons, [r["var_mc"] for r in mine])
        results[f"second_moment_exponent/gamma{gamma}"] = growth_exponent(
            horizons, [r["second_moment_mc"] for r in mine])
        at = next(r for r in mine if r["T"] == toy.bias_horizon)
        for key in ("var_mc", "var_exact", "rel_bias_exact", "bias_exact", "bias_mc"):
            results[f"{key}/T{toy.bias_horizon}/gamma{gamma}"] = at[key]
    return results

