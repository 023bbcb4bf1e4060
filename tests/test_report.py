"""opd-exp-report on fixture run dirs built here (known means and CIs by hand), and sweeps end to end.

The fixture run dirs follow the run-dir contract (opd_exp/rundir.py): .hydra/config.yaml, .hydra/overrides.yaml,
config.yaml (resolved), metrics.jsonl and run_summary.json; their report blocks are the real ones of
conf/experiment/*.yaml, resolved with eval.k = 2.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from opd_exp.config.validation import ConfigError
from opd_exp.report import claims, stats
from opd_exp.report import cli as report
from opd_exp.report import runs as runs_mod
from opd_exp.report import table as table_mod
from opd_exp.report.cli import main
from opd_exp.report.stats import mean_ci, t_quantile

REPO = Path(__file__).resolve().parent.parent
SPLITS = ("id", "long", "wide")
T975_2DOF = 4.302652729911275  # t quantile 0.975, 2 dof (scipy.stats.t.ppf(0.975, 2))
T975_1DOF = 12.706204736174707


# ----------------------------------------------------------------------------- fixture builders

def experiment_block(name: str, k: int = 2) -> dict:
    """The resolved `report:` block and `experiment` of conf/experiment/<name>.yaml with eval.k = k."""
    node = OmegaConf.load(REPO / "conf" / "experiment" / f"{name}.yaml")
    node.pop("hydra", None)
    node = OmegaConf.merge({"eval": {"k": k}}, node)
    return OmegaConf.to_container(node, resolve=True)


def results_for(score: float, teacher: float = 0.9, before: float = 0.1, k: int = 2) -> dict:
    """Flat results: student_after = score on every split except wide (score / 2); teacher weakest on wide."""
    out = {}
    for who, base in (("student_after", score), ("teacher", teacher), ("student_before", before)):
        per_split = {"id": base, "long": base, "wide": base / 2}
        for metric in ("greedy@1", f"avg@{k}", f"pass@{k}"):
            for split, value in per_split.items():
                out[f"{who}/{split}/{metric}"] = value
                out[f"{who}/{split}/{metric}_ci"] = [value - 0.05, value + 0.05]
            out[f"{who}/avg/{metric}"] = sum(per_split.values()) / 3
    return out


def make_run(root: Path, overrides: list[str], config: dict, status: str = "completed",
             results: dict | None = None, error: str | None = None, steps: int = 3, summary: bool = True) -> Path:
    """One run dir as the entrypoint leaves it (summary=False: killed before writing run_summary.json)."""
    keyed = [o for o in overrides if not o.startswith("experiment=")]
    run = root / ",".join(sorted(keyed))
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if not summary:
        return run
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    seed = config["seed"]
    lines = [{"step": s, "train/loss": 1.0 / (s + 1) + 0.01 * seed, "train/response_len": 10.0 + s}
             for s in range(steps)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    body = {"status": status, "runner": config.get("runner", "opd"), "experiment": config["experiment"],
            "seed": seed, "overrides": overrides, "results": results or {}, "wall_time_s": 60.0,
            "git_commit": "abc123", "versions": {"python": "3.11"}}
    if error:
        body["error"] = error
    (run / "run_summary.json").write_text(json.dumps(body))
    return run


def base_config(name: str, seed: int, **extra) -> dict:
    cfg = experiment_block(name)
    cfg.update(seed=seed, runner="opd", model={"name": "tiny"},
               task={"eval_splits": {s: {} for s in SPLITS}}, train={"steps": 3})
    for key, value in extra.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


# math_main: student_after on id/long per (recipe, mask) cell, seeds 0, 1, 2
MAIN_SCORES = {("baseline", False): [0.2, 0.3, 0.4], ("baseline", True): [0.3, 0.3, 0.3],
               ("ours", False): [0.5, 0.6, 0.7], ("ours", True): [0.5, 0.7, None]}  # None: the failed seed


def make_math_main(root: Path) -> Path:
    sweep = root / "multirun" / "math_main"
    for (recipe, mask), scores in MAIN_SCORES.items():
        for seed, score in enumerate(scores):
            ov = [f"recipe={recipe}", f"mask.enabled={mask}", "model=tiny", f"seed={seed}", "experiment=math_main"]
            cfg = base_config("math_main", seed, **{"mask.enabled": mask})
            if score is None:
                make_run(sweep, ov, cfg, status="failed",
                         error="Traceback (most recent call last):\n  File x\nValueError: boom in cell\n")
            else:  # teacher / student_before differ by seed only
                make_run(sweep, ov, cfg, results=results_for(score, teacher=0.8 + 0.05 * seed,
                                                             before=0.1 + 0.1 * seed))
    return sweep


def row(frame: pd.DataFrame, label: str, column: str) -> pd.Series:
    hit = frame[(frame["row"] == label) & (frame["column"] == column)]
    assert len(hit) == 1, (label, column, frame)
    return hit.iloc[0]


# ----------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("dof, expected", [(1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (4, 2.7764451),
                                           (9, 2.2621572), (30, 2.0422725), (120, 1.9799304)])
def test_t_quantile_matches_tables(dof, expected):
    assert t_quantile(0.975, dof) == pytest.approx(expected, abs=1e-6)


def test_mean_ci_by_hand():
    s = mean_ci([0.2, 0.3, 0.4])  # sd 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3)
    half = T975_2DOF * 0.1 / math.sqrt(3)
    assert (s.mean, s.n) == (pytest.approx(0.3), 3)
    assert (s.lo, s.hi) == (pytest.approx(0.3 - half), pytest.approx(0.3 + half))
    one = mean_ci([0.7])
    assert one.n == 1 and one.mean == 0.7 and math.isnan(one.lo) and math.isnan(one.hi)
    assert mean_ci([None, float("nan")]).n == 0


# ----------------------------------------------------------------------------- paper layouts

def test_math_main_table_means_cis_and_failed_cell(tmp_path):
    sweep = make_math_main(tmp_path)
    # a cell killed before it wrote run_summary.json
    make_run(sweep, ["recipe=ours", "mask.enabled=True", "model=tiny", "seed=3", "experiment=math_main"],
             base_config("math_main", 3), summary=False)
    out = tmp_path / "results" / "math_main"
    assert main([str(sweep), "--out", str(out)]) == 0

    table = pd.read_csv(out / "main.csv")
    half = T975_2DOF * 0.1 / math.sqrt(3)
    r = row(table, "Sampled-token OPD", "id")
    assert (r["mean"], r["ci_lo"], r["ci_hi"], r["n"]) == (
        pytest.approx(0.3), pytest.approx(0.3 - half), pytest.approx(0.3 + half), 3)
    assert row(table, "Sampled-token OPD", "wide")["mean"] == pytest.approx(0.15)
    assert row(table, "Sampled-token OPD", "avg")["mean"] == pytest.approx((0.3 + 0.3 + 0.15) / 3)
    same = row(table, "+ mask", "id")  # zero spread: a zero-width interval
    assert (same["mean"], same["ci_lo"], same["ci_hi"]) == (pytest.approx(0.3),) * 3
    # the failed seed is left out: n = 2, mean 0.6, half-width t(0.975, 1) * sd / sqrt(2)
    masked = row(table, "Ours w/ mask", "id")
    half2 = T975_1DOF * math.sqrt(0.02) / math.sqrt(2)
    assert (masked["n"], masked["mean"]) == (2, pytest.approx(0.6))
    assert (masked["ci_lo"], masked["ci_hi"]) == (0.0, 1.0)  # 0.6 -+ 1.27 cut to the score's range [0, 1]
    assert 0.6 + half2 > 1
    # teacher: one value per seed (0.8, 0.85, 0.9), pooled over the 4 cells of each seed
    teacher = row(table, "Teacher", "id")
    assert (teacher["mean"], teacher["n"]) == (pytest.approx(0.85), 3)
    assert teacher["ci_hi"] == pytest.approx(0.85 + T975_2DOF * 0.05 / math.sqrt(3))
    assert row(table, "Student", "long")["mean"] == pytest.approx(0.2)
    assert list(table[table["row"] == "Teacher"]["column"]) == ["id", "long", "wide", "avg"]

    readme = (out / "README.md").read_text()
    assert "- reused:" not in readme  # no run was copied
    assert "ValueError: boom in cell" in readme
    assert "unfinished (no run_summary.json)" in readme
    assert "seeds: 0, 1, 2, 3" in readme and "abc123" in readme
    assert "opd-exp experiment=math_main model=tiny" in readme
    md = (out / "main.md").read_text()
    assert "| Sampled-token OPD | 30.0 ± 24.8 |" in md  # percent, half-width of the t-interval
    for name in ("bars_main.png", "curves_main.png", "runs.csv", "cells.csv", "tables.csv"):
        assert (out / name).stat().st_size > 0
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["status"].unique()) == ["completed", "failed", "unfinished (no run_summary.json)"]
    # the curves' data beside the figure: loss 1/(s + 1) + 0.01 seed, so step 0 minus step 1 is 0.5 in any row
    curves = pd.read_csv(out / "curves_main.csv")
    assert list(curves.columns) == ["key", "row", "step", "mean", "ci_lo", "ci_hi", "n"]
    loss = curves[(curves["key"] == "train/loss") & (curves["row"] == "Sampled-token OPD")].set_index("step")
    assert loss.loc[0, "mean"] - loss.loc[1, "mean"] == pytest.approx(0.5, abs=1e-5)
    assert loss.loc[0, "n"] == row(table, "Sampled-token OPD", "id")["n"] and loss.loc[0, "ci_lo"] < loss.loc[0, "mean"]


def test_a_shared_evaluation_shows_its_interval_over_prompts(tmp_path):
    """Teacher and student before are one cached evaluation in every run: the row shows that evaluation's own
    interval over prompts (here the recorded value -+ 0.05), not a zero-width interval over seeds."""
    sweep = tmp_path / "multirun" / "math_main"
    for seed, score in enumerate([0.5, 0.6, 0.7]):
        ov = ["recipe=ours", "mask.enabled=False", "model=tiny", f"seed={seed}", "experiment=math_main"]
        make_run(sweep, ov, base_config("math_main", seed), results=results_for(score, teacher=0.9, before=0.2))
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    table = pd.read_csv(out / "main.csv")
    teacher = row(table, "Teacher", "id")
    assert (teacher["mean"], teacher["ci_lo"], teacher["ci_hi"], teacher["n"]) == (
        pytest.approx(0.9), pytest.approx(0.85), pytest.approx(0.95), 1)
    ours = row(table, "Ours w/o mask", "id")  # student_after still varies by seed: the t-interval
    assert ours["n"] == 3 and ours["ci_hi"] == pytest.approx(0.6 + T975_2DOF * 0.1 / math.sqrt(3))
    assert "| Teacher | 90.0 [85.0, 95.0] |" in (out / "main.md").read_text()


def test_the_checkouts_experiment_file_lays_out_the_report(tmp_path):
    """The title, tables and claims come from conf/experiment/<name>.yaml as committed, not from the block each
    run stored when it ran (a stale title there is ignored)."""
    sweep = make_math_main(tmp_path)
    for cfg_file in sweep.glob("*/config.yaml"):
        cfg = yaml.safe_load(cfg_file.read_text())
        cfg["report"]["title"] = "A stale title"
        cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert report.main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "A stale title" not in readme
    assert readme.startswith(f"# {experiment_block('math_main')['report']['title']} (`math_main`)")


def test_included_files_are_embedded_in_the_readme(tmp_path, monkeypatch):
    """report.include: a Markdown file another command wrote into the report's dir is embedded (headings one
    level down); a missing one is named, and the report still completes."""
    monkeypatch.setattr(table_mod, "CONF_DIR", tmp_path / "no_conf")  # the runs' stored block: no file
    sweep = make_math_main(tmp_path)
    for cfg_file in sweep.glob("*/config.yaml"):
        cfg = yaml.safe_load(cfg_file.read_text())
        cfg["report"]["include"] = ["collapse.md", "absent.md"]
        cfg["report"]["notes"] = ["What the evidence shows."]
        cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "out"
    out.mkdir()
    (out / "collapse.md").write_text("# Evidence\n\n| run | n |\n|---|---|\n| Ours | 7 |\n")
    assert report.main([str(sweep), "--out", str(out)]) == 0
    readme = (out / "README.md").read_text()
    assert "## collapse.md\n\n## Evidence\n\n| run | n |" in readme
    assert readme.index("## Notes\n\nWhat the evidence shows.") < readme.index("## collapse.md")
    assert "| Ours | 7 |" in readme
    assert "## absent.md" in readme and "Not written yet" in readme


def test_reused_runs_are_counted_with_their_sweeps(tmp_path):
    sweep = make_math_main(tmp_path)
    for path in list(sweep.glob("*/run_summary.json"))[:2]:
        summary = json.loads(path.read_text())
        if summary["status"] == "completed":
            summary["reused_from"] = str(tmp_path / "multirun" / "ablation_components" / "recipe=ours,seed=0")
            path.write_text(json.dumps(summary))
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    readme = (out / "README.md").read_text()
    n = sum("reused_from" in json.loads(p.read_text()) for p in sweep.glob("*/run_summary.json"))
    assert n >= 1 and f"- reused: {n} runs copy a finished run" in readme and "sweeps ablation_components" in readme


def test_curves_put_one_loss_type_per_axis(tmp_path):
    """Rows training different objectives: their own losses are not plotted on one axis (the log-prob gap
    compares them); rows of one objective keep the loss panel."""
    from opd_exp.report.figures import comparable_keys

    runs = {}
    for name in ("sampled_token", "topk_rkl"):
        cfg = base_config("math_main", 0, **{"estimator.name": name})
        runs[name] = runs_mod.load_run(make_run(tmp_path / name, [f"estimator={name}", "seed=0"], cfg))
    keys = ["train/loss", "train/kl", "train/logprob_gap", "train/entropy"]
    mixed = [("a", [runs["sampled_token"]]), ("b", [runs["topk_rkl"]])]
    assert comparable_keys(mixed, keys) == ["train/logprob_gap", "train/entropy"]
    assert comparable_keys([("a", [runs["topk_rkl"]])], keys) == keys


def test_claims_read_paired_differences_over_seeds(tmp_path):
    out = tmp_path / "out"
    assert main([str(make_math_main(tmp_path)), "--out", str(out)]) == 0
    claims = pd.read_csv(out / "claims.csv").set_index("claim")
    # ours - baseline (no mask) per seed: 5/6 * 0.3 on the split average, the same for every seed
    beats = claims.loc["Ours w/o mask beats sampled-token OPD"]
    assert (beats["diff_mean"], beats["diff_ci_lo"], beats["n"]) == (pytest.approx(0.25), pytest.approx(0.25), 3)
    assert beats["verdict"] == "reproduces"
    # mask on the baseline: 5/6 * (0.1, 0, -0.1) -> mean 0, interval around it
    mask = claims.loc["Masking special tokens improves sampled-token OPD"]
    assert mask["diff_mean"] == pytest.approx(0.0, abs=1e-12)
    assert mask["diff_ci_hi"] == pytest.approx(T975_2DOF * (5 / 6) * 0.1 / math.sqrt(3))
    assert mask["verdict"].startswith("not significant")
    # the failed seed has no pair: n = 2; diffs 5/6 * (0, 0.1) contain 0 -> consistent with "similar"
    similar = claims.loc["Masking changes little on top of Ours"]  # n = 2 cannot show equivalence within 2 pts
    assert similar["n"] == 2 and similar["verdict"].startswith("not significant (not shown equivalent")
    assert similar["p_holm"] >= similar["p_equiv"] and math.isnan(beats["margin"])
    # student_before pairs with every seed: after - before = 5/6 * (0.2 - 0.1, 0.3 - 0.2, 0.4 - 0.3)
    improves = claims.loc["Sampled-token OPD improves on the student"]
    assert improves["diff_mean"] == pytest.approx(5 / 6 * 0.1) and improves["verdict"] == "reproduces"
    assert "## Paper claims at this scale" in (out / "README.md").read_text()


def judged(expect: str, diffs: list[float], margin: float = 0.02, untestable: str = "") -> claims.ClaimResult:
    """One claim judged alone (a family of one: Holm p = p) on paired differences ``diffs``."""
    spec = claims.ClaimSpec(claim="c", expect=expect, margin=margin, untestable=untestable)
    r = claims.ClaimResult(spec, "id", mean_ci(diffs), mean_ci([0.0] * len(diffs)), mean_ci(diffs),
                           p=stats.paired_t_p(diffs), p_equiv=stats.tost_p(diffs, margin),
                           mde=stats.min_detectable_effect(diffs))
    claims.judge([("", r)])
    return r


@pytest.mark.parametrize("expect,diffs,verdict", [
    ("higher", [0.10, 0.12, 0.11, 0.13], "reproduces"),
    ("lower", [0.10, 0.12, 0.11, 0.13], "opposite (significant)"),
    ("lower", [-0.10, -0.12, -0.11, -0.13], "reproduces"),
    ("higher", [0.10, -0.05, 0.02, 0.0], "not significant (MDE "),
    ("similar", [0.001, -0.002, 0.0, 0.001], "equivalent (within +-2 pts)"),
    ("similar", [0.10, 0.12, 0.11, 0.13], "opposite (significant difference)"),
    ("similar", [0.05, -0.05, 0.03, -0.02], "not significant (not shown equivalent within +-2 pts; MDE "),
    ("higher", [0.1], "not enough seeds (n = 1)")])
def test_claim_verdicts(expect, diffs, verdict):
    assert judged(expect, diffs).verdict.startswith(verdict)
    assert judged(expect, diffs, untestable="responses never drift").verdict == (
        "untestable at this scale: responses never drift")


def test_a_training_dynamics_claim_reads_each_runs_curve_over_its_last_steps(tmp_path):
    """metric: train/<name>: each run's mean over its last `window` of steps, paired by seed, in the curve's
    own units; a teacher or before-training side is refused by name."""
    runs = []
    for recipe, offset in (("topk_full", 0.0), ("baseline", 5.0)):
        for seed in range(3):
            cfg = base_config("ablation_components", seed, recipe=recipe)
            run = make_run(tmp_path / recipe, [f"recipe={recipe}", f"seed={seed}"], cfg, steps=8)
            rows = [{"step": s, "train/response_len": 20.0 + s + offset + seed * 0.1 * (recipe == "baseline")}
                    for s in range(8)]  # ends 27 vs 32 (+0.1 * seed): shorter on every seed
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            runs.append(runs_mod.load_run(run))
    spec = claims.ClaimSpec(claim="LSM gives shorter responses", metric="train/response_len", window=0.25,
                            a=claims.SideSpec(where={"recipe": "topk_full"}),
                            b=claims.SideSpec(where={"recipe": "baseline"}), expect="lower")
    matches = lambda run, where: all(run.lookup(k) == v for k, v in where.items())  # noqa: E731
    r = claims.evaluate_claim(spec, runs, matches, hardest_split=None)
    # steps >= 0.75 * 7 = 5.25: steps 6 and 7; a = 26.5, b = 31.5 + 0.1 * seed
    assert r.a.mean == pytest.approx(26.5) and r.b.mean == pytest.approx(31.6) and r.diff.n == 3
    assert r.diff.mean == pytest.approx(-5.1) and math.isnan(r.room) and r.split == "last 25% of steps"
    claims.judge([("", r)])
    assert r.verdict == "reproduces"
    line = next(x for x in claims.claims_markdown([("", r)]) if x.startswith("| LSM"))
    assert "| 26.5 | 31.6 | -5.1 [" in line  # tokens, not x 100 points
    with pytest.raises(ConfigError, match="report.claims.b.who"):
        claims.evaluate_claim(claims.ClaimSpec(metric="train/entropy", b=claims.SideSpec(who="teacher")), runs,
                              matches, hardest_split=None)


def test_a_claim_whose_mde_exceeds_the_teachers_lead_is_untestable():
    """Not significant with an MDE above the teacher - student gap on the split: no plausible effect could have
    shown (the room is unknown, nan, for a pair without teacher results: the plain verdict)."""
    diffs = [0.10, -0.05, 0.02, 0.0]
    r = judged("higher", diffs)
    assert r.verdict.startswith("not significant (MDE ")
    for room, expected in ((r.mde + 0.01, "not significant (MDE "), (r.mde - 0.01, "untestable at this scale: "),
                           (-0.02, "untestable at this scale: ")):
        r.room = room
        claims.judge([("", r)])
        assert r.verdict.startswith(expected), (room, r.verdict)
    assert "teacher's lead over the student on id" in r.verdict
    r = judged("higher", [0.10, 0.12, 0.11, 0.13])
    r.room = 0.0
    claims.judge([("", r)])
    assert r.verdict == "reproduces"  # a significant claim keeps its verdict


def test_paired_tests_by_hand():
    """Against the textbook closed forms of Student's t for 2, 3 and 4 degrees of freedom."""
    cdf3 = lambda t: 0.5 + (t / math.sqrt(3) / (1 + t * t / 3) + math.atan(t / math.sqrt(3))) / math.pi  # noqa: E731
    cdf4 = lambda t: 0.5 + 3 / 8 * t / math.sqrt(1 + t * t / 4) * (1 - t * t / (12 * (1 + t * t / 4)))  # noqa: E731
    assert stats.t_cdf(-1.5, 3) == pytest.approx(cdf3(-1.5), abs=1e-12)
    assert stats.t_cdf(2.0, 4) == pytest.approx(cdf4(2.0), abs=1e-12)
    t = 0.15 / (0.05 / math.sqrt(3))  # d = (0.1, 0.2, 0.15): two-sided p with 2 dof is 1 - t / sqrt(2 + t^2)
    assert stats.paired_t_p([0.1, 0.2, 0.15]) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    # TOST within 0.1 of d = (0.02, 0.05, -0.01, 0.04): mean 0.025, se 0.013229; max of the one-sided p-values
    se = math.sqrt(sum((d - 0.025) ** 2 for d in (0.02, 0.05, -0.01, 0.04)) / 3 / 4)
    expected = max(1 - stats.t_cdf((0.025 + 0.1) / se, 3), stats.t_cdf((0.025 - 0.1) / se, 3))
    assert stats.tost_p([0.02, 0.05, -0.01, 0.04], 0.1) == pytest.approx(expected)
    assert expected < 0.01 and stats.tost_p([0.02, 0.05, -0.01, 0.04], 0.02) > 0.5
    # MDE: (t_0.975 + t_0.8) * se with 2 dof, whose quantile is (2p - 1) sqrt(2 / (4 p (1 - p)))
    q2 = lambda p: (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))  # noqa: E731
    mde = stats.min_detectable_effect([0.1, 0.2, 0.15])
    assert mde == pytest.approx((q2(0.975) + q2(0.8)) * 0.05 / math.sqrt(3), abs=1e-9)
    assert stats.paired_t_p([0.1, 0.1]) == 0.0 and stats.paired_t_p([0.0, 0.0]) == 1.0
    assert math.isnan(stats.paired_t_p([0.3]))


