"""Benchmark and CHAMP tasks: local files shaped like each hub schema, dataset errors, exit 2 before run files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from opd_exp.config import TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.tasks.base import make_task
from opd_exp.tasks.benchmark import BenchmarkTask

ROOT = Path(__file__).resolve().parent.parent

# one row of each benchmark as its hub copy names the columns (conf/task/benchmark.yaml)
SCHEMAS = {
    "dapo": {"prompt": "Find x if 2x = 10.", "solution": "5", "data_source": "math_dapo", "ability": "MATH"},
    "math500": {"problem": "Compute $\\frac{1}{4} + \\frac{1}{4}$.", "solution": "...", "answer": "\\frac{1}{2}",
                "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
    "aime24": {"id": 60, "problem": "Find the remainder when 2024 is divided by 1000.", "solution": "...",
               "answer": "24", "url": "https://example", "year": "2024"},
    "aime25": {"problem": "Compute 7 * 8.", "answer": "56", "id": "0"},
    "minerva": {"question": "A star has luminosity 4 L. What is 4 / 2?", "answer": "2"},
    "olympiadbench": {"id": 1, "question": "Solve x^2 = 4 for x > 0.", "final_answer": ["$2$"],
                      "solution": ["..."], "is_multiple_answer": False},
    "amc": {"id": 0, "question": "What is 1 + 1?", "answer": 2.0, "url": "https://example"},
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Each schema as a local file of 6 rows (parquet for MATH-500 and OlympiadBench, JSONL for the rest)."""
    root = tmp_path_factory.mktemp("bench")
    out = {}
    for name, row in SCHEMAS.items():
        rows = [dict(row) for _ in range(6)]
        if name in ("math500", "olympiadbench"):
            out[name] = root / f"{name}.parquet"
            pd.DataFrame(rows).to_parquet(out[name])
        else:
            out[name] = write_jsonl(root / f"{name}.jsonl", rows)
    return out


def bench_cfg(files, **kw) -> TaskConfig:
    splits = {name: {"path": str(files[name]), "k": 3 if name.startswith("aime") else None}
              for name in SCHEMAS if name != "dapo"}
    return TaskConfig(**{"name": "benchmark", "n_eval": 4, "train_data": {"path": str(files["dapo"])},
                         "eval_splits": splits, **kw})


def test_every_schema_maps_to_problem_and_answer(files):
    task = BenchmarkTask(bench_cfg(files))
    assert len(task.train) == 6 and task.train[0].question == "Find x if 2x = 10." and task.train[0].answer == "5"
    answers = {name: split[0].answer for name, split in task.eval_splits.items()}
    assert answers == {"math500": "\\frac{1}{2}", "aime24": "24", "aime25": "56", "minerva": "2",
                       "olympiadbench": "$2$", "amc": "2.0"}
    assert all(len(split) == 4 for split in task.eval_splits.values())  # capped at n_eval
    assert task.eval_k == {"aime24": 3, "aime25": 3}
    for split in task.eval_splits.values():  # the boxed answer the prompt asks for grades right
        assert task.grade(f"... so \\boxed{{{split[0].answer.strip('$')}}}", split[0])
        assert not task.grade("\\boxed{999}", split[0])


def test_prompt_template_and_system_prompt(files):
    from pair_factory import make_tokenizer

    tok = make_tokenizer("qwen2")
    cfg = bench_cfg(files, prompt_template="Q: {problem} Put it in \\boxed{}.", system_prompt="Be brief.")
    task = BenchmarkTask(cfg)
    text = task.prompt_text(tok, task.eval_splits["aime25"][0])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ: Compute 7 * 8. Put it in "
                    "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(task.prompt_ids(tok, task.eval_splits["aime25"][0])) == text
    with pytest.raises(ConfigError, match="task.prompt_template"):
        BenchmarkTask(bench_cfg(files, prompt_template="no placeholder"))


@pytest.mark.parametrize("content, words", [
    (None, "no such file"),
    ("DIR", "is a directory"),
    ("", "empty dataset"),
    ("\n  \n", "empty dataset"),
    ('{"problem": "1+1?", "answer": "2"}\n{"problem": "", "answer": "3"}\n', "row 1: empty or non-text"),
    ('{"problem": "1+1?", "answer": null}\n', "row 0: empty"),
    ('{"text": "1+1?", "answer": "2"}\n', "none of the columns"),
    ("{not json\n", "cannot be loaded"),
])
def test_dataset_errors_name_the_field_and_the_file(tmp_path, files, content, words):
    path = tmp_path / "eval.jsonl"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    cfg = bench_cfg(files)
    cfg.eval_splits = {"mine": {"path": str(path)}}
    with pytest.raises(ConfigError, match=words) as err:
        BenchmarkTask(cfg)
    assert "task.eval_splits.mine" in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_spec_keys_and_k_are_checked(files):
    cfg = bench_cfg(files)
    cfg.eval_splits = {"a": {"path": str(files["amc"]), "colum": "x"}}
    with pytest.raises(ConfigError, match="task.eval_splits.a.colum"):
        BenchmarkTask(cfg)
    cfg.eval_splits = {"a": {"path": str(files["amc"]), "k": 0}}
    with pytest.raises(ConfigError, match="task.eval_splits.a.k"):
        BenchmarkTask(cfg)


def test_champ_task_offline():
    pytest.importorskip("champ_dataset")
    task = make_task(TaskConfig(name="champ", n_eval=20, n_train=250))
    assert len(task.eval_splits["champ"]) == 20 and len(task.train) == 250
    assert not {p.question for p in task.train} & {p.question for p in task.eval_splits["champ"]}
    numeric = [p for p in task.eval_splits["champ"] if p.answer.lstrip("-").isdigit()]
    assert numeric and all(task.grade(f"\\boxed{{{p.answer}}}", p) for p in numeric)
    assert not task.grade("\\boxed{-12345}", numeric[0])
    with pytest.raises(ConfigError, match="task.n_eval"):
        make_task(TaskConfig(name="champ", n_eval=270))


# ------------------------------------------------------------------------------------------------------------
# the entrypoint: a dataset error exits 2 with one line, before any run file


def execute(run_dir: Path, overrides: list[str]):
    """What `opd-exp <overrides>` does for one run, in this process (opd_exp.__main__.execute)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from opd_exp.__main__ import execute as run

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        node = compose("config", overrides=overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run(node, run_dir, overrides, False)


def test_dataset_error_exits_2_before_run_files(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        execute(run_dir, ["task=benchmark", f"task.train_data.path={tmp_path / 'none.jsonl'}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"config error: task.train_data.path: {tmp_path / 'none.jsonl'}: no such file"]
    assert not any(run_dir.iterdir())  # no config.yaml, no run_summary.json


@pytest.mark.parametrize("content, words", [("DIR", "is a directory"), ("", "empty dataset"),
                                            ('{"question": "1+2", "answer": "x"}\n', "row 0")])
def test_math_dataset_path_errors_are_one_line(tmp_path, content, words):
    """The arithmetic task's task.dataset_path goes through the same checks (make_task is what the entrypoint
    calls before writing run files)."""
    path = tmp_path / "data.jsonl"
    path.mkdir() if content == "DIR" else path.write_text(content)
    with pytest.raises(ConfigError, match=words) as err:
        make_task(TaskConfig(dataset_path=str(path)))
    assert str(err.value).startswith("config error: task.dataset_path: ") and "\n" not in str(err.value)
