"""The "vllm" rollout backend: a vLLM engine colocated with the trained student (optional extra ``[vllm]``, GPU).

    sampling.backend=vllm          # opd-exp ... ; vllm is imported on the first generate, never before

Per call (every training step, and every evaluation): the student's current weights are loaded into the
engine (``load_weights`` on the engine's model, so each step samples from the policy being trained) and the
engine's prefix cache is dropped (its KV blocks were computed with the previous weights, and vLLM would reuse
them for every prompt it has seen: ``LLM.reset_prefix_cache``, as TRL does after each sync); then
``LLM.generate`` samples ``n`` completions per prompt and the ragged outputs become one right-padded
:class:`~opd_exp.rollout.base.Rollout` (:func:`to_rollout`). A sharded student (``train.parallel=fsdp``) is
synced from inside ``opd_exp.train.fsdp.gathered``, where its parameters are whole on every rank.

What the sampler's log-prob means. The HF backend records log p(token) under the distribution actually sampled:
vocabulary slice, temperature, then top-p, renormalised over the nucleus. vLLM's default ``logprobs`` are the
*raw* model log-probs (before temperature and top-p). The engine is created with
``logprobs_mode="processed_logprobs"`` (vLLM >= 0.10.2; engine args: "after applying all processors, including
temperature and top_k/top_p"): log-softmax over the kept support, log(p_t / S) with S the nucleus' mass, the
same quantity the HF backend records. The known TRL bug (huggingface/trl#6789, fixed by trl#7269) is a ratio of
a *full-vocabulary* trainer log-prob to these renormalised ones, which carries a spurious factor S into every
importance weight. Here no ratio mixes the two: PPO's ratio uses pi_old recomputed by the student over the full
vocabulary (opd_exp/train/collect.py), and the one consumer of the sampler log-probs, the sampled-token tail of
``topk_rkl`` (``tail=sampled_is``), needs exactly the density the token was drawn from, the renormalised one.
Ids at or beyond ``vocab_size`` (padded embedding rows) are excluded with ``allowed_token_ids``.

The teacher is scored locally (chunked) or by a vLLM server (``model.teacher_server``,
opd_exp/models/teacher_server.py).
"""

from __future__ import annotations

import os

import torch

from opd_exp.config import SamplingConfig
from opd_exp.rollout.base import Rollout, completion_mask, left_pad

GPU_MEMORY_UTILIZATION = 0.35  # the engine's KV-cache share: the student, its optimizer and the teacher share the GPU