def test_holm_adjusts_the_family():
    """Holm 1979: sorted p times (m - rank), made monotone; NaN left out of m."""
    assert stats.holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)
    assert stats.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    # a family of two claims that each pass alone at p ~ 0.035: the adjusted p is ~0.07, no longer significant
    a = judged("higher", [0.1, 0.2, 0.15])
    pair = [("", claims.ClaimResult(a.spec, "id", a.a, a.b, a.diff, p=a.p, p_equiv=a.p_equiv, mde=a.mde))
            for _ in range(2)]
    claims.judge(pair)
    assert a.verdict == "reproduces" and pair[0][1].p_holm == pytest.approx(2 * a.p)
    assert pair[0][1].verdict.startswith("not significant")


def test_hardest_split_is_the_students_worst_among_those_the_teacher_leads(tmp_path):
    before = {"id": 0.3, "long": 0.05, "wide": 0.15}
    teacher = {"id": 0.99, "long": 0.04, "wide": 0.35}  # long: the teacher fails it as badly as the student
    runs = []
    for seed in (0, 1):
        results = {f"{who}/{split}/avg@2": value for who, table in (("student_before", before), ("teacher", teacher))
                   for split, value in table.items()}
        ov = ["recipe=ours", "model=tiny", f"seed={seed}", "experiment=ablation_components"]
        runs.append(make_run(tmp_path, ov, base_config("ablation_components", seed), results=results))
    loaded = [runs_mod.load_run(p) for p in runs]
    assert table_mod.hardest_split(loaded, "avg@2") == "wide"
    untaught = {f"teacher/{s}/avg@2": 0.0 for s in before} | {f"student_before/{s}/avg@2": 0.5 for s in before}
    for run in loaded:
        run.summary["results"] = untaught | {"teacher/long/avg@2": -1.0}
    assert table_mod.hardest_split(loaded, "avg@2") == "long"  # none taught: the teacher's lowest


