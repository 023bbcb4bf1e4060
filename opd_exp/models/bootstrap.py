"""Build, SFT-train and cache the embedded default pair: a tiny teacher and a weaker student.

    entry = ensure_tiny_pair(cfg.model, cfg.task)   # first call trains (minutes), later calls return at once
    entry / "teacher", entry / "student", entry / "tokenizer"   # save_pretrained dirs; bootstrap.json: metrics

Both models are randomly initialised Llama (or Qwen2) configs over the character tokenizer of
:mod:`opd_exp.models.tokenization` and trained by supervised fine-tuning (loss on response tokens only) on the math
task's worked traces. The gap between them is a **data gap**: the student (96 x 2 layers, 0.30M) is SFT-trained
on only ``student.sft_examples`` (200) problems, which it memorises (train accuracy 100%, loss ~1e-4) while its
held-out accuracy stays low; the teacher (192 x 4, 2.37M) sees the whole 20k pool. Measured at 500 steps
(2-core AVX2 CPU shared with other jobs), student id accuracy against its number of SFT problems:
100 -> 7%, 150 -> 19%, 200 -> 31%, 300 -> 64%, 400 -> 66%, 500 -> 80%; 200 problems for 1000 steps -> 40% (it
still drifts up slowly after memorising). Teacher: id 98.5% after 700 steps (probe: 86% at 300, 95% at 400).
On-policy distillation over the full prompt pool gives the student the teacher's feedback on problems it has
never seen; compare it with SFT on the full pool at equal compute.
Cache: ``<cache_dir>/<name>-<hash>`` where the hash covers the bootstrap settings, the task knobs that change
the training data and :data:`BOOTSTRAP_VERSION` (bump it whenever a code change alters what is trained). An
entry is built in a temp dir, marked complete, then renamed into place, under a file lock, so concurrent runs
train once and a half-written entry is never loaded.

The pair does not depend on the machine that built it: SFT runs in float32 unless ``bootstrap.bf16: true`` asks
for bf16 autocast (part of the cache key; bootstrap.json records ``precision`` and each member's
``weights_sha256``), and building it leaves the caller's torch / python / numpy RNG state untouched, so a run on
an empty cache samples the same random stream as a run on a warm one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock
from tqdm.auto import tqdm

from opd_exp.config import ModelConfig, SamplingConfig, TaskConfig
from opd_exp.config.validation import ConfigError, spec, validate
from opd_exp.models.tokenization import Convention, build_tokenizer, resolve_token_ids, warn_unknown
from opd_exp.rollout.hf import HFGenerateBackend
from opd_exp.rollout.multiturn import play, turn_ids
from opd_exp.tasks.games import GAMES_VERSION
from opd_exp.tasks.math import Example, MathTask

BOOTSTRAP_VERSION = 2  # bump when a code change alters the trained pair (invalidates every cache entry)
COMPLETE = "COMPLETE"  # marker file, written last; an entry without it is never loaded
META = "bootstrap.json"
HASH_EXCLUDED = ("progress", "eval_every")  # settings that do not change what is trained


@dataclass
class MemberConfig:
    """Architecture and SFT recipe of one bootstrapped model (teacher or student)."""

    arch: str = spec("llama", "transformers config family", choices=["llama", "qwen2"])
    hidden_size: int = spec(192, "model width", ge=8)
    num_layers: int = spec(4, "transformer blocks", ge=1)
    num_heads: int = spec(4, "attention heads (must divide hidden_size)", ge=1)
    intermediate_size: int = spec(0, "MLP width (0 = 4 * hidden_size)", ge=0)
    sft_examples: int = spec(0, "train problems the model sees (0 = the whole train pool): the data-gap knob",
                             ge=0)
    sft_games: int = spec(0, "training games the model sees (0 = all; agentic task): the games' data-gap knob",
                          ge=0)
    sft_detours: int = spec(0, "extra SFT rows per game, each with one action the game rejects (seen, not "
                            "trained) before an expert turn: the model learns to go on after a weaker policy's "
                            "errors (AgenticTask.detours); game tasks only", ge=0)
    sft_steps: int = spec(500, "optimizer steps", ge=0)
    batch_size: int = spec(64, "sequences per step", ge=1)
    lr: float = spec(2e-3, "AdamW peak learning rate (linear warm-up, cosine decay to 10%)", gt=0.0)
    warmup_steps: int = spec(50, "linear warm-up steps", ge=0)
    weight_decay: float = spec(0.0, "AdamW weight decay", ge=0.0)
    max_seconds: float = spec(0.0, "stop SFT after this wall time (0 = no cap; makes results machine-dependent)",
                              ge=0.0)
    convention: Convention = field(default_factory=Convention)


def _student_defaults() -> MemberConfig:
    return MemberConfig(hidden_size=96, num_layers=2, num_heads=4, sft_examples=200, sft_games=16, sft_steps=250,
                        lr=3e-3)


@dataclass
class BootstrapConfig:
    """``model.bootstrap``: how the tiny pair is built (the defaults live in conf/model/tiny.yaml)."""

    seed: int = spec(0, "init and batch-order seed", ge=0)
    threads: int = spec(0, "torch CPU threads while training (0 = leave torch's setting); a nonzero value is part "
                        "of the cache key: the thread count orders float reductions, so it can change the weights "
                        "(the games' teacher: id 88% with 1 thread, 36% with 2)", ge=0)
    bf16: bool = spec(False, "bf16 autocast of the SFT forward passes (opt-in: a different pair, its own cache "
                      "entry; ~10x slower than float32 on CPUs without AVX512-BF16/AMX); weights are saved float32",
                      choices=[False, True])
    eval_examples: int = spec(200, "id-split problems greedily graded after SFT (recorded in bootstrap.json)",
                              ge=1)
    eval_every: int = spec(0, "grade 64 id problems every N steps for the progress bar (0 = only at the end)",
                           ge=0)
    eval_max_new_tokens: int = spec(64, "generation cap when grading", ge=1)
    progress: bool = spec(True, "show tqdm progress bars")
    teacher: MemberConfig = field(default_factory=MemberConfig)
    student: MemberConfig = field(default_factory=_student_defaults)


def parse_bootstrap(node: dict) -> BootstrapConfig:
    """Validate ``model.bootstrap`` (a plain dict) into a :class:`BootstrapConfig`; member keys given in
    YAML override that member's defaults (so the student keeps its own defaults for unset keys)."""
    node = dict(node or {})
    if isinstance(node.get("bf16"), str):
        raise ConfigError("model.bootstrap.bf16", f"got {node['bf16']!r}, allowed values: false (float32, the "
                          "default), true (bf16 autocast); 'auto' is gone: the pair must not depend on the CPU")
    members = {}
    for role, default in (("teacher", MemberConfig()), ("student", _student_defaults())):
        base = dataclasses.asdict(default)
        over = node.pop(role, None) or {}
        if not isinstance(over, dict):
            raise ConfigError(f"model.bootstrap.{role}", f"got {over!r}, expected a mapping")
        conv = {**base.pop("convention"), **(over.get("convention") or {})}
        members[role] = {**base, **{k: v for k, v in over.items() if k != "convention"}, "convention": conv}
    cfg = validate(BootstrapConfig, {**node, **members}, "model.bootstrap")
    tok = build_tokenizer()
    for role in ("teacher", "student"):
        m: MemberConfig = getattr(cfg, role)
        if m.hidden_size % m.num_heads:
            raise ConfigError(f"model.bootstrap.{role}.num_heads",
                              f"got {m.num_heads}, must divide hidden_size ({m.hidden_size})")
        c = m.convention
        try:
            resolve_token_ids(tok, [c.think_open, c.think_close, c.end])
        except ValueError as err:
            raise ConfigError(f"model.bootstrap.{role}.convention", str(err)) from None
    return cfg


