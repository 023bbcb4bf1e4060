"""The student's (or teacher's) logits, never materialised whole: final hidden states and the output projection.

    z_BTV = (hidden_BTH @ weight_VH.T + bias_V) / temperature          over the tokenizer's V ids only

A head is what an objective receives instead of (B, T, V) logits. The kernels in
:mod:`opd_exp.objectives.kernels` compute from it a chunk of positions at a time (``logits(start, end)``) and
recompute in the backward pass, so no (B, T, V) tensor exists at once (the fused linear + loss idea of
Liger-Kernel, arXiv 2410.10989, Sec. 3.3). ``weight_VH`` is the output projection *sliced to the tokenizer's
vocabulary*: padded embedding rows (a 152,064-row teacher over a 151,646-id tokenizer) are never in a softmax,
a top-K or a normaliser. ``LogitsHead.dense`` wraps ready-made logits (tests, small vocabularies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogitsHead:
    """z = (h W^T + b) / temperature at B x T positions; ``weight_VH is None`` means ``hidden`` already are z * T.

    hidden_BTH:  (B, T, H) final hidden states (after the model's last norm), any float dtype, with grad for
                 the student; or (B, T, V) logits when ``weight_VH`` is None.
    weight_VH:   (V, H) output projection rows of the tokenizer's V ids (a view of the model's weight, so the
                 gradient reaches it), or None.
    bias_V:      (V,) output bias, or None.
    temperature: the sampling temperature; the PPO ratio and pi_old are taken at the distribution sampled.
    """

    hidden_BTH: torch.Tensor
    weight_VH: torch.Tensor | None = None
    bias_V: torch.Tensor | None = None
    temperature: float = 1.0

    @classmethod
    def dense(cls, logits_BTV: torch.Tensor, temperature: float = 1.0) -> LogitsHead:
        """Ready-made logits (B, T, V) as a head (no projection)."""
        return cls(hidden_BTH=logits_BTV, temperature=temperature)

    @property
    def shape_BT(self) -> torch.Size:
        return self.hidden_BTH.shape[:2]

    @property
    def vocab_size(self) -> int:
        return self.hidden_BTH.shape[-1] if self.weight_VH is None else self.weight_VH.shape[0]

    @property
    def n_positions(self) -> int:
        return self.hidden_BTH.shape[0] * self.hidden_BTH.shape[1]

    def flat_hidden(self) -> torch.Tensor:
        """(N, H) view of the hidden states (N = B * T positions, row-major)."""
        return self.hidden_BTH.reshape(-1, self.hidden_BTH.shape[-1])

    def logits(self, start: int, end: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """z at flattened positions [start, end): (end - start, V), in ``dtype`` (default: float32, or float64
        for float64 inputs). Differentiable when the inputs are."""
        h_NH = self.flat_hidden()[start:end]
        dtype = dtype or torch.promote_types(h_NH.dtype, torch.float32)
        if self.weight_VH is None:
            z_NV = h_NH.to(dtype)
        else:
            z_NV = torch.nn.functional.linear(h_NH, self.weight_VH, self.bias_V).to(dtype)
        return z_NV if self.temperature == 1.0 else z_NV / self.temperature

    def detach(self) -> LogitsHead:
        return LogitsHead(self.hidden_BTH.detach(), None if self.weight_VH is None else self.weight_VH.detach(),
                          None if self.bias_V is None else self.bias_V.detach(), self.temperature)

    def rows(self, rows) -> LogitsHead:
        """The head of a subset of the batch's rows (same projection)."""
        return LogitsHead(self.hidden_BTH[rows], self.weight_VH, self.bias_V, self.temperature)
