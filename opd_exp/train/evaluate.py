"""Held-out evaluation: greedy pass@1, sampled avg@k and unbiased pass@k, each with a 95% CI over prompts.

Metric names (the keys of ``run_summary.json``'s results, per model and split):
    greedy@1   share of prompts whose greedy completion is correct (Wilson interval)
    avg@k      mean over prompts of the share of k samples that are correct (the paper's avg@32)
    pass@k     unbiased pass@k of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code")
Each comes lenient (the task's grade of whatever was written: the tables' metric, as in earlier versions) and
``<metric>_strict``: a response that hit the length cap without its end token is wrong, whatever it contains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from opd_exp.config import EvalConfig, SamplingConfig
from opd_exp.rollout import make_backend, rollout, stop_ids
from opd_exp.rollout.multiturn import play
from opd_exp.tasks.base import episode_makers

EVAL_BACKEND = "decode"  # evaluation samples with opd-exp's own loop, whatever backend training rolls out with
# bumped when what evaluate_model records changes, so cached evaluations (opd_exp/train/loop.py) are redone:
# 2 = avg@k / pass@k intervals are Wilson at the effective sample size (1: a normal interval over prompts)
EVAL_VERSION = 2

Z95 = 1.959963984540054


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1),
    computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def wilson_ci(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (stays inside [0, 1] at 0% and 100%)."""
    return (math.nan, math.nan) if n == 0 else wilson_interval(successes / n, n, z)


