"""The rollout backends by name (config ``sampling.backend``), and :func:`rollout`, one call to sample.

    backend = make_backend(cfg.sampling.backend)      # "decode": our KV-cache loop (opd_exp/rollout/decode.py),
                                                      # "hf": transformers generate (opd_exp/rollout/hf.py),
                                                      # "vllm": a colocated vLLM engine (opd_exp/rollout/vllm.py)
    ro = backend.generate(model, prompts, cfg.sampling, stop_ids=..., pad_id=..., vocab_size=...)
"""

from __future__ import annotations

import importlib

from opd_exp.config import SamplingConfig
from opd_exp.config.validation import ConfigError
from opd_exp.rollout.base import Rollout, RolloutBackend
from opd_exp.rollout.decode import DecodeBackend
from opd_exp.rollout.hf import HFGenerateBackend

# name (config ``sampling.backend``) -> backend class, or "module:Class" imported on use (optional extras)
BACKENDS: dict[str, type | str] = {"decode": DecodeBackend, "hf": HFGenerateBackend,
                                   "vllm": "opd_exp.rollout.vllm:VLLMBackend"}


def make_backend(name: str) -> RolloutBackend:
    """A fresh backend registered under ``name``; ConfigError naming ``sampling.backend`` when there is none."""
    if name not in BACKENDS:
        raise ConfigError("sampling.backend", f"got {name!r}, allowed values: {', '.join(sorted(BACKENDS))}")
    cls = BACKENDS[name]
    if isinstance(cls, str):
        module, attr = cls.split(":")
        cls = getattr(importlib.import_module(module), attr)
    return cls()


def rollout(model, prompts: list[list[int]], sampling: SamplingConfig, *, eos_id: int | list[int], pad_id: int,
            vocab_size: int | None = None, n_per_prompt: int | None = None, greedy: bool = False) -> Rollout:
    """``make_backend(sampling.backend).generate(...)`` in one call. ``eos_id``: the stop id(s), e.g.
    :func:`stop_ids`; ``vocab_size``: the tokenizer's length (``opd_exp.models.pair.vocab_size``); None = the
    model's logits width (no slice: only right when the embedding has no padded rows)."""
    if vocab_size is None:
        head = model.get_output_embeddings()
        vocab_size = head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size
    stops = [int(e) for e in (eos_id if isinstance(eos_id, (list, tuple)) else [eos_id])]
    return make_backend(sampling.backend).generate(model, prompts, sampling, stop_ids=stops, pad_id=pad_id,
                                                   vocab_size=vocab_size, n_per_prompt=n_per_prompt, greedy=greedy)
