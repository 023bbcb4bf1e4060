"""Tables, figures and verdicts of the exact bias/variance study (runner=toy_exact); called by opd_exp.toy.report.

Reads each run's rows.json (one row per (T, gamma)). Writes exact_rows.csv (every seed), exact_variance.{csv,md},
exact_exponents.{csv,md}, exact_bias.{csv,md} and exact_variance_vs_T.png, exact_bias_vs_coupling.png,
exact_bias_vs_T.png, exact_variance_vs_gamma.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from opd_exp.rundir import read_json  # noqa: E402
from opd_exp.toy.exact import growth_exponent  # noqa: E402
from opd_exp.toy.stats import ClaimTest, Interval, ci95, judge, slope, to_markdown  # noqa: E402

BOUND = {0.0: "O(T^2)", 1.0: "O(T^4)"}  # the paper's worst-case bounds on E||g||^2


def load(runs: list[dict]) -> pd.DataFrame:
    """All rows of all runs: seed, coupling, T, gamma, bias and variance columns."""
    rows = [r for run in runs for r in read_json(Path(run["run_dir"]) / "rows.json")]
    df = pd.DataFrame(rows).sort_values(["coupling", "gamma", "T", "seed"]).reset_index(drop=True)
    # variances differ in scale across seeds: average them in log space (geometric mean, CI of log10)
    df["log10_var_mc"] = np.log10(df["var_mc"])
    return df


def bias_horizon(runs: list[dict]) -> int:
    return int(runs[0].get("toy", {}).get("bias_horizon", 8))


def reference_coupling(df: pd.DataFrame) -> float:
    """The coupling used for single-coupling views: 1.0 when swept, else the median swept value."""
    couplings = sorted(df["coupling"].unique())
    return 1.0 if 1.0 in couplings else couplings[len(couplings) // 2]


# --------------------------------------------------------------------------------------------- tables
def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% CI over seeds of every measured column, per (coupling, T, gamma)."""
    out = []
    for (coupling, T, gamma), g in df.groupby(["coupling", "T", "gamma"]):
        row = {"coupling": coupling, "T": T, "gamma": gamma, "seeds": len(g)}
        for key in ("var_mc", "log10_var_mc", "var_exact", "second_moment_mc", "rel_bias_exact", "bias_exact",
                    "bias_mc", "bias_mc_floor", "cos_to_seq"):
            iv = ci95(g[key])
            row.update({key: iv.mean, f"{key}_lo": iv.lo, f"{key}_hi": iv.hi})
        out.append(row)
    return pd.DataFrame(out)


def exponents(df: pd.DataFrame) -> pd.DataFrame:
    """Per (coupling, gamma, seed): fitted growth exponents of the variance and the second moment in T."""
    out = []
    for (coupling, gamma, seed), g in df.groupby(["coupling", "gamma", "seed"]):
        g = g.sort_values("T")
        out.append({"coupling": coupling, "gamma": gamma, "seed": seed,
                    "var_exponent": growth_exponent(list(g["T"]), list(g["var_mc"])),
                    "second_moment_exponent": growth_exponent(list(g["T"]), list(g["second_moment_mc"]))})
    return pd.DataFrame(out)


def exponent_table(exps: pd.DataFrame) -> pd.DataFrame:
    """Rows = gamma; per coupling the variance exponent mean [95% CI]; the paper's bound beside."""
    out = []
    for gamma, g in exps.groupby("gamma"):
        row = {"gamma": gamma, "paper bound on E||g||^2": BOUND.get(gamma, "-")}
        for coupling, gc in g.groupby("coupling"):
            row[f"var exponent, kappa={coupling:g}"] = ci95(gc["var_exponent"]).fmt()
        row["E||g||^2 exponent (all kappa)"] = ci95(g["second_moment_exponent"]).fmt()
        out.append(row)
    return pd.DataFrame(out)


def pivot_ci(agg: pd.DataFrame, index: str, key: str, digits: int = 3) -> pd.DataFrame:
    """index x gamma table of 'mean [lo, hi]' strings."""
    table = {}
    for (idx, gamma), g in agg.groupby([index, "gamma"]):
        r = g.iloc[0]
        table.setdefault(idx, {})[f"gamma={gamma:g}"] = Interval(r[key], r[f"{key}_lo"], r[f"{key}_hi"],
                                                                   int(r["seeds"])).fmt(digits)
    return pd.DataFrame.from_dict(table, orient="index").rename_axis(index).reset_index()


