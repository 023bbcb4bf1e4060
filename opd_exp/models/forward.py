"""A model's forward pass over (prompt, response) rows, returned as a :class:`LogitsHead` at the response
positions: the final hidden states and the output projection sliced to the tokenizer's vocabulary, so that no
(B, T, V) logits tensor is ever built here (objectives compute logits a chunk of positions at a time).

Layout (opd_exp/objectives/batch.py): prompts left-padded to P tokens, the response region right-padded to T.
Position ids follow the attention mask (left padding does not shift them), the convention ``generate`` uses, so
log-probs computed here match the ones recorded while sampling.
"""

from __future__ import annotations

import torch

from opd_exp.objectives.head import LogitsHead

# config attributes of architectures that transform logits after the output projection (soft-capping,
# scaling): a head built from hidden states alone would silently differ from the model's logits
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def check_plain_head(model) -> None:
    """Fail with one line when ``model``'s logits are not ``lm_head(last hidden state)``."""
    for name in _LOGIT_TRANSFORMS:
        value = getattr(model.config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__}: config.{name}={value} transforms the logits after the "
                             "output projection; opd-exp's chunked heads do not support it")


def response_head(model, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor, ids_BT: torch.Tensor,
                  attention_mask_BT: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> LogitsHead:
    """Run ``model``'s decoder over prompt + response and return its head at the T response positions.

    Position t of the head predicts ``ids_BT[:, t]`` (hidden state of the token before it). ``vocab_size``: the
    tokenizer's ids; embedding rows beyond it (padding) are cut from the projection. Grad flows when enabled.
    """
    device = next(model.parameters()).device
    ids_BL = torch.cat([prompt_ids_BP, ids_BT], dim=1).to(device)
    attn_BL = torch.cat([prompt_mask_BP, attention_mask_BT], dim=1).to(device)
    position_ids_BL = (attn_BL.long().cumsum(-1) - 1).clamp(min=0)
    hidden_BLH = model.base_model(input_ids=ids_BL, attention_mask=attn_BL.long(),
                                  position_ids=position_ids_BL).last_hidden_state
    P, T = prompt_ids_BP.shape[1], ids_BT.shape[1]
    lm_head = model.get_output_embeddings()
    bias = lm_head.bias[:vocab_size] if getattr(lm_head, "bias", None) is not None else None
    return LogitsHead(hidden_BTH=hidden_BLH[:, P - 1: P + T - 1], weight_VH=lm_head.weight[:vocab_size],
                      bias_V=bias, temperature=temperature)
