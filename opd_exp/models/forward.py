"""A model's forward pass over (prompt, response) rows, returned as a :class:`LogitsHead` at the response
positions: the final hidden states and the output projection sliced to the tokenizer's vocabulary, so that no
(B, T, V) logits tensor is ever built here (objectives compute logits a chunk of positions at a time).

Layout (opd_exp/objectives/batch.py): prompts left-padded to P tokens, the response region right-padded to T.
Position ids follow the attention mask (left padding does not shift them), the convention ``generate`` uses, so
log-probs computed here match the ones recorded while sampling.
"""

from __future__ import annotations

import copy
import inspect

import torch
from transformers import DynamicCache

from opd_exp.objectives.head import LogitsHead

# config attributes of architectures that transform logits after the output projection (soft-capping,
# scaling): a head built from hidden states alone would silently differ from the model's logits
CALL_COST = 64  # a forward call's fixed overhead in padded-token equivalents (length_groups; measured: README "Speed")
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def check_plain_head(model) -> None:
    """Fail with one line when ``model``'s logits are not ``lm_head(last hidden state)``."""
    for name in _LOGIT_TRANSFORMS:
        value = getattr(model.config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__}: config.{name}={value} transforms the logits after the "
                             "output projection; opd-exp's chunked heads do not support it")


def length_groups(prompt_len_B: list[int], response_len_B: list[int], call_cost: float = CALL_COST
                  ) -> list[list[int]]:
    """Rows split into groups that each run as one forward trimmed to the group's longest prompt and response.

    Rows sorted by response length are cut into contiguous groups minimising
    sum_g n_g * (max_prompt_g + max_response_g) + call_cost * (groups - 1): the padded tokens a forward computes,
    plus ``call_cost`` token-equivalents for each extra call (its fixed overhead); ``math.inf`` gives one group
    (one forward, as a sharded model needs on every rank). O(B^2) dynamic programme.
    """
    order = sorted(range(len(response_len_B)), key=lambda i: (response_len_B[i], prompt_len_B[i]))
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        max_p = 0
        for i in range(j, 0, -1):  # group = sorted rows i-1 .. j-1; its longest response is row j-1's
            max_p = max(max_p, prompt_len_B[order[i - 1]])
            cost = best[i - 1] + (j - i + 1) * (max_p + response_len_B[order[j - 1]]) + (call_cost if i > 1 else 0)
            if cost <= best[j]:  # ties: the larger group (fewer calls)
                best[j], cut[j] = cost, i - 1
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _decoder_hidden(model, prompt_ids_BP, prompt_mask_BP, ids_BT, attention_mask_BT) -> torch.Tensor:
    """(B, T, H) final hidden states at the response positions (position t predicts ``ids_BT[:, t]``)."""
    device = next(model.parameters()).device
    ids_BL = torch.cat([prompt_ids_BP, ids_BT], dim=1).to(device)
    attn_BL = torch.cat([prompt_mask_BP, attention_mask_BT], dim=1).to(device)
    position_ids_BL = (attn_BL.long().cumsum(-1) - 1).clamp(min=0)
    hidden_BLH = model.base_model(input_ids=ids_BL, attention_mask=attn_BL.long(),
                                  position_ids=position_ids_BL).last_hidden_state
    P, T = prompt_ids_BP.shape[1], ids_BT.shape[1]
    return hidden_BLH[:, P - 1: P + T - 1]


def response_head(model, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor, ids_BT: torch.Tensor,
                  attention_mask_BT: torch.Tensor, vocab_size: int, temperature: float = 1.0,
                  call_cost: float = CALL_COST) -> LogitsHead:
    """Run ``model``'s decoder over prompt + response and return its head at the T response positions.

    Position t of the head predicts ``ids_BT[:, t]`` (hidden state of the token before it). ``vocab_size``: the
    tokenizer's ids; embedding rows beyond it (padding) are cut from the projection. Grad flows when enabled.

    Padding is not computed: rows run in :func:`length_groups`, each group trimmed to its longest prompt (left)
    and response (right). The causal mask makes a real position's hidden state independent of the pad columns
    removed (later positions, or earlier ones masked out), so only float rounding differs from one padded
    forward. Hidden states at a group's trimmed positions (outside every row's attention mask) are zeros.
    """
    P, T = prompt_ids_BP.shape[1], ids_BT.shape[1]
    # extents, not counts: columns from the first real prompt token, and up to the last real response token
    prompt_len_B = torch.where(prompt_mask_BP.any(-1), P - prompt_mask_BP.int().argmax(-1), 0).tolist()
    response_len_B = torch.where(attention_mask_BT.any(-1), T - attention_mask_BT.flip(-1).int().argmax(-1),
                                 0).tolist()
    groups = length_groups(prompt_len_B, response_len_B, call_cost)
    parts = []
    for rows in groups:
        p, t = max(max(prompt_len_B[i] for i in rows), 1), max(max(response_len_B[i] for i in rows), 1)
        index = torch.tensor(rows)
        hidden = _decoder_hidden(model, prompt_ids_BP[index, P - p:], prompt_mask_BP[index, P - p:],
                                 ids_BT[index, :t], attention_mask_BT[index, :t])
        parts.append(torch.nn.functional.pad(hidden, (0, 0, 0, T - t)))
    hidden_BTH = torch.cat(parts) if len(parts) > 1 else parts[0]
    if len(parts) > 1 or groups[0] != sorted(groups[0]):
        inverse = torch.empty(len(prompt_len_B), dtype=torch.long)
        inverse[torch.tensor([i for rows in groups for i in rows])] = torch.arange(len(prompt_len_B))
        hidden_BTH = hidden_BTH[inverse.to(hidden_BTH.device)]
    lm_head = model.get_output_embeddings()
    bias = lm_head.bias[:vocab_size] if getattr(lm_head, "bias", None) is not None else None
    return LogitsHead(hidden_BTH=hidden_BTH, weight_VH=lm_head.weight[:vocab_size], bias_V=bias,
                      temperature=temperature)


