"""response_head runs rows in length groups trimmed of padding: same hidden states and gradients as one padded
forward at every real position, any row order, any group split."""

import pytest
import torch
from reference_forward import completion_logits
from transformers import LlamaConfig, LlamaForCausalLM

from opd_exp.models.forward import length_groups, response_head, shared_prompt_head
from opd_exp.rollout import Rollout

V = 40


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def ragged_rollout(prompt_lens: list[int], response_lens: list[int], P: int = 9, T: int = 20) -> Rollout:
    g = torch.Generator().manual_seed(1)
    B = len(prompt_lens)
    prompt_ids = torch.randint(1, V, (B, P), generator=g)
    ids = torch.randint(1, V, (B, T), generator=g)
    prompt_mask = torch.arange(P).expand(B, P) >= P - torch.tensor(prompt_lens)[:, None]
    mask = torch.arange(T).expand(B, T) < torch.tensor(response_lens)[:, None]
    prompt_ids[~prompt_mask], ids[~mask] = 0, 0
    return Rollout(prompt_ids_BP=prompt_ids, prompt_mask_BP=prompt_mask, completion_ids_BT=ids,
                   completion_mask_BT=mask, sample_logprobs_BT=torch.zeros(B, T), truncated_B=mask.all(-1),
                   prompt_index_B=torch.arange(B))


@pytest.mark.parametrize("call_cost", [0, 16, 10**9])  # many groups, some, exactly one
def test_grouped_head_equals_one_padded_forward(model, call_cost):
    ro = ragged_rollout([9, 3, 5, 9, 2, 7], [20, 2, 11, 5, 20, 1])
    head = response_head(model, ro.prompt_ids_BP, ro.prompt_mask_BP, ro.completion_ids_BT, ro.completion_mask_BT,
                         V, call_cost=call_cost)
    reference = completion_logits(model, ro)
    m = ro.completion_mask_BT
    torch.testing.assert_close((head.hidden_BTH @ head.weight_VH.T)[m], reference[m], atol=2e-5, rtol=1e-5)


def test_grouped_head_gradient_equals_padded(model):
    ro = ragged_rollout([9, 3, 5, 9], [20, 2, 11, 5])
    m = ro.completion_mask_BT
    grads = []
    for cost in (0, 10**9):
        model.zero_grad()
        head = response_head(model, ro.prompt_ids_BP, ro.prompt_mask_BP, ro.completion_ids_BT, m, V, call_cost=cost)
        logits = head.hidden_BTH @ head.weight_VH.T
        torch.log_softmax(logits, -1)[m].gather(-1, ro.completion_ids_BT[m][:, None]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_length_groups_partition_and_cost():
    prompt, response = [4, 4, 4, 4, 4, 4], [60, 10, 12, 58, 11, 64]
    groups = length_groups(prompt, response, call_cost=50)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert [sorted(g) for g in groups] == [[1, 2, 4], [0, 3, 5]]  # short rows apart from long ones
    assert length_groups(prompt, response, call_cost=10**6) == [sorted(range(6), key=lambda i: response[i])]
    assert len(length_groups(prompt, [5] * 6, call_cost=0)) == 1  # equal lengths: nothing to trim


@pytest.mark.parametrize(("arch", "call_cost"), [("llama", 0), ("llama", 10**9), ("gpt_neox", 4)])
def test_shared_prompt_head_equals_one_padded_forward(model, arch, call_cost):
    """Each distinct prompt runs once and its cache serves its rollouts (rows interleaved, not grouped), in
    response-length groups (many, one, some)."""
    if arch == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=128)).eval()
    base = ragged_rollout([4, 9, 2], [20, 2, 11])
    prompt_index = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    ro = ragged_rollout([4, 9, 2, 4, 9, 2, 2], [20, 2, 11, 7, 1, 16, 3])
    ro.prompt_ids_BP, ro.prompt_mask_BP = base.prompt_ids_BP[prompt_index], base.prompt_mask_BP[prompt_index]
    head = shared_prompt_head(model, ro.prompt_ids_BP, ro.prompt_mask_BP, ro.completion_ids_BT,
                              ro.completion_mask_BT, prompt_index, V, call_cost=call_cost)
    m = ro.completion_mask_BT
    reference = completion_logits(model, ro)
    assert head.hidden_BTH.shape[:2] == m.shape
    torch.testing.assert_close((head.hidden_BTH @ head.weight_VH[:V].T)[m], reference[m][:, :V], atol=2e-5,
                               rtol=1e-5)


def test_shared_prompt_head_refuses_rows_whose_shared_prompt_differs(model):
    ro = ragged_rollout([4, 9], [3, 2])
    with pytest.raises(ValueError, match="different prompts"):
        shared_prompt_head(model, ro.prompt_ids_BP, ro.prompt_mask_BP, ro.completion_ids_BT, ro.completion_mask_BT,
                           torch.tensor([0, 0]), V)
