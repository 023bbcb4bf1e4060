"""The "hf" backend: same samples as plain ``generate``, exact log-probs without output_scores, no padded ids."""

import copy

import pytest
import torch
from reference_forward import completion_logits
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from opd_exp.config import SamplingConfig
from opd_exp.config.validation import ConfigError
from opd_exp.rollout import BACKENDS, HFGenerateBackend, Rollout, make_backend, rollout
from opd_exp.rollout.hf import SampledLogprobRecorder

V, EOS, PAD, BOS = 300, 1, 0, 2
PROMPTS = [[BOS, 5, 6, 7, 8], [BOS, 9], [BOS, 10, 11]]


def with_output_bias(model, bias_V: torch.Tensor):
    """Replace the (untied) output projection by one with a bias, to steer which ids dominate."""
    head = model.lm_head
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    new.weight.data.copy_(head.weight.data)
    new.bias.data.copy_(bias_V)
    model.lm_head = new
    return model.eval()


def eos_llama():
    """No padded rows (embedding rows == V); EOS made likely enough that rows end at different steps."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, eos_token_id=EOS, pad_token_id=PAD,
                      bos_token_id=BOS)
    bias = torch.zeros(V)
    bias[EOS] = 2.0
    return with_output_bias(LlamaForCausalLM(cfg), bias)


@pytest.fixture(scope="module")
def llama():
    return eos_llama()


def sample(model, sampling, seed, **kw) -> Rollout:
    torch.manual_seed(seed)
    return HFGenerateBackend().generate(model, PROMPTS, sampling, stop_ids=[EOS], pad_id=PAD,
                                        **{"vocab_size": V, **kw})


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_samples_identical_to_plain_generate(llama, temperature, top_p, monkeypatch):
    """Same seed -> the very tokens of ``generate(do_sample, temperature, top_p, top_k=0)``; the recorded log-probs
    are log_softmax of the processed scores that generate's output_scores returns (to 1e-6), without storing them."""
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, rollouts_per_prompt=3, max_new_tokens=12,
                              backend="hf")
    calls = []
    real_generate = llama.generate

    def spy(*args, **kwargs):
        calls.append(kwargs["generation_config"])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(llama, "generate", spy)
    ro = sample(llama, sampling, seed=7)
    monkeypatch.undo()
    assert calls[0].output_scores is False and calls[0].return_dict_in_generate is False  # no (B, T, V) kept

    ids, mask = ro.prompt_ids_BP, ro.prompt_mask_BP
    torch.manual_seed(7)
    out = llama.generate(input_ids=ids, attention_mask=mask.long(), do_sample=True, temperature=temperature,
                         top_p=top_p, top_k=0, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD,
                         return_dict_in_generate=True, output_scores=True)
    plain = out.sequences[:, ids.shape[1]:]
    assert torch.equal(ro.completion_ids_BT, plain)
    assert (~ro.completion_mask_BT).any()  # some rows end at EOS early: the pad-after-EOS path runs
    logp = torch.log_softmax(torch.stack(out.scores, 1).float(), -1).gather(-1, plain.unsqueeze(-1)).squeeze(-1)
    m = ro.completion_mask_BT
    torch.testing.assert_close(ro.sample_logprobs_BT[m], logp[m], atol=1e-6, rtol=0)
    assert (ro.sample_logprobs_BT[~m] == 0).all() and torch.isfinite(ro.sample_logprobs_BT).all()
    assert torch.equal(ro.action_mask_BT, m)

    torch.manual_seed(7)
    again = rollout(llama, PROMPTS, sampling, eos_id=EOS, pad_id=PAD, vocab_size=V)
    assert torch.equal(again.completion_ids_BT, ro.completion_ids_BT)  # the convenience call is the same backend


def test_checkpoint_sampling_defaults_do_not_leak(llama):
    """A checkpoint's generation_config (Qwen ships repetition_penalty, top_k, temperature, ...) alters nothing:
    the chain is the only thing between the logits and the sampler, and the config is restored afterwards."""
    sampling = SamplingConfig(temperature=0.8, top_p=0.9, rollouts_per_prompt=2, max_new_tokens=10)
    clean = sample(llama, sampling, seed=3)
    noisy = copy.deepcopy(llama)
    gc = noisy.generation_config
    gc.repetition_penalty, gc.top_k, gc.temperature, gc.top_p, gc.do_sample = 3.0, 2, 0.3, 0.5, True
    gc.no_repeat_ngram_size, gc.suppress_tokens, gc.min_new_tokens, gc.min_p = 1, [5, 6, 7], 5, 0.2
    before = gc.to_dict()
    got = sample(noisy, sampling, seed=3)
    assert torch.equal(got.completion_ids_BT, clean.completion_ids_BT)
    torch.testing.assert_close(got.sample_logprobs_BT, clean.sample_logprobs_BT, atol=0, rtol=0)
    assert noisy.generation_config.to_dict() == before


