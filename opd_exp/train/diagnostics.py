"""Per-step diagnostics of the paper's three failure modes: pure functions over tensors a step already has.

The loop builds one :class:`DiagInputs` per rollout batch and logs ``step_diagnostics(inputs)`` (keys
``diag/...``) to metrics.jsonl; ``save_raw_samples`` writes a compact per-token .npz so the scatter (Fig. 2)
and gap-by-position (Fig. 4) figures can be redrawn without re-running. Nothing here needs a model or the
vocabulary: the cost is a few sorts over B*T (or B*T*K) numbers and a numpy pass over the token ids.

Shapes: B rollouts, T completion positions (position t holds the sampled token y_t), K top-K size.

Conventions (one rule each, so plots read the same across runs):

- **Reward.** ``reward_t = log q(y_t) - log pi_old(y_t)``: the teacher - student log-prob gap of the sampled
  token, i.e. the per-token advantage of sampled-token OPD (A_t = -r_t in the paper's notation). Negative
  reward = the student is more confident in its own token than the teacher is.
- **Masks.** Signal metrics (``diag/signal/*``, ``diag/special/adv_mass_frac``) are taken over
  ``loss_mask_BT``: the signal the optimizer actually receives. Metrics that describe the rollouts or the
  teacher (``diag/teacher/*``, ``diag/rep/*``, ``diag/len/*``, ``diag/special/completion_frac``) are taken over
  ``completion_mask_BT``, so masking special tokens out of the loss does not hide them here.
- **Empty sets give 0.0**, never NaN (JSONL and wandb both choke on NaN): a mean, share or quantile over no
  tokens is 0.0. The counts ``diag/n/*`` and ``diag/rep/loop_tokens`` tell a real 0 from "no data".
- **Missing inputs** (``None``) skip the metrics that need them; the keys are then absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class DiagInputs:
    """What the loop passes to the diagnostics for one rollout batch (any device; nothing needs grad)."""

    tokens_BT: torch.Tensor  # long: sampled completion ids y_t
    completion_mask_BT: torch.Tensor  # bool: real completion positions (a prefix of each row; no padding)
    loss_mask_BT: torch.Tensor  # bool: positions that enter the loss (after special-token masking)
    student_logprobs_BT: torch.Tensor  # float: log pi_old(y_t), the rollout policy's log-prob
    truncated_B: torch.Tensor  # bool: the response hit max_new_tokens without EOS
    special_ids: list[int] = field(default_factory=list)  # ids counted as special tokens
    teacher_logprobs_BT: torch.Tensor | None = None  # float: log q(y_t)
    student_entropy_BT: torch.Tensor | None = None  # float: entropy of pi_old at each position (nats)
    teacher_topk_ids_BTK: torch.Tensor | None = None  # long: teacher's top-K ids at each position
    teacher_topk_logprobs_BTK: torch.Tensor | None = None  # float: log q at those ids (not renormalised)
    student_logprobs_at_teacher_topk_BTK: torch.Tensor | None = None  # float: log pi_old at the teacher's ids
    student_topk_ids_BTK: torch.Tensor | None = None  # long: pi_old's top-K ids at each position
    advantages_BT: torch.Tensor | None = None  # float: the estimator's per-token advantage, if it has one


# --- small numeric helpers ----------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``x[mask]``; 0.0 when the mask is empty."""
    n = int(mask.sum())
    return float(x[mask].double().sum() / n) if n else 0.0