def test_hardest_column_in_the_component_table(tmp_path):
    sweep = tmp_path / "ablation_components"
    for recipe, score in (("baseline", 0.2), ("baseline_top_p", 0.3), ("topk_full", 0.1), ("ours", 0.4)):
        for seed in (0, 1):
            ov = [f"recipe={recipe}", "model=tiny", f"seed={seed}", "experiment=ablation_components"]
            make_run(sweep, ov, base_config("ablation_components", seed), results=results_for(score + seed / 10))
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "main.csv")
    assert set(table["column"]) == {"hardest (wide)"}
    assert row(table, "Teacher top-K alone", "hardest (wide)")["mean"] == pytest.approx((0.1 + 0.2) / 2 / 2)
    assert row(table, "Top-K + top-p (Ours)", "hardest (wide)")["n"] == 2


def test_x_layout_finds_panels_by_resolved_config(tmp_path):
    sweep = tmp_path / "ablation_k_topp"
    points = {"ours": (8, 0.9, "renormalized", 0.6), "f6/k4": (4, 0.9, "renormalized", 0.5),
              "f6/k1": (1, 0.9, "renormalized", 0.2), "f6/unnorm": (8, 0.9, "none", 0.05),
              "f6/p100": (8, 1.0, "renormalized", 0.3)}
    for recipe, (k, p, norm, score) in points.items():
        for seed in (0, 1, 2):
            cfg = base_config("ablation_k_topp", seed, **{"estimator.top_k": k, "sampling.top_p": p,
                                                          "estimator.normalize": norm})
            ov = [f"recipe={recipe}", "model=tiny", f"seed={seed}", "experiment=ablation_k_topp"]
            make_run(sweep, ov, cfg, results=results_for(score))
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    k = pd.read_csv(out / "k.csv")
    assert list(k[k["column"] == "id"]["row"]) == ["estimator.top_k=1", "estimator.top_k=4", "estimator.top_k=8"]
    assert row(k, "estimator.top_k=4", "id")["mean"] == pytest.approx(0.5)
    ours = row(k, "estimator.top_k=8", "id")  # only the Ours cell: unnorm and p100 (also K = 8) are other panels
    assert (ours["mean"], ours["n"]) == (pytest.approx(0.6), 3)
    renorm = pd.read_csv(out / "renorm.csv")
    assert set(renorm["row"]) == {"estimator.normalize=none", "estimator.normalize=renormalized"}
    top_p = pd.read_csv(out / "top_p.csv")
    assert set(top_p["row"]) == {"sampling.top_p=0.9", "sampling.top_p=1.0"}
    assert (out / "x_k.png").stat().st_size > 0


