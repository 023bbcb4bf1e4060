"""The "decode" backend: generate's greedy tokens, log-probs of the distribution it sampled, rows that stop
leave the batch, padded embedding rows never sampled."""

import pytest
import torch
from reference_forward import completion_logits
from test_rollout_hf import EOS, PAD, PROMPTS, V, eos_llama

from opd_exp.config import SamplingConfig
from opd_exp.rollout import make_backend
from opd_exp.rollout.decode import DecodeBackend, processed_logprobs
from opd_exp.rollout.hf import HFGenerateBackend


@pytest.fixture(scope="module")
def llama():
    """The "hf" backend's test model: EOS likely enough that rows end at different steps."""
    return eos_llama()


def decode(model, sampling, seed, greedy=False, vocab_size=V):
    torch.manual_seed(seed)
    return DecodeBackend().generate(model, PROMPTS, sampling, stop_ids=[EOS], pad_id=PAD, vocab_size=vocab_size,
                                    greedy=greedy)


def test_registered_as_decode():
    assert isinstance(make_backend("decode"), DecodeBackend)


def test_greedy_tokens_equal_generate(llama):
    """Argmax decoding is deterministic: the very tokens and masks of the "hf" backend (transformers generate)."""
    sampling = SamplingConfig(rollouts_per_prompt=2, max_new_tokens=16)
    ours = decode(llama, sampling, 0, greedy=True)
    hf = HFGenerateBackend().generate(llama, PROMPTS, sampling, stop_ids=[EOS], pad_id=PAD, vocab_size=V,
                                      greedy=True)
    assert torch.equal(ours.prompt_ids_BP, hf.prompt_ids_BP) and torch.equal(ours.prompt_index_B, hf.prompt_index_B)
    assert torch.equal(ours.completion_ids_BT, hf.completion_ids_BT)
    assert torch.equal(ours.completion_mask_BT, hf.completion_mask_BT)
    torch.testing.assert_close(ours.sample_logprobs_BT, hf.sample_logprobs_BT, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.8)])
def test_logprobs_are_the_processed_distribution_of_a_full_forward(llama, temperature, top_p):
    """The cache, positions and dropped rows are right iff every recorded log-prob equals the processed
    log-softmax of a teacher-forced forward over the finished sequences (no cache, padding as the Rollout's)."""
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, rollouts_per_prompt=4, max_new_tokens=20)
    ro = decode(llama, sampling, 3)
    m = ro.completion_mask_BT
    assert (~m).any() and m.any(-1).all()  # some rows stopped early: the shrinking path ran
    assert ro.completion_ids_BT.shape[1] == int(m.sum(-1).max())  # trimmed to the longest row
    with torch.no_grad():
        logits_BTV = completion_logits(llama, ro)
    ref_BTV = processed_logprobs(logits_BTV.flatten(0, 1), V, temperature, top_p).view(*m.shape, V)
    ref_BT = ref_BTV.gather(-1, ro.completion_ids_BT.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ro.sample_logprobs_BT[m], ref_BT[m], atol=1e-5, rtol=0)
    assert torch.isfinite(ro.sample_logprobs_BT).all() and (ro.sample_logprobs_BT[~m] == 0).all()
    assert (ro.completion_ids_BT[~m] == PAD).all()
    assert torch.equal(ro.truncated_B, ~(ro.completion_ids_BT == EOS).any(-1))


def test_top_p_support_renormalised():
    """processed_logprobs keeps HF's nucleus: mass of the kept ids >= p, the rest -inf, renormalised to 1."""
    torch.manual_seed(1)
    logits_BV = torch.randn(5, 40) * 3
    logp_BV = processed_logprobs(logits_BV, 40, 1.0, 0.6)
    kept_BV = torch.isfinite(logp_BV)
    mass_B = (torch.softmax(logits_BV, -1) * kept_BV).sum(-1)
    assert (mass_B >= 0.6 - 1e-6).all() and (kept_BV.sum(-1) < 40).all()
    torch.testing.assert_close(logp_BV.exp().sum(-1), torch.ones(5))


def test_padded_embedding_rows_never_sampled(llama):
    """Ids >= vocab_size (padded embedding rows) are cut before sampling, even where the model prefers them."""
    with torch.no_grad():
        llama.lm_head.bias[V - 20:] = 20.0  # the model all but always prefers a padded row
    try:
        ro = decode(llama, SamplingConfig(rollouts_per_prompt=3, max_new_tokens=8), 0, vocab_size=V - 20)
    finally:
        with torch.no_grad():
            llama.lm_head.bias[V - 20:] = 0.0
    assert (ro.completion_ids_BT < V - 20).all()