def mean_ci(values: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, lo, hi) of a mean over prompts of per-prompt rates in [0, 1] (avg@k, pass@k): the Wilson interval
    at the effective sample size n_eff = p (1 - p) / se^2, se the standard error over prompts (Korn & Graubard
    1998's interval for clustered proportions), so it stays inside [0, 1] where a normal interval crosses 0.
    Zero spread (every prompt alike) falls back to n_eff = n prompts. NaN bounds for n < 2."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return (mean, math.nan, math.nan)
    se2 = sum((v - mean) ** 2 for v in values) / (n - 1) / n
    n_eff = mean * (1 - mean) / se2 if se2 > 0 and 0 < mean < 1 else n
    return (mean, *wilson_interval(mean, n_eff, z))


def wilson_interval(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of proportion ``p`` over ``n`` (possibly fractional) observations."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _graded(task, tokenizer, ro, examples) -> list[tuple[bool, bool]]:
    """(lenient, strict) per row: lenient = the task's grade of the text; strict = that, and the response
    wrote an end token (a response cut at the length cap is wrong, whatever it contains)."""
    texts = tokenizer.batch_decode(ro.completion_ids_BT, skip_special_tokens=False)
    rows = zip(texts, ro.prompt_index_B.tolist(), ro.truncated_B.tolist(), strict=True)
    return [(ok, ok and not cut) for text, i, cut in rows for ok in [task.grade(text, examples[i])]]


def _play_stats(task, tokenizer, ro, examples) -> list[dict | None]:
    """Per row the play statistics (won, steps, invalid) of a multi-turn task's episode, else None."""
    stats = getattr(task, "play_stats", None)
    if stats is None:
        return [None] * len(ro)
    texts = tokenizer.batch_decode(ro.completion_ids_BT, skip_special_tokens=False)
    return [stats(text, examples[i]) for text, i in zip(texts, ro.prompt_index_B.tolist(), strict=True)]


def _generate_graded(model, tokenizer, task, examples, sampling, n, greedy, batch_size
                     ) -> list[list[tuple[bool, bool, dict | None]]]:
    """(lenient, strict, play stats) of n completions per example, as a list per example; a multi-turn task's
    examples are played as episodes (opd_exp/rollout/multiturn.py)."""
    per_example: list[list[tuple[bool, bool, dict | None]]] = [[] for _ in examples]
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [task.prompt_ids(tokenizer, ex) for ex in chunk]
        makers = episode_makers(task, chunk)
        if makers is None:
            ro = rollout(model, prompts, sampling, eos_id=stop_ids(model, tokenizer), pad_id=tokenizer.pad_token_id,
                         vocab_size=len(tokenizer), n_per_prompt=n, greedy=greedy)
        else:
            ro, _ = play(make_backend(sampling.backend), model, tokenizer, prompts, makers, sampling,
                         stop_ids=stop_ids(model, tokenizer), pad_id=tokenizer.pad_token_id,
                         vocab_size=len(tokenizer), max_turns=task.cfg.max_turns,
                         max_action_tokens=task.cfg.max_action_tokens, n_per_prompt=n, greedy=greedy)
        rows = zip(ro.prompt_index_B.tolist(), _graded(task, tokenizer, ro, chunk),
                   _play_stats(task, tokenizer, ro, chunk), strict=True)
        for i, (ok, strict_ok), stats in rows:
            per_example[start + i].append((ok, strict_ok, stats))
    return per_example


def _play_metrics(results: dict, split: str, stats: list[dict | None]) -> None:
    """A multi-turn split's greedy play: mean steps of the won episodes, share of invalid actions."""
    stats = [s for s in stats if s is not None]
    if not stats:
        return
    won = [s["steps"] for s in stats if s["won"]]
    results[f"{split}/steps_to_win"] = sum(won) / len(won) if won else math.nan
    results[f"{split}/invalid_rate"] = sum(s["invalid"] for s in stats) / max(1.0, sum(s["steps"] for s in stats))


def _put(results: dict, key: str, per_prompt: list[float], proportion: bool = False) -> None:
    """``key`` -> the mean over prompts and ``key_ci`` -> its 95% interval (Wilson; at the effective sample size
    for per-prompt rates)."""
    if proportion:
        results[key] = sum(per_prompt) / len(per_prompt)
        results[f"{key}_ci"] = list(wilson_ci(int(sum(per_prompt)), len(per_prompt)))
    else:
        mean, lo, hi = mean_ci(per_prompt)
        results[key], results[f"{key}_ci"] = mean, [lo, hi]


@torch.no_grad()
def evaluate_model(model, tokenizer, task, cfg: EvalConfig, splits: dict[str, list],
                   sampled: bool = True, split_models: dict | None = None) -> dict[str, float | list]:
    """``{"<split>/<metric>": value, "<split>/<metric>_ci": [lo, hi]}`` plus ``avg/<metric>`` over splits;
    ``sampled=False`` computes greedy@1 only (cheap enough for periodic evaluation). Samples per prompt are
    ``cfg.k``, or ``task.eval_k[split]`` where the task sets one (the paper's AIME avg@32, top-p 0.9, T = 1);
    such a split reports avg@/pass@ at its own k and, from the same samples, at ``cfg.k`` when that is smaller.
    A mix's splits are named ``<task>/<split>``: each task gets ``<task>/avg/<metric>`` and ``avg/`` is the mean
    of the task averages (over the splits that report the metric). ``split_models``: split -> the model
    evaluated on it instead of ``model`` (a task's own teacher)."""
    split_models = split_models or {}
    models = [model, *split_models.values()]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    results: dict[str, float | list] = {}
    split_k = {split: getattr(task, "eval_k", {}).get(split, cfg.k) for split in splits}
    for split, examples in splits.items():
        k = split_k[split]
        sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, rollouts_per_prompt=k,
                                  max_new_tokens=cfg.max_new_tokens, backend=EVAL_BACKEND)
        examples = examples[: cfg.n_prompts] if cfg.n_prompts else examples
        split_model = split_models.get(split, model)
        greedy = [c[0] for c in _generate_graded(split_model, tokenizer, task, examples, sampling, 1, True,
                                                 cfg.batch_size)]
        _play_metrics(results, split, [g[2] for g in greedy])
        for strict, suffix in ((0, ""), (1, "_strict")):
            _put(results, f"{split}/greedy@1{suffix}", [float(g[strict]) for g in greedy], proportion=True)
        if not sampled:
            continue
        samples = _generate_graded(split_model, tokenizer, task, examples, sampling, k, False,
                                   max(1, cfg.batch_size // k))
        # a split sampled more than eval.k times also reports the eval.k metrics from the same n samples
        # (avg: the mean of all n; pass@k: the unbiased estimator from n >= k), so every split has them
        for strict, suffix in ((0, ""), (1, "_strict")):
            correct = [[g[strict] for g in c] for c in samples]
            for kk in sorted({k, cfg.k} if k >= cfg.k else {k}):
                _put(results, f"{split}/avg@{kk}{suffix}", [sum(c) / len(c) for c in correct])
                _put(results, f"{split}/pass@{kk}{suffix}", [pass_at_k(len(c), sum(c), kk) for c in correct])
    ks = dict.fromkeys([cfg.k, *split_k.values()])
    metrics = ["greedy@1"] + ([m for k in ks for m in (f"avg@{k}", f"pass@{k}")] if sampled else [])
    groups: dict[str, list[str]] = {}
    for s in splits:
        groups.setdefault(s.split("/")[0] if "/" in s else "", []).append(s)

    def mean_over(names: list[str], key: str) -> float | None:
        have = [results[f"{s}/{key}"] for s in names if f"{s}/{key}" in results]
        return sum(have) / len(have) if have else None

    for metric in metrics:
        for suffix in ("", "_strict"):
            key = f"{metric}{suffix}"
            if "" in groups:  # plain splits: the mean over them
                results[f"avg/{key}"] = mean_over(list(splits), key)
                continue
            for group, names in groups.items():
                value = mean_over(names, key)
                if value is not None:
                    results[f"{group}/avg/{key}"] = value
            results[f"avg/{key}"] = mean_over(list(groups), f"avg/{key}")
    for m, training in zip(models, was_training, strict=True):
        m.train(training)
    return results
