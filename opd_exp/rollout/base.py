"""The rollout contract: what a backend returns (:class:`Rollout`) and how it is called (:class:`RolloutBackend`).

    backend = make_backend(cfg.sampling.backend)                     # "hf": transformers ``generate``
    ro = backend.generate(model, prompts, cfg.sampling, stop_ids=stop_ids(model, tok), pad_id=tok.pad_token_id,
                          vocab_size=vocab_size(tok))
    ro = rollout(model, prompts, cfg.sampling, eos_id=..., pad_id=..., vocab_size=...)   # the same, one call

Layout: prompts are left-padded to P tokens, completions right-padded to T tokens, so that the completion
starts at column P for every row. A backend never samples an id >= ``vocab_size`` (the tokenizer's length):
real checkpoints pad their embedding beyond the tokenizer (Qwen2.5-7B: 152,064 rows for 151,646 ids), and those
rows are not tokens. The registry of backends is :mod:`opd_exp.rollout.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import torch

from opd_exp.config import SamplingConfig


@dataclass
class Rollout:
    """B completions of B prompts (a prompt is repeated for several rollouts; rows grouped by prompt).

    prompt_ids_BP:      long, left-padded prompts
    prompt_mask_BP:     bool, True on real prompt tokens
    completion_ids_BT:  long, the response region; pad after the first stop id
    completion_mask_BT: bool, what the models see of the response region: True up to and including the first
                        stop id (single-turn), actions and observations (multi-turn)
    sample_logprobs_BT: float32, log-prob of each sampled token under the distribution actually sampled from
                        (vocabulary slice, temperature and top-p applied); 0 outside ``action_mask_BT``
    truncated_B:        bool, no stop id within ``max_new_tokens``
    prompt_index_B:     long, which prompt of the call each row completes
    action_mask_BT:     bool, tokens the policy sampled; defaults to ``completion_mask_BT`` (single-turn). A
                        multi-turn backend sets it to False on observations, which stay in ``completion_mask_BT``
    after_rejected_BT:  bool, a multi-turn row's tokens after the first action its environment rejected (the
                        rejected action itself excluded); all False when none was (and single-turn)
    """

    prompt_ids_BP: torch.Tensor
    prompt_mask_BP: torch.Tensor
    completion_ids_BT: torch.Tensor
    completion_mask_BT: torch.Tensor
    sample_logprobs_BT: torch.Tensor
    truncated_B: torch.Tensor
    prompt_index_B: torch.Tensor
    action_mask_BT: torch.Tensor | None = None
    after_rejected_BT: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.action_mask_BT is None:
            self.action_mask_BT = self.completion_mask_BT.clone()
        if self.after_rejected_BT is None:
            self.after_rejected_BT = torch.zeros_like(self.completion_mask_BT)

    def __getitem__(self, rows) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def __len__(self) -> int:
        return self.completion_ids_BT.shape[0]

    @property
    def lengths_B(self) -> torch.Tensor:
        return self.completion_mask_BT.sum(-1)


class RolloutBackend(Protocol):
    """Samples completions. ``prompts`` are token lists (the policy's tokenizer); ``n_per_prompt`` defaults to
    ``sampling.rollouts_per_prompt``; rows are grouped by prompt. Ids >= ``vocab_size`` are never sampled (greedy
    included). ``greedy`` decodes the argmax and records log-probs of the untempered distribution."""

    def generate(self, model, prompts: list[list[int]], sampling: SamplingConfig, *, stop_ids: list[int],
                 pad_id: int, vocab_size: int, n_per_prompt: int | None = None, greedy: bool = False) -> Rollout:
        ...


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to (B, P) long ids and a (B, P) bool mask (P = the longest list)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = True
    return ids, mask


def stop_ids(model, tokenizer) -> list[int]:
    """The ids that end ``model``'s responses: its generation config's EOS (a model may write its own end
    token, as the paper's teacher does), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def completion_mask(completion_ids_BT: torch.Tensor, eos_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool mask through the first stop id inclusive, and (B,) truncated flags (no stop id in the row);
    any of several ids can end a row."""
    is_eos = torch.isin(completion_ids_BT, torch.as_tensor(eos_id, device=completion_ids_BT.device))
    eos_seen_before = (is_eos.cumsum(-1) - is_eos.long()) > 0
    truncated = ~is_eos.any(-1)
    return ~eos_seen_before, truncated
