"""Tables, figures and verdicts of the gamma sweep (runner=toy_gamma); called by opd_exp.toy.report.

Reads each run's run_summary.json (results), metrics.jsonl (curves) and visitation.npz (heatmaps).
Writes gamma_summary.{csv,md}, gamma_grad_var.png, gamma_dist_to_goal.png, gamma_kl_to_teacher.png,
gamma_visitation.png (mean over seeds, per task) and gamma_visitation_seeds.png (per seed, both tasks).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from opd_exp.rundir import read_metrics  # noqa: E402
from opd_exp.toy.gamma import ToyGammaConfig  # noqa: E402
from opd_exp.toy.stats import ClaimTest, ci95, judge, slope, to_markdown  # noqa: E402


def load(runs: list[dict]) -> pd.DataFrame:
    """One row per completed run: seed, gamma, run_dir, wall time and every flat result."""
    rows = [{"seed": r["seed"], "run_dir": r["run_dir"], "wall_time_s": r.get("wall_time_s", np.nan),
             **r["results"]} for r in runs]
    return pd.DataFrame(rows).sort_values(["gamma", "seed"]).reset_index(drop=True)


def reached_both(row: pd.Series) -> bool:
    """A seed 'reaches both goals' when most final-eval trajectories of each task end within the radius."""
    return row["final/success/task0"] >= 0.5 and row["final/success/task1"] >= 0.5


# --------------------------------------------------------------------------------------------- tables
def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per gamma: mean [95% CI] over seeds of the end-of-training numbers and the variance proxy."""
    cols = {"final/dist_to_goal": "final distance to goal", "final/success": "final success rate",
            "final/kl_to_teacher": "final KL to teacher (per step)",
            "grad_var/log10_mean": "log10 grad var (all iterations)",
            "grad_var/log10_first_quarter": "log10 grad var (first 25%)",
            "grad_var/log10_last_quarter": "log10 grad var (last 25%)"}
    out = []
    for gamma, g in df.groupby("gamma"):
        row = {"gamma": gamma, "seeds": len(g), "seeds reaching both goals": int(g.apply(reached_both, axis=1).sum())}
        row.update({name: ci95(g[key]).fmt() for key, name in cols.items()})
        out.append(row)
    return pd.DataFrame(out)


def per_seed(df: pd.DataFrame, key: str) -> pd.DataFrame:
    """seed x gamma table of one result."""
    return df.pivot(index="seed", columns="gamma", values=key)


def verdicts(df: pd.DataFrame, success_radius: float) -> list[dict]:
    """The paper's toy claims, each tested on one number per seed (slope across gammas, paired gap), with a
    verdict from the claims' vocabulary; the drift claims are about a size, so they also get an equivalence test
    within the goal radius (the final distance) or half the seeds (reaching both goals)."""
    rows, tests, key_var = [], [], "grad_var/log10_mean"
    for key, what, claim, paper, margin in [
        ("grad_var/log10_mean", "log10 gradient-variance proxy (mean over iterations)",
         "the gradient variance grows with gamma",
         "gamma 0.75 and 1 are one to several orders of magnitude (log10 units) above gamma 0", None),
        ("final/dist_to_goal", "final distance to goal", "learning is less stable at large gamma (final distance)",
         "gamma = 1 drifts and never reaches the goals", success_radius),
        ("final/kl_to_teacher", "final KL to teacher", "larger gamma ends farther from the teacher (final KL)",
         "(implied by the drift)", None),
    ]:
        table = per_seed(df, key)
        gammas = np.asarray(table.columns, dtype=float)
        slopes = [slope(gammas, row.values) for _, row in table.iterrows()]
        gaps = (table[gammas.max()] - table[gammas.min()]).values
        base = float(table[gammas.min()].mean())
        relative = ("" if key.startswith("grad_var")
                    else f" ({ci95(gaps).mean / base:+.0%} of gamma={gammas.min():g}'s mean)")
        rows.append({"claim": claim, "paper": paper, "measure": what, "per-seed slope vs gamma": ci95(slopes).fmt(),
                     "gap (largest - smallest gamma)": ci95(gaps).fmt() + relative})
        tests.append(ClaimTest(parts=(tuple(slopes),), margin=margin, equiv=tuple(gaps)))
    both = df.assign(both=df.apply(reached_both, axis=1))
    reached = both.pivot(index="seed", columns="gamma", values="both").astype(float)
    lo, hi = reached.columns.min(), reached.columns.max()
    log_var = per_seed(df, key_var)
    rows[0]["note"] = f"orders of magnitude above gamma={lo:g} (log10 proxy, mean over iterations): " + ", ".join(
        f"gamma={g:g}: {ci95((log_var[g] - log_var[lo]).values).fmt()}" for g in log_var.columns if g != lo)
    fewer = (reached[lo] - reached[hi]).values  # +1 on a seed where gamma=lo reaches both goals and gamma=hi not
    rows.append({"claim": f"gamma = {lo:g} reaches both goals on every seed, gamma = {hi:g} on none (visitation)",
                 "paper": "gamma = 0 reaches both goals on every seed, gamma = 1 never does",
                 "measure": "seeds reaching both goals (success >= 0.5 on each task)",
                 "per-seed slope vs gamma": "; ".join(f"gamma={g:g}: {int(reached[g].sum())}/{int(reached[g].count())}"
                                                      for g in reached.columns),
                 "gap (largest - smallest gamma)": f"{-int(fewer.sum())} seeds"})
    tests.append(ClaimTest(parts=(tuple(fewer),), margin=0.5, equiv=tuple(fewer)))
    return judge(rows, tests, ["", f" (the goal radius), on the gap gamma={hi:g} - gamma={lo:g}", "",
                               " of a seed, on the per-seed difference in reaching both goals"])


