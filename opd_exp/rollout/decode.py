"""The "decode" rollout backend: opd-exp's own sampling loop over any HF causal LM's forward with a KV cache.

Same distribution and the same :class:`~opd_exp.rollout.base.Rollout` as the "hf" backend (vocabulary slice,
temperature, top-p with HF's arithmetic, the sampled token's log-prob under the processed distribution), with
less work per rollout batch than ``generate``:

    prefill   each distinct prompt once (U = B / n rows), its KV cache gathered to its n rollouts
    decode    one forward of the active rows' last token; logits of that position only (``logits_to_keep=1``)
    sample    slice + temperature + top-p + log-softmax + one ``torch.multinomial`` over the (B_active, V) scores
    shrink    rows that wrote a stop id leave the batch (their cache rows are dropped): the step costs what the
              unfinished rows cost, and the loop ends when none is left

The random stream differs from ``generate``'s (finished rows draw no more samples), so seeds are not
interchangeable between the two backends; the distribution is the same (tests/test_rollout_decode.py checks
greedy token equality with ``generate``, and recorded log-probs against a teacher-forced forward).
Measured (scripts/bench_step.py, README "Speed"): faster than ``generate`` on the tiny pair, where a step is
Python overhead. The idea of dropping finished sequences from the batch is standard in serving engines (vLLM's
continuous batching, arXiv 2309.06180); the code is ours.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from opd_exp.config import SamplingConfig
from opd_exp.models.forward import cache_kwarg
from opd_exp.rollout.base import Rollout, completion_mask, left_pad
from opd_exp.rollout.hf import TopP


def processed_logprobs(logits_BV: torch.Tensor, vocab_size: int, temperature: float | None,
                       top_p: float | None) -> torch.Tensor:
    """(B, V') logits -> (B, vocab_size) float32 log-probs of the distribution sampled from: ids >= vocab_size
    cut, / temperature (when given and != 1), top-p nucleus (when given and < 1; HF's arithmetic, ``TopP``),
    log-softmax (-inf outside the nucleus)."""
    scores_BV = logits_BV[:, :vocab_size].float()
    if temperature is not None and temperature != 1.0:
        scores_BV = scores_BV / temperature
    if top_p is not None and top_p < 1.0:
        scores_BV = TopP(top_p)(None, scores_BV)
    return torch.log_softmax(scores_BV, dim=-1)


class DecodeBackend:
    """:class:`~opd_exp.rollout.base.RolloutBackend` on a model's forward with a ``DynamicCache``."""

    @torch.no_grad()
    def generate(self, model, prompts: list[list[int]], sampling: SamplingConfig, *, stop_ids: list[int],
                 pad_id: int, vocab_size: int, n_per_prompt: int | None = None, greedy: bool = False) -> Rollout:
        """Sample ``n_per_prompt`` completions of every prompt (argmax when ``greedy``, with the log-probs of the
        sliced, untempered distribution); returns the (CPU) :class:`Rollout`."""
        n = sampling.rollouts_per_prompt if n_per_prompt is None else n_per_prompt
        temperature, top_p = (None, None) if greedy else (sampling.temperature, sampling.top_p)
        device = next(model.parameters()).device
        kw = cache_kwarg(model)
        prompt_ids_UP, prompt_mask_UP = left_pad(prompts, pad_id)
        slot_B = torch.arange(len(prompts)).repeat_interleave(n)
        B, T = len(slot_B), sampling.max_new_tokens
        cache = DynamicCache(config=model.config)
        mask_UP = prompt_mask_UP.long().to(device)
        position_UP = (mask_UP.cumsum(-1) - 1).clamp(min=0)
        logits_UV = model(input_ids=prompt_ids_UP.to(device), attention_mask=mask_UP, position_ids=position_UP,
                          use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1]
        cache.reorder_cache(slot_B.to(device))
        logits_BV, mask_BL = logits_UV[slot_B.to(device)], mask_UP[slot_B.to(device)]
        position_B1 = position_UP[slot_B.to(device), -1:]
        ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
        logprobs_BT = torch.zeros((B, T), dtype=torch.float32)
        active_A = torch.arange(B)  # rows still writing, as indices into the B rows
        stops = torch.tensor(stop_ids, device=device)
        width = T  # columns written: the loop ends early when every row has stopped
        for t in range(T):
            logp_AV = processed_logprobs(logits_BV, vocab_size, temperature, top_p)
            token_A = logp_AV.argmax(-1) if greedy else torch.multinomial(logp_AV.exp(), 1).squeeze(-1)
            ids_BT[active_A, t] = token_A.cpu()
            logprobs_BT[active_A, t] = logp_AV.gather(-1, token_A[:, None]).squeeze(-1).cpu()
            going_A = ~torch.isin(token_A, stops)
            if t == T - 1 or not going_A.any():
                width = t + 1
                break
            if not going_A.all():  # finished rows leave the batch and the cache
                keep_A = going_A.nonzero().squeeze(-1)
                cache.reorder_cache(keep_A)
                active_A, token_A = active_A[keep_A.cpu()], token_A[keep_A]
                mask_BL, position_B1 = mask_BL[keep_A], position_B1[keep_A]
            mask_BL = torch.cat([mask_BL, mask_BL.new_ones((len(active_A), 1))], dim=1)
            position_B1 = position_B1 + 1
            logits_BV = model(input_ids=token_A[:, None], attention_mask=mask_BL, position_ids=position_B1,
                              use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1]
        ids_BT, logprobs_BT = ids_BT[:, :width], logprobs_BT[:, :width]
        mask_BT, truncated_B = completion_mask(ids_BT, stop_ids)
        return Rollout(
            prompt_ids_BP=prompt_ids_UP[slot_B], prompt_mask_BP=prompt_mask_UP[slot_B],
            completion_ids_BT=ids_BT.masked_fill(~mask_BT, pad_id), completion_mask_BT=mask_BT,
            sample_logprobs_BT=logprobs_BT.masked_fill(~mask_BT, 0.0), truncated_B=truncated_B,
            prompt_index_B=slot_B, action_mask_BT=mask_BT.clone())