def test_pivot_marks_best_lr(tmp_path):
    sweep = tmp_path / "lr_tune"
    for recipe in ("baseline", "ours"):
        for lr, score in ((1.5e-4, 0.2), (5e-4, 0.4 if recipe == "ours" else 0.1), (1.5e-3, 0.3)):
            for seed in (100, 101, 102):
                ov = [f"recipe={recipe}", f"train.lr={lr}", "model=tiny", f"seed={seed}", "experiment=lr_tune"]
                make_run(sweep, ov, base_config("lr_tune", seed, **{"train.lr": lr}), results=results_for(score))
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    md = (out / "main.md").read_text()
    assert "recipe=ours: best train.lr=0.0005" in md
    assert "recipe=baseline: best train.lr=0.0015" in md
    assert md.count(" * |") == 2
    assert "conf/recipe/ours.yaml records train.lr=" in md  # the recorded choice, checked against the sweep


def test_adhoc_sweep_gets_a_generic_table_and_facets_by_experiment(tmp_path):
    sweep = tmp_path / "adhoc"
    for est, score in (("sampled_token", 0.2), ("topk_rkl", 0.4)):
        for seed in (0, 1):
            cfg = {"experiment": "default", "seed": seed, "runner": "opd", "report": {}}
            make_run(sweep, [f"estimator={est}", f"seed={seed}"], cfg, results={"student_after/id/avg@4": score})
    other = make_math_main(tmp_path)
    out = tmp_path / "out"
    assert main([str(sweep), str(other), "--out", str(out)]) == 0  # two experiments -> out/<experiment>
    table = pd.read_csv(out / "default" / "main.csv")
    assert row(table, "estimator=topk_rkl", "student_after/id/avg@4")["mean"] == pytest.approx(0.4)
    assert (out / "math_main" / "main.csv").exists()