# --------------------------------------------------------------------------------------------- figures
def curves(df: pd.DataFrame, key: str) -> dict[float, pd.DataFrame]:
    """gamma -> (step x seed) table of one metrics.jsonl key."""
    out = {}
    for gamma, g in df.groupby("gamma"):
        cols = {}
        for _, row in g.iterrows():
            pts = {m["step"]: m[key] for m in read_metrics(row["run_dir"]) if m.get(key) is not None}
            cols[row["seed"]] = pd.Series(pts)
        out[gamma] = pd.DataFrame(cols).sort_index()
    return out


def plot_curves(df: pd.DataFrame, key: str, ylabel: str, path: Path, log10: bool = False,
                title: str = "") -> None:
    """Mean over seeds per gamma with a 95% t-band; ``log10`` averages log10 values (orders of magnitude)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = plt.cm.viridis(np.linspace(0, 0.9, df["gamma"].nunique()))
    for color, (gamma, table) in zip(colors, curves(df, key).items(), strict=False):
        values = np.log10(np.maximum(table.values, 1e-30)) if log10 else table.values
        bands = [ci95(v) for v in values]
        ax.plot(table.index, [b.mean for b in bands], color=color, label=f"gamma={gamma:g}")
        ax.fill_between(table.index, [b.lo for b in bands], [b.hi for b in bands], color=color, alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel}: mean over {df['seed'].nunique()} seeds, 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _density(hist_TB: np.ndarray) -> np.ndarray:
    """Counts (T + 1, bins) -> per-time-step visitation frequencies, transposed to (bins, T + 1) for imshow."""
    return (hist_TB / np.maximum(hist_TB.sum(axis=1, keepdims=True), 1)).T


def plot_visitation(df: pd.DataFrame, path: Path, which: str = "final") -> None:
    """Rows = gamma, columns = task: position-by-time visitation of the final policy, averaged over seeds."""
    gammas = sorted(df["gamma"].unique())
    fig, axes = plt.subplots(len(gammas), 2, figsize=(7.5, 1.7 * len(gammas)), sharex=True, sharey=True,
                             squeeze=False)
    for i, gamma in enumerate(gammas):
        vis = [np.load(Path(d) / "visitation.npz") for d in df[df["gamma"] == gamma]["run_dir"]]
        for task in (0, 1):
            dens = np.mean([_density(v[which][task]) for v in vis], axis=0)
            ax, edges, goal = axes[i, task], vis[0]["edges"], vis[0]["goals"][task]
            ax.imshow(dens, origin="lower", aspect="auto", cmap="magma", vmin=0, vmax=0.5,
                      extent=(0, dens.shape[1] - 1, edges[0], edges[-1]))
            ax.axhline(goal, color="cyan", ls="--", lw=0.8)
            ax.set_title(f"gamma={gamma:g}, task {task} (goal {goal:+g})", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("t")
    for ax in axes[:, 0]:
        ax.set_ylabel("position")
    fig.suptitle(f"state visitation ({which} policy), mean over seeds; dashed = goal", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_visitation_seeds(df: pd.DataFrame, path: Path) -> None:
    """Rows = gamma, columns = seed: both tasks' final-policy visitation overlaid (one panel per run)."""
    gammas, seeds = sorted(df["gamma"].unique()), sorted(df["seed"].unique())
    fig, axes = plt.subplots(len(gammas), len(seeds), figsize=(1.8 * len(seeds) + 1, 1.5 * len(gammas)),
                             sharex=True, sharey=True, squeeze=False)
    for _, row in df.iterrows():
        ax = axes[gammas.index(row["gamma"]), seeds.index(row["seed"])]
        vis = np.load(Path(row["run_dir"]) / "visitation.npz")
        dens = _density(vis["final"][0]) + _density(vis["final"][1])
        edges = vis["edges"]
        ax.imshow(dens, origin="lower", aspect="auto", cmap="magma", vmin=0, vmax=0.5,
                  extent=(0, dens.shape[1] - 1, edges[0], edges[-1]))
        for goal in vis["goals"]:
            ax.axhline(goal, color="cyan", ls="--", lw=0.6)
        ax.set_title(f"g={row['gamma']:g} s={row['seed']} both={'yes' if reached_both(row) else 'no'}",
                     fontsize=7)
    fig.suptitle("final-policy visitation per seed, both tasks overlaid; dashed = goals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(runs: list[dict], out_dir: Path) -> tuple[pd.DataFrame, list[dict]]:
    """All gamma-sweep artifacts; returns the per-run frame and the verdicts for the README."""
    df = load(runs)
    table = summary_table(df)
    table.to_csv(out_dir / "gamma_summary.csv", index=False)
    (out_dir / "gamma_summary.md").write_text(to_markdown(table))
    df.drop(columns=["run_dir"]).to_csv(out_dir / "gamma_runs.csv", index=False)
    plot_curves(df, "train/grad_var", "log10 output-layer grad variance", out_dir / "gamma_grad_var.png",
                log10=True)
    plot_curves(df, "eval/dist_to_goal", "distance to goal (eval, both tasks)", out_dir / "gamma_dist_to_goal.png")
    plot_curves(df, "eval/kl_to_teacher", "log10 KL to teacher per step (eval)",
                out_dir / "gamma_kl_to_teacher.png", log10=True)
    plot_visitation(df, out_dir / "gamma_visitation.png", "final")
    plot_visitation(df, out_dir / "gamma_visitation_train.png", "train")
    plot_visitation_seeds(df, out_dir / "gamma_visitation_seeds.png")
    radius = float(runs[0]["toy"].get("success_radius", ToyGammaConfig.success_radius))
    return df, verdicts(df, radius)
