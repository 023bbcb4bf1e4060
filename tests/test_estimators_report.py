"""The estimator comparison's report (opd_exp/report/estimators.py) on hand-made run dirs of
conf/experiment/estimators.yaml: the ranking, the paired verdicts, the probe's per-run means and CIs, the files,
and scripts/set_estimator_lrs.py on a tuning table.

Run: pytest tests/test_estimators_report.py -q
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_report import REPO, base_config, make_run, results_for

from opd_exp.report import cli
from opd_exp.report.estimators import summarize, verdict
from opd_exp.report.runs import find_run_dirs, load_run
from opd_exp.report.stats import Stat

# final avg@2 on id / long (wide is half) per objective and seed; a: best, b: within noise of a, c: always lower
SCORES = {"a": [0.50, 0.60, 0.70], "b": [0.55, 0.50, 0.68], "c": [0.20, 0.25, 0.30]}
# probe cosine per (objective measured) at steps 0 and 25, the same in every run except a seed offset
COSINE = {"full_rkl": (1.0, 1.0), "a": (0.9, 0.7), "b": (0.5, 0.3), "c": (0.2, 0.2)}


def make_sweep(root: Path) -> Path:
    sweep = root / "multirun" / "estimators"
    for name, scores in SCORES.items():
        for seed, score in enumerate(scores):
            ov = [f"recipe=est/{name}", "model=tiny", f"seed={seed}", "experiment=estimators"]
            run = make_run(sweep, ov, base_config("estimators", seed), results=results_for(score))
            rows = [{"step": step, "objective": obj, "cosine": cos[i] - 0.01 * seed, "cosine_mb": cos[i] / 2,
                     "variance": 1.0, "rel_variance": 10.0 ** (-cos[i]), "grad_norm": 1.0, "time_s": 0.01,
                     "peak_mb": None}
                    for i, step in enumerate((0, 25)) for obj, cos in COSINE.items()]
            rows.append(dict(rows[0], cosine=-5.0))  # a re-measured (step 0, full_rkl) row: the first one loses
            rows[0] = dict(rows[0], cosine=-5.0)
            rows[-1] = dict(rows[-1], cosine=1.0 - 0.01 * seed)
            (run / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sweep


def test_ranking_verdicts_and_probe_means(tmp_path):
    runs = [load_run(p) for p in find_run_dirs([str(make_sweep(tmp_path))])]
    summary = summarize(runs, "avg@2")
    by = {r["objective"]: r for r in summary}
    assert [r["objective"] for r in summary[:3]] == ["a", "b", "c"] and "full_rkl" in by
    assert [by[n]["verdict"] for n in "abc"] == ["top", "not significant", "significantly lower"]
    # Holm over the two comparisons (full_rkl was only probed: no p): c's p doubled, b's the larger one kept
    assert by["c"]["p_holm"] == pytest.approx(2 * by["c"]["p"]) and by["b"]["p_holm"] == pytest.approx(by["b"]["p"])
    assert math.isnan(by["full_rkl"]["p_holm"]) and by["c"]["mde"] > 0
    # avg over the splits: (s + s + s / 2) / 3 = 5 s / 6; a's mean score over seeds 0.6 -> 0.5
    assert by["a"]["accuracy"].mean == pytest.approx(0.5, abs=1e-12) and by["a"]["accuracy"].n == 3
    # every run probes every objective: n = 9 runs; per run the mean over steps 0 and 25
    assert by["a"]["cosine"].n == 9 and by["a"]["cosine"].mean == pytest.approx(0.8 - 0.01, abs=1e-12)
    assert by["full_rkl"]["cosine"].mean == pytest.approx(1.0 - 0.01, abs=1e-12)  # the re-measured row won
    assert by["full_rkl"]["accuracy"].n == 0 and math.isnan(by["full_rkl"]["peak_mb"].mean)


def test_cli_writes_the_estimators_files(tmp_path):
    sweep = make_sweep(tmp_path)
    out = tmp_path / "results"
    assert cli.main([str(sweep), "--out", str(out)]) == 0
    folder = out / "estimators" if (out / "estimators").is_dir() else out
    for name in ("probe.csv", "estimators.csv", "estimators.md", "accuracy_vs_variance.png",
                 "cosine_over_training.png", "README.md", "main.csv"):
        assert (folder / name).is_file(), name
    readme = (folder / "README.md").read_text()
    assert "## Estimator comparison" in readme and "significantly lower: c" in readme
    with open(folder / "estimators.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["objective"] for r in rows][:3] == ["a", "b", "c"] and rows[2]["verdict"] == "significantly lower"
    assert sum(1 for _ in open(folder / "probe.csv")) == 1 + 9 * 2 * len(COSINE)  # the re-measured row dropped


def test_verdict_follows_the_holm_adjusted_p_and_needs_two_seeds():
    assert verdict(Stat(0.1, math.nan, math.nan, 1), math.nan).startswith("n/a")
    assert verdict(Stat(-0.1, -0.2, -0.05, 3), 0.01) == "significantly lower"
    assert verdict(Stat(-0.1, -0.2, -0.05, 3), 0.06) == "not significant"  # raw CI excludes 0, Holm does not
    assert verdict(Stat(0.1, 0.05, 0.2, 3), 0.01) == "significantly higher"


def test_set_estimator_lrs_rewrites_the_lr_line(tmp_path):
    spec = importlib.util.spec_from_file_location("set_lrs", REPO / "scripts" / "set_estimator_lrs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = tmp_path / "main.csv"
    table.write_text("table,facet,row,column,metric,mean,ci_lo,ci_hi,n\n"
                     "main,,recipe=est/vopd,train.lr=5e-05,avg@4,0.20,,,2\n"
                     "main,,recipe=est/vopd,train.lr=0.00015,avg@4,0.25,,,2\n"
                     "main,,recipe=est/vopd,train.lr=0.0005,avg@4,0.10,,,2\n")
    best = mod.best_lrs(table)
    assert best["vopd"][0] == pytest.approx(1.5e-4)
    text = mod.rewrite(REPO / "conf" / "recipe" / "est" / "vopd.yaml", *best["vopd"], table)
    assert "  lr: 0.00015\n" in text and "0.00015: 25.0%" in text and "Not tuned yet" not in text
    assert text.count("lr:") == text.count("\n  lr:") + text.count("# lr:")


# ----------------------------------------------------------------------------- the experiment files


def test_estimators_experiment_trains_and_probes_the_same_objectives():
    """The sweep's recipes are exactly the probed objectives (and the lr tuning's); three cells composed."""
    from test_configs import composed, run_config, sweep_cells

    from opd_exp.train.probe import estimator_preset

    probed = list(OmegaConf.load(REPO / "conf" / "experiment" / "estimators.yaml").estimator.probe_objectives)
    recipes = [dict(c.split("=", 1) for c in cell)["recipe"] for cell in sweep_cells("estimators")]
    assert recipes == [f"est/{n}" for n in probed]
    tune = {dict(c.split("=", 1) for c in cell)["recipe"] for cell in sweep_cells("estimators_lr_tune")}
    assert tune == set(recipes)
    for name in ("sampled_token", "topk_sg", "iw_opd"):
        cfg = run_config(composed(["experiment=estimators", f"recipe=est/{name}"]))
        assert cfg.sampling.top_p == 1.0 and cfg.train.steps == 100 and cfg.estimator.probe_objectives == probed
        preset = estimator_preset(name)
        assert cfg.estimator == type(preset)(**{**vars(preset), "probe_every": 25, "probe_objectives": probed})
    assert run_config(composed(["experiment=estimators_lr_tune", "recipe=est/vopd"])).estimator.probe_every == 0
