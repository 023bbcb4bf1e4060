"""Load a (teacher, student) pair: the bootstrapped tiny default or any two ``save_pretrained`` checkpoints.

    pair = load_pair(cfg.model, cfg.task, device="cpu", dtype=torch.float32)
    pair.teacher        # eval mode, requires_grad False (a ServedTeacher client with model.teacher_server)
    pair.student        # train mode
    pair.tokenizer      # the student's tokenizer (left padding): prompts and rollouts are in its ids
    pair.teacher_tokenizer   # the teacher's own tokenizer (the same object when the teacher dir has none)

Both kinds go through one loader (:func:`load_checkpoint` / :func:`load_tokenizer`), so the tiny pair is
loaded exactly like a real one. Problems with a checkpoint dir (missing, no config, no weights, truncated or
malformed files) raise :class:`ModelLoadError` naming the path and the problem instead of a library
traceback.

A real pair's paths may be hub ids (``Qwen/Qwen2.5-7B-Instruct``), downloaded once with their
``*_revision``; ``model.attn_implementation``, ``model.gradient_checkpointing`` and ``model.lora_*`` (peft
adapters injected into the student in place, so the model keeps its class) are applied here. The tokens that
special-token masking removes are read from the pair itself when ``model.special_tokens`` is null
(:func:`pair_special_tokens`: think delimiters in the vocabulary, the tokenizer's EOS and the generation config's
stop ids), and :func:`masked_token_ids` logs what masking will remove, or that it removes nothing.

Caveat where it bites: the teacher scores the *student's* token ids. That is only meaningful when both
tokenizers agree on the ids of the response's tokens; the tiny pair shares one vocabulary by construction.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from opd_exp.config import ModelConfig, TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.models.teacher_server import ServedTeacher

log = logging.getLogger(__name__)
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
THINK_DELIMITERS = ("<think>", "</think>")  # the reasoning delimiters of R1-style models (OpenThinker, Qwen3)

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
                    role: str = "model", attn_implementation: str | None = None):
    """``AutoModelForCausalLM.from_pretrained(path)`` on ``device`` in ``dtype`` (with ``attn_implementation``
    when given), or :class:`ModelLoadError`."""
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    check_checkpoint_dir(path, role)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **extra)
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
        from opd_exp.models.integrity import verify_entry

        entry = ensure_tiny_pair(model_cfg, task_cfg)
        if (problem := verify_entry(entry)) is not None:
            raise ModelLoadError(problem)
        return entry / "teacher", entry / "student", entry / "tokenizer"
    if not model_cfg.teacher_path or not model_cfg.student_path:
        raise ModelLoadError("model.kind=pretrained needs model.teacher_path and model.student_path")
    student = resolve_checkpoint(model_cfg.student_path, model_cfg.student_revision, "student")
    tokenizer = Path(model_cfg.tokenizer_path).expanduser() if model_cfg.tokenizer_path else student
    return resolve_checkpoint(model_cfg.teacher_path, model_cfg.teacher_revision, "teacher"), student, tokenizer


def pair_identity(model_cfg: ModelConfig, task_cfg: TaskConfig) -> dict[str, Any]:
    """What identifies the pair a run used, for its summary and the report's provenance: the embedded pair's
    cache entry, weights sha256 and the bootstrap settings that change its weights (torch threads, precision,
    version; bootstrap.json), or a checkpoint pair's paths and revisions; the per-task teachers either way."""
    teachers = {"teachers": dict(model_cfg.teachers)} if model_cfg.teachers else {}
    if model_cfg.teacher_server:
        teachers["teacher_server"] = model_cfg.teacher_server
    if model_cfg.kind != "tiny":
        return {"teacher": model_cfg.teacher_path, "teacher_revision": model_cfg.teacher_revision,
                "student": model_cfg.student_path, "student_revision": model_cfg.student_revision} | teachers
    from opd_exp.models.bootstrap import META, entry_dir

    entry = entry_dir(model_cfg, task_cfg)
    meta = json.loads((entry / META).read_text())
    return {"entry": entry.name, "teacher_sha256": (meta.get("teacher") or {}).get("weights_sha256"),
            "student_sha256": (meta.get("student") or {}).get("weights_sha256"),
            "bootstrap_threads": meta.get("torch_threads"), "precision": meta.get("precision"),
            "bootstrap_version": meta.get("version")} | teachers