# ------------------------------------------------------------------------------------------------------------
# cache key


def cache_key(model_cfg: ModelConfig, task_cfg: TaskConfig, boot: BootstrapConfig) -> str:
    """12 hex digits of sha256 over the bootstrap settings, the task's data knobs (with the games' generator
    version for a task that plays games) and the code version."""
    settings = {k: v for k, v in dataclasses.asdict(boot).items() if k not in HASH_EXCLUDED}
    for role in ("teacher", "student"):  # a knob at its default (0) is left out: older pairs keep their keys
        if not settings[role]["sft_detours"]:
            del settings[role]["sft_detours"]
    if not settings["threads"]:  # the thread count orders float reductions: it can change the weights
        del settings["threads"]
    keys = ("min_ops", "max_ops", "max_operand", "data_seed", "n_train", "n_eval", "eval_splits", "dataset_path")
    if task_cfg.name != "math":  # the games' knobs (a math pair's key is unchanged by them)
        keys += ("name", "n_train_games", "n_eval_games", "game_rooms", "game_receptacles", "game_distractors",
                 "game_eval_splits", "max_turns", "max_action_tokens", "mix")
    data = {k: getattr(task_cfg, k) for k in keys}
    if task_cfg.name != "math":  # the games a pair learns from change with their generator's version
        data["games_version"] = GAMES_VERSION
    if task_cfg.dataset_path and Path(task_cfg.dataset_path).expanduser().is_file():
        st = Path(task_cfg.dataset_path).expanduser().stat()
        data["dataset_stat"] = [st.st_size, int(st.st_mtime)]
    blob = json.dumps({"version": BOOTSTRAP_VERSION, "bootstrap": settings, "task": data}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def entry_dir(model_cfg: ModelConfig, task_cfg: TaskConfig) -> Path:
    """Where the pair for these configs lives (whether or not it exists yet)."""
    boot = parse_bootstrap(model_cfg.bootstrap)
    return Path(model_cfg.cache_dir).expanduser() / f"{model_cfg.name}-{cache_key(model_cfg, task_cfg, boot)}"


def is_complete(entry: Path) -> bool:
    return (entry / COMPLETE).is_file()


# ------------------------------------------------------------------------------------------------------------
# models and data


def build_model(m: MemberConfig, vocab_size: int, special_ids: dict, seed: int) -> torch.nn.Module:
    """A randomly initialised causal LM (fp32) from a Llama or Qwen2 config; tied embeddings."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = LlamaConfig if m.arch == "llama" else Qwen2Config
    config = cls(vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                 num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
                 intermediate_size=m.intermediate_size or 4 * m.hidden_size, max_position_embeddings=1024,
                 tie_word_embeddings=True, **special_ids)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def sft_rows(task, tokenizer, examples: list, detours: int = 0, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per example: the prompt then the target, labels -100 on the prompt. A multi-turn task's
    target is the expert's turns (``target_turns``): actions are labels, observation turns -100; ``detours``
    more rows per game (``AgenticTask.detours``, seeded by ``seed``) hold a rejected action, -100 too."""
    items = [(ex, [(action, obs, True) for action, obs in task.target_turns(ex)] if hasattr(task, "target_turns")
              else [(task.target_text(ex), None, True)]) for ex in examples]
    if detours:
        items += task.detours(examples, detours, seed)
    rows, texts = [], []
    for ex, turns in items:
        texts.append(task.prompt_text(tokenizer, ex))
        ids = task.prompt_ids(tokenizer, ex)
        labels = [-100] * len(ids)
        for action, observation, trained in turns:
            texts += [action] + ([observation] if observation is not None else [])
            a = tokenizer(action, add_special_tokens=False)["input_ids"]
            ids, labels = ids + a, labels + (a if trained else [-100] * len(a))
            if observation is not None:
                o = turn_ids(tokenizer, observation)
                ids, labels = ids + o, labels + [-100] * len(o)
        rows.append((ids, labels))
    warn_unknown(tokenizer, texts, f"the {task.name} task's SFT data")
    return rows


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (N, L), labels (N, L) with -100 on padding, lengths (N,)."""
    width = max(len(ids) for ids, _ in rows)
    ids_NL = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels_NL = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        ids_NL[i, :len(ids)] = torch.tensor(ids)
        labels_NL[i, :len(labels)] = torch.tensor(labels)
    return ids_NL, labels_NL, torch.tensor([len(ids) for ids, _ in rows])


# ------------------------------------------------------------------------------------------------------------
# greedy grading and SFT


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task: MathTask, examples: list[Example], batch_size: int = 256,
                    max_new_tokens: int = 64) -> float:
    """Fraction of ``examples`` whose greedy completion (cut at the end token) grades correct."""
    was_training = model.training
    model.eval()
    end_id = resolve_token_ids(tokenizer, [task.convention.end])[0]
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = tokenizer([task.prompt_text(tokenizer, ex) for ex in chunk], add_special_tokens=False,
                          padding=True, return_tensors="pt").to(model.device)
        out_BT = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_id,
                                pad_token_id=tokenizer.pad_token_id)
        for ex, row in zip(chunk, out_BT[:, batch["input_ids"].shape[1]:].tolist(), strict=True):
            row = row[:row.index(end_id)] if end_id in row else row
            correct += task.grade(tokenizer.decode(row), ex)
    model.train(was_training)
    return correct / max(len(examples), 1)


@torch.no_grad()
def greedy_success(model, tokenizer, task, examples: list, task_cfg: TaskConfig, batch_size: int = 64) -> float:
    """Fraction of ``examples`` (games) won by ``model`` playing greedily (opd_exp/rollout/multiturn.py)."""
    was_training = model.training
    model.eval()
    won = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        _, episodes = play(HFGenerateBackend(), model, tokenizer, [task.prompt_ids(tokenizer, ex) for ex in chunk],
                           [lambda ex=ex: task.episode(ex) for ex in chunk], SamplingConfig(),
                           stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id,
                           vocab_size=len(tokenizer), max_turns=task_cfg.max_turns,
                           max_action_tokens=task_cfg.max_action_tokens, n_per_prompt=1, greedy=True)
        won += sum(ep.won for ep in episodes)
    model.train(was_training)
    return won / max(len(examples), 1)


def precision(boot: BootstrapConfig) -> str:
    """The SFT compute precision recorded in bootstrap.json: "bfloat16" (autocast) or "float32"."""
    return "bfloat16" if boot.bf16 else "float32"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def preserved_rng():
    """Restore the global torch (CPU and every CUDA device), python ``random`` and numpy RNG states on exit."""
    import numpy as np

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def lr_at(step: int, m: MemberConfig) -> float:
    """Linear warm-up to ``m.lr`` then cosine decay to 10% of it at ``m.sft_steps``."""
    import math

    if step < m.warmup_steps:
        return m.lr * (step + 1) / m.warmup_steps
    frac = (step - m.warmup_steps) / max(1, m.sft_steps - m.warmup_steps)
    return m.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def sft(model, data: list[tuple], order: list[int], m: MemberConfig, boot: BootstrapConfig, evaluate,
        desc: str) -> dict:
    """Train ``model`` for ``m.sft_steps`` steps on ``data``, one dataset per task: (ids (N, L), labels (N, L),
    lengths (N,)). Step s draws ``m.batch_size`` rows uniformly from dataset ``order[s % len(order)]`` (a mix's
    batch schedule, as OPD alternates tasks), so a batch is padded only to its own task's lengths.

    ``evaluate(model) -> float`` gives the progress bar's accuracy. Returns {"steps", "seconds", "loss"}.
    """
    gen = torch.Generator().manual_seed(boot.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=m.lr, betas=(0.9, 0.98), weight_decay=m.weight_decay)
    model.train()
    start, loss_ema, acc, step = time.time(), None, float("nan"), 0
    bar = tqdm(range(m.sft_steps), desc=desc, disable=not boot.progress, mininterval=2.0)
    for step in bar:
        ids_NL, labels_NL, lengths_N = data[order[step % len(order)]]
        idx = torch.randint(0, ids_NL.shape[0], (m.batch_size,), generator=gen)
        width = int(lengths_N[idx].max())  # trim the shared right padding to this batch's longest row
        for group in opt.param_groups:
            group["lr"] = lr_at(step, m)
        mask_BL = torch.arange(width)[None, :] < lengths_N[idx, None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=boot.bf16 and model.device.type == "cpu"):
            loss = model(input_ids=ids_NL[idx, :width], attention_mask=mask_BL.long(),
                         labels=labels_NL[idx, :width]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if boot.eval_every and (step + 1) % boot.eval_every == 0:
            acc = evaluate(model)
            model.train()
        bar.set_postfix(loss=f"{loss_ema:.3f}", acc=f"{acc:.2f}", refresh=False)
        if m.max_seconds and time.time() - start > m.max_seconds:
            break
    bar.close()
    return {"steps": step + 1 if m.sft_steps else 0, "seconds": round(time.time() - start, 1),
            "loss": loss_ema}


# ------------------------------------------------------------------------------------------------------------
# the cached pair


def member_tokenizer(tokenizer, convention: Convention):
    """The shared tokenizer, with eos set to the member's end token when its convention differs."""
    if convention.end == tokenizer.eos_token:
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = convention.end
    return tok


def member_parts(task_cfg: TaskConfig, m: MemberConfig) -> list[tuple[str, object, list, int]]:
    """(task name, task, the member's SFT examples, mix weight) per task the pair is trained on: the task
    itself, or each task of a mix with positive weight. The data gaps: ``sft_examples`` math problems,
    ``sft_games`` games (0 = all)."""
    from opd_exp.tasks.agentic import AgenticTask

    weights = {"math": {"math": 1}, "agentic": {"agentic": 1}}.get(task_cfg.name, task_cfg.mix)
    parts = []
    for name, weight in weights.items():
        if weight <= 0:
            continue
        task = MathTask(task_cfg, convention=m.convention) if name == "math" else AgenticTask(task_cfg)
        limit = m.sft_examples if name == "math" else m.sft_games
        parts.append((name, task, task.train[:limit] if limit else task.train, weight))
    return parts


def train_member(role: str, m: MemberConfig, boot: BootstrapConfig, task_cfg: TaskConfig, tokenizer,
                 out: Path) -> dict:
    """Build, SFT-train, grade and save one model (and the tokenizer) into ``out / role``. Accuracy keys are
    the eval splits (``<task>/<split>`` for a mix); a game's accuracy is its greedy success rate."""
    parts = member_parts(task_cfg, m)
    special = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
               "eos_token_id": resolve_token_ids(tokenizer, [m.convention.end])[0]}
    model = build_model(m, len(tokenizer), special, seed=boot.seed + (role == "student"))
    member_tok = member_tokenizer(tokenizer, m.convention)

    def grade(mod, task, exs: list) -> float:
        if hasattr(task, "target_turns"):
            return greedy_success(mod, member_tok, task, exs, task_cfg)
        return greedy_accuracy(mod, tokenizer, task, exs, max_new_tokens=boot.eval_max_new_tokens)

    from opd_exp.tasks.mix import schedule

    data = [pad_rows(sft_rows(task, tokenizer, examples, m.sft_detours if name != "math" else 0, boot.seed),
                     tokenizer.pad_token_id) for name, task, examples, _ in parts]
    names = [name for name, *_ in parts]
    order = [names.index(name) for name in schedule({name: weight for name, _, _, weight in parts})]
    first = parts[0][1]
    probe = (first.eval_splits.get("id") or next(iter(first.eval_splits.values())))[:64]
    stats = sft(model, data, order, m, boot, evaluate=lambda mod: grade(mod, first, probe),
                desc=f"bootstrap {role} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M)")
    single = len(parts) == 1  # a one-task pair keeps bootstrap.json's plain numbers
    stats["n_examples"] = len(parts[0][2]) if single else {name: len(exs) for name, _, exs, _ in parts}
    stats["params"] = sum(p.numel() for p in model.parameters())
    stats["accuracy"] = {(split if single else f"{name}/{split}"): grade(model, task, exs[:boot.eval_examples])
                         for name, task, _, _ in parts for split, exs in task.eval_splits.items()}
    train_acc = {name: grade(model, task, exs[:boot.eval_examples]) for name, task, exs, _ in parts}
    stats["accuracy_train"] = next(iter(train_acc.values())) if single else train_acc
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = special["eos_token_id"]
    model.save_pretrained(out / role)
    member_tok.save_pretrained(out / role)
    stats["weights_sha256"] = file_sha256(out / role / "model.safetensors")
    return stats