def quantiles(x_N: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Linear-interpolation quantiles of a 1-D tensor (as ``torch.quantile``, without its 2**24-element
    limit); all 0.0 when ``x_N`` is empty."""
    if x_N.numel() == 0:
        return [0.0 for _ in qs]
    x_N = x_N.double().sort().values
    out = []
    for q in qs:
        pos = q * (x_N.numel() - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(float(x_N[lo] + (x_N[hi] - x_N[lo]) * (pos - lo)))
    return out


def skewness(x_N: torch.Tensor) -> float:
    """Sample skewness E[(x - mu)^3] / sigma^3 (population moments); 0.0 for fewer than 2 values or sigma = 0."""
    if x_N.numel() < 2:
        return 0.0
    x_N = x_N.double()
    centred_N = x_N - x_N.mean()
    sigma = centred_N.pow(2).mean().sqrt()
    return float(centred_N.pow(3).mean() / sigma**3) if sigma > 0 else 0.0


def relative_positions(completion_mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(abs_pos_BT, rel_pos_BT)``: the index of each completion token within its response (0-based) and
    that index divided by the response length, in [0, 1). Values at non-completion positions are meaningless."""
    mask_BT = completion_mask_BT.long()
    abs_pos_BT = mask_BT.cumsum(1) - 1
    len_B1 = mask_BT.sum(1, keepdim=True).clamp(min=1)
    return abs_pos_BT, abs_pos_BT.double() / len_B1


def position_buckets(completion_mask_BT: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Bucket j in 0..n_buckets-1 of each token: ``floor(rel_pos * n_buckets)`` (equal slices of each response,
    so bucket 0 is the first quarter of every response whatever its length, for n_buckets = 4)."""
    _, rel_pos_BT = relative_positions(completion_mask_BT)
    return (rel_pos_BT * n_buckets).floor().long().clamp(0, n_buckets - 1)


def special_mask(tokens_BT: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """bool (B, T): the token is one of ``special_ids``."""
    if not special_ids:
        return torch.zeros_like(tokens_BT, dtype=torch.bool)
    ids = torch.as_tensor(special_ids, device=tokens_BT.device, dtype=tokens_BT.dtype)
    return torch.isin(tokens_BT, ids)


# --- failure mode 1: imbalanced one-token signal ------------------------------------------------------------


def sampled_reward(inputs: DiagInputs) -> torch.Tensor | None:
    """``reward_BT = log q(y_t) - log pi_old(y_t)`` (float64), or None without teacher log-probs."""
    if inputs.teacher_logprobs_BT is None:
        return None
    return inputs.teacher_logprobs_BT.double() - inputs.student_logprobs_BT.double()


def top_share(abs_N: torch.Tensor, frac: float) -> float:
    """Share of ``sum(abs_N)`` carried by the largest ``ceil(frac * N)`` entries (0.0 if the sum is 0).
    A uniform signal gives ~frac; a signal concentrated on a few tokens gives ~1."""
    total = abs_N.double().sum()
    if abs_N.numel() == 0 or total <= 0:
        return 0.0
    n_top = max(1, math.ceil(frac * abs_N.numel()))
    return float(abs_N.double().topk(n_top).values.sum() / total)


def signal_imbalance(reward_BT: torch.Tensor, mask_BT: torch.Tensor) -> dict[str, float]:
    """Shape of the sampled-token reward over the loss tokens.

    - ``neg_reward_frac``: share of tokens with reward < 0 (teacher log-prob below the student's).
    - ``reward_mean``, ``reward_p10/p50/p90``, ``reward_skew``: its mean, quantiles and skewness.
    """
    r_N = reward_BT[mask_BT]
    p10, p50, p90 = quantiles(r_N, (0.1, 0.5, 0.9))
    neg = float((r_N < 0).double().mean()) if r_N.numel() else 0.0
    return {"neg_reward_frac": neg, "reward_mean": masked_mean(reward_BT, mask_BT), "reward_p10": p10,
            "reward_p50": p50, "reward_p90": p90, "reward_skew": skewness(r_N)}


def advantage_concentration(adv_BT: torch.Tensor, mask_BT: torch.Tensor) -> dict[str, float]:
    """``adv_top1pct_share`` / ``adv_top10pct_share``: share of the total |advantage| over the loss tokens
    carried by the top 1% / 10% of tokens ranked by |advantage|."""
    abs_N = adv_BT[mask_BT].abs()
    return {"adv_top1pct_share": top_share(abs_N, 0.01), "adv_top10pct_share": top_share(abs_N, 0.10)}


def positive_signal_by_id(tokens_BT: torch.Tensor, reward_BT: torch.Tensor, mask_BT: torch.Tensor,
                          top_n: int = 10) -> dict[int, float]:
    """Which token ids carry the positive signal: ``{id: share}`` for the ``top_n`` ids with the largest
    summed positive reward, share = that id's sum of max(reward, 0) / the batch's total. Empty if no token
    has a positive reward. Ordered by share, largest first."""
    pos_N = reward_BT[mask_BT].clamp(min=0)
    ids_N = tokens_BT[mask_BT]
    total = float(pos_N.sum())
    if total <= 0:
        return {}
    uniq_U, inv_N = ids_N.unique(return_inverse=True)
    sum_U = torch.zeros(uniq_U.numel(), dtype=torch.float64, device=pos_N.device).index_add_(0, inv_N, pos_N)
    top = sum_U.topk(min(top_n, uniq_U.numel()))
    return {int(uniq_U[i]): float(v) / total for v, i in zip(top.values, top.indices, strict=True) if v > 0}


def positive_signal_metrics(by_id: dict[int, float], n_report: int = 3) -> dict[str, float]:
    """Float metrics from :func:`positive_signal_by_id`: ``pos_top{i}_id`` and ``pos_top{i}_share`` for the
    ``n_report`` leading ids (id -1, share 0 where there are fewer), and ``pos_top5_ids_share``: the share of the
    positive reward carried by the 5 leading ids together."""
    items = list(by_id.items())
    out: dict[str, float] = {}
    for i in range(n_report):
        tok, share = items[i] if i < len(items) else (-1, 0.0)
        out[f"pos_top{i + 1}_id"], out[f"pos_top{i + 1}_share"] = float(tok), share
    out["pos_top5_ids_share"] = float(sum(s for _, s in items[:5]))
    return out


# --- failure mode 2: teacher reliability along the rollout ---------------------------------------------------


def by_bucket(x_BT: torch.Tensor, mask_BT: torch.Tensor, bucket_BT: torch.Tensor, n_buckets: int,
              name: str) -> dict[str, float]:
    """``{name: overall mean, name_b{j}: mean over bucket j}`` of ``x_BT`` over ``mask_BT``."""
    out = {name: masked_mean(x_BT, mask_BT)}
    for j in range(n_buckets):
        out[f"{name}_b{j}"] = masked_mean(x_BT, mask_BT & (bucket_BT == j))
    return out


def gap_by_bucket(reward_BT: torch.Tensor, mask_BT: torch.Tensor, bucket_BT: torch.Tensor,
                  n_buckets: int) -> dict[str, float]:
    """Quantiles (p10/p50/p90) and mean of the teacher - student log-prob gap of the sampled token, over all
    tokens (``gap_p10`` ...) and per relative-position bucket (``gap_p10_b{j}`` ...). Fig. 4's claim: the lower
    tail (p10) widens in later buckets."""
    out: dict[str, float] = {}
    for suffix, m_BT in [("", mask_BT)] + [(f"_b{j}", mask_BT & (bucket_BT == j)) for j in range(n_buckets)]:
        p10, p50, p90 = quantiles(reward_BT[m_BT], (0.1, 0.5, 0.9))
        out |= {f"gap_p10{suffix}": p10, f"gap_p50{suffix}": p50, f"gap_p90{suffix}": p90,
                f"gap_mean{suffix}": masked_mean(reward_BT, m_BT)}
    return out


def topk_entropy(topk_logprobs_BTK: torch.Tensor) -> torch.Tensor:
    """Entropy proxy (B, T): entropy of the distribution renormalised over the top-K,
    ``-sum_k p~_k log p~_k`` with ``p~ = softmax(topk_logprobs)``. Between 0 and log K."""
    lp_BTK = torch.log_softmax(topk_logprobs_BTK.double(), dim=-1)
    return -(lp_BTK.exp() * lp_BTK).sum(-1)


def in_topk(tokens_BT: torch.Tensor, topk_ids_BTK: torch.Tensor) -> torch.Tensor:
    """bool (B, T): the sampled token is one of the top-K ids."""
    return (topk_ids_BTK == tokens_BT.unsqueeze(-1)).any(-1)


def in_topp(tokens_BT: torch.Tensor, topk_ids_BTK: torch.Tensor, topk_logprobs_BTK: torch.Tensor,
            top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(in_set_BT, short_BT)``: whether the sampled token is in the teacher's top-p (nucleus) set, and
    whether the top-K mass falls short of p.

    The top-p set is the smallest prefix of the top-K sorted by probability (un-renormalised) whose mass
    reaches ``top_p``. When the top-K mass is below p the true nucleus extends past the K known ids; we then
    take the whole top-K as the set, so a token outside the top-K counts as outside the nucleus (membership
    is a lower bound) and ``short_BT`` marks those positions (logged as ``topk_mass_below_p_frac``).
    """
    lp_BTK, order_BTK = topk_logprobs_BTK.double().sort(dim=-1, descending=True)
    ids_BTK = topk_ids_BTK.gather(-1, order_BTK)
    p_BTK = lp_BTK.exp()
    mass_before_BTK = p_BTK.cumsum(-1) - p_BTK  # mass of the strictly higher-ranked ids
    in_set_BTK = mass_before_BTK < top_p  # the set grows until the mass before an id already reaches p
    in_set_BT = ((ids_BTK == tokens_BT.unsqueeze(-1)) & in_set_BTK).any(-1)
    return in_set_BT, p_BTK.sum(-1) < top_p


def topk_overlap(teacher_ids_BTK: torch.Tensor, student_ids_BTK: torch.Tensor,
                 rows_per_chunk: int = 8) -> torch.Tensor:
    """float (B, T): ``|S_teacher ∩ S_student| / K`` with K = the smaller of the two set sizes (the two K
    are normally equal). Chunked over rows: the pairwise comparison is (T, K, K) per row."""
    k = min(teacher_ids_BTK.shape[-1], student_ids_BTK.shape[-1])
    chunks = []
    for lo in range(0, teacher_ids_BTK.shape[0], rows_per_chunk):
        t_bTK1 = teacher_ids_BTK[lo:lo + rows_per_chunk].unsqueeze(-1)
        s_bT1K = student_ids_BTK[lo:lo + rows_per_chunk].unsqueeze(-2)
        chunks.append((t_bTK1 == s_bT1K).any(-1).sum(-1))
    return torch.cat(chunks).double() / k


def teacher_reliability(inputs: DiagInputs, n_buckets: int, top_p: float) -> dict[str, float]:
    """Teacher-side metrics on the student's prefixes, over completion tokens, overall and per bucket:
    ``gap_*`` (see :func:`gap_by_bucket`), ``entropy`` (:func:`topk_entropy`), ``in_topk``, ``in_topp``
    (:func:`in_topp`), ``teacher_topk_mass`` / ``student_topk_mass`` (sum of q / pi_old over the teacher's
    top-K), ``topk_overlap`` (:func:`topk_overlap`) and ``topk_mass_below_p_frac``."""
    mask_BT, bucket_BT = inputs.completion_mask_BT, position_buckets(inputs.completion_mask_BT, n_buckets)
    out: dict[str, float] = {}
    reward_BT = sampled_reward(inputs)
    if reward_BT is not None:
        out |= gap_by_bucket(reward_BT, mask_BT, bucket_BT, n_buckets)
    t_ids, t_lp = inputs.teacher_topk_ids_BTK, inputs.teacher_topk_logprobs_BTK
    per_token: dict[str, torch.Tensor] = {}
    if t_lp is not None:
        per_token["entropy"] = topk_entropy(t_lp)
        per_token["teacher_topk_mass"] = t_lp.double().exp().sum(-1)
    if t_ids is not None:
        per_token["in_topk"] = in_topk(inputs.tokens_BT, t_ids).double()
    if t_ids is not None and t_lp is not None:
        in_set_BT, short_BT = in_topp(inputs.tokens_BT, t_ids, t_lp, top_p)
        per_token["in_topp"] = in_set_BT.double()
        out["topk_mass_below_p_frac"] = masked_mean(short_BT.double(), mask_BT)
    if inputs.student_logprobs_at_teacher_topk_BTK is not None:
        per_token["student_topk_mass"] = inputs.student_logprobs_at_teacher_topk_BTK.double().exp().sum(-1)
    if t_ids is not None and inputs.student_topk_ids_BTK is not None:
        per_token["topk_overlap"] = topk_overlap(t_ids, inputs.student_topk_ids_BTK)
    for name, x_BT in per_token.items():
        out |= by_bucket(x_BT, mask_BT, bucket_BT, n_buckets, name)
    return out


# --- repetition, length, special tokens ----------------------------------------------------------------------


def response_ids(tokens_BT: torch.Tensor, completion_mask_BT: torch.Tensor) -> list[np.ndarray]:
    """Each response's completion ids as a 1-D int64 numpy array (one host copy of the ids)."""
    tokens, mask = tokens_BT.cpu().numpy(), completion_mask_BT.cpu().numpy().astype(bool)
    return [tokens[b][mask[b]] for b in range(tokens.shape[0])]


def ngram_repeat_rate(seq_L: np.ndarray, n: int) -> float | None:
    """Fraction of the response's L-n+1 n-grams that already occurred at an earlier start in the same
    response (0 = no n-gram repeats, -> 1 in a long loop); None when the response has fewer than n tokens."""
    n_grams = len(seq_L) - n + 1
    if n_grams <= 0:
        return None
    grams_NG = np.lib.stride_tricks.sliding_window_view(seq_L, n)
    return 1.0 - len(np.unique(grams_NG, axis=0)) / n_grams


def repeat_loop_mask(seq_L: np.ndarray, max_period: int, min_repeats: int) -> np.ndarray:
    """bool (L,): tokens that repeat a loop. A loop is a span where one unit of p tokens (1 <= p <= max_period)
    occurs at least ``min_repeats`` times back to back, i.e. ``seq[i] == seq[i - p]`` for ``(min_repeats - 1) * p``
    consecutive i. The first copy of the unit is not marked, every later copy is: these are the tokens the
    teacher should penalise and, per the paper's Fig. 3, does not."""
    if min_repeats < 2:
        raise ValueError(f"min_repeats must be >= 2, got {min_repeats}")
    loop_L = np.zeros(len(seq_L), dtype=bool)
    for p in range(1, min(max_period, len(seq_L) - 1) + 1):
        match_M = np.concatenate([[0], (seq_L[p:] == seq_L[:-p]).astype(np.int8), [0]])
        edges = np.diff(match_M)
        for start, end in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
            if end - start >= (min_repeats - 1) * p:  # the run covers seq[start : end + p], >= min_repeats copies
                loop_L[start + p:end + p] = True
    return loop_L


def repetition(inputs: DiagInputs, ngram: int, max_period: int, min_repeats: int) -> dict[str, float]:
    """Repetition over completion tokens.

    - ``ngram_repeat_rate``: mean over responses (with >= ngram tokens) of :func:`ngram_repeat_rate`.
    - ``loop_frac``: share of responses with a loop (:func:`repeat_loop_mask`); ``loop_token_frac`` and
      ``loop_tokens``: share and count of completion tokens inside loops.
    - ``teacher_prob_in_loop`` / ``student_prob_in_loop``: mean q(y_t) / pi_old(y_t) on loop tokens, and
      ``teacher_prob_out_loop`` on the other completion tokens (needs teacher log-probs).
    """
    seqs = response_ids(inputs.tokens_BT, inputs.completion_mask_BT)
    rates = [r for r in (ngram_repeat_rate(s, ngram) for s in seqs) if r is not None]
    mask_np = inputs.completion_mask_BT.cpu().numpy().astype(bool)
    loop_np = np.zeros_like(mask_np)
    for b, seq_L in enumerate(seqs):
        loop_np[b, np.flatnonzero(mask_np[b])] = repeat_loop_mask(seq_L, max_period, min_repeats)
    loop_BT = torch.from_numpy(loop_np).to(inputs.completion_mask_BT.device)
    n_tokens = int(mask_np.sum())
    out = {"ngram_repeat_rate": float(np.mean(rates)) if rates else 0.0,
           "loop_frac": float(loop_np.any(1).mean()) if len(seqs) else 0.0,
           "loop_token_frac": float(loop_np.sum()) / n_tokens if n_tokens else 0.0,
           "loop_tokens": float(loop_np.sum()),
           "student_prob_in_loop": masked_mean(inputs.student_logprobs_BT.double().exp(), loop_BT)}
    if inputs.teacher_logprobs_BT is not None:
        q_BT = inputs.teacher_logprobs_BT.double().exp()
        out["teacher_prob_in_loop"] = masked_mean(q_BT, loop_BT)
        out["teacher_prob_out_loop"] = masked_mean(q_BT, inputs.completion_mask_BT & ~loop_BT)
    return out


def mean_response_length(completion_mask_BT: torch.Tensor) -> float:
    """Mean number of completion tokens per response (0.0 for an empty batch)."""
    return float(completion_mask_BT.sum(1).double().mean()) if completion_mask_BT.shape[0] else 0.0


def mean_entropy(entropy_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """Mean per-token entropy over ``mask_BT`` (0.0 when empty)."""
    return masked_mean(entropy_BT, mask_BT)


def length_metrics(completion_mask_BT: torch.Tensor, truncated_B: torch.Tensor) -> dict[str, float]:
    """``mean`` / ``max`` response length in tokens and ``truncated_frac``, the share of responses that hit
    the length cap without EOS."""
    n_B = completion_mask_BT.sum(1)
    empty = n_B.numel() == 0
    return {"mean": mean_response_length(completion_mask_BT), "max": 0.0 if empty else float(n_B.max()),
            "truncated_frac": 0.0 if empty else float(truncated_B.double().mean())}


def special_share(inputs: DiagInputs, adv_BT: torch.Tensor | None) -> dict[str, float]:
    """Special tokens' weight: ``completion_frac`` (share of completion tokens that are special ids),
    ``loss_frac`` (share of loss tokens; 0 once masking removes them all), ``adv_mass_frac`` (share of the
    total |advantage| over loss tokens that sits on special ids) and ``reward_mean`` (mean teacher - student
    log-prob gap on special completion tokens: the Fig. 5 symptom, strongly negative under a mismatch)."""
    special_BT = special_mask(inputs.tokens_BT, inputs.special_ids)
    comp_BT = inputs.completion_mask_BT
    loss_BT = inputs.loss_mask_BT & comp_BT
    out = {"completion_frac": masked_mean(special_BT.double(), comp_BT),
           "loss_frac": masked_mean(special_BT.double(), loss_BT)}
    if adv_BT is not None:
        abs_BT = adv_BT.double().abs() * loss_BT
        total = float(abs_BT.sum())
        out["adv_mass_frac"] = float((abs_BT * special_BT).sum()) / total if total > 0 else 0.0
    reward_BT = sampled_reward(inputs)
    if reward_BT is not None:
        out["reward_mean"] = masked_mean(reward_BT, comp_BT & special_BT)
    return out


# --- the step's metrics and the raw-sample file --------------------------------------------------------------


def step_diagnostics(inputs: DiagInputs, *, n_buckets: int = 4, top_p: float = 0.9, ngram: int = 3,
                     loop_max_period: int = 8, loop_min_repeats: int = 3) -> dict[str, float]:
    """All diagnostics of one rollout batch as ``{"diag/<group>/<metric>": float}``.

    Groups: ``n`` (counts), ``signal`` (failure mode 1), ``teacher`` (mode 2, per position bucket),
    ``rep``, ``len``, ``special`` (mode 3), ``dyn``. The advantage used by ``signal/adv_top*`` and
    ``special/adv_mass_frac`` is ``inputs.advantages_BT`` when given, else the sampled-token reward.
    """
    reward_BT = sampled_reward(inputs)
    adv_BT = inputs.advantages_BT if inputs.advantages_BT is not None else reward_BT
    loss_BT = inputs.loss_mask_BT & inputs.completion_mask_BT
    groups: dict[str, dict[str, float]] = {
        "n": {"responses": float(inputs.tokens_BT.shape[0]),
              "completion_tokens": float(inputs.completion_mask_BT.sum()), "loss_tokens": float(loss_BT.sum())},
        "signal": {},
        "teacher": teacher_reliability(inputs, n_buckets, top_p),
        "rep": repetition(inputs, ngram, loop_max_period, loop_min_repeats),
        "len": length_metrics(inputs.completion_mask_BT, inputs.truncated_B),
        "special": special_share(inputs, adv_BT),
        "dyn": {},
    }
    if reward_BT is not None:
        groups["signal"] |= signal_imbalance(reward_BT, loss_BT)
        by_id = positive_signal_by_id(inputs.tokens_BT, reward_BT, loss_BT)
        groups["signal"] |= positive_signal_metrics(by_id)
    if adv_BT is not None:
        groups["signal"] |= advantage_concentration(adv_BT, loss_BT)
    if inputs.student_entropy_BT is not None:
        groups["dyn"]["student_entropy"] = mean_entropy(inputs.student_entropy_BT, inputs.completion_mask_BT)
    return {f"diag/{g}/{k}": float(v) for g, metrics in groups.items() for k, v in metrics.items()}


def raw_samples(inputs: DiagInputs, max_tokens: int = 20000, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-token arrays over the completion tokens, subsampled uniformly (without replacement, order kept) to
    at most ``max_tokens``: ``teacher_prob`` (q(y_t); absent without teacher log-probs), ``student_prob``
    (pi_old(y_t)), their log-probs ``teacher_logprob`` / ``student_logprob`` (probabilities underflow float32
    below about -87 nats, as a mismatched teacher's are), ``rel_pos``, ``abs_pos``, ``token_id``, ``is_special``,
    ``in_loss``, ``row``."""
    mask_BT = inputs.completion_mask_BT.bool()
    abs_pos_BT, rel_pos_BT = relative_positions(mask_BT)
    rows_BT = torch.arange(mask_BT.shape[0], device=mask_BT.device).unsqueeze(1).expand_as(mask_BT)
    cols = {"student_prob": (inputs.student_logprobs_BT.double().exp(), np.float32),
            "student_logprob": (inputs.student_logprobs_BT, np.float32),
            "rel_pos": (rel_pos_BT, np.float32), "abs_pos": (abs_pos_BT, np.int32),
            "token_id": (inputs.tokens_BT, np.int32),
            "is_special": (special_mask(inputs.tokens_BT, inputs.special_ids), np.bool_),
            "in_loss": (inputs.loss_mask_BT, np.bool_), "row": (rows_BT, np.int32)}
    if inputs.teacher_logprobs_BT is not None:
        cols["teacher_prob"] = (inputs.teacher_logprobs_BT.double().exp(), np.float32)
        cols["teacher_logprob"] = (inputs.teacher_logprobs_BT, np.float32)
    n = int(mask_BT.sum())
    keep = np.arange(n)
    if n > max_tokens:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=max_tokens, replace=False))
    return {name: x_BT[mask_BT].cpu().numpy().astype(dtype)[keep] for name, (x_BT, dtype) in cols.items()}


def save_raw_samples(path: str | Path, inputs: DiagInputs, *, max_tokens: int = 20000, seed: int = 0,
                     top_n_ids: int = 20) -> Path:
    """Write :func:`raw_samples` plus ``pos_signal_ids`` / ``pos_signal_shares`` (from
    :func:`positive_signal_by_id` over the loss tokens; empty without teacher log-probs) to a compressed .npz.
    Read back with ``np.load(path)``."""
    arrays = raw_samples(inputs, max_tokens=max_tokens, seed=seed)
    reward_BT = sampled_reward(inputs)
    by_id = {} if reward_BT is None else positive_signal_by_id(
        inputs.tokens_BT, reward_BT, inputs.loss_mask_BT & inputs.completion_mask_BT, top_n=top_n_ids)
    arrays["pos_signal_ids"] = np.array(list(by_id), dtype=np.int64)
    arrays["pos_signal_shares"] = np.array(list(by_id.values()), dtype=np.float64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path