def to_rollout(prompts: list[list[int]], completions: list[list[tuple[list[int], list[float]]]], *, stop_ids,
               pad_id: int) -> Rollout:
    """Ragged completions -> a :class:`Rollout` (prompts left-padded, completions right-padded).

    ``completions[i]`` holds prompt i's samples as (token ids, their sampler log-probs), rows grouped by prompt.
    Positions after the first stop id are pad with log-prob 0 (:func:`completion_mask`)."""
    rows = [(i, ids, lps) for i, samples in enumerate(completions) for ids, lps in samples]
    prompt_ids_BP, prompt_mask_BP = left_pad([prompts[i] for i, _, _ in rows], pad_id)
    width = max((len(ids) for _, ids, _ in rows), default=0)
    ids_BT = torch.full((len(rows), width), pad_id, dtype=torch.long)
    logprobs_BT = torch.zeros((len(rows), width), dtype=torch.float32)
    for b, (_, ids, lps) in enumerate(rows):
        if len(ids) != len(lps):
            raise ValueError(f"row {b}: {len(ids)} token ids but {len(lps)} log-probs")
        ids_BT[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        logprobs_BT[b, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
    mask_BT, truncated_B = completion_mask(ids_BT, list(stop_ids))
    mask_BT &= torch.arange(width)[None, :] < torch.tensor([len(ids) for _, ids, _ in rows])[:, None]
    return Rollout(prompt_ids_BP=prompt_ids_BP, prompt_mask_BP=prompt_mask_BP,
                   completion_ids_BT=ids_BT.masked_fill(~mask_BT, pad_id), completion_mask_BT=mask_BT,
                   sample_logprobs_BT=logprobs_BT.masked_fill(~mask_BT, 0.0), truncated_B=truncated_B,
                   prompt_index_B=torch.tensor([i for i, _, _ in rows], dtype=torch.long))


def sampled_logprobs(output) -> list[float]:
    """The sampled tokens' log-probs of one vLLM ``CompletionOutput`` (``logprobs=0`` returns exactly those)."""
    return [float(step[token].logprob) for token, step in zip(output.token_ids, output.logprobs, strict=True)]


class VLLMBackend:
    """:class:`~opd_exp.rollout.base.RolloutBackend` on a colocated ``vllm.LLM`` (created on the first call)."""

    def __init__(self, gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION):
        self.gpu_memory_utilization = gpu_memory_utilization
        self.llm = None

    def _engine(self, model):
        """The engine for ``model``'s checkpoint dir and dtype, created once."""
        if self.llm is None:
            try:
                from vllm import LLM
            except ImportError:
                from opd_exp.config.validation import ConfigError

                raise ConfigError("sampling.backend", "got 'vllm', which needs vLLM: pip install 'opd-exp[vllm]' "
                                  "(CUDA only)") from None
            # the engine in this process, so that sync_weights hands it the student's tensors without pickling
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            self.llm = LLM(model=model.config._name_or_path, dtype=dtype, seed=int(torch.initial_seed() % 2**31),
                           gpu_memory_utilization=self.gpu_memory_utilization, enable_prefix_caching=True,
                           logprobs_mode="processed_logprobs")
        return self.llm

    def sync_weights(self, model) -> None:
        """Load the student's current parameters into the engine (``LLM.apply_model`` on the in-process engine;
        vLLM >= 0.10.2 for it and for ``logprobs_mode``), then drop the KV blocks cached with the old ones.

        ``named_parameters``, not ``state_dict``: inside ``fsdp.gathered`` a sharded student's parameters are
        whole, while its ``state_dict`` hook returns the shards (and reshards the student)."""
        weights = [(name, p.detach()) for name, p in model.named_parameters()]
        if any(hasattr(p, "full_tensor") for _, p in weights):
            raise RuntimeError("sync_weights got DTensor shards: sample a sharded student inside "
                               "opd_exp.train.fsdp.gathered(student)")
        llm = self._engine(model)
        llm.apply_model(lambda engine_model: engine_model.load_weights(weights))
        llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, model, prompts: list[list[int]], sampling: SamplingConfig, *, stop_ids: list[int],
                 pad_id: int, vocab_size: int, n_per_prompt: int | None = None, greedy: bool = False) -> Rollout:
        """Sample with the student's current weights; the Rollout's log-probs are under the processed
        (sliced, tempered, top-p-renormalised) distribution, as the HF backend's."""
        from vllm import SamplingParams, TokensPrompt

        llm = self._engine(model)
        self.sync_weights(model)
        n = sampling.rollouts_per_prompt if n_per_prompt is None else n_per_prompt
        rows = model.get_output_embeddings().weight.shape[0]
        params = SamplingParams(n=n, temperature=0.0 if greedy else sampling.temperature,
                                top_p=1.0 if greedy else sampling.top_p, top_k=-1,
                                max_tokens=sampling.max_new_tokens, stop_token_ids=list(stop_ids), logprobs=0,
                                allowed_token_ids=list(range(vocab_size)) if rows > vocab_size else None,
                                detokenize=False)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        completions = [[(list(o.token_ids), sampled_logprobs(o)) for o in out.outputs] for out in outputs]
        return to_rollout(prompts, completions, stop_ids=stop_ids, pad_id=pad_id)
