"""An independent reference for tests: a model's full (B, T, V_rows) logits at a rollout's completion positions,
computed the plain way (one forward through ``model(...).logits``), against which the sampler's recorded
log-probs and the chunked heads are checked."""

import torch

from opd_exp.rollout import Rollout


def completion_logits(model, ro: Rollout) -> torch.Tensor:
    """Logits (B, T, V_rows) of ``model`` at the completion positions, row t predicting
    ``completion_ids_BT[:, t]``. Position ids follow the attention mask (left padding does not shift them), the
    convention ``generate`` uses."""
    device = next(model.parameters()).device
    ids = torch.cat([ro.prompt_ids_BP, ro.completion_ids_BT], dim=1).to(device)
    attn = torch.cat([ro.prompt_mask_BP, ro.completion_mask_BT], dim=1).to(device)
    position_ids = (attn.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn.long(), position_ids=position_ids).logits
    P, T = ro.prompt_ids_BP.shape[1], ro.completion_ids_BT.shape[1]
    return logits[:, P - 1: P + T - 1]
