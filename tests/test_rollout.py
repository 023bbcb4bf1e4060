import pytest
import torch
from reference_forward import completion_logits
from transformers import LlamaConfig, LlamaForCausalLM

from opd_exp.config import SamplingConfig
from opd_exp.rollout import completion_mask, left_pad, rollout

V, EOS, PAD = 12, 1, 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      eos_token_id=EOS, pad_token_id=PAD, bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def test_completion_mask_runs_through_first_eos():
    ids = torch.tensor([[5, 6, EOS, 7, EOS], [5, 5, 5, 5, 5], [EOS, 3, 3, 3, 3]])
    mask, truncated = completion_mask(ids, EOS)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_left_pad():
    ids, mask = left_pad([[3, 4], [5]], PAD)
    assert ids.tolist() == [[3, 4], [PAD, 5]] and mask.tolist() == [[True, True], [False, True]]


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_rollout_logprobs_match_a_forward_pass(model, top_p):
    torch.manual_seed(1)
    sampling = SamplingConfig(temperature=1.0, top_p=top_p, rollouts_per_prompt=3, max_new_tokens=10)
    prompts = [[2, 5, 6, 7], [2, 8], [2, 9, 10]]
    ro = rollout(model, prompts, sampling, eos_id=EOS, pad_id=PAD)
    assert ro.completion_ids_BT.shape[0] == 9 and ro.prompt_index_B.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    mask, truncated = completion_mask(ro.completion_ids_BT, EOS)
    assert torch.equal(mask, ro.completion_mask_BT) and torch.equal(truncated, ro.truncated_B)
    assert (ro.completion_ids_BT[~ro.completion_mask_BT] == PAD).all()
    with torch.no_grad():
        logp = torch.log_softmax(completion_logits(model, ro).float(), -1)
    forward = logp.gather(-1, ro.completion_ids_BT.unsqueeze(-1)).squeeze(-1)
    m = ro.completion_mask_BT
    if top_p == 1.0:  # sampling distribution == model distribution: same log-probs, left padding included
        torch.testing.assert_close(ro.sample_logprobs_BT[m], forward[m], atol=1e-4, rtol=1e-4)
    else:  # renormalised over the nucleus: at least as likely as under the full distribution
        assert (ro.sample_logprobs_BT[m] >= forward[m] - 1e-4).all()
    assert (ro.sample_logprobs_BT[~m] == 0).all()


def test_rollout_respects_max_new_tokens_and_greedy_is_deterministic(model):
    sampling = SamplingConfig(rollouts_per_prompt=2, max_new_tokens=4)
    a = rollout(model, [[2, 3]], sampling, eos_id=EOS, pad_id=PAD, greedy=True)
    b = rollout(model, [[2, 3]], sampling, eos_id=EOS, pad_id=PAD, greedy=True)
    assert a.completion_ids_BT.shape[1] <= 4
    assert torch.equal(a.completion_ids_BT, b.completion_ids_BT)
    assert torch.equal(a.completion_ids_BT[0], a.completion_ids_BT[1])
