"""The "hf" rollout backend: transformers ``generate`` (KV cache, multinomial sampling) with our own logits chain.

``generate`` is called with ``do_sample`` and *no* ``output_scores``: keeping the (B, T, V) processed scores to
read the sampled tokens' log-probs costs gigabytes at V = 152k. Instead the backend passes its own
``LogitsProcessor`` chain, which ``generate`` runs every step, in the order given (``LogitsProcessorList.__call__``
in transformers/generation/logits_process.py), after its own default processors and before its sampling warpers
(``GenerationMixin._get_logits_processor`` in transformers/generation/utils.py):

    1. :class:`VocabSlice`            ids >= vocab_size (padded embedding rows) -> -inf, greedy included
    2. :class:`Temperature`           scores / T                      (HF ``TemperatureLogitsWarper``)
    3. :class:`TopP`                  smallest nucleus of mass >= p   (HF ``TopPLogitsWarper``)
    4. :class:`SampledLogprobRecorder` keeps this step's (B, V) log_softmax; at the next call ``input_ids`` ends
                                      with the token sampled from it, whose log-prob it gathers (one final
                                      gather after ``generate`` returns)

``generate`` itself adds nothing: the config passed asks for temperature 1, top-p 1, top-k 0, and the model's
own ``generation_config`` (which ``generate`` merges into unset fields: a Qwen checkpoint's repetition_penalty,
top_k, ...) is replaced for the call by a copy with every score-altering field unset (:data:`SCORE_FIELDS`,
the fields ``_get_logits_processor`` reads). Steps 2 and 3 repeat HF's warper arithmetic operation for operation,
so with the same seed and a model without padded rows the samples are identical to
``model.generate(do_sample=True, temperature=T, top_p=p, top_k=0)`` (tests/test_rollout_hf.py pins this).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from opd_exp.config import SamplingConfig
from opd_exp.rollout.base import Rollout, completion_mask, left_pad

__all__ = ["HFGenerateBackend", "SampledLogprobRecorder", "Temperature", "TopP", "VocabSlice", "sampling_processors"]

# GenerationConfig fields that make ``generate`` add a logits processor or warper of its own
SCORE_FIELDS = ("guidance_scale", "sequence_bias", "encoder_repetition_penalty", "repetition_penalty",
                "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length",
                "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
                "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "temperature",
                "top_h", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                "watermarking_config", "renormalize_logits")


class VocabSlice(LogitsProcessor):
    """Scores (B, V_rows) -> the same with columns >= ``vocab_size`` at -inf (a no-op when V_rows <= vocab_size)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] <= self.vocab_size:
            return scores
        out = scores.clone()
        out[:, self.vocab_size:] = float("-inf")
        return out


class Temperature(LogitsProcessor):
    """Scores (B, V) / T; the exact operation of HF's ``TemperatureLogitsWarper`` (added only when T != 1)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopP(LogitsProcessor):
    """Nucleus filter of scores (B, V): sets to -inf every token outside the smallest set of most likely tokens
    whose probability reaches ``top_p``; the most likely token always stays. Same operations, in the same order,
    as HF's ``TopPLogitsWarper`` with ``min_tokens_to_keep=1`` (an ascending sort, softmax, cumulative sum,
    drop while the mass below is <= 1 - p), so that the two filters agree bit for bit."""

    def __init__(self, top_p: float):
        self.top_p = float(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        ascending, order = torch.sort(scores, descending=False)
        mass_up_to = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = mass_up_to <= (1 - self.top_p)
        drop_sorted[..., -1:] = False  # the top token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        return scores.masked_fill(drop, float("-inf"))


class SampledLogprobRecorder(LogitsProcessor):
    """Last in the chain: records log p(sampled token) under the processed scores without keeping (B, T, V).

    Holds only the current step's (B, V) float32 log_softmax. At the next call ``input_ids`` (B, P + t) ends with
    the token sampled from it; after ``generate`` returns, :meth:`finish` gathers the last step's from the output
    sequences. Scores pass through unchanged."""

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len
        self.pending_BV: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []  # (B,) per generated token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending_BV is not None:
            if input_ids.shape[1] != self.prompt_len + len(self.steps) + 1:
                raise RuntimeError(f"SampledLogprobRecorder: expected {self.prompt_len + len(self.steps) + 1} "
                                   f"columns of input_ids, got {input_ids.shape[1]} (one recorder per generate call)")
            self.steps.append(self.pending_BV.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending_BV = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences_BL: torch.Tensor) -> torch.Tensor:
        """(B, T) log-probs of ``sequences_BL[:, P:]`` (T = L - P), float32 on the sequences' device."""
        col = self.prompt_len + len(self.steps)
        if self.pending_BV is not None and sequences_BL.shape[1] > col:
            self.steps.append(self.pending_BV.gather(-1, sequences_BL[:, col:col + 1]).squeeze(-1))
        self.pending_BV = None
        width = sequences_BL.shape[1] - self.prompt_len  # steps undone by generate (deferred stop) are dropped
        if width == 0:
            return torch.zeros((sequences_BL.shape[0], 0), dtype=torch.float32, device=sequences_BL.device)
        return torch.stack(self.steps[:width], dim=1)


