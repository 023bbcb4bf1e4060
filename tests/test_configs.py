"""Every config in conf/ composes (Hydra's compose API on the absolute config dir) and validates.

Covers the root config, every option of every config group (recipes and launcher presets included), every
experiment file, and every cell of each paper-table sweep (its sweeper params expanded, seed left out).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

from opd_exp.config import load_run_config
from opd_exp.report.table import report_spec

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = sorted({p.parent.relative_to(CONF).parts[0] for p in CONF.glob("*/**/*.yaml")} - {"hydra", "experiment"})
PAPER_EXPERIMENTS = ["math_main", "ablation_components", "ablation_support", "ablation_k_topp", "lr_tune",
                     "failure_modes"]


def options(group: str) -> list[str]:
    """Option names of a group, nested ones as 'sub/name' (e.g. recipe=f6/k4)."""
    return sorted(str(p.relative_to(CONF / group).with_suffix("")) for p in (CONF / group).rglob("*.yaml"))


def composed(overrides: list[str], hydra: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


def run_config(cfg):
    """The RunConfig of a composed config (the `hydra` node left out, as the entrypoint does)."""
    node = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    return load_run_config(node)


def test_root_config_composes_and_validates():
    cfg = run_config(composed([]))
    assert cfg.estimator.name == "topk_rkl" and cfg.sampling.top_p == 0.9


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_group_option_composes(group, option):
    run_config(composed([f"{group}={option}"]))


@pytest.mark.parametrize("option", options("hydra/launcher"))
def test_launcher_preset_composes(option):
    cfg = composed([f"hydra/launcher={option}"], hydra=True)
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")


@pytest.mark.parametrize("recipe, estimator, top_p", [("baseline", "sampled_token", 1.0),
                                                      ("ours", "topk_rkl", 0.9),
                                                      ("baseline_top_p", "sampled_token", 0.9),
                                                      ("topk_full", "topk_rkl", 1.0)])
def test_recipe_ties_estimator_and_sampling(recipe, estimator, top_p):
    cfg = run_config(composed([f"recipe={recipe}"]))
    assert (cfg.estimator.name, cfg.sampling.top_p) == (estimator, top_p)


def test_swept_estimator_replaces_the_recipes():
    cfg = run_config(composed(["recipe=ours", "estimator=topk_v2"]))
    assert cfg.estimator.support == "student" and cfg.sampling.top_p == 0.9


def test_f6_recipes_change_one_knob_of_ours():
    assert run_config(composed(["recipe=f6/k4"])).estimator.top_k == 4
    assert run_config(composed(["recipe=f6/p100"])).sampling.top_p == 1.0
    unnorm = run_config(composed(["recipe=f6/unnorm"]))
    ours = run_config(composed(["recipe=ours"]))
    assert (unnorm.estimator.normalize, unnorm.estimator.top_k) == ("none", ours.estimator.top_k)


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_composes_and_validates(name):
    cfg = composed([f"experiment={name}"], hydra=True)
    assert cfg.experiment == name
    run = run_config(cfg)
    assert run.experiment == name


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
def test_paper_experiment_is_a_deterministic_multirun(name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert f"opd-exp experiment={name}" in text and "Wall time at the default scale" in text
    cfg = composed([f"experiment={name}"], hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.hydra.sweep.dir == f"multirun/{name}"
    seeds = str(cfg.hydra.sweeper.params.seed).split(",")
    # every table has at least 3 seeds; the lr sweep (not a table) 2 per (recipe, lr)
    assert len(seeds) >= (2 if name == "lr_tune" else 3)
    assert report_spec_of(cfg).tables, "a paper experiment needs a report block"


def report_spec_of(cfg):
    class _Run:  # report_spec reads the experiment file's report block, resolved against run.config
        experiment = cfg.experiment
        config = {"report": OmegaConf.to_container(cfg.report, resolve=True), "eval": {"k": cfg.eval.k}}

    return report_spec([_Run()])


def sweep_cells(name: str) -> list[list[str]]:
    """The sweep's cells (seed left out) as override lists."""
    node = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
    params = {k: str(v).split(",") for k, v in node.hydra.sweeper.params.items() if k != "seed"}
    return [[f"{k}={v}" for k, v in zip(params, combo, strict=True)]
            for combo in itertools.product(*params.values())]


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
def test_every_sweep_cell_composes_and_validates(name):
    for cell in sweep_cells(name):
        run_config(composed([f"experiment={name}", *cell]))


