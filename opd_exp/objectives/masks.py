"""Loss masks: pure (B, T) bool tensor functions the loop composes before calling an estimator.

Convention: :func:`special_token_mask_BT` marks positions to REMOVE, :func:`entropy_top_q_mask` positions to
KEEP; masks compose by logical and:

    loss_mask_BT = completion_mask_BT & ~special_token_mask_BT(...) & entropy_top_q_mask(...)
"""

from __future__ import annotations

import torch


def special_token_mask_BT(tokens_BT: torch.Tensor, completion_mask_BT: torch.Tensor, special_ids: list[int],
                          mode: str = "first") -> torch.Tensor:
    """Positions to remove from every loss term (the special-token masking of arXiv 2603.25562, "Estimators").

    tokens_BT (B, T) long; completion_mask_BT (B, T) bool (only completion positions are considered).
    mode "first": the first occurrence of EACH listed id in each response (the official code masks the first
    "<", "think" and "<|im_end|>"); "all": every occurrence. Returns (B, T) bool, True = remove.
    """
    if mode not in ("first", "all"):
        raise ValueError(f"mode must be 'first' or 'all', got {mode!r}")
    remove_BT = torch.zeros_like(completion_mask_BT, dtype=torch.bool)
    for token_id in set(int(i) for i in special_ids):
        hit_BT = (tokens_BT == token_id) & completion_mask_BT
        if mode == "first":
            hit_BT = hit_BT & (hit_BT.cumsum(1) == 1)
        remove_BT |= hit_BT
    return remove_BT


@torch.no_grad()
def entropy_BT(logits_BTV: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """H(softmax(z)) per position, float32, computed ``chunk_size`` positions at a time (no grad)."""
    V = logits_BTV.shape[-1]
    z_NV = logits_BTV.reshape(-1, V)
    out_N = torch.empty(z_NV.shape[0], dtype=torch.float32, device=logits_BTV.device)
    for start in range(0, z_NV.shape[0], chunk_size):
        logp = torch.log_softmax(z_NV[start:start + chunk_size].float(), -1)
        out_N[start:start + chunk_size] = -(logp.exp() * logp).sum(-1)
    return out_N.view(logits_BTV.shape[:-1])


@torch.no_grad()
def entropy_top_q_mask(logits_or_entropy: torch.Tensor, mask_BT: torch.Tensor, q: float) -> torch.Tensor:
    """Positions to KEEP: in each row, the ceil(q * n_row) highest-entropy positions among mask_BT.

    Per response (the official README trains on the top 20% highest-entropy tokens of each sample); ties are
    broken by position (earlier first). ``logits_or_entropy``: student logits (B, T, V) or entropies (B, T).
    q = 1 returns mask_BT itself. Returns (B, T) bool, a subset of mask_BT (at least one per non-empty row).
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    if q == 1.0:
        return mask_BT.clone()
    ent_BT = entropy_BT(logits_or_entropy) if logits_or_entropy.dim() == 3 else logits_or_entropy.float()
    ent_BT = torch.where(mask_BT, ent_BT, torch.tensor(float("-inf"), device=ent_BT.device))
    order_BT = torch.sort(ent_BT, dim=1, descending=True, stable=True).indices
    positions_BT = torch.arange(ent_BT.shape[1], device=ent_BT.device).expand_as(order_BT)
    rank_BT = torch.empty_like(order_BT).scatter_(1, order_BT, positions_BT)
    keep_B1 = torch.ceil(mask_BT.sum(1, keepdim=True) * q - 1e-9).long()
    return (rank_BT < keep_B1) & mask_BT