def sampling_processors(vocab_size: int, temperature: float | None, top_p: float | None,
                        recorder: SampledLogprobRecorder | None = None) -> LogitsProcessorList:
    """The chain, in order: vocabulary slice, temperature (when given and != 1), top-p (when given and < 1), the
    recorder (when given). Greedy decoding passes ``temperature=top_p=None``."""
    chain = LogitsProcessorList([VocabSlice(vocab_size)])
    if temperature is not None and temperature != 1.0:
        chain.append(Temperature(temperature))
    if top_p is not None and top_p < 1.0:
        chain.append(TopP(top_p))
    if recorder is not None:
        chain.append(recorder)
    return chain


@contextmanager
def score_neutral_defaults(model):
    """For the ``with`` block, ``model.generation_config`` is a copy with every :data:`SCORE_FIELDS` entry unset,
    so that ``generate`` merges none of the checkpoint's sampling defaults into our config."""
    saved = getattr(model, "generation_config", None)
    neutral = copy.deepcopy(saved) if saved is not None else GenerationConfig()
    for name in SCORE_FIELDS:
        if hasattr(neutral, name):
            setattr(neutral, name, None)
    model.generation_config = neutral
    try:
        yield
    finally:
        model.generation_config = saved


class HFGenerateBackend:
    """:class:`~opd_exp.rollout.base.RolloutBackend` on ``model.generate`` (any HF causal LM)."""

    @torch.no_grad()
    def generate(self, model, prompts: list[list[int]], sampling: SamplingConfig, *, stop_ids: list[int],
                 pad_id: int, vocab_size: int, n_per_prompt: int | None = None, greedy: bool = False) -> Rollout:
        """Sample ``n_per_prompt`` completions of every prompt; returns the (CPU) :class:`Rollout` with the
        sampled tokens' log-probs under the processed distribution (vocabulary slice, temperature, top-p; only
        the slice when ``greedy``), 0 after the first stop id."""
        n = sampling.rollouts_per_prompt if n_per_prompt is None else n_per_prompt
        device = next(model.parameters()).device
        repeated = [p for p in prompts for _ in range(n)]
        prompt_ids, prompt_mask = left_pad(repeated, pad_id)
        recorder = SampledLogprobRecorder(prompt_ids.shape[1])
        chain = sampling_processors(vocab_size, None if greedy else sampling.temperature,
                                    None if greedy else sampling.top_p, recorder)
        # sampling: temperature/top-p/top-k neutral so that generate adds no warper of its own (they are in
        # `chain`); greedy: none of them (generate warns that sampling flags are ignored without sampling)
        knobs = {} if greedy else {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
        gen_config = GenerationConfig(do_sample=not greedy, **knobs, num_beams=1,
                                      max_new_tokens=sampling.max_new_tokens, eos_token_id=list(stop_ids),
                                      pad_token_id=pad_id, return_dict_in_generate=False, output_scores=False)
        with score_neutral_defaults(model):
            sequences = model.generate(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.long().to(device),
                                       generation_config=gen_config, logits_processor=chain)
        logprobs = recorder.finish(sequences).float().cpu()
        completion_ids = sequences[:, prompt_ids.shape[1]:].cpu()
        mask, truncated = completion_mask(completion_ids, stop_ids)
        return Rollout(
            prompt_ids_BP=prompt_ids, prompt_mask_BP=prompt_mask,
            completion_ids_BT=completion_ids.masked_fill(~mask, pad_id), completion_mask_BT=mask,
            sample_logprobs_BT=logprobs.masked_fill(~mask, 0.0), truncated_B=truncated,
            prompt_index_B=torch.arange(len(prompts)).repeat_interleave(n), action_mask_BT=mask.clone())