@pytest.mark.parametrize("name", ["multitask", "ablation_support_multitask"])
def test_multitask_tables_run_the_papers_methods_on_the_mix(name):
    """Table 2 and Table 4's multi-task columns: every cell trains on the mix, without the games' own
    mask.after_rejected (the paper's methods as the paper runs them), with the swept support variant."""
    cfg = composed([f"experiment={name}"], hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.hydra.sweep.dir == f"multirun/{name}"
    assert report_spec_of(cfg).tables
    for cell in sweep_cells(name):
        run = run_config(composed([f"experiment={name}", *cell]))
        assert run.task.name == "math_agentic" and run.mask.after_rejected is False
        variant = dict(c.split("=") for c in cell).get("estimator")
        if variant:
            assert run.estimator.support == composed([f"estimator={variant}"]).estimator.support


def test_lr_tune_uses_prompts_and_seeds_apart():
    cfg = composed(["experiment=lr_tune"], hydra=True)
    assert cfg.task.eval_set == "tune" and composed([]).task.eval_set == "report"
    assert cfg.task.data_seed == composed([]).task.data_seed  # the same pair and train pool
    assert all(int(s) >= 100 for s in str(cfg.hydra.sweeper.params.seed).split(","))


def test_reproduce_script_dry_run_names_each_sweep_and_report():
    script = CONF.parent / "scripts" / "reproduce_paper.sh"
    env = {**os.environ, "DRY_RUN": "1", "SCALE": "smoke", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(script), "math_main", "lr_tune"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "-m opd_exp experiment=math_main hydra.sweep.dir=multirun/smoke/math_main" in out
    assert "-m opd_exp.report.cli multirun/smoke/lr_tune --out outputs/smoke/results/lr_tune" in out
    assert "model.bootstrap]" in out  # the scale's keys are left out of the cells' dir names
    # every pair the sweeps train is bootstrapped first, once each, with the scale's overrides and every core
    lines = [line for line in out.splitlines() if line.startswith("+ ")]
    pairs = [line for line in lines if "-m opd_exp.check --pair-only" in line]
    assert lines[:len(pairs)] == pairs and len(pairs) == 2, lines
    assert {p.split("--pair-only ")[1].split(" train.steps=2")[0] for p in pairs} == {
        "experiment=math_main model=tiny_mismatch", "experiment=math_main model=tiny"}  # lr_tune's tiny: the same
    assert all("threads=1" not in p for p in pairs)
    multitask = subprocess.run(["bash", str(script), "multitask", "toy_gamma"], env=env, capture_output=True,
                               text=True, timeout=60, check=True).stdout
    assert [line for line in multitask.splitlines() if "--pair-only" in line][0].startswith(
        "+ " + sys.executable + " -m opd_exp.check --pair-only experiment=multitask train.steps=2")  # the mix pair
    estimators = subprocess.run(["bash", str(script), "estimators"], env=env, capture_output=True, text=True,
                                timeout=60, check=True).stdout
    assert "experiment=estimators_lr_tune" not in estimators  # the committed lrs; re-tuning is its own part


def test_reproduce_script_default_runs_every_table_with_the_committed_lrs_then_the_estimators():
    """No argument: every experiment file but the two lr sweeps (they rewrite the recipes: run when named), in
    the order the reports and the reuse need."""
    script = CONF.parent / "scripts" / "reproduce_paper.sh"
    env = {**os.environ, "DRY_RUN": "1", "SCALE": "smoke", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    names = [line.split("experiment=")[1].split()[0] for line in out.splitlines()
             if line.startswith("+ ") and " -m opd_exp experiment=" in line]
    expected = {f.stem for f in (CONF / "experiment").glob("*.yaml")} - {"lr_tune", "estimators_lr_tune"}
    assert sorted(names) == sorted(expected), names
    assert names[-1] == "estimators"
    assert names.index("mismatch_collapse") < names.index("math_main")  # T1's report embeds the collapse study
    assert names.index("multitask") < names.index("ablation_support_multitask")  # V1 reuses T2's cells
    assert names.index("math_main") < names.index("pair_seeds")  # its pair-0 cells are T1's (reused)
    bootstraps = [line for line in out.splitlines() if "--pair-only experiment=pair_seeds" in line]
    pair_seeds = OmegaConf.load(CONF / "experiment" / "pair_seeds.yaml").hydra.sweeper.params["model.bootstrap.seed"]
    assert [line.split("model.bootstrap.seed=")[1].split()[0] for line in bootstraps] == str(pair_seeds).split(",")


def test_reproduce_script_real_scale_runs_the_paper_setup_and_each_sweep_validates():
    """SCALE=real NPROC=2: the paper's math tables, each sweep under torchrun with the student sharded, on
    model=paper_math task=benchmark at the paper's settings; each sweep's first cell composes and validates with
    them (the scale's overrides take precedence over a sweep's own model, as on the command line)."""
    script = CONF.parent / "scripts" / "reproduce_paper.sh"
    env = {**os.environ, "DRY_RUN": "1", "SCALE": "real", "NPROC": "2", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    sweeps = [line.split()[1:] for line in out.splitlines() if line.startswith("+ ") and " -m opd_exp " in line]
    names = [next(a for a in argv if a.startswith("experiment=")).split("=")[1] for argv in sweeps]
    assert names == ["math_main", "ablation_components", "ablation_support", "ablation_k_topp", "failure_modes"]
    for name, argv in zip(names, sweeps, strict=True):
        assert argv[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        cli = [a for a in argv[argv.index("opd_exp") + 1:] if not a.startswith("hydra")]
        cli_keys = {a.lstrip("+~").split("=")[0] for a in cli}
        cell = sweep_cells(name)[0]
        cfg = run_config(composed([c for c in cell if c.split("=")[0] not in cli_keys] + cli))
        assert (cfg.model.name, cfg.task.name, cfg.train.parallel) == ("paper_math", "benchmark", "fsdp")
        assert (cfg.train.steps, cfg.train.lr, cfg.sampling.max_new_tokens, cfg.sampling.backend) == (
            400, 2e-6, 16384, "vllm")
        assert sorted(cfg.task.eval_splits) == ["aime24", "aime25", "math500", "minerva", "olympiadbench"]
        assert cfg.estimator.top_k == 32 or name == "ablation_k_topp"  # F6 sweeps its own K