def test_model_facet_splits_tables(tmp_path):
    sweep = make_math_main(tmp_path)
    for seed in (0, 1, 2):
        ov = ["recipe=ours", "mask.enabled=False", "model=tiny_mismatch", f"seed={seed}", "experiment=math_main"]
        cfg = base_config("math_main", seed)
        make_run(sweep, ov, cfg, results=results_for(0.9))
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    mismatch = pd.read_csv(out / "main__model=tiny_mismatch.csv")
    assert row(mismatch, "Ours w/o mask", "id")["mean"] == pytest.approx(0.9)
    assert row(pd.read_csv(out / "main__model=tiny.csv"), "Ours w/o mask", "id")["mean"] == pytest.approx(0.6)


def test_toy_runs_go_to_the_toy_report(tmp_path, monkeypatch):
    calls = []

    def fake_toy_report(run_dirs, out_dir):
        calls.append((sorted(run_dirs), out_dir))
        (out_dir / "README.md").write_text("# Toy study (written by the toy report)\n")

    fake = types.ModuleType("opd_exp.toy.report")
    fake.write_toy_report = fake_toy_report
    monkeypatch.setitem(sys.modules, "opd_exp.toy.report", fake)
    sweep = tmp_path / "toy_gamma"
    for gamma in (0.0, 1.0):
        cfg = {"experiment": "toy_gamma", "seed": 0, "runner": "toy_gamma", "report": {}}
        make_run(sweep, [f"toy.gamma={gamma}", "seed=0"], cfg, results={"final/return": gamma})
    make_run(sweep, ["toy.gamma=0.5", "seed=0"], {"experiment": "toy_gamma", "seed": 0, "runner": "toy_gamma"},
             status="failed", error="RuntimeError: toy boom")
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    assert len(calls) == 1 and len(calls[0][0]) == 3 and calls[0][1] == out  # failed runs too: it lists them
    readme = (out / "README.md").read_text()
    assert readme.startswith("# Toy study (written by the toy report)")
    assert "RuntimeError: toy boom" in readme and "# Runs of `toy`" in readme
    assert not (out / "main.md").exists()  # the toy report owns the tables