def cache_kwarg(module) -> str:
    """The name under which ``module.forward`` takes a KV cache (transformers renamed ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


@torch.no_grad()
def shared_prompt_head(model, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor, ids_BT: torch.Tensor,
                       attention_mask_BT: torch.Tensor, prompt_index_B: torch.Tensor, vocab_size: int,
                       temperature: float = 1.0, call_cost: float = CALL_COST) -> LogitsHead:
    """:func:`response_head` without gradient, each distinct prompt's forward run once.

    Rows with the same ``prompt_index_B`` share their prompt (B = prompts x rollouts): the U distinct prompts run
    once, trimmed to the longest (U, p); their KV cache is gathered to the rows (``Cache.reorder_cache``) and the
    responses run against it in :func:`length_groups` (cost: response tokens only, the prompt being cached), each
    group trimmed to its longest response (n_g, t_g - 1: the last token predicts nothing). Response position 0 is
    predicted by the prompt's last hidden state. Same values as one padded forward of every row, up to float
    rounding; the prompt's FLOPs drop by B / U and the responses' padding is not computed.
    """
    P, T = prompt_ids_BP.shape[1], ids_BT.shape[1]
    device = next(model.parameters()).device
    index_B = prompt_index_B.tolist()
    first_row = {}  # prompt index -> its first row
    for b, i in enumerate(index_B):
        first_row.setdefault(i, b)
    slot = {i: u for u, i in enumerate(first_row)}
    slot_B = torch.tensor([slot[i] for i in index_B], device=device)
    p = int(torch.where(prompt_mask_BP.any(-1), P - prompt_mask_BP.int().argmax(-1), 0).max().clamp(min=1))
    response_len_B = torch.where(attention_mask_BT.any(-1), T - attention_mask_BT.flip(-1).int().argmax(-1),
                                 0).tolist()
    base, kw = model.base_model, cache_kwarg(model.base_model)
    rows_U = torch.tensor(list(first_row.values()))
    shared_B = rows_U[slot_B.cpu()]
    if not (torch.equal(prompt_ids_BP[shared_B], prompt_ids_BP)
            and torch.equal(prompt_mask_BP[shared_B], prompt_mask_BP)):
        raise ValueError("shared_prompt_head: rows with the same prompt_index_B have different prompts")
    prompt_mask_Up = prompt_mask_BP[rows_U, P - p:].long().to(device)
    prompt_cache = DynamicCache(config=model.config)
    prompt_hidden_UpH = base(input_ids=prompt_ids_BP[rows_U, P - p:].to(device), attention_mask=prompt_mask_Up,
                             position_ids=(prompt_mask_Up.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                             **{kw: prompt_cache}).last_hidden_state
    groups = length_groups([0] * len(index_B), response_len_B, call_cost)
    parts = []
    for rows in groups:
        index = torch.tensor(rows)
        t = max(max(response_len_B[i] for i in rows), 1)
        hidden = prompt_hidden_UpH[slot_B[index.to(device)], -1:]
        if t > 1:
            cache = copy.deepcopy(prompt_cache) if len(groups) > 1 else prompt_cache
            cache.reorder_cache(slot_B[index.to(device)])
            mask_BL = torch.cat([prompt_mask_BP[index, P - p:], attention_mask_BT[index, :t - 1]], dim=1).long()
            mask_BL = mask_BL.to(device)
            position_ids = (mask_BL.cumsum(-1) - 1).clamp(min=0)[:, p:]
            response_hidden = base(input_ids=ids_BT[index, :t - 1].to(device), attention_mask=mask_BL,
                                   position_ids=position_ids, use_cache=True, **{kw: cache}).last_hidden_state
            hidden = torch.cat([hidden, response_hidden], dim=1)
        parts.append(torch.nn.functional.pad(hidden, (0, 0, 0, T - t)))
    hidden_BTH = torch.cat(parts) if len(parts) > 1 else parts[0]
    order = [i for rows in groups for i in rows]
    if order != list(range(len(order))):
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        hidden_BTH = hidden_BTH[inverse.to(hidden_BTH.device)]
    lm_head = model.get_output_embeddings()
    bias = lm_head.bias[:vocab_size] if getattr(lm_head, "bias", None) is not None else None
    return LogitsHead(hidden_BTH=hidden_BTH, weight_VH=lm_head.weight[:vocab_size], bias_V=bias,
                      temperature=temperature)
