"""The vLLM backend (opd_exp/rollout/vllm.py): ragged outputs to a Rollout everywhere; the engine where vLLM and a
GPU are present (skipped cleanly elsewhere)."""

from __future__ import annotations

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