def test_toy_runs_without_the_toy_report_get_generic_tables(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "opd_exp.toy.report", None)  # import fails
    sweep = tmp_path / "toy_gamma"
    for gamma in (0.0, 1.0):
        cfg = {"experiment": "toy_gamma", "seed": 0, "runner": "toy_gamma", "report": {}}
        make_run(sweep, [f"toy.gamma={gamma}", "seed=0"], cfg, results={"final/return": gamma})
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "main.csv")
    assert row(table, "toy.gamma=1.0", "final/return")["mean"] == pytest.approx(1.0)


def test_no_runs_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    assert "no run dirs" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sweeps end to end

HAS_LOOP = importlib.util.find_spec("opd_exp.train.loop") is not None
try:
    import opd_exp.train.loop  # noqa: F401
except Exception:  # the loop is being written: its imports may not resolve yet
    HAS_LOOP = False
needs_loop = pytest.mark.skipif(not HAS_LOOP, reason="opd_exp.train.loop does not import yet (the lead's loop)")
# cells named by job number: the smoke overrides would make Hydra's override_dirname longer than a file name
SHORT_SUBDIR = "hydra.sweep.subdir=cell${hydra:job.num}"


def hydra_literal(value) -> str:
    """A YAML value in Hydra's override grammar ({a:1,b:[x,y]}, true, null)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(hydra_literal(v) for v in value) + "]"
    return str(value)


@pytest.fixture(scope="module")
def smoke_overrides(smoke) -> list[str]:
    """The suite's smoke scale (tests/conftest.py, experiment/smoke.yaml) as command-line overrides, so these
    runs share its bootstrapped pair while naming a paper experiment; the loop is cut to 2 steps."""
    node = yaml.safe_load((smoke.conf_dir / "experiment" / "smoke.yaml").read_text())
    node.pop("experiment", None)
    node.pop("defaults", None)  # group choices: each test picks its own
    node["train"].update(steps=2, checkpoint_every=0, diag_every=0)
    out = [f"++model.bootstrap={hydra_literal(node['model'].pop('bootstrap'))}"]
    for group, value in node.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        out += [f"++{group}{'.' + k if k else ''}={hydra_literal(v)}" for k, v in items if v != {}]
    return out


def opd_exp_cli(args: list[str], smoke) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opd_exp", *args], cwd=smoke.root, env=smoke.env(),
                          capture_output=True, text=True, timeout=600)


@needs_loop
def test_failed_cell_is_reported_and_only_it_reruns(tmp_path, smoke, smoke_overrides):
    sweep = tmp_path / "sweep"
    # estimator.top_k=0 fails validation in one cell; the other cell must finish and be reported
    args = ["-m", "experiment=math_main", "recipe=ours", "mask.enabled=false", "model=tiny", "seed=0", *smoke_overrides,
            "estimator.top_k=0,4", f"hydra.sweep.dir={sweep}", SHORT_SUBDIR]
    first = opd_exp_cli(args, smoke)
    assert first.returncode == 0, first.stderr[-3000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/run_summary.json")}
    status = {name: s["status"] for name, s in summaries.items()}
    assert sorted(status.values()) == ["completed", "failed"], status
    done = next(s for s in summaries.values() if s["status"] == "completed")
    meta = json.loads((smoke.entry / "bootstrap.json").read_text())  # provenance: the pair and what was evaluated
    assert done["pair"]["entry"] == smoke.entry.name
    assert done["pair"]["teacher_sha256"] == meta["teacher"]["weights_sha256"]
    assert done["pair"]["bootstrap_threads"] == meta["torch_threads"]
    assert done["eval_prompts"] == dict.fromkeys(SPLITS, 8) and "git_dirty" in done
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    readme = (tmp_path / "out" / "README.md").read_text()
    assert f"- pair: {smoke.entry.name} (teacher sha256 {meta['teacher']['weights_sha256'][:12]}" in readme
    (scale,) = [ln for ln in readme.splitlines() if ln.startswith("- scale: ")]
    assert "evaluated prompts per split: id=8, long=8, wide=8" in scale and "task.n_eval" not in scale
    assert f"- code that ran: {done['git_commit'][:10]} (2 runs, " in readme
    assert "estimator.top_k" in readme and "| failed |" in readme
    assert "Ours w/o mask" in (tmp_path / "out" / "main.md").read_text()
    cell = {s: next(sweep / n for n, st in status.items() if st == s) for s in ("completed", "failed")}
    before = {s: (d / "run_summary.json").stat().st_mtime_ns for s, d in cell.items()}
    second = opd_exp_cli(args, smoke)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already finished; skipping" in second.stdout + second.stderr
    after = {s: (d / "run_summary.json").stat().st_mtime_ns for s, d in cell.items()}
    assert after["completed"] == before["completed"]  # the finished cell was skipped
    assert after["failed"] > before["failed"]  # the failed one ran again


# The paper-table sweeps other than math_main (the failed-cell test above runs math_main's Ours cell); the
# toy study's experiments are smoke-tested by its own tests.
SMOKED = ["ablation_components", "ablation_support", "ablation_k_topp", "lr_tune"]


def first_cell(name: str) -> list[str]:
    """Seed 0 and the first value of every other swept key of conf/experiment/<name>.yaml."""
    node = OmegaConf.load(REPO / "conf" / "experiment" / f"{name}.yaml")
    params = OmegaConf.select(node, "hydra.sweeper.params") or {}
    return ["seed=0"] + [f"{k}={str(v).split(',')[0]}" for k, v in params.items() if k != "seed"]


@needs_loop
@pytest.mark.parametrize("name", SMOKED)
def test_experiment_runs_at_smoke_scale(tmp_path, smoke, smoke_overrides, monkeypatch, name):
    """The entrypoint's own Hydra main, in this process (the subprocess CLI is covered above; re-importing
    torch and transformers per experiment would cost most of the test budget)."""
    from opd_exp.__main__ import hydra_main

    sweep = tmp_path / "sweep"
    monkeypatch.setenv("OPD_EXP_CACHE", str(smoke.cache))
    monkeypatch.setattr(sys, "argv", ["opd-exp", f"experiment={name}", *first_cell(name), *smoke_overrides,
                                      f"hydra.sweep.dir={sweep}", SHORT_SUBDIR])
    hydra_main()
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/run_summary.json")]
    assert summaries and all(s["status"] in ("completed", "diverged") for s in summaries), summaries
    assert report.main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    assert "Table" in (tmp_path / "out" / "README.md").read_text() or name == "lr_tune"


def test_seed_plan_inverts_the_committed_interval():
    """scripts/plan_seeds.py: the sd behind a claim's interval is the paired differences' sd, its MDE is the
    report's, and the seeds it asks for reach the target MDE (one fewer does not)."""
    spec = importlib.util.spec_from_file_location("plan_seeds", REPO / "scripts" / "plan_seeds.py")
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    diffs = [0.05, 0.02, 0.08, 0.03]
    ci = mean_ci(diffs)
    sd = plan.paired_sd(ci.lo, ci.hi, 4)
    mean = sum(diffs) / 4
    assert sd == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3))
    assert plan.mde(sd, 4) == pytest.approx(stats.min_detectable_effect(diffs))
    n = plan.seeds_needed(sd, 0.02, 0.05, 50)
    assert plan.mde(sd, n) <= 0.02 < plan.mde(sd, n - 1)
    assert plan.seeds_needed(sd, 1e-6, 0.05, 10) is None


