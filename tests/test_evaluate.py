import itertools
import math

import pytest

from opd_exp.train.evaluate import mean_ci, pass_at_k, wilson_ci


def brute_force_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Share of all k-subsets of the n samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_1_is_the_success_rate_and_rejects_bad_input():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_wilson_interval_contains_estimate_and_stays_in_unit_interval():
    lo, hi = wilson_ci(0, 20)
    assert lo == 0.0 and 0.0 < hi < 0.25
    lo, hi = wilson_ci(20, 20)
    assert hi == 1.0 and 0.75 < lo < 1.0
    lo, hi = wilson_ci(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 100), rel=0.05)


def wilson_by_hand(p: float, n: float) -> tuple[float, float]:
    z2 = 1.959963984540054**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(z2 * (p * (1 - p) / n + z2 / (4 * n**2))) / (1 + z2 / n)
    return centre - half, centre + half


def test_mean_ci_is_wilson_at_the_effective_sample_size():
    # 0/1 rates: n_eff = p (1 - p) / se^2 = n - 1 (the sample variance's n - 1 denominator)
    mean, lo, hi = mean_ci([0.0, 1.0] * 50)
    assert mean == 0.5 and (lo, hi) == pytest.approx(wilson_by_hand(0.5, 99))
    # avg@4 rates, 50 prompts, mostly 0: the normal interval crosses 0, this one stays inside [0, 1]
    rates = [0.0] * 46 + [0.25, 0.5, 0.75, 1.0]
    mean, lo, hi = mean_ci(rates)
    se = math.sqrt(sum((v - mean) ** 2 for v in rates) / 49 / 50)
    assert mean - 1.959963984540054 * se < 0 <= lo < mean < hi < 1
    assert (lo, hi) == pytest.approx(wilson_by_hand(mean, mean * (1 - mean) / se**2))
    # every prompt alike: a real interval from the prompt count, not a zero width
    mean, lo, hi = mean_ci([0.0] * 20)
    assert mean == 0 and lo == 0 and (lo, hi) == pytest.approx(wilson_ci(0, 20)) and hi > 0.1
    assert math.isnan(mean_ci([1.0])[1])


def test_strict_accuracy_fails_a_response_that_never_ended():
    """A response cut at the length cap scores in the lenient grade (the answer is in it) but not in the strict
    one; an ended correct response scores in both; a wrong one in neither."""
    import torch

    from opd_exp.config import TaskConfig
    from opd_exp.models.tokenization import build_tokenizer
    from opd_exp.rollout import Rollout
    from opd_exp.tasks.math import Example, MathTask
    from opd_exp.train.evaluate import _graded

    tok = build_tokenizer()
    task = MathTask(TaskConfig(n_train=8, n_eval=2, eval_splits={"id": {}}))
    examples = [Example("Q:1+2=?", 3, "1+2=3", "id")] * 3
    texts = ["A:3<|im_end|>", "A:3A:3A:3", "A:4<|im_end|>"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(map(len, ids))
    ids_BT = torch.tensor([row + [tok.pad_token_id] * (T - len(row)) for row in ids])
    ro = Rollout(prompt_ids_BP=torch.zeros(3, 1, dtype=torch.long), prompt_mask_BP=torch.ones(3, 1, dtype=torch.bool),
                 completion_ids_BT=ids_BT, completion_mask_BT=ids_BT != tok.pad_token_id,
                 sample_logprobs_BT=torch.zeros(3, T), truncated_B=torch.tensor([False, True, False]),
                 prompt_index_B=torch.arange(3))
    assert _graded(task, tok, ro, examples) == [(True, True), (True, False), (False, False)]


def test_cached_evaluations_are_keyed_by_the_evaluation_version(tmp_path, monkeypatch):
    """A before-training evaluation recorded by older evaluation code (other intervals) is not read back."""
    from opd_exp.check import compose_config
    from opd_exp.train import loop

    dirs = [tmp_path / name for name in ("teacher", "student", "tokenizer")]
    for d in dirs:
        d.mkdir()
        (d / "config.json").write_text("{}")
    monkeypatch.setattr(loop, "pair_paths", lambda model, task: tuple(dirs))
    monkeypatch.setenv("OPD_EXP_CACHE", str(tmp_path / "cache"))
    cfg = compose_config([])
    first = loop._before_cache_file(cfg)
    assert first == loop._before_cache_file(cfg) and first.parent == tmp_path / "cache" / "evals"
    monkeypatch.setattr(loop, "EVAL_VERSION", loop.EVAL_VERSION + 1)
    assert loop._before_cache_file(cfg) != first
