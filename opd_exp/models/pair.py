"""Load a (teacher, student) pair: the bootstrapped tiny default or any two ``save_pretrained`` checkpoints.

    pair = load_pair(cfg.model, cfg.task, device="cpu", dtype=torch.float32)
    pair.teacher        # eval mode, requires_grad False
    pair.student        # train mode
    pair.tokenizer      # the student's tokenizer (left padding): prompts and rollouts are in its ids
    pair.teacher_tokenizer   # the teacher's own tokenizer (the same object when the teacher dir has none)

Both kinds go through one loader (:func:`load_checkpoint` / :func:`load_tokenizer`), so the tiny pair is
loaded exactly like a real one. Problems with a checkpoint dir (missing, no config, no weights, truncated or
malformed files) raise :class:`ModelLoadError` naming the path and the problem instead of a library
traceback.

Caveat where it bites: the teacher scores the *student's* token ids. That is only meaningful when both
tokenizers agree on the ids of the response's tokens; the tiny pair shares one vocabulary by construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from opd_exp.config import ModelConfig, TaskConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A checkpoint or tokenizer dir that cannot be loaded; the message names the path and the problem."""


@dataclass
class ModelPair:
    """The models of one run. ``tokenizer`` is the student's; ``teacher_tokenizer`` the teacher's."""

    teacher: Any
    student: Any
    tokenizer: Any
    teacher_tokenizer: Any
    teachers: dict[str, Any] = field(default_factory=dict)  # task name -> its own teacher (model.teachers)

    def for_task(self, name: str) -> ModelPair:
        """The pair whose teacher scores task ``name``'s rows: its own (``model.teachers``), else the default
        (arXiv 2603.25562's multi-task setting switches teachers per task)."""
        return self if name not in self.teachers else replace(self, teacher=self.teachers[name])

    @property
    def vocab_size(self) -> int:
        """The ids the student's tokenizer can produce: every softmax, top-K and sample is over these, never over
        the embedding rows beyond (padding)."""
        return vocab_size(self.tokenizer)


# --------------------------------------------------------------------------------------------------------------
# one checkpoint


def _last_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"


def check_checkpoint_dir(path: Path, role: str) -> None:
    """Fail fast, naming ``path``, when it is not a loadable HF model dir."""
    if not path.exists():
        raise ModelLoadError(f"{role} checkpoint {path}: no such directory")
    if not path.is_dir():
        raise ModelLoadError(f"{role} checkpoint {path}: not a directory")
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{role} checkpoint {path}: no config.json (not a save_pretrained dir?)")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{role} checkpoint {path}: config.json is malformed ({err})") from None
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"{role} checkpoint {path}: no weights (expected one of {', '.join(WEIGHT_FILES)})")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    role: str = "model"):
    """``AutoModelForCausalLM.from_pretrained(path)`` on ``device`` in ``dtype``, or :class:`ModelLoadError`."""
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    check_checkpoint_dir(path, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as err:  # truncated safetensors, unknown model_type, shape mismatches, ...
        raise ModelLoadError(f"{role} checkpoint {path}: cannot be loaded ({_last_line(err)})") from err
    return model.to(device)


def has_tokenizer(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, role: str = "model"):
    """``AutoTokenizer.from_pretrained(path)`` with left padding and a pad token, or :class:`ModelLoadError`."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not has_tokenizer(path):
        raise ModelLoadError(f"{role} tokenizer {path}: no tokenizer files "
                             f"(expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise ModelLoadError(f"{role} tokenizer {path}: cannot be loaded ({_last_line(err)})") from err
    tok.padding_side = "left"  # rollouts batch prompts of different lengths
    if tok.pad_token is None:  # common for base checkpoints; eos is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def vocab_size(tokenizer) -> int:
    """V: the ids the tokenizer can produce (base vocabulary plus added tokens), ``len(tokenizer)``. Embedding rows
    beyond V are padding (Qwen2.5-7B: 152,064 rows, V = 151,646): never sampled, never in a softmax or a top-K."""
    return len(tokenizer)


def check_vocab(model, tokenizer, role: str, path: Path) -> None:
    """The model's embedding must cover every id of its tokenizer (it may be larger: padded vocabularies)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < vocab_size(tokenizer):
        raise ModelLoadError(f"{role} checkpoint {path}: embedding has {rows} rows but its tokenizer has "
                             f"{vocab_size(tokenizer)} tokens")


# --------------------------------------------------------------------------------------------------------------
# the pair


def pair_paths(model_cfg: ModelConfig, task_cfg: TaskConfig) -> tuple[Path, Path, Path]:
    """(teacher dir, student dir, student-tokenizer dir); bootstraps the tiny pair when needed."""
    if model_cfg.kind == "tiny":
        from opd_exp.models.bootstrap import ensure_tiny_pair

        entry = ensure_tiny_pair(model_cfg, task_cfg)
        return entry / "teacher", entry / "student", entry / "tokenizer"
    if not model_cfg.teacher_path or not model_cfg.student_path:
        raise ModelLoadError("model.kind=pretrained needs model.teacher_path and model.student_path")
    student = Path(model_cfg.student_path).expanduser()
    tokenizer = Path(model_cfg.tokenizer_path).expanduser() if model_cfg.tokenizer_path else student
    return Path(model_cfg.teacher_path).expanduser(), student, tokenizer


def load_pair(model_cfg: ModelConfig, task_cfg: TaskConfig, device: str | torch.device = "cpu",
              dtype: torch.dtype | str | None = None) -> ModelPair:
    """Load teacher and student with the same function; the teacher is frozen (eval, no grad).

    ``dtype`` defaults to ``model_cfg.dtype``. The teacher's tokenizer is read from its own dir when it has
    one, else the student's tokenizer is shared.
    """
    if dtype is None or isinstance(dtype, str):
        dtype = DTYPES[dtype or model_cfg.dtype]
    teacher_dir, student_dir, tokenizer_dir = pair_paths(model_cfg, task_cfg)
    check_checkpoint_dir(student_dir, "student")  # before the tokenizers: AutoTokenizer also reads config.json
    check_checkpoint_dir(teacher_dir, "teacher")
    tokenizer = load_tokenizer(tokenizer_dir, role="student")
    teacher_tokenizer = load_tokenizer(teacher_dir, role="teacher") if has_tokenizer(teacher_dir) else tokenizer
    student = load_checkpoint(student_dir, device, dtype, role="student")
    teacher = load_checkpoint(teacher_dir, device, dtype, role="teacher")
    check_vocab(student, tokenizer, "student", student_dir)
    check_vocab(teacher, teacher_tokenizer, "teacher", teacher_dir)
    teachers = {}
    for task, path in (model_cfg.teachers or {}).items():  # a task's own teacher shares the student's ids
        teachers[task] = load_checkpoint(path, device, dtype, role=f"teacher of task {task}")
        check_vocab(teachers[task], tokenizer, f"teacher of task {task}", Path(path).expanduser())
    for model in [teacher, *teachers.values()]:
        model.eval()
        model.requires_grad_(False)
    student.train()
    return ModelPair(teacher=teacher, student=student, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer,
                     teachers=teachers)