def write_tables(df: pd.DataFrame, agg: pd.DataFrame, exps: pd.DataFrame, t_ref: int, out_dir: Path) -> None:
    df.to_csv(out_dir / "exact_rows.csv", index=False)
    agg.to_csv(out_dir / "exact_variance.csv", index=False)
    k_ref = reference_coupling(df)
    var_md = pivot_ci(agg[agg["coupling"] == k_ref], "T", "log10_var_mc")
    (out_dir / "exact_variance.md").write_text(
        f"log10 tr Cov[g_gamma] (one trajectory, MC) at kappa={k_ref:g}: mean [95% CI] over seeds "
        "(exact_variance.csv has every coupling, arithmetic means and the enumerated variance)\n\n"
        + to_markdown(var_md))
    exps.to_csv(out_dir / "exact_exponents.csv", index=False)
    (out_dir / "exact_exponents.md").write_text(
        "Fitted exponent b of tr Cov[g_gamma] ~ T^b (and of E||g_gamma||^2), mean [95% CI] over seeds\n\n"
        + to_markdown(exponent_table(exps)))
    at = agg[agg["T"] == t_ref]
    at.to_csv(out_dir / "exact_bias.csv", index=False)
    (out_dir / "exact_bias.md").write_text(
        f"||E[g_gamma] - grad J_seq|| at T={t_ref} (exact), mean [95% CI] over seeds\n\n"
        + to_markdown(pivot_ci(at, "coupling", "bias_exact"))
        + f"\nRelative: ||E[g_gamma] - grad J_seq|| / ||grad J_seq|| at T={t_ref}\n\n"
        + to_markdown(pivot_ci(at, "coupling", "rel_bias_exact")))


# --------------------------------------------------------------------------------------------- figures
def _band(ax, x, agg_rows: pd.DataFrame, key: str, **kw) -> None:
    """Mean line and 95% band; a ``log10_`` key is drawn back on the linear scale (10 ** value)."""
    f = (lambda v: 10.0**v) if key.startswith("log10_") else (lambda v: v)
    ax.plot(x, f(agg_rows[key]), marker="o", ms=3, **kw)
    ax.fill_between(x, f(agg_rows[f"{key}_lo"]), f(agg_rows[f"{key}_hi"]), alpha=0.2, color=kw.get("color"))