def test_seed_plan_leaves_training_dynamics_claims_out(tmp_path):
    """Its target is in points of accuracy: a claim on a training curve (tokens, nats) gets no plan."""
    spec = importlib.util.spec_from_file_location("plan_seeds", REPO / "scripts" / "plan_seeds.py")
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    path = tmp_path / "t3" / "claims.csv"
    path.parent.mkdir()
    pd.DataFrame([{"claim": "accuracy", "group": "all", "split": "long", "metric": "avg@4", "n": 3,
                   "diff_ci_lo": -0.02, "diff_ci_hi": 0.04},
                  {"claim": "shorter", "group": "all", "split": "last 25% of steps", "metric": "train/response_len",
                   "n": 3, "diff_ci_lo": -2.0, "diff_ci_hi": 1.0}]).to_csv(path, index=False)
    rows = plan.plan([path], 0.02, 30)[2:]
    assert len(rows) == 1 and "| accuracy |" in rows[0]


def test_pair_seeds_are_replicates(tmp_path):
    """A sweep over model.bootstrap.seed (independently bootstrapped pairs) x seed: one cell per recipe, whose
    replicates are (pair seed, run seed); the teacher varies with the pair, so its row has an interval over
    the 2 pairs, and claims pair a run with the teacher of its own pair."""
    sweep = tmp_path / "multirun" / "math_main"
    for pair_seed in (0, 1):
        for seed in (0, 1):
            ov = ["recipe=ours", "mask.enabled=False", "model=tiny", f"model.bootstrap.seed={pair_seed}",
                  f"seed={seed}", "experiment=math_main"]
            cfg = base_config("math_main", seed, **{"model.bootstrap.seed": pair_seed})
            make_run(sweep, ov, cfg, results=results_for(0.5 + 0.1 * pair_seed + 0.01 * seed,
                                                         teacher=0.8 + 0.1 * pair_seed))
    runs = [runs_mod.load_run(p) for p in runs_mod.find_run_dirs([str(sweep)])]
    assert len({r.cell for r in runs}) == 1 and len({r.replicate for r in runs}) == 4
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    table = pd.read_csv(out / "main.csv")
    teacher = row(table, "Teacher", "id")
    # one teacher per pair: n counts pairs, not the 4 replicates
    assert (teacher["n"], teacher["mean"]) == (2, pytest.approx(0.85)) and teacher["ci_lo"] < 0.8
    assert row(table, "Ours w/o mask", "id")["n"] == 4


