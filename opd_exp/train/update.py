"""update: PPO epochs of mini-batch steps on one :class:`~opd_exp.objectives.batch.Batch`.

    result = update(student, batch, spec, cfg, optimizer, vocab_size)

For each epoch, the batch's rows in a fresh random order, ``train.mini_batch_size`` rows at a time: the
student's head at the response positions (temperature = the sampling temperature), the objective's loss,
backward, gradient clipping, AdamW step. A non-finite loss or gradient norm skips that update (counted, with a
summary of the offending mini-batch). Under torchrun each rank holds its share of every mini-batch and
gradients are averaged before the step (opd_exp/train/distributed.py), or, with the student sharded
(``train.parallel=fsdp``), reduce-scattered by FSDP and clipped by the global norm (opd_exp/train/fsdp.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from opd_exp.config import RunConfig
from opd_exp.models.forward import CALL_COST, response_head
from opd_exp.objectives import Batch, EstimatorSpec, LossOutput
from opd_exp.objectives.kernels import selected_logprobs
from opd_exp.train import distributed, fsdp


@dataclass
class UpdateResult:
    """Means over the finite updates of the loss, gradient norm and the objective's metrics, and what the
    diagnostics read (the student's log-probs at the probe's ids and the objective's advantages, per row)."""

    metrics: dict[str, float] = field(default_factory=dict)
    n_updates: int = 0
    finite: bool = True
    skipped: dict[str, float] = field(default_factory=dict)  # train/nonfinite/*: the last skipped mini-batch
    student_at_probe_BTK: torch.Tensor | None = None  # log p_theta at probe ids, as each row was updated
    advantages_BT: torch.Tensor | None = None


def update(student, batch: Batch, spec: EstimatorSpec, cfg: RunConfig, optimizer, vocab_size: int,
           probe_ids_BTK: torch.Tensor | None = None) -> UpdateResult:
    """Mini-batch updates of ``student`` on ``batch``; ``probe_ids_BTK`` (diagnostics) asks for the student's
    log-probs at those ids as each mini-batch is updated (pi_old itself on the first mini-batch)."""
    device = next(student.parameters()).device
    res = UpdateResult()
    if probe_ids_BTK is not None:
        res.student_at_probe_BTK = torch.zeros(probe_ids_BTK.shape, dtype=torch.float32)
        res.advantages_BT = torch.zeros(batch.ids_BT.shape, dtype=torch.float32)
    totals: dict[str, float] = {}
    sharded = fsdp.is_sharded(student)
    B, mb = len(batch), cfg.train.mini_batch_size // distributed.world_size()  # this rank's rows of a mini-batch
    for _ in range(cfg.train.ppo_epochs):
        order = torch.randperm(B)
        for start in range(0, B, mb):
            rows = order[start:start + mb]
            mini = batch.rows(rows, device)
            # sharded: one forward per mini-batch on every rank (each sharded forward is a collective), not
            # one per length group, whose count depends on the rank's rows
            head = response_head(student, mini.prompt_ids_BP, mini.prompt_mask_BP, mini.ids_BT,
                                 mini.attention_mask_BT, vocab_size, cfg.sampling.temperature,
                                 call_cost=math.inf if sharded else CALL_COST)
            out = spec.loss(head, mini, cfg.estimator)
            if probe_ids_BTK is not None:
                _probe(res, rows, head, probe_ids_BTK, out, cfg.estimator.chunk_size)
            optimizer.zero_grad(set_to_none=True)
            ok, grad_norm = _backward(student, out.loss, cfg.train.max_grad_norm, sharded)
            if ok:
                optimizer.step()
                for k, v in {"loss": out.loss.item(), "grad_norm": grad_norm, **out.metrics}.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                res.n_updates += 1
            else:  # skip the update; the loop counts it and logs this mini-batch's summary
                optimizer.zero_grad(set_to_none=True)
                res.finite = False
                res.skipped = _nonfinite_summary(out, grad_norm, mini, res.skipped)
    res.metrics = {k: v / max(res.n_updates, 1) for k, v in totals.items()}
    return res


def _backward(student, loss: torch.Tensor, max_grad_norm: float, sharded: bool) -> tuple[bool, float]:
    """Backward, the ranks' mean gradient, clipping: (every rank may step, the gradient norm before clipping).

    Data-parallel: a rank with a non-finite loss skips its backward and every rank skips the step together
    (:func:`distributed.all_reduce_grads`). Sharded (FSDP2): every rank runs every backward (its reduce-scatters
    are collectives; FSDP averages the sharded gradients), and a non-finite loss on any rank makes the global
    norm non-finite on every rank, so all skip together."""
    if sharded:
        loss.backward()
        fsdp.all_reduce_replicated_grads(student)
        grad_norm = fsdp.clip_grad_norm(student, max_grad_norm)
        return math.isfinite(grad_norm), grad_norm
    ok, grad_norm = bool(torch.isfinite(loss)), float("nan")
    if ok:
        loss.backward()
    ok = distributed.all_reduce_grads(student, ok)  # data-parallel: the ranks' mean gradient
    if ok:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm))
        ok = math.isfinite(grad_norm)
    return ok, grad_norm


@torch.no_grad()
def _probe(res: UpdateResult, rows, head, probe_ids_BTK, out: LossOutput, chunk_size: int) -> None:
    ids = probe_ids_BTK[rows].to(head.hidden_BTH.device)
    res.student_at_probe_BTK[rows] = selected_logprobs(head.detach(), ids, chunk_size).float().cpu()
    if out.advantages_BT is not None and res.advantages_BT is not None:
        res.advantages_BT[rows] = out.advantages_BT.detach().float().cpu()
    else:
        res.advantages_BT = None


def _nonfinite_summary(out: LossOutput, grad_norm: float, mini: Batch, previous: dict) -> dict[str, float]:
    """``train/nonfinite/*``: the last skipped mini-batch's loss, gradient norm, lengths and the objective's
    metrics (rewards, ...), and how many updates of this step were skipped. NaN is written as null."""
    lengths_B = mini.loss_mask_BT.sum(-1).float()
    return {"train/nonfinite/updates": previous.get("train/nonfinite/updates", 0.0) + 1,
            "train/nonfinite/loss": float(out.loss.detach()), "train/nonfinite/grad_norm": grad_norm,
            "train/nonfinite/loss_tokens": float(lengths_B.sum()), "train/nonfinite/len_mean": float(lengths_B.mean()),
            **{f"train/nonfinite/{k}": float(v) for k, v in out.metrics.items()}}
