"""The math task: deterministic splits, disjointness, traces, prompts and a grader that never raises."""

import json

import pytest

from opd_exp.config import TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.models.tokenization import EOS, THINK_CLOSE, THINK_OPEN, build_tokenizer
from opd_exp.tasks.math import MathTask, make_trace, parse_expression

SPLITS = {"id": {}, "long": {"min_ops": 5, "max_ops": 6}, "wide": {"max_operand": 19}}


def make(**kw) -> MathTask:
    return MathTask(TaskConfig(**{"n_train": 500, "n_eval": 50, "eval_splits": SPLITS, **kw}))


def test_deterministic_by_seed():
    a, b, c = make(), make(), make(data_seed=7)
    assert a.train == b.train and a.eval_splits == b.eval_splits
    assert [e.question for e in a.train] != [e.question for e in c.train]


def test_eval_splits_do_not_depend_on_train_size():
    assert make().eval_splits == make(n_train=100).eval_splits


def test_splits_are_disjoint_and_sized():
    task = make()
    seen = [e.question for e in task.train]
    assert len(task.train) == 500
    for name, split in task.eval_splits.items():
        assert len(split) == 50 and {e.split for e in split} == {name}
        seen += [e.question for e in split]
    assert len(seen) == len(set(seen))


def test_tune_splits_are_apart_from_the_reported_ones_and_keep_the_pool():
    report, tune = make(), make(eval_set="tune")
    assert tune.train == report.train  # the pool (and the pair bootstrapped on it) does not change
    reported = {e.question for split in report.eval_splits.values() for e in split}
    pool = {e.question for e in report.train}
    for name, split in tune.eval_splits.items():
        assert len(split) == 50 and {e.split for e in split} == {name}
        questions = {e.question for e in split}
        assert not questions & reported and not questions & pool
    assert tune.eval_splits.keys() == report.eval_splits.keys()


def test_tune_set_needs_generated_data(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"{i}+1", "answer": i + 1}) + "\n" for i in range(80)))
    with pytest.raises(ConfigError, match="task.eval_set"):
        make(dataset_path=str(rows), eval_set="tune")


def test_split_knobs_are_applied():
    task = make()
    n_ops = lambda e: e.question.count("+") + e.question.count("-")  # noqa: E731
    assert all(2 <= n_ops(e) <= 4 for e in task.train + task.eval_splits["id"])
    assert all(5 <= n_ops(e) <= 6 for e in task.eval_splits["long"])
    assert max(max(map(int, e.trace.replace(";", "=").replace("-", "+").replace("=", "+").split("+")))
               for e in task.eval_splits["wide"]) > 9


def test_trace_is_correct_and_nonnegative():
    for ex in make().train:
        expr = ex.question[2:-2]
        assert eval(expr) == ex.answer >= 0  # the generator only subtracts what the total can afford
        assert "=-" not in ex.trace
        assert ex.trace.split("=")[-1] == str(ex.answer)
    assert make_trace([5, 9, 3, 8], ["+", "-", "+"]) == ("5+9=14;14-3=11;11+8=19", 19)


def test_bad_split_overrides_are_config_errors():
    with pytest.raises(ConfigError, match="eval_splits.x.max_op"):
        make(eval_splits={"x": {"max_op": 3}})
    with pytest.raises(ConfigError, match="min_ops"):
        make(eval_splits={"x": {"min_ops": 5, "max_ops": 3}})
    with pytest.raises(ConfigError, match="distinct"):
        MathTask(TaskConfig(min_ops=1, max_ops=1, max_operand=1, n_train=100, n_eval=2))


def test_prompt_and_target_render():
    task, tok = make(), build_tokenizer()
    ex = task.train[0]
    prompt = tok.decode(task.prompt_ids(tok, ex))
    assert prompt.startswith(tok.bos_token) and ex.question in prompt and prompt.endswith("<|assistant|>")
    target = task.target_text(ex)
    assert target == f"{THINK_OPEN}{ex.trace}{THINK_CLOSE}A:{ex.answer}{EOS}"
    assert task.grade(target, ex)
    n = len(tok(target, add_special_tokens=False)["input_ids"])
    assert 10 <= n <= 50


@pytest.mark.parametrize("text,ok", [
    ("<think>1+2=3</think>A:3", True),
    ("A:3", True),
    ("A: 3", True),
    ("<think>A:4</think>A:3<|im_end|>", True),   # the last answer line counts
    ("A:3A:4", False),
    ("A:33", False),
    ("A:-3", False),
    ("<think>1+2=3</think>", False),             # no answer line
    ("", False),
    ("3", False),
    ("A:", False),
    ("A:" + "9" * 5000, False),                  # huge number: no int() overflow / str-digits limit
    ("A:٣", False),                             # a non-ASCII digit
    ("💥\x00A:\ufffd", False),
])
def test_grader(text, ok):
    task = make()
    ex = next(e for e in task.train if e.answer == 3)
    assert task.grade(text, ex) is ok


@pytest.mark.parametrize("junk", [None, 3, b"A:3", ["A:3"]])
def test_grader_never_raises_on_non_strings(junk):
    task = make()
    assert task.grade(junk, task.train[0]) is False


def test_parse_expression():
    assert parse_expression("5+9-3") == ("Q:5+9-3=?", "5+9=14;14-3=11", 11)
    assert parse_expression("Q: 12 - 2 =?")[2] == 10
    assert parse_expression("what is 2+2") is None


def test_dataset_path(tmp_path):
    rows = [{"question": f"{i}+{i % 7}", "answer": i + i % 7} for i in range(30)]
    rows.append({"question": "word problem", "answer": "5"})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = make(dataset_path=str(path), n_eval=5)
    assert len(task.eval_splits["id"]) == 5 and len(task.train) == 26
    assert set(task.eval_splits) == {"id"}
    ex = next(e for e in task.train + task.eval_splits["id"] if e.question == "Q:3+3=?")
    assert ex.trace == "3+3=6" and ex.answer == 6
    word = next(e for e in task.train + task.eval_splits["id"] if e.question == "word problem")
    assert word.trace == "" and task.grade("A:5", word)


def test_dataset_path_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.jsonl"):
        make(dataset_path=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": 2}\n{not json\n')
    with pytest.raises(ConfigError, match="bad.jsonl"):
        make(dataset_path=str(bad))
    cols = tmp_path / "cols.jsonl"
    cols.write_text('{"q": "1+1", "a": 2}\n')
    with pytest.raises(ConfigError, match="cols.jsonl.*answer"):
        make(dataset_path=str(cols))