def test_pair_seeds_report_pools_pairs_and_keeps_each_pair_apart(tmp_path):
    """experiment=pair_seeds: the pooled claims (over: pairs) take one mean difference per pair, each run paired
    with its own pair's student; a row or claim whose `where` names a pair seed reads that pair alone, Student
    rows included (each pair has its own student)."""
    sweep = tmp_path / "multirun" / "pair_seeds"
    for pair_seed in (0, 1, 2):
        for seed in (0, 1):
            for recipe, gain in (("baseline", 0.0), ("ours", 0.1 if pair_seed < 2 else -0.1)):
                ov = [f"recipe={recipe}", "mask.enabled=False", "model=tiny", f"model.bootstrap.seed={pair_seed}",
                      f"seed={seed}", "experiment=pair_seeds"]
                cfg = base_config("pair_seeds", seed, **{"model.bootstrap.seed": pair_seed, "mask.enabled": False})
                make_run(sweep, ov, cfg, results=results_for(0.4 + gain + 0.02 * seed + 0.03 * pair_seed,
                                                             before=0.1 * (pair_seed + 1)))
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    pairs = pd.read_csv(out / "pairs.csv")
    for pair_seed in (0, 1, 2):
        student = row(pairs, f"Student, pair {pair_seed}", "id")
        # one pair's student is one evaluation: the row shows it with its interval over prompts (results_for)
        assert (student["mean"], student["ci_lo"]) == (pytest.approx(0.1 * (pair_seed + 1)),
                                                       pytest.approx(0.1 * (pair_seed + 1) - 0.05))
        assert row(pairs, f"Ours w/o mask, pair {pair_seed}", "id")["n"] == 2
    assert row(pd.read_csv(out / "main.csv"), "Student", "id")["n"] == 3  # one student per pair
    claims = pd.read_csv(out / "claims.csv").set_index("claim")
    on_avg = (1 + 1 + 0.5) / 3  # the claims read the split average; `wide` scores half (results_for)
    pooled = claims.loc["Ours w/o mask beats sampled-token OPD"]  # over: pairs, one mean difference a pair
    assert pooled["n"] == 3 and pooled["diff_mean"] == pytest.approx(0.1 / 3 * on_avg)
    assert pooled["diff_ci_hi"] - pooled["diff_ci_lo"] == pytest.approx(
        2 * t_quantile(0.975, 2) * statistics.stdev([0.1, 0.1, -0.1]) * on_avg / math.sqrt(3), rel=1e-6)
    for pair_seed, gain in ((0, 0.1), (1, 0.1), (2, -0.1)):
        one = claims.loc[f"Ours w/o mask beats sampled-token OPD, pair {pair_seed}"]
        assert one["n"] == 2 and one["diff_mean"] == pytest.approx(gain * on_avg)
    readme = (out / "README.md").read_text()
    assert "| Ours w/o mask beats sampled-token OPD | " in readme and "| 3 pairs |" in readme
    improves = claims.loc["Sampled-token OPD improves on the student"]  # each run against its own pair's student
    assert improves["n"] == 3 and improves["diff_mean"] == pytest.approx((0.4 + 0.01 + 0.03 - 0.2) * on_avg)
