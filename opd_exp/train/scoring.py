"""What the loop computes from the models for an estimator: exactly the tensors its ``Needs`` ask for.

The teacher scores the student's own tokens. Caveat (the paper's failure mode 3): this assumes both models
share one tokenizer and chat template; the audit in opd_exp/models/audit.py checks that before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_exp.objectives.estimators import Needs, TeacherScores
from opd_exp.rollout.hf import Rollout, completion_logits


@dataclass
class StudentOld:
    """The student before this batch's updates (no grad): PPO's pi_old and what masks/diagnostics need."""

    logprobs_BT: torch.Tensor  # log pi_old(y_t), float32
    entropy_BT: torch.Tensor  # entropy of pi_old(. | c_t), float32
    topk_ids_BTK: torch.Tensor | None  # pi_old's top-K ids (for a student-side support or diagnostics)


def _row_chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def score_student_old(student, ro: Rollout, top_k: int = 0, chunk_rows: int = 64) -> StudentOld:
    """log pi_old of the sampled tokens, entropy, and pi_old's top-``top_k`` ids (0 = none)."""
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "entropy": [], "topk": []}
    for rows in _row_chunks(len(ro), chunk_rows):
        logp = torch.log_softmax(completion_logits(student, ro[rows]).float(), -1).cpu()
        parts["logprobs"].append(logp.gather(-1, ro.completion_ids_BT[rows].unsqueeze(-1)).squeeze(-1))
        parts["entropy"].append(-(logp.exp() * logp).sum(-1))
        if top_k:
            parts["topk"].append(logp.topk(top_k, dim=-1).indices)
    return StudentOld(logprobs_BT=torch.cat(parts["logprobs"]), entropy_BT=torch.cat(parts["entropy"]),
                      topk_ids_BTK=torch.cat(parts["topk"]) if top_k else None)


@torch.no_grad()
def score_teacher(teacher, ro: Rollout, needs: Needs, student_topk_ids_BTK: torch.Tensor | None = None,
                  top_k: int = 0, chunk_rows: int = 64) -> TeacherScores:
    """One teacher forward per row chunk; keeps only what ``needs`` asks for (float32, on CPU).

    ``top_k`` is the teacher support size for diagnostics when the estimator asks for none.
    """
    k = needs.teacher_topk or top_k
    keep: dict[str, list[torch.Tensor]] = {}
    for rows in _row_chunks(len(ro), chunk_rows):
        logp = torch.log_softmax(completion_logits(teacher, ro[rows]).float(), -1).cpu()
        out = {"sampled_logprobs_BT": logp.gather(-1, ro.completion_ids_BT[rows].unsqueeze(-1)).squeeze(-1)}
        if k:
            top = logp.topk(k, dim=-1)
            out |= {"topk_ids_BTK": top.indices, "topk_logprobs_BTK": top.values}
        if needs.teacher_full:
            out["full_logprobs_BTV"] = logp
        if student_topk_ids_BTK is not None:
            ids = student_topk_ids_BTK[rows]
            out |= {"student_topk_ids_BTK": ids, "at_student_topk_logprobs_BTK": logp.gather(-1, ids)}
        for name, value in out.items():
            keep.setdefault(name, []).append(value)
    return TeacherScores(**{name: torch.cat(values) for name, values in keep.items()})
