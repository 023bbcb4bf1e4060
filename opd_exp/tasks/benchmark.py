"""Real math benchmarks: data through ``datasets.load_dataset``, one (problem, answer) schema, math-verify grading.

    task=benchmark                                    # conf/task/benchmark.yaml: DAPO-Math-17K train, five evals
    task=benchmark task.train_data.path=my.jsonl      # a local JSONL / JSON / parquet file instead of a hub id
    task.eval_splits.aime24.k=32                      # samples per prompt of one split (avg@32, pass@32)

A dataset spec (``task.train_data``, each ``task.eval_splits.<name>``) is a mapping:

    path         hub dataset id (``HuggingFaceH4/MATH-500``) or a local .jsonl/.json/.parquet file
    name         hub config name (null = the default)           split     hub split (default "train")
    revision     hub revision (null = the default branch)       k         eval samples per prompt (null = eval.k)
    problem_key  column of the problem (null = the first of PROBLEM_KEYS present)
    answer_key   column of the reference answer (null = the first of ANSWER_KEYS present)

Every row becomes a :class:`Problem`; a list answer (OlympiadBench's ``final_answer``) keeps its first item.
The prompt is ``task.prompt_template`` with ``{problem}`` replaced (other braces are literal) as the user
turn (after ``task.system_prompt`` when set), rendered with the pair's own chat template. The default is
verl's math prompt, which the paper's verl-agent runs inherit (an assumption: the paper does not print it):
the problem, then "Let's think step by step and output the final answer within \\boxed{}." Responses are
graded by :mod:`opd_exp.tasks.grading` (last ``\\boxed{}``, ``####``, ``A:``, "answer is"; math-verify).
Dataset problems (missing file, a directory, no rows, no problem column, an empty answer) raise
:class:`ConfigError` naming the spec's field and the file.
"""

from __future__ import annotations

import importlib.util
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from opd_exp.config import TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.tasks.grading import grade_response
from opd_exp.tasks.prompts import text_ids

PROBLEM_KEYS = ("problem", "question", "prompt", "Problem", "Question")
ANSWER_KEYS = ("answer", "final_answer", "expected_answer", "solution", "Answer", "ground_truth")
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPEC_KEYS = ("path", "name", "split", "revision", "k", "problem_key", "answer_key")
log = logging.getLogger(__name__)


@dataclass
class Problem:
    """One benchmark row: the problem text, its reference answer (a string math-verify parses), its split."""

    question: str
    answer: str
    split: str


# ------------------------------------------------------------------------------------------------------------
# loading


def _last_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"


def is_local(path: str) -> bool:
    """A local file (by suffix, or because it exists) rather than a hub id."""
    p = Path(path).expanduser()
    return p.suffix in LOCAL_SUFFIXES or p.exists() or path.startswith((".", "/", "~"))


