"""Procedurally generated multi-step arithmetic with a worked trace: the default task's prompts and grader.

A problem is a chain of ``+``/``-`` operations on operands in ``0..max_operand`` whose running total never
goes below zero (so every number in the trace is a plain non-negative integer):

    question  Q:5+9-3+8=?
    target    <think>5+9=14;14-3=11;11+8=19</think>A:19          (then the end token, eos)

The trace writes one ``a op b = c`` step per operation, so a response has 6-8 tokens per operation plus ~6:
2-4 operations give ~20-40 tokens. Difficulty knobs (``min_ops``, ``max_ops``, ``max_operand``) are config;
eval splits override them to play the role of the paper's harder benchmarks (``long``: more operations,
``wide``: larger operands). Splits are fixed by ``cfg.data_seed`` and the train pool excludes every eval
question. Graded by greedy exact match of the integer after the last answer prefix.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, replace

from opd_exp.config import TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.models.tokenization import DEFAULT_CONVENTION, Convention
from opd_exp.tasks.prompts import text_ids, user_prompt_text

SPLIT_KNOBS = ("min_ops", "max_ops", "max_operand")
EXPR_RE = re.compile(r"^\s*(?:Q:)?\s*([0-9]+(?:\s*[+-]\s*[0-9]+)*)\s*(?:=\s*\??)?\s*$")
MAX_ANSWER_DIGITS = 18  # longer numbers in a completion are graded wrong without int() (never raises)


@dataclass
class Example:
    """One problem: the question text (``Q:...=?``), its integer answer, the worked trace, and its split."""

    question: str
    answer: int
    trace: str
    split: str


# ------------------------------------------------------------------------------------------------------------
# generation


def make_trace(operands: list[int], ops: list[str]) -> tuple[str, int]:
    """``[5, 9, 3], ['+', '-']`` -> ``('5+9=14;14-3=11', 11)``: one step per operation."""
    total, steps = operands[0], []
    for op, b in zip(ops, operands[1:], strict=True):
        new = total + b if op == "+" else total - b
        steps.append(f"{total}{op}{b}={new}")
        total = new
    return ";".join(steps), total


def sample_example(rng: random.Random, min_ops: int, max_ops: int, max_operand: int, split: str) -> Example:
    """Draw one chain; ``-`` is only chosen when it keeps the running total >= 0."""
    n_ops = rng.randint(min_ops, max_ops)
    operands, ops = [rng.randint(0, max_operand)], []
    total = operands[0]
    for _ in range(n_ops):
        b = rng.randint(0, max_operand)
        op = rng.choice("+-") if b <= total else "+"
        total = total + b if op == "+" else total - b
        operands.append(b)
        ops.append(op)
    expr = str(operands[0]) + "".join(f"{op}{b}" for op, b in zip(ops, operands[1:], strict=True))
    trace, answer = make_trace(operands, ops)
    return Example(question=f"Q:{expr}=?", answer=answer, trace=trace, split=split)


def sample_unique(rng: random.Random, n: int, knobs: dict, split: str, taken: set[str]) -> list[Example]:
    """``n`` examples with questions outside ``taken`` (which is updated); fails clearly when the space is
    too small for ``n`` distinct problems."""
    out: list[Example] = []
    tries = 0
    while len(out) < n:
        ex = sample_example(rng, knobs["min_ops"], knobs["max_ops"], knobs["max_operand"], split)
        tries += 1
        if ex.question not in taken:
            taken.add(ex.question)
            out.append(ex)
        elif tries > 50 * n + 1000:
            raise ConfigError(f"task ({split})", f"cannot draw {n} distinct problems with {knobs}; "
                              "lower task.n_train / task.n_eval or widen the knobs")
    return out


def split_knobs(cfg: TaskConfig, name: str, overrides: dict) -> dict:
    """The train knobs with one eval split's overrides applied (unknown keys are config errors)."""
    knobs = {k: getattr(cfg, k) for k in SPLIT_KNOBS}
    for key, value in (overrides or {}).items():
        if key not in SPLIT_KNOBS:
            raise ConfigError(f"task.eval_splits.{name}.{key}", f"unknown key; valid keys: {', '.join(SPLIT_KNOBS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "max_operand" else 1):
            raise ConfigError(f"task.eval_splits.{name}.{key}", f"got {value!r}, expected a positive integer")
        knobs[key] = value
    if knobs["min_ops"] > knobs["max_ops"]:
        raise ConfigError(f"task.eval_splits.{name}", f"min_ops {knobs['min_ops']} > max_ops {knobs['max_ops']}")
    return knobs


# ------------------------------------------------------------------------------------------------------------
# user datasets


def parse_expression(question: str) -> tuple[str, str, int] | None:
    """``'5+9-3'`` or ``'Q:5+9-3=?'`` -> ``('Q:5+9-3=?', trace, value)``; None when not a +/- chain."""
    m = EXPR_RE.match(question)
    if not m:
        return None
    expr = m.group(1).replace(" ", "")
    numbers = [int(x) for x in re.findall(r"[0-9]+", expr)]
    ops = re.findall(r"[+-]", expr)
    trace, value = make_trace(numbers, ops)
    return f"Q:{expr}=?", trace, value


def load_jsonl(path: str, seed: int) -> list[Example]:
    """Rows ``{"question", "answer"}`` via ``datasets``; a +/- chain gets its worked trace, anything else an
    empty one. Errors name the file and the problem."""
    import datasets

    from opd_exp.tasks.benchmark import check_local_file

    file = check_local_file(path, "task.dataset_path")  # missing, a directory, empty: one line naming the file
    # datasets logs its own traceback on a parse error before raising: keep stderr to our one-line error
    logger = logging.getLogger("datasets")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset("json", data_files=str(file), split="train")
    except Exception as err:  # datasets raises many types for malformed JSON
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        raise ConfigError("task.dataset_path", f"{file}: not valid JSONL ({reason})") from None
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
    missing = {"question", "answer"} - set(rows.column_names)
    if missing:
        raise ConfigError("task.dataset_path", f"{file}: rows lack {sorted(missing)} (have {rows.column_names})")
    out = []
    for i, row in enumerate(rows):
        try:
            answer = int(str(row["answer"]).strip())
        except ValueError:
            raise ConfigError("task.dataset_path", f"{file}: row {i}: answer {row['answer']!r} is not an "
                              "integer") from None
        parsed = parse_expression(str(row["question"]))
        question, trace = (parsed[0], parsed[1]) if parsed and parsed[2] == answer else (str(row["question"]), "")
        out.append(Example(question=question, answer=answer, trace=trace, split="train"))
    random.Random(seed).shuffle(out)
    return out


# ------------------------------------------------------------------------------------------------------------
# the task


class MathTask:
    """Train pool, eval splits, prompt rendering and grading of the arithmetic task.

    Attributes:
        train:        ``cfg.n_train`` examples (generated), or the rows of ``cfg.dataset_path`` minus held-out.
        eval_splits:  name -> ``cfg.n_eval`` examples; generated splits use ``cfg.eval_splits[name]`` overrides
                      and are disjoint from each other and from ``train``. With a dataset, only ``id`` (the
                      first ``n_eval`` shuffled rows, held out of ``train``). ``cfg.eval_set = "tune"``
                      replaces them with splits of the same shape, disjoint from the reported ones and from
                      ``train``, for hyper-parameter tuning.
        convention:   the response convention written and graded (delimiters, answer prefix, end token).
    """

    name = "math"

    def __init__(self, cfg: TaskConfig, convention: Convention = DEFAULT_CONVENTION):
        self.cfg = cfg
        self.convention = convention
        splits = dict(cfg.eval_splits or {"id": {}})
        if cfg.dataset_path:
            if cfg.eval_set != "report":
                raise ConfigError("task.eval_set", f"'{cfg.eval_set}' needs generated data; with "
                                  f"task.dataset_path only 'report' is allowed")
            rows = load_jsonl(cfg.dataset_path, cfg.data_seed)
            if len(rows) <= cfg.n_eval:
                raise ConfigError("task.dataset_path", f"{cfg.dataset_path}: {len(rows)} rows, need more than "
                                  f"task.n_eval={cfg.n_eval}")
            self.eval_splits = {"id": [replace(ex, split="id") for ex in rows[:cfg.n_eval]]}
            self.train = rows[cfg.n_eval:][:cfg.n_train]
            return
        rng = random.Random(cfg.data_seed)
        taken: set[str] = set()
        # eval splits first, in sorted order, so a split's content does not depend on n_train
        self.eval_splits = {name: sample_unique(rng, cfg.n_eval, split_knobs(cfg, name, splits[name]), name, taken)
                            for name in sorted(splits)}
        self.train = sample_unique(rng, cfg.n_train, split_knobs(cfg, "train", {}), "train", taken)
        if cfg.eval_set == "tune":
            # drawn after the pool, so the pool (and the bootstrapped pair trained on it) stays the same
            self.eval_splits = {name: sample_unique(rng, cfg.n_eval, split_knobs(cfg, name, splits[name]), name,
                                                    taken)
                                for name in sorted(splits)}

    # --------------------------------------------------------------------------------------------------------
    def prompt_text(self, tokenizer, example: Example) -> str:
        """The chat-rendered prompt, ending with the assistant's generation prompt."""
        return user_prompt_text(tokenizer, example.question)

    def prompt_ids(self, tokenizer, example: Example) -> list[int]:
        """Token ids of :meth:`prompt_text` (no padding; the template writes bos)."""
        return text_ids(tokenizer, self.prompt_text(tokenizer, example))

    def target_text(self, example: Example) -> str:
        """The response to imitate: ``<think>trace</think>A:answer`` followed by the end token."""
        c = self.convention
        return f"{c.think_open}{example.trace}{c.think_close}{c.answer_prefix}{example.answer}{c.end}"

    def parse_answer(self, completion_text: str) -> int | None:
        """The integer after the last answer prefix (``A:``), or None; never raises."""
        if not isinstance(completion_text, str):
            return None
        prefix = re.escape(self.convention.answer_prefix)
        matches = re.findall(prefix + r"\s*(-?[0-9]+)", completion_text)
        if not matches or len(matches[-1].lstrip("-")) > MAX_ANSWER_DIGITS:
            return None
        return int(matches[-1])

    def grade(self, completion_text: str, example: Example) -> bool:
        """Exact match of the parsed final answer; malformed output (no answer line, garbage) is wrong."""
        return self.parse_answer(completion_text) == example.answer

    def episode(self, example: Example) -> None:
        """Single-turn: no environment."""
        return None
