"""One OPD step on one screen: collect a Batch, update on it, and the step's metrics beside.

    metrics, finite, diag = train_step(pair, prompts, cfg, spec, backend, optimizer, scheduler, special_ids,
                                       diagnose)

The step never branches on the objective's name: the objective's ``Needs`` decide what collect scores.
"""

from __future__ import annotations

import torch

from opd_exp.config import RunConfig
from opd_exp.objectives import EstimatorSpec
from opd_exp.rollout import RolloutBackend
from opd_exp.train.collect import collect
from opd_exp.train.diagnostics import DiagInputs, step_diagnostics
from opd_exp.train.update import update


def train_step(pair, prompts: list[list[int]], cfg: RunConfig, spec: EstimatorSpec, backend: RolloutBackend,
               optimizer, scheduler, special_ids: list[int], diagnose: bool = False, episodes: list | None = None
               ) -> tuple[dict[str, float], bool, DiagInputs | None]:
    """One rollout batch and its PPO mini-batch updates: (metrics, all updates finite, the diagnostics' inputs
    when ``diagnose``). ``episodes``: a multi-turn task's episode makers (see :func:`collect`)."""
    needs = spec.needs(cfg.estimator)
    batch, probe = collect(pair, prompts, cfg, needs, backend, special_ids,
                           diag_top_k=cfg.train.diag_top_k if diagnose else 0, episodes=episodes)
    result = update(pair.student, batch, spec, cfg, optimizer, pair.vocab_size,
                    probe_ids_BTK=probe.teacher_topk_ids_BTK if diagnose else None)
    scheduler.step()

    seen_BT, teacher_BT = batch.attention_mask_BT, batch.teacher.sampled_logprobs_BT
    # the policy's own tokens: a multi-turn row's observations are seen, not sampled (nor predicted by either model)
    acted_BT = probe.action_mask_BT if probe.action_mask_BT is not None else seen_BT
    metrics = {f"train/{k}": v for k, v in result.metrics.items()}
    metrics |= {"train/response_len": float(seen_BT.sum(-1).float().mean()),
                "train/truncated": float(batch.truncated_B.float().mean()),
                "train/entropy": _masked_mean(probe.entropy_BT, acted_BT),
                "train/teacher_logprob": _masked_mean(teacher_BT, acted_BT),
                "train/logprob_gap": _masked_mean(teacher_BT - batch.old_logprobs_BT, acted_BT),
                "train/masked_tokens": float((seen_BT & ~batch.loss_mask_BT).sum()),
                "train/updates": float(result.n_updates), "train/lr": scheduler.get_last_lr()[0]} | result.skipped
    if not diagnose:
        return metrics, result.finite, None
    diag = DiagInputs(tokens_BT=batch.ids_BT, completion_mask_BT=seen_BT, loss_mask_BT=batch.loss_mask_BT,
                      student_logprobs_BT=batch.old_logprobs_BT, truncated_B=batch.truncated_B,
                      special_ids=special_ids, teacher_logprobs_BT=teacher_BT, student_entropy_BT=probe.entropy_BT,
                      teacher_topk_ids_BTK=probe.teacher_topk_ids_BTK,
                      teacher_topk_logprobs_BTK=probe.teacher_topk_logprobs_BTK,
                      student_logprobs_at_teacher_topk_BTK=result.student_at_probe_BTK,
                      student_topk_ids_BTK=probe.student_topk_ids_BTK, advantages_BT=result.advantages_BT)
    return metrics | step_diagnostics(diag, top_p=cfg.eval.top_p), result.finite, diag


def _masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    return float((x_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1))
