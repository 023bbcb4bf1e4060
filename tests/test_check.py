"""opd-exp-check (opd_exp/check.py) on tiny random-init pairs written with save_pretrained."""

from __future__ import annotations

import json

import pytest
from pair_factory import write_pair

from opd_exp.check import main


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(6)))
    return {"qwen2": write_pair(root, "qwen2"), "llama": write_pair(root, "llama"), "data": data}


def run(capsys, args: list[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def args_for(pairs, teacher: str, student: str) -> list[str]:
    data = str(pairs["data"])
    return ["model=pair_template", f"model.teacher_path={pairs[teacher]['teacher']}",
            f"model.student_path={pairs[student]['student']}", "model.dtype=float32", "task=benchmark",
            f"task.train_data.path={data}", "task.train_data.problem_key=null", "task.train_data.answer_key=null",
            "~task.eval_splits", f"+task.eval_splits={{small: {{path: '{data}'}}}}",
            "eval.n_prompts=2",
            "eval.max_new_tokens=4", "device=cpu"]


def test_check_reports_every_part(pairs, capsys):
    code, out, err = run(capsys, args_for(pairs, "qwen2", "qwen2"))
    for part in ("[1] loaded task 'benchmark'", "[2] tokenizer audit (teacher vs student): OK",
                 "[3] prompts", "<|im_start|>assistant", "[4] sampling 2 'small' prompts", "tokens/s",
                 "[5] the teacher's scores", "mean log-prob per token", "[6] special-token masking",
                 "would remove: '<think>' (3)", "peak memory"):
        assert part in out, (part, code, err)
    assert code == 1 and "the teacher solved none of 2 'small' prompts" in out  # random init: a mismatch


def test_check_lists_a_tokenizer_mismatch(pairs, capsys):
    code, out, _ = run(capsys, args_for(pairs, "llama", "qwen2"))
    assert code == 1 and "audit: EOS differs: teacher '<|eot_id|>'" in out
    assert "[train] the teacher's template renders the prompt" in out


def test_check_bad_input_exits_2_with_one_line(pairs, capsys, tmp_path):
    code, _, err = run(capsys, [*args_for(pairs, "qwen2", "qwen2"), f"model.teacher_path={tmp_path / 'none'}"])
    assert code == 2 and err.strip() == f"teacher checkpoint {tmp_path / 'none'}: no such directory"
    code, _, err = run(capsys, ["model.lora_rank=-1"])
    assert code == 2 and err.startswith("config error: model.lora_rank") and err.count("\n") == 1


@pytest.mark.slow
def test_check_on_the_tiny_pair_within_a_minute(smoke, capsys):
    """The embedded pair (its smoke-scale bootstrap): every part runs, in well under a minute."""
    import time

    start = time.perf_counter()
    code, out, err = run(capsys, [f"hydra.searchpath=[file://{smoke.conf_dir}]", "experiment=smoke"])
    assert time.perf_counter() - start < 60 and code in (0, 1), err
    assert "[2] tokenizer audit" in out and "[6] special-token masking" in out
    assert "would remove: '<think>'" in out  # the tiny pair's configured tokens (model.special_tokens)


def test_pair_only_prints_the_pair_a_run_would_use(smoke, pairs, capsys):
    """--pair-only: the tiny pair's cache entry (bootstrapped when missing: here the session's smoke pair), or a
    real pair's checkpoints, and nothing else (no sampling, exit 0)."""
    code, out, err = run(capsys, ["--pair-only", f"hydra.searchpath=[file://{smoke.conf_dir}]", "experiment=smoke"])
    assert code == 0 and out.splitlines() == [f"{role}: {smoke.entry / role}"
                                              for role in ("teacher", "student", "tokenizer")], err
    code, out, _ = run(capsys, ["--pair-only", *args_for(pairs, "qwen2", "qwen2")])
    assert code == 0 and out.splitlines()[0] == f"teacher: {pairs['qwen2']['teacher']}"
