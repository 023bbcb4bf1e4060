"""The vLLM backend (opd_exp/rollout/vllm.py): ragged outputs to a Rollout everywhere; the engine where vLLM and a
GPU are present (skipped cleanly elsewhere)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from opd_exp.config import SamplingConfig
from opd_exp.rollout import make_backend
from opd_exp.rollout.vllm import VLLMBackend, sampled_logprobs, to_rollout


def test_ragged_outputs_become_a_padded_rollout():
    prompts = [[5, 6, 7], [8]]
    completions = [[([1, 2, 9], [-0.1, -0.2, -0.3]), ([3], [-0.5])],  # 9 = stop: included, then the row ends
                   [([4, 4, 4, 4], [-1.0, -1.0, -1.0, -1.0]), ([9, 2], [-0.7, -0.8])]]  # a truncated row, early stop
    ro = to_rollout(prompts, completions, stop_ids=[9], pad_id=0)
    assert ro.prompt_ids_BP.tolist() == [[5, 6, 7], [5, 6, 7], [0, 0, 8], [0, 0, 8]]
    assert ro.prompt_index_B.tolist() == [0, 0, 1, 1]
    assert ro.completion_ids_BT.tolist() == [[1, 2, 9, 0], [3, 0, 0, 0], [4, 4, 4, 4], [9, 0, 0, 0]]
    assert ro.completion_mask_BT.sum(-1).tolist() == [3, 1, 4, 1]
    assert ro.truncated_B.tolist() == [False, True, True, False]  # row 1 ran out of tokens without a stop id
    torch.testing.assert_close(ro.sample_logprobs_BT[3], torch.tensor([-0.7, 0.0, 0.0, 0.0]))
    assert ro.action_mask_BT.equal(ro.completion_mask_BT)
    with pytest.raises(ValueError, match="row 0: 2 token ids but 1 log-probs"):
        to_rollout([[1]], [[([1, 2], [-0.1])]], stop_ids=[9], pad_id=0)


def test_sampled_logprobs_reads_the_sampled_token():
    step = lambda tok, lp: {tok: types.SimpleNamespace(logprob=lp)}  # noqa: E731
    out = types.SimpleNamespace(token_ids=[3, 7], logprobs=[step(3, -0.25), step(7, -1.5)])
    assert sampled_logprobs(out) == [-0.25, -1.5]


def test_registered_lazily():
    assert isinstance(make_backend("vllm"), VLLMBackend)  # no vllm import until the first generate


def fake_vllm(calls: list) -> types.ModuleType:
    """The parts of the ``vllm`` module the backend uses, recording every call; each sample is ids [3, 9] with
    the log-probs an engine in processed_logprobs mode would return."""
    class LLM:
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))

        def apply_model(self, fn):
            engine_model = types.SimpleNamespace(
                load_weights=lambda weights: calls.append(("load", {n: t.clone() for n, t in weights})))
            fn(engine_model)

        def reset_prefix_cache(self):
            calls.append(("reset",))

        def generate(self, prompts, params, use_tqdm):
            calls.append(("generate", params))
            step = lambda tok, lp: {tok: types.SimpleNamespace(logprob=lp)}  # noqa: E731
            sample = types.SimpleNamespace(token_ids=[3, 9], logprobs=[step(3, -0.5), step(9, -0.25)])
            return [types.SimpleNamespace(outputs=[sample] * params.n) for _ in prompts]

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.TokensPrompt = LLM, types.SimpleNamespace, dict
    return module


def test_each_generate_syncs_the_current_student_then_drops_the_prefix_cache(monkeypatch):
    """One engine, created in processed_logprobs mode; before every generate the student's current parameters
    are loaded and the KV blocks cached under the old ones are dropped (stale prompts otherwise)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    calls: list = []
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    backend, sampling = VLLMBackend(), SamplingConfig(max_new_tokens=4, rollouts_per_prompt=2, top_p=0.9)
    for _ in range(2):
        ro = backend.generate(model, [[1, 2]], sampling, stop_ids=[9], pad_id=0, vocab_size=12)
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)  # an optimizer step
    names = [c[0] for c in calls]
    assert names == ["init", "load", "reset", "generate", "load", "reset", "generate"]
    assert calls[0][1]["logprobs_mode"] == "processed_logprobs"
    first, second = calls[1][1]["lm_head.weight"], calls[4][1]["lm_head.weight"]
    torch.testing.assert_close(second - first, torch.ones_like(first))  # the second step saw the update
    params = calls[3][1]
    assert (params.top_p, params.logprobs, params.n) == (0.9, 0, 2)
    assert params.allowed_token_ids == list(range(12))  # 16 rows, 12 ids: padded rows never sampled
    assert ro.completion_ids_BT.tolist() == [[3, 9], [3, 9]]
    torch.testing.assert_close(ro.sample_logprobs_BT, torch.tensor([[-0.5, -0.25], [-0.5, -0.25]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a CUDA GPU")
def test_engine_samples_from_the_synced_student(tmp_path):
    pytest.importorskip("vllm")
    from pair_factory import write_pair
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dirs = write_pair(tmp_path, "qwen2")
    tok = AutoTokenizer.from_pretrained(dirs["student"])
    model = AutoModelForCausalLM.from_pretrained(dirs["student"], dtype=torch.bfloat16).cuda()
    backend = VLLMBackend(gpu_memory_utilization=0.2)
    prompts = [tok("What is 2 + 3?")["input_ids"]]
    ro = backend.generate(model, prompts, SamplingConfig(max_new_tokens=8, rollouts_per_prompt=4, top_p=0.9),
                          stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, vocab_size=len(tok))
    assert len(ro) == 4 and int(ro.completion_ids_BT.max()) < len(tok)
    assert (ro.sample_logprobs_BT[ro.completion_mask_BT] <= 0).all()