def ensure_tiny_pair(model_cfg: ModelConfig, task_cfg: TaskConfig) -> Path:
    """The cache entry dir holding ``tokenizer/``, ``teacher/``, ``student/`` for these configs.

    Returns at once when the entry is complete; otherwise takes the entry's file lock (waiting for a
    concurrent bootstrap of the same entry, which then is complete), trains both models into a temp dir,
    writes the COMPLETE marker and renames the dir into place. The caller's RNG states are left as they were.
    """
    with preserved_rng():
        return _ensure_tiny_pair(model_cfg, task_cfg)


def _ensure_tiny_pair(model_cfg: ModelConfig, task_cfg: TaskConfig) -> Path:
    boot = parse_bootstrap(model_cfg.bootstrap)
    entry = entry_dir(model_cfg, task_cfg)
    if is_complete(entry):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if is_complete(entry):  # another process finished it while we waited
            return entry
        if entry.exists():  # incomplete leftovers (never produced by this code's rename, but be safe)
            shutil.rmtree(entry)
        # under the lock no one else writes this entry: temp dirs left here are from killed bootstraps
        for stale in entry.parent.glob(f".{entry.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}"
        threads = torch.get_num_threads()
        if boot.threads:
            torch.set_num_threads(boot.threads)
        try:
            start = time.time()
            tokenizer = build_tokenizer()
            tokenizer.save_pretrained(tmp / "tokenizer")
            meta = {"version": BOOTSTRAP_VERSION, "precision": precision(boot), "bootstrap": dataclasses.asdict(boot),
                    "task": dataclasses.asdict(task_cfg), "torch_threads": torch.get_num_threads()}
            for role in ("teacher", "student"):
                meta[role] = train_member(role, getattr(boot, role), boot, task_cfg, tokenizer, tmp)
            meta["seconds"] = round(time.time() - start, 1)
            (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
            (tmp / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            torch.set_num_threads(threads)
    print(f"[opd-exp] bootstrapped {entry} in {meta['seconds']:.0f}s: teacher {meta['teacher']['accuracy']}, "
          f"student {meta['student']['accuracy']}")
    return entry