def check_local_file(path: str, field: str) -> Path:
    """The file behind ``path``, or a ConfigError naming ``field`` and the file: missing, a directory, another
    suffix, or empty (no bytes but white space: ``datasets`` would say only "StopIteration")."""
    file = Path(path).expanduser()
    if not file.exists():
        raise ConfigError(field, f"{file}: no such file")
    if file.is_dir():
        raise ConfigError(field, f"{file}: is a directory, expected a .jsonl, .json or .parquet file")
    if file.suffix not in LOCAL_SUFFIXES:
        raise ConfigError(field, f"{file}: unknown suffix {file.suffix!r}, allowed: {', '.join(LOCAL_SUFFIXES)}")
    with open(file, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise ConfigError(field, f"{file}: empty dataset (no rows)")
    return file


def load_table(spec: dict, field: str):
    """A ``datasets.Dataset`` for ``spec`` (hub id or local file), or a ConfigError naming ``field``."""
    import datasets

    path = str(spec.get("path") or "")
    if not path:
        raise ConfigError(f"{field}.path", "missing: a hub dataset id or a local .jsonl/.json/.parquet file")
    # datasets logs its own traceback on a parse error before raising: keep stderr to our one-line error
    logger = logging.getLogger("datasets")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        if is_local(path):
            file = check_local_file(path, f"{field}.path")
            rows = datasets.load_dataset(LOCAL_SUFFIXES[file.suffix], data_files=str(file), split="train")
        else:
            rows = datasets.load_dataset(path, spec.get("name"), split=spec.get("split") or "train",
                                         revision=spec.get("revision"))
    except ConfigError:
        raise
    except Exception as err:  # datasets raises many types (malformed JSON, unknown hub id, no network, ...)
        raise ConfigError(f"{field}.path", f"{path}: cannot be loaded ({_last_line(err)})") from None
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
    if len(rows) == 0:
        raise ConfigError(f"{field}.path", f"{path}: empty dataset (no rows)")
    return rows


def pick_column(columns: list[str], given: str | None, candidates: tuple[str, ...], field: str, path: str) -> str:
    """The configured column, or the first candidate present; a ConfigError naming ``field`` otherwise."""
    if given is not None:
        if given not in columns:
            raise ConfigError(field, f"{path}: no column {given!r} (have {columns})")
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise ConfigError(field, f"{path}: none of the columns {list(candidates)} (have {columns}); set {field}")
    return found


def answer_text(value) -> str | None:
    """A reference answer as a string: a list keeps its first item, numbers their ``str``; None when empty."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def load_problems(spec: dict, split: str, field: str) -> list[Problem]:
    """The rows of one dataset spec as :class:`Problem` s (schema mapped, every row checked)."""
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{field}.{sorted(unknown)[0]}", f"unknown key; valid keys: {', '.join(SPEC_KEYS)}")
    rows = load_table(spec, field)
    path = str(spec["path"])
    q_key = pick_column(rows.column_names, spec.get("problem_key"), PROBLEM_KEYS, f"{field}.problem_key", path)
    a_key = pick_column(rows.column_names, spec.get("answer_key"), ANSWER_KEYS, f"{field}.answer_key", path)
    out = []
    for i, (q, a) in enumerate(zip(rows[q_key], rows[a_key], strict=True)):
        answer = answer_text(a)
        if not isinstance(q, str) or not q.strip():
            raise ConfigError(f"{field}.path", f"{path}: row {i}: empty or non-text {q_key!r} ({q!r})")
        if answer is None:
            raise ConfigError(f"{field}.path", f"{path}: row {i}: empty {a_key!r}")
        out.append(Problem(question=q.strip(), answer=answer, split=split))
    return out


# ------------------------------------------------------------------------------------------------------------
# the task


class BenchmarkTask:
    """Training prompts from ``cfg.train_data``, eval splits from ``cfg.eval_splits`` (name -> dataset spec).

    Attributes:
        train:        the training rows (shuffled by ``cfg.data_seed``, at most ``cfg.n_train``).
        eval_splits:  name -> the first ``cfg.n_eval`` rows of each eval spec (benchmark order).
        eval_k:       name -> samples per prompt, for the splits whose spec sets ``k`` (AIME: 32).
    """

    name = "benchmark"

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        check_grader(self.name)
        check_prompt_template(cfg.prompt_template)
        if not cfg.train_data:
            raise ConfigError("task.train_data", "empty: set task.train_data.path (a hub id or a local file)")
        if not cfg.eval_splits:
            raise ConfigError("task.eval_splits", "empty: name at least one eval dataset")
        train = load_problems(dict(cfg.train_data), "train", "task.train_data")
        random.Random(cfg.data_seed).shuffle(train)
        self.train = train[:cfg.n_train]
        self.eval_splits, self.eval_k = {}, {}
        for name, spec in sorted(cfg.eval_splits.items()):
            spec = self._spec(name, spec)
            self.eval_splits[name] = load_problems(spec, name, f"task.eval_splits.{name}")[:cfg.n_eval]
            if spec.get("k") is not None:
                self.eval_k[name] = spec["k"]

    @staticmethod
    def _spec(name: str, spec) -> dict:
        if not isinstance(spec, dict):
            raise ConfigError(f"task.eval_splits.{name}", f"got {spec!r}, expected a dataset spec mapping "
                              f"with keys {', '.join(SPEC_KEYS)}")
        k = spec.get("k")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"task.eval_splits.{name}.k", f"got {k!r}, expected a positive integer or null")
        return dict(spec)

    # --------------------------------------------------------------------------------------------------------
    def prompt_text(self, tokenizer, example: Problem) -> str:
        """``cfg.prompt_template`` filled with the problem, as the user turn of the pair's chat template (with
        the generation prompt); a tokenizer without a template gets the plain text after its BOS."""
        user = self.cfg.prompt_template.replace("{problem}", example.question)
        messages = ([{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else [])
        messages.append({"role": "user", "content": user})
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return (tokenizer.bos_token or "") + "\n\n".join(m["content"] for m in messages) + "\n"

    def prompt_ids(self, tokenizer, example: Problem) -> list[int]:
        """Token ids of :meth:`prompt_text` (the template writes any special tokens itself)."""
        return text_ids(tokenizer, self.prompt_text(tokenizer, example))

    def grade(self, completion_text: str, example: Problem) -> bool:
        """The response's final answer (grading.extract_answer) equals the reference (math-verify)."""
        return grade_response(completion_text, example.answer)

    def episode(self, example: Problem) -> None:
        """Single-turn: no environment."""
        return None


def check_grader(task_name: str) -> None:
    """math-verify (the ``bench`` extra) must be importable before any data is read or model loaded."""
    if importlib.util.find_spec("math_verify") is None:
        raise ConfigError("task.name", f"got {task_name!r}, which grades with math-verify: "
                          "pip install 'opd-exp[real]'")


def check_prompt_template(template: str) -> None:
    """``task.prompt_template`` must contain the placeholder ``{problem}`` (other braces are literal text)."""
    if "{problem}" not in template:
        raise ConfigError("task.prompt_template", f"got {template!r}: must contain {{problem}}")