def plot_variance_vs_T(agg: pd.DataFrame, path: Path) -> None:
    """Log-log tr Cov vs T per gamma, one panel per coupling, with T^2 and T^4 guides."""
    couplings = sorted(agg["coupling"].unique())
    fig, axes = plt.subplots(1, len(couplings), figsize=(3.2 * len(couplings), 3.3), sharey=True, squeeze=False)
    gammas = sorted(agg["gamma"].unique())
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(gammas)))
    for ax, coupling in zip(axes[0], couplings, strict=False):
        for color, gamma in zip(colors, gammas, strict=False):
            rows = agg[(agg["coupling"] == coupling) & (agg["gamma"] == gamma)].sort_values("T")
            _band(ax, rows["T"], rows, "log10_var_mc", color=color, label=f"gamma={gamma:g}")
        T = np.array(sorted(agg["T"].unique()), dtype=float)
        for power, anchor_gamma, ls in ((2, gammas[0], ":"), (4, gammas[-1], "--")):
            at = agg[(agg["coupling"] == coupling) & (agg["gamma"] == anchor_gamma) & (agg["T"] == T[0])]
            v0 = 10.0 ** float(at["log10_var_mc"].iloc[0])
            ax.plot(T, v0 * (T / T[0]) ** power, color="gray", ls=ls, lw=0.8, label=f"~T^{power}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(T, [f"{t:g}" for t in T], minor=False)
        ax.minorticks_off()
        ax.set_title(f"kappa={coupling:g}", fontsize=9)
        ax.set_xlabel("T")
    axes[0, 0].set_ylabel("tr Cov[g_gamma]")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle("variance of g_gamma vs horizon (geometric mean over seeds, 95% CI); guides ~T^2, ~T^4",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lines(agg: pd.DataFrame, x: str, key: str, group: str, ylabel: str, title: str, path: Path,
               logy: bool = False) -> None:
    """One line per value of ``group`` with its 95% band."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    values = sorted(agg[group].unique())
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(values)))
    for color, v in zip(colors, values, strict=False):
        rows = agg[agg[group] == v].sort_values(x)
        _band(ax, rows[x], rows, key, color=color, label=f"{group}={v:g}")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- verdicts
def verdicts(df: pd.DataFrame, exps: pd.DataFrame, t_ref: int) -> list[dict]:
    """Directions tested on one number per seed, each claim at every coupling (or gamma) at once (the largest
    part's p), Holm-adjusted over the study's claims; verdicts from the claims' vocabulary."""
    rows, tests = [], []
    at = df[df["T"] == t_ref]
    per_k = {}
    for coupling, g in at.groupby("coupling"):
        table = g.pivot(index="seed", columns="gamma", values="var_mc")
        per_k[coupling] = [slope(table.columns, np.log10(row.values)) for _, row in table.iterrows()]
    _add(rows, tests, "the variance grows with gamma", "larger gamma (stronger future-reward coupling) raises the "
         "gradient variance", f"per-seed slope of log10 tr Cov vs gamma at T={t_ref}", per_k, "kappa")
    gmin, gmax = exps["gamma"].min(), exps["gamma"].max()
    per_k = {}
    for coupling, g in exps.groupby("coupling"):
        table = g.pivot(index="seed", columns="gamma", values="var_exponent")
        per_k[coupling] = list((table[gmax] - table[gmin]).values)
    _add(rows, tests, f"the variance grows faster in T for gamma={gmax:g} than for gamma={gmin:g}",
         "E||g_0||^2 = O(T^2) vs E||g_1||^2 = O(T^4) (worst-case bounds)",
         f"per-seed exponent gap b(gamma={gmax:g}) - b(gamma={gmin:g})", per_k, "kappa")
    per_g = {gamma: list(g["var_exponent"]) for gamma, g in exps.groupby("gamma")}
    _add(rows, tests, "the variance grows with T", "bounds grow as T^2 (gamma = 0) and T^4 (gamma = 1)",
         "fitted exponent b of tr Cov ~ T^b (all couplings and seeds)", per_g, "gamma")
    g0 = at[at["gamma"] == at["gamma"].min()]
    for key, what in (("bias_exact", "||E g_0 - grad J_seq||"),
                      ("rel_bias_exact", "||E g_0 - grad J_seq|| / ||grad J_seq||")):
        row, test = bias_claim(g0, key, what, t_ref)
        rows.append(row)
        tests.append(test)
    return judge(rows, tests)


def bias_claim(g0: pd.DataFrame, key: str, what: str, t_ref: int) -> tuple[dict, ClaimTest]:
    """Token-level bias against the coupling: per-seed slope, means per kappa, seeds where it never decreases."""
    table = g0.pivot(index="seed", columns="coupling", values=key)
    slopes = [slope(table.columns, row.values) for _, row in table.iterrows()]
    monotone = int(sum(bool(np.all(np.diff(row.values) >= -1e-12)) for _, row in table.iterrows()))
    means = "; ".join(f"kappa={k:g}: {ci95(table[k]).fmt()}" for k in table.columns)
    kind = "relative" if key.startswith("rel") else "absolute"
    return ({"claim": f"the token-level (gamma = 0) bias grows with the coupling ({kind})",
             "paper": "bias = E[sum_t sum_{t'>t} r_t' s_t], the dropped future-reward coupling",
             "measure": f"{what} at T={t_ref}: per-seed slope vs kappa; means per kappa; seeds non-decreasing in "
                        f"kappa",
             "result": f"slope {ci95(slopes).fmt()}; {means}; non-decreasing on {monotone}/{len(table)} seeds"},
            ClaimTest(parts=(tuple(slopes),)))


def _add(rows: list[dict], tests: list[ClaimTest], claim: str, paper: str, measure: str,
         per_part: dict[float, list[float]], part: str) -> None:
    """One claim that must hold at every part (coupling or gamma): its row and its intersection-union test."""
    rows.append({"claim": claim, "paper": paper, "measure": measure,
                 "result": "; ".join(f"{part}={k:g}: {ci95(v).fmt()}" for k, v in per_part.items())})
    tests.append(ClaimTest(parts=tuple(tuple(v) for v in per_part.values())))


def checks(df: pd.DataFrame) -> dict[str, float]:
    """Monte Carlo against exact: variance agreement, and the MC bias of gamma = 1 relative to its noise floor
    (E||mean - truth||^2 = tr Cov / n, so an unbiased estimator gives a ratio near 1)."""
    enum = df[np.isfinite(df["var_exact"])]
    g1 = df[df["gamma"] == df["gamma"].max()]
    return {"median |var_mc / var_exact - 1|": float((enum["var_mc"] / enum["var_exact"] - 1).abs().median()),
            "cells with exact variance": float(len(enum)),
            "gamma=1: median bias_mc / noise floor": float((g1["bias_mc"] / g1["bias_mc_floor"]).median()),
            "gamma=1: max |bias_exact|": float(g1["bias_exact"].abs().max())}


def write(runs: list[dict], out_dir: Path) -> tuple[pd.DataFrame, list[dict], dict]:
    """All exact-study artifacts; returns the rows, the verdicts and the MC-vs-exact checks."""
    df = load(runs)
    t_ref = bias_horizon(runs)
    agg, exps = aggregate(df), exponents(df)
    write_tables(df, agg, exps, t_ref, out_dir)
    plot_variance_vs_T(agg, out_dir / "exact_variance_vs_T.png")
    at = agg[agg["T"] == t_ref]
    plot_lines(at, "coupling", "rel_bias_exact", "gamma", "||E g_gamma - grad J_seq|| / ||grad J_seq||",
               f"relative bias vs coupling at T={t_ref} (mean over seeds, 95% CI)",
               out_dir / "exact_bias_vs_coupling.png")
    g0 = agg[agg["gamma"] == agg["gamma"].min()]
    plot_lines(g0, "T", "rel_bias_exact", "coupling", "relative bias of gamma=0",
               "token-level bias vs horizon per coupling", out_dir / "exact_bias_vs_T.png")
    ref = agg[agg["coupling"] == reference_coupling(df)]
    plot_lines(ref[ref["T"].isin(sorted(ref["T"].unique())[::2])], "gamma", "log10_var_mc", "T", "tr Cov[g_gamma]",
               f"variance vs gamma per T at kappa={reference_coupling(df):g}", out_dir / "exact_variance_vs_gamma.png",
               logy=True)
    return df, verdicts(df, exps, t_ref), checks(df)