def resolve_checkpoint(path: str, revision: str | None, role: str) -> Path:
    """A local dir as given; a hub id (``org/name``, not an existing path) downloaded once into the Hugging Face
    cache at ``revision`` (``huggingface_hub.snapshot_download``); its local snapshot dir either way."""
    local = Path(path).expanduser()
    if local.exists() or not HUB_ID_RE.match(path):
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision))
    except Exception as err:  # offline, unknown id or revision, gated repo
        raise ModelLoadError(f"{role} checkpoint {path}: not a local dir and not downloadable from the hub "
                             f"at revision {revision or 'main'} ({_last_line(err)})") from None


def cache_root(model_cfg: ModelConfig) -> Path:
    """Where a pair's cached files go (bootstrapped pairs, evaluation results): env ``OPD_EXP_CACHE`` when set,
    else ``model.cache_dir``, so the variable works for a pair YAML that does not interpolate it."""
    return Path(os.environ.get("OPD_EXP_CACHE") or model_cfg.cache_dir).expanduser()


def add_stop_tokens(model, tokenizer, tokens: list) -> None:
    """Add ``tokens`` to ``model.generation_config.eos_token_id``, which is what ends its responses everywhere
    (opd_exp.rollout.stop_ids). Raises ConfigError naming ``model.student_stop_tokens`` for a token outside the
    vocabulary."""
    from opd_exp.models.tokenization import resolve_token_ids
    from opd_exp.rollout import stop_ids

    try:
        extra = resolve_token_ids(tokenizer, list(tokens))
    except ValueError as err:
        raise ConfigError("model.student_stop_tokens", f"{list(tokens)}: {err}") from None
    stops = stop_ids(model, tokenizer)
    model.generation_config.eos_token_id = stops + [i for i in extra if i not in stops]


def load_pair(model_cfg: ModelConfig, task_cfg: TaskConfig, device: str | torch.device = "cpu",
              dtype: torch.dtype | str | None = None) -> ModelPair:
    """Load teacher and student with the same function; the teacher is frozen (eval, no grad).

    ``dtype`` defaults to ``model_cfg.dtype``. The teacher's tokenizer is read from its own dir when it has
    one, else the student's tokenizer is shared.
    """
    if dtype is None or isinstance(dtype, str):
        dtype = DTYPES[dtype or model_cfg.dtype]
    teacher_dir, student_dir, tokenizer_dir = pair_paths(model_cfg, task_cfg)
    served = model_cfg.teacher_server is not None
    check_checkpoint_dir(student_dir, "student")  # before the tokenizers: AutoTokenizer also reads config.json
    if not served:
        check_checkpoint_dir(teacher_dir, "teacher")
    tokenizer = load_tokenizer(tokenizer_dir, role="student")
    attn = model_cfg.attn_implementation
    student = load_checkpoint(student_dir, device, dtype, role="student", attn_implementation=attn)
    check_vocab(student, tokenizer, "student", student_dir)
    if model_cfg.student_stop_tokens:
        add_stop_tokens(student, tokenizer, model_cfg.student_stop_tokens)
    if served:  # scored by the server in the student's ids: nothing of the teacher loads here
        log.warning("the teacher is served by %s: it must share the student's vocabulary (not audited)",
                    model_cfg.teacher_server)
        teacher, teacher_tokenizer = ServedTeacher(model_cfg.teacher_server), tokenizer
    else:
        teacher_tokenizer = load_tokenizer(teacher_dir, role="teacher") if has_tokenizer(teacher_dir) else tokenizer
        teacher = load_checkpoint(teacher_dir, device, dtype, role="teacher", attn_implementation=attn)
        check_vocab(teacher, teacher_tokenizer, "teacher", teacher_dir)
    teachers = {}
    for task, path in (model_cfg.teachers or {}).items():  # a task's own teacher shares the student's ids
        teachers[task] = load_checkpoint(path, device, dtype, role=f"teacher of task {task}", attn_implementation=attn)
        check_vocab(teachers[task], tokenizer, f"teacher of task {task}", Path(path).expanduser())
    for model in [*([] if served else [teacher]), *teachers.values()]:
        model.eval()
        model.requires_grad_(False)
    if model_cfg.lora_rank:
        add_lora(student, model_cfg)
    if model_cfg.gradient_checkpointing:  # non-reentrant: works with frozen embeddings (LoRA)
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    return ModelPair(teacher=teacher, student=student, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer,
                     teachers=teachers)


