"""collect: prompts -> rollouts -> pi_old and teacher scores -> one :class:`~opd_exp.objectives.batch.Batch`.

    batch, probe = collect(pair, prompts, cfg, needs, backend, special_ids, diag_top_k)

The policy samples (the student, or the teacher for off-policy ``seq_kd``); the student scores its own tokens
at the sampling temperature (pi_old, for PPO ratios); the teacher scores them at temperature 1 (the target),
keeping exactly what the objective's ``Needs`` ask for, (B, T, K) at most; a served teacher
(``model.teacher_server``) returns its top-K over HTTP instead (opd_exp/models/teacher_server.py). Forwards
run ``chunk_rows`` rows at a time and logits ``chunk_size`` positions at a time: no (B, T, V) tensor exists.

Caveat (the paper's failure mode 3, arXiv 2603.25562 Sec. 4.3): the teacher scores the *student's* token ids,
which assumes both tokenizers agree on them; the audit (opd_exp/models/audit.py) checks that before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_exp.config import RunConfig
from opd_exp.models.forward import shared_prompt_head
from opd_exp.models.teacher_server import ServedTeacher
from opd_exp.objectives import Batch, Needs, TeacherScores
from opd_exp.objectives.kernels import selected_logprobs, token_stats
from opd_exp.objectives.masks import entropy_top_q_mask, special_token_mask_BT
from opd_exp.rollout import Rollout, RolloutBackend, stop_ids
from opd_exp.rollout.multiturn import play
from opd_exp.train import fsdp


@dataclass
class StepProbe:
    """What the diagnostics read beside the Batch: pi_old's entropy and both models' top ``diag_top_k`` ids
    at a K fixed by ``train.diag_top_k`` whatever the objective, so ``diag/`` is comparable across objectives."""

    entropy_BT: torch.Tensor  # float32, entropy of pi_old at each position
    action_mask_BT: torch.Tensor | None = None  # bool, tokens the policy sampled (a multi-turn row's actions)
    student_topk_ids_BTK: torch.Tensor | None = None  # long, pi_old's top diag_top_k ids
    teacher_topk_ids_BTK: torch.Tensor | None = None  # long, the teacher's top diag_top_k ids
    teacher_topk_logprobs_BTK: torch.Tensor | None = None  # float32, log q at them


def _row_chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _head(model, ro: Rollout, rows: slice, vocab_size: int, temperature: float):
    return shared_prompt_head(model, ro.prompt_ids_BP[rows], ro.prompt_mask_BP[rows], ro.completion_ids_BT[rows],
                              ro.completion_mask_BT[rows], ro.prompt_index_B[rows], vocab_size, temperature)


@torch.no_grad()
def score_student_old(student, ro: Rollout, vocab_size: int, temperature: float, top_k: int,
                      chunk_rows: int, chunk_size: int):
    """pi_old at the sampling temperature: log-probs (B, T), entropy (B, T), top-``top_k`` ids (B, T, K) or None."""
    parts = []
    for rows in _row_chunks(len(ro), chunk_rows):
        head = _head(student, ro, rows, vocab_size, temperature)
        parts.append(token_stats(head, ro.completion_ids_BT[rows].to(head.hidden_BTH.device), top_k, chunk_size))
    cat = lambda name: torch.cat([getattr(p, name).cpu() for p in parts])  # noqa: E731
    return cat("logprobs_BT"), cat("entropy_BT"), (cat("topk_ids_BTK") if top_k else None)


@torch.no_grad()
def score_teacher(teacher, ro: Rollout, needs: Needs, vocab_size: int, top_k: int,
                  student_topk_ids_BTK: torch.Tensor | None, chunk_rows: int, chunk_size: int) -> TeacherScores:
    """The teacher at temperature 1: log q of the sampled tokens, its top-``top_k``, log q at the student's
    top-K ids when asked, and its hidden states (``full``) for full-vocabulary objectives."""
    keep: dict[str, list[torch.Tensor]] = {}
    weight = bias = None
    for rows in _row_chunks(len(ro), chunk_rows):
        head = _head(teacher, ro, rows, vocab_size, 1.0)
        device = head.hidden_BTH.device
        stats = token_stats(head, ro.completion_ids_BT[rows].to(device), top_k, chunk_size)
        out = {"sampled_logprobs_BT": stats.logprobs_BT}
        if top_k:
            out |= {"topk_ids_BTK": stats.topk_ids_BTK, "topk_logprobs_BTK": stats.topk_logprobs_BTK}
        if student_topk_ids_BTK is not None:
            ids = student_topk_ids_BTK[rows].to(device)
            out |= {"student_topk_ids_BTK": ids,
                    "at_student_topk_logprobs_BTK": selected_logprobs(head, ids, chunk_size)}
        if needs.teacher_full:
            out["full_hidden_BTH"] = head.hidden_BTH
            weight, bias = head.weight_VH, head.bias_V
        for name, value in out.items():
            keep.setdefault(name, []).append(value.cpu() if name != "full_hidden_BTH" else value)
    tensors = {name: torch.cat(values) for name, values in keep.items()}
    full_hidden = tensors.pop("full_hidden_BTH", None)
    scores = TeacherScores(**tensors)
    if full_hidden is not None:
        from opd_exp.objectives.head import LogitsHead

        scores.full = LogitsHead(full_hidden, weight, bias, 1.0)
    return scores


def loss_mask(ro: Rollout, cfg: RunConfig, special_ids: list[int], entropy_BT: torch.Tensor) -> torch.Tensor:
    """Sampled tokens & ~special tokens (& highest-entropy tokens) (& before the first rejected action): every
    objective sees the same mask. Observation tokens of a multi-turn episode are never in it (``action_mask_BT``)."""
    mask_BT = ro.action_mask_BT.clone()
    if cfg.mask.after_rejected:
        mask_BT &= ~ro.after_rejected_BT
    if cfg.mask.enabled and special_ids:
        mask_BT &= ~special_token_mask_BT(ro.completion_ids_BT, ro.action_mask_BT, special_ids, cfg.mask.mode)
    if cfg.estimator.entropy_top_q < 1.0:
        mask_BT &= entropy_top_q_mask(entropy_BT, mask_BT, cfg.estimator.entropy_top_q)
    return mask_BT


def collect(pair, prompts: list[list[int]], cfg: RunConfig, needs: Needs, backend: RolloutBackend,
            special_ids: list[int], diag_top_k: int = 0, chunk_rows: int = 64,
            episodes: list | None = None) -> tuple[Batch, StepProbe]:
    """Sample one rollout batch and score it: the Batch an update consumes, and the diagnostics' probe.

    ``diag_top_k`` > 0 also keeps both models' top-``diag_top_k`` (capped at the vocabulary) for the probe.
    ``episodes`` (per prompt, a callable making a fresh episode) plays a multi-turn task
    (opd_exp/rollout/multiturn.py): observations are scored in context and left out of the loss mask.
    """
    V, chunk = pair.vocab_size, cfg.estimator.chunk_size
    policy = pair.student if needs.rollout_policy == "student" else pair.teacher
    tok = pair.tokenizer
    diag_k = min(diag_top_k, V)
    with fsdp.gathered(pair.student):  # sharded: ranks sample and score their own rows, lengths and all
        if episodes is None:
            ro = backend.generate(policy, prompts, cfg.sampling, stop_ids=stop_ids(policy, tok),
                                  pad_id=tok.pad_token_id, vocab_size=V)
        else:
            ro, _ = play(backend, policy, tok, prompts, episodes, cfg.sampling, stop_ids=stop_ids(policy, tok),
                         pad_id=tok.pad_token_id, vocab_size=V, max_turns=cfg.task.max_turns,
                         max_action_tokens=cfg.task.max_action_tokens)
        old_logprobs_BT, entropy_BT, old_topk_BTK = score_student_old(
            pair.student, ro, V, cfg.sampling.temperature, max(needs.student_topk, diag_k), chunk_rows, chunk)
    student_topk = old_topk_BTK[..., :needs.student_topk] if needs.student_topk else None
    k_teacher = max(needs.teacher_topk, diag_k)
    if isinstance(pair.teacher, ServedTeacher):  # model.teacher_server: top-K prompt_logprobs over HTTP
        teacher = pair.teacher.score(ro.prompt_ids_BP, ro.prompt_mask_BP, ro.completion_ids_BT,
                                     ro.completion_mask_BT, k_teacher, V)
    else:
        teacher = score_teacher(pair.teacher, ro, needs, V, k_teacher, student_topk, chunk_rows, chunk)
    probe = StepProbe(entropy_BT=entropy_BT, action_mask_BT=ro.action_mask_BT)
    if diag_k:
        probe.student_topk_ids_BTK = old_topk_BTK[..., :diag_k]
        probe.teacher_topk_ids_BTK = teacher.topk_ids_BTK[..., :diag_k]
        probe.teacher_topk_logprobs_BTK = teacher.topk_logprobs_BTK[..., :diag_k]
    if needs.teacher_topk:  # exactly the objective's K (the top-K is sorted, so its first K)
        teacher.topk_ids_BTK = teacher.topk_ids_BTK[..., :needs.teacher_topk]
        teacher.topk_logprobs_BTK = teacher.topk_logprobs_BTK[..., :needs.teacher_topk]
    else:
        teacher.topk_ids_BTK = teacher.topk_logprobs_BTK = None
    batch = Batch(ids_BT=ro.completion_ids_BT, loss_mask_BT=loss_mask(ro, cfg, special_ids, entropy_BT),
                  old_logprobs_BT=old_logprobs_BT, sampler_logprobs_BT=ro.sample_logprobs_BT, teacher=teacher,
                  prompt_ids_BP=ro.prompt_ids_BP, prompt_mask_BP=ro.prompt_mask_BP,
                  attention_mask_BT=ro.completion_mask_BT, task_B=torch.zeros(len(ro), dtype=torch.long),
                  prompt_index_B=ro.prompt_index_B, truncated_B=ro.truncated_B)
    return batch, probe
