"""Batched sampling of completions and forward passes over (prompt, completion) pairs.

One function, :func:`rollout`, is the rollout backend: HF ``generate`` with a KV cache here; a vLLM backend
or multi-turn environment rollouts can replace it behind the same signature, as long as they return a
:class:`Rollout`.

Layout: prompts are left-padded to P tokens, completions right-padded to T tokens, so that the completion
starts at column P for every row. Position ids follow the attention mask (left padding does not shift them),
the same convention ``generate`` uses, so that log-probs from :func:`completion_logits` match sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers import GenerationConfig

from opd_exp.config import SamplingConfig


@dataclass
class Rollout:
    """A batch of B completions of B prompts (a prompt repeated for several rollouts)."""

    prompt_ids_BP: torch.Tensor  # long, left-padded
    prompt_mask_BP: torch.Tensor  # bool, True on real prompt tokens
    completion_ids_BT: torch.Tensor  # long, pad after the first EOS
    completion_mask_BT: torch.Tensor  # bool, True up to and including the first EOS
    sample_logprobs_BT: torch.Tensor  # float32, log-prob of each token under the sampling distribution
    truncated_B: torch.Tensor  # bool, no EOS within max_new_tokens
    prompt_index_B: torch.Tensor  # long, which prompt of the batch each row completes

    def __getitem__(self, rows) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def __len__(self) -> int:
        return self.completion_ids_BT.shape[0]

    @property
    def lengths_B(self) -> torch.Tensor:
        return self.completion_mask_BT.sum(-1)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to (B, P) ids and a bool mask."""
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
    """(mask through the first EOS inclusive, truncated flag per row); any of several ids can end a row."""
    is_eos = torch.isin(completion_ids_BT, torch.as_tensor(eos_id))
    eos_seen_before = (is_eos.cumsum(-1) - is_eos.long()) > 0
    truncated = ~is_eos.any(-1)
    return ~eos_seen_before, truncated


@torch.no_grad()
def rollout(model, prompts: list[list[int]], sampling: SamplingConfig, *, eos_id: int | list[int], pad_id: int,
            n_per_prompt: int | None = None, greedy: bool = False) -> Rollout:
    """Sample ``n_per_prompt`` completions of every prompt (rows grouped by prompt).

    Returns tokens, the completion mask, the per-token log-probs under the distribution actually sampled
    from (after temperature and top-p), and whether each rollout hit ``max_new_tokens`` without EOS.
    """
    n = sampling.rollouts_per_prompt if n_per_prompt is None else n_per_prompt
    device = next(model.parameters()).device
    repeated = [p for p in prompts for _ in range(n)]
    prompt_ids, prompt_mask = left_pad(repeated, pad_id)
    gen_config = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p, top_k=0 if not greedy else None,
        max_new_tokens=sampling.max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
        return_dict_in_generate=True, output_scores=True)
    out = model.generate(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.long().to(device),
                         generation_config=gen_config)
    completion_ids = out.sequences[:, prompt_ids.shape[1]:].cpu()
    scores_BTV = torch.stack(out.scores, dim=1).float().cpu()  # processed (warped) logits per step
    sample_logprobs = torch.log_softmax(scores_BTV, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    mask, truncated = completion_mask(completion_ids, eos_id)
    completion_ids = completion_ids.masked_fill(~mask, pad_id)
    return Rollout(
        prompt_ids_BP=prompt_ids, prompt_mask_BP=prompt_mask, completion_ids_BT=completion_ids,
        completion_mask_BT=mask, sample_logprobs_BT=sample_logprobs.masked_fill(~mask, 0.0),
        truncated_B=truncated, prompt_index_B=torch.arange(len(prompts)).repeat_interleave(n))


def completion_logits(model, ro: Rollout) -> torch.Tensor:
    """Logits (B, T, V) of ``model`` at the completion positions: row t predicts ``completion_ids_BT[:, t]``."""
    device = next(model.parameters()).device
    ids = torch.cat([ro.prompt_ids_BP, ro.completion_ids_BT], dim=1).to(device)
    attn = torch.cat([ro.prompt_mask_BP, ro.completion_mask_BT], dim=1).to(device)
    position_ids = (attn.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn.long(), position_ids=position_ids).logits
    P, T = ro.prompt_ids_BP.shape[1], ro.completion_ids_BT.shape[1]
    return logits[:, P - 1: P + T - 1]