# --------------------------------------------------------------------------------------------------------------
# padded embeddings

ROWS = 320  # embedding rows; the "tokenizer" has V = 300 ids


@pytest.fixture(scope="module")
def padded_qwen():
    """A Qwen2 whose 20 padded rows get +50 logits: without the slice they take ~all the probability mass."""
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=ROWS, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=EOS,
                      pad_token_id=PAD, bos_token_id=BOS, tie_word_embeddings=False)
    bias = torch.zeros(ROWS)
    bias[V:] = 50.0
    return with_output_bias(Qwen2ForCausalLM(cfg), bias)


def test_unsliced_control_samples_padded_ids(padded_qwen):
    """The control: over the full logits width the padded rows dominate (so the next test is not vacuous)."""
    ro = sample(padded_qwen, SamplingConfig(rollouts_per_prompt=2, max_new_tokens=6), seed=0, vocab_size=ROWS)
    assert (ro.completion_ids_BT[ro.completion_mask_BT] >= V).float().mean() > 0.9


@pytest.mark.parametrize(("temperature", "top_p", "greedy"), [(1.0, 1.0, False), (0.7, 0.9, False),
                                                               (1.0, 1.0, True)])
def test_padded_ids_are_never_sampled(padded_qwen, temperature, top_p, greedy):
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, rollouts_per_prompt=4, max_new_tokens=10)
    ro = sample(padded_qwen, sampling, seed=5, greedy=greedy)
    m = ro.completion_mask_BT
    assert (ro.completion_ids_BT < V).all()
    assert torch.isfinite(ro.sample_logprobs_BT).all() and (ro.sample_logprobs_BT[m] <= 0).all()
    if temperature == 1.0 and top_p == 1.0:  # the recorded log-probs are normalised over the V real ids only
        with torch.no_grad():
            logp = torch.log_softmax(completion_logits(padded_qwen, ro)[..., :V].float(), -1)
        forward = logp.gather(-1, ro.completion_ids_BT.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(ro.sample_logprobs_BT[m], forward[m], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# plumbing


def test_recorder_gathers_each_token_once_and_drops_undone_steps():
    """Step t's log-probs are gathered when step t+1's input_ids arrive, the last one from the final sequences;
    steps generate undid (deferred stop check) are dropped."""
    P, rec = 2, SampledLogprobRecorder(prompt_len=2)
    scores = [torch.randn(3, 5) for _ in range(4)]
    seq = torch.randint(0, 5, (3, P + 4))
    for t in range(4):
        assert rec(seq[:, :P + t], scores[t]) is scores[t]
    want = torch.stack([torch.log_softmax(s, -1).gather(-1, seq[:, P + t:P + t + 1]).squeeze(-1)
                        for t, s in enumerate(scores)], 1)
    torch.testing.assert_close(rec.finish(seq), want)
    rec = SampledLogprobRecorder(prompt_len=2)
    for t in range(4):
        rec(seq[:, :P + t], scores[t])
    torch.testing.assert_close(rec.finish(seq[:, :P + 3]), want[:, :3])  # one step undone


def test_registry_and_rollout_rows():
    assert BACKENDS["hf"] is HFGenerateBackend and isinstance(make_backend("hf"), HFGenerateBackend)
    with pytest.raises(ConfigError, match="sampling.backend.*'nosuch'.*allowed values: decode, hf, vllm"):
        make_backend("nosuch")
    mask = torch.tensor([[True, False], [True, True]])
    ro = Rollout(prompt_ids_BP=torch.zeros(2, 1), prompt_mask_BP=torch.ones(2, 1, dtype=torch.bool),
                 completion_ids_BT=torch.zeros(2, 2), completion_mask_BT=mask, sample_logprobs_BT=torch.zeros(2, 2),
                 truncated_B=torch.tensor([False, True]), prompt_index_B=torch.tensor([0, 0]))
    assert torch.equal(ro.action_mask_BT, mask) and ro.action_mask_BT is not mask  # single-turn default
    assert torch.equal(ro[1:].action_mask_BT, mask[1:]) and len(ro[1:]) == 1