def add_lora(model, model_cfg: ModelConfig) -> None:
    """Inject LoRA adapters (Hu et al. 2021, arXiv 2106.09685: W + (alpha / r) B A) into ``model`` in place with
    ``peft.inject_adapter_in_model`` (the model keeps its class, so ``base_model`` and the output head are
    read as for full fine-tuning) and freeze everything else; the optimizer then updates the adapters only."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("model.lora_rank", f"got {model_cfg.lora_rank}: LoRA needs peft (pip install peft)") from None
    targets = model_cfg.lora_target_modules or "all-linear"
    config = LoraConfig(r=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha, target_modules=targets,
                        lora_dropout=0.0, bias="none")
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:  # a target module that the model does not have
        raise ConfigError("model.lora_target_modules", f"got {targets!r}: {_last_line(err)}") from None
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


# --------------------------------------------------------------------------------------------------------------
# the tokens special-token masking removes


def pair_special_tokens(tokenizer, model) -> list[str]:
    """What masking removes by default for a real pair, read from the pair: the think delimiters present in the
    tokenizer's vocabulary, the tokenizer's EOS, and the stop ids of the student's generation config."""
    vocab = tokenizer.get_vocab()
    out = [t for t in THINK_DELIMITERS if t in vocab]
    if tokenizer.eos_token is not None and tokenizer.eos_token not in out:
        out.append(tokenizer.eos_token)
    for i in stop_ids_of(model):
        token = tokenizer.convert_ids_to_tokens(i) if 0 <= i < vocab_size(tokenizer) else None
        if token is not None and token not in out:
            out.append(token)
    return out


def stop_ids_of(model) -> list[int]:
    """The generation config's ``eos_token_id`` as a list (empty when it has none)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def masked_token_ids(pair: ModelPair, mask_tokens: list | None, default_tokens: list | None,
                     enabled: bool) -> list[int]:
    """The ids special-token masking removes: ``mask.tokens``, else ``model.special_tokens``, else
    :func:`pair_special_tokens`. Logs which tokens (or that none) masking removes. A token outside the
    tokenizer is a ConfigError naming the field when masking is on; with masking off it is left out with a
    warning (the ids only feed the diagnostics' special-token share)."""
    from opd_exp.models.tokenization import resolve_token_ids

    field, tokens = (("mask.tokens", mask_tokens) if mask_tokens else
                     ("model.special_tokens", default_tokens) if default_tokens is not None else
                     ("the pair's tokenizer and generation config", pair_special_tokens(pair.tokenizer, pair.student)))
    ids = []
    for token in tokens:
        try:
            ids += resolve_token_ids(pair.tokenizer, [token])
        except ValueError as err:
            if enabled:
                raise ConfigError(field, f"{err}; set {field} to tokens of this pair") from None
            log.warning("%s: %s; left out (special-token masking is off)", field, err)
    shown = ", ".join(f"{pair.tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in ids) or "nothing"
    if enabled:
        log.warning("special-token masking removes %s from the loss (from %s)", shown, field)
    return ids
