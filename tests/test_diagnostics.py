"""Diagnostics on hand-built tensors with known answers (opd_exp/train/diagnostics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opd_exp.train import diagnostics as D


def as_float(x) -> torch.Tensor | None:
    return None if x is None else torch.as_tensor(x, dtype=torch.float32)


def make_inputs(tokens, student_lp, *, teacher_lp=None, lengths=None, loss_mask=None, **kw) -> D.DiagInputs:
    """DiagInputs from nested lists; ``lengths`` (per row) builds a prefix completion mask (default: all)."""
    tokens_BT = torch.as_tensor(tokens, dtype=torch.long)
    B, T = tokens_BT.shape
    lengths = lengths if lengths is not None else [T] * B
    comp_BT = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    loss_BT = comp_BT.clone() if loss_mask is None else torch.tensor(loss_mask, dtype=torch.bool)
    return D.DiagInputs(
        tokens_BT=tokens_BT, completion_mask_BT=comp_BT, loss_mask_BT=loss_BT,
        student_logprobs_BT=as_float(student_lp), teacher_logprobs_BT=as_float(teacher_lp),
        truncated_B=kw.pop("truncated_B", torch.zeros(B, dtype=torch.bool)), **kw)


# --- failure mode 1 -------------------------------------------------------------------------------------------


def test_negative_reward_share_three_of_four():
    inp = make_inputs([[1, 2, 3, 4]], [[-1.0, -1.0, -1.0, -1.0]], teacher_lp=[[-2.0, -3.0, -1.5, -0.5]])
    m = D.step_diagnostics(inp)
    assert m["diag/signal/neg_reward_frac"] == pytest.approx(0.75)
    assert m["diag/signal/reward_mean"] == pytest.approx((-1 - 2 - 0.5 + 0.5) / 4)


def test_masked_token_is_not_counted_in_signal():
    inp = make_inputs([[1, 2, 3, 4]], [[0.0] * 4], teacher_lp=[[-1.0, -1.0, -1.0, 0.0]],
                      loss_mask=[[False, True, True, True]])
    # the loss tokens have rewards -1, -1, 0: two of three are negative
    assert D.step_diagnostics(inp)["diag/signal/neg_reward_frac"] == pytest.approx(2 / 3)


def test_quantiles_match_torch_and_skewness_of_known_distribution():
    x_N = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    qs = (0.1, 0.5, 0.9)
    assert D.quantiles(x_N, qs) == pytest.approx(torch.quantile(x_N.double(), torch.tensor(qs).double()).tolist())
    # Bernoulli(1/4) has skewness (1 - 2p) / sqrt(p (1 - p)) = 2 / sqrt(3)
    assert D.skewness(torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(2 / math.sqrt(3))
    assert D.skewness(torch.tensor([-1.0, 0.0, 1.0])) == pytest.approx(0.0)
    assert D.skewness(torch.ones(5)) == 0.0 and D.quantiles(torch.empty(0), qs) == [0.0, 0.0, 0.0]


def test_advantage_concentration_on_one_token():
    abs_N = torch.tensor([99.0] + [1 / 99] * 99)  # 100 tokens, total 100, one carries 99
    adv_BT = abs_N.view(1, 100) * torch.tensor([1.0, -1.0]).repeat(50)  # signs must not matter
    out = D.advantage_concentration(adv_BT, torch.ones(1, 100, dtype=torch.bool))
    assert out["adv_top1pct_share"] == pytest.approx(0.99)
    assert out["adv_top10pct_share"] == pytest.approx((99 + 9 / 99) / 100)
    uniform = D.advantage_concentration(torch.ones(1, 100), torch.ones(1, 100, dtype=torch.bool))
    assert uniform["adv_top10pct_share"] == pytest.approx(0.10)


def test_positive_signal_by_token_id():
    tokens_BT = torch.tensor([[5, 6, 5, 7, 8]])
    reward_BT = torch.tensor([[1.0, 1.0, 2.0, -3.0, 50.0]], dtype=torch.float64)
    mask_BT = torch.tensor([[True, True, True, True, False]])  # id 8's large reward is masked out
    by_id = D.positive_signal_by_id(tokens_BT, reward_BT, mask_BT)
    assert list(by_id) == [5, 6] and by_id[5] == pytest.approx(0.75) and by_id[6] == pytest.approx(0.25)
    m = D.positive_signal_metrics(by_id)
    assert (m["pos_top1_id"], m["pos_top2_id"], m["pos_top3_id"]) == (5.0, 6.0, -1.0)
    assert m["pos_top5_ids_share"] == pytest.approx(1.0) and m["pos_top3_share"] == 0.0
    assert D.positive_signal_by_id(tokens_BT, -reward_BT.abs(), mask_BT) == {}


# --- failure mode 2 -------------------------------------------------------------------------------------------


def test_gap_quantiles_by_relative_position_bucket():
    # row 0: 40 tokens with gap -t, so bucket j holds -10j - 0..9; row 1 is empty; padding carries garbage
    T = 48
    teacher_BT = torch.full((2, T), 1e3)
    teacher_BT[0, :40] = -torch.arange(40.0)
    inp = make_inputs([[1] * T, [1] * T], torch.zeros(2, T), teacher_lp=teacher_BT, lengths=[40, 0])
    m = D.teacher_reliability(inp, n_buckets=4, top_p=0.9)
    for j in range(4):
        assert m[f"gap_p10_b{j}"] == pytest.approx(-10 * j - 8.1)
        assert m[f"gap_p50_b{j}"] == pytest.approx(-10 * j - 4.5)
        assert m[f"gap_p90_b{j}"] == pytest.approx(-10 * j - 0.9)
    assert m["gap_p50"] == pytest.approx(-19.5)


def test_buckets_are_relative_to_each_response_length():
    bucket_BT = D.position_buckets(torch.tensor([[True] * 8, [True] * 4 + [False] * 4]), n_buckets=4)
    assert bucket_BT[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert bucket_BT[1, :4].tolist() == [0, 1, 2, 3]


def test_top_p_membership_on_a_known_distribution():
    ids_BTK = torch.tensor([[[13, 11, 10, 12]]])  # deliberately unsorted
    lp_BTK = torch.tensor([[[0.05, 0.3, 0.5, 0.15]]]).log()
    members = {tok: D.in_topp(torch.tensor([[tok]]), ids_BTK, lp_BTK, top_p=0.9)[0].item() for tok in (10, 11, 12, 13)}
    assert members == {10: True, 11: True, 12: True, 13: False}  # 0.5 + 0.3 < 0.9 <= 0.5 + 0.3 + 0.15
    in_set, short = D.in_topp(torch.tensor([[12]]), ids_BTK, lp_BTK, top_p=0.75)
    assert not in_set.item() and not short.item()  # 0.5 + 0.3 already reaches 0.75
    # top-K mass 0.7 < p: the whole top-K is the set and the position is flagged
    in_set, short = D.in_topp(torch.tensor([[2]]), torch.tensor([[[1, 2]]]), torch.tensor([[[0.4, 0.3]]]).log(), 0.9)
    assert in_set.item() and short.item()


def test_topk_overlap_entropy_and_masses():
    t_ids = torch.tensor([[[1, 2, 3, 4], [1, 2, 3, 4]]])
    s_ids = torch.tensor([[[3, 4, 5, 6], [4, 3, 2, 1]]])
    assert D.topk_overlap(t_ids, s_ids, rows_per_chunk=1).tolist() == [[0.5, 1.0]]
    uniform_lp = torch.full((1, 1, 4), math.log(0.1))
    assert D.topk_entropy(uniform_lp).item() == pytest.approx(math.log(4))  # renormalised: uniform over K
    inp = make_inputs([[2, 9]], [[0.0, 0.0]], teacher_lp=[[0.0, 0.0]],
                      teacher_topk_ids_BTK=t_ids, teacher_topk_logprobs_BTK=torch.full((1, 2, 4), math.log(0.2)),
                      student_logprobs_at_teacher_topk_BTK=torch.full((1, 2, 4), math.log(0.1)),
                      student_topk_ids_BTK=s_ids)
    m = D.step_diagnostics(inp, n_buckets=2)
    assert m["diag/teacher/teacher_topk_mass"] == pytest.approx(0.8)
    assert m["diag/teacher/student_topk_mass"] == pytest.approx(0.4)
    assert m["diag/teacher/topk_overlap_b0"] == pytest.approx(0.5) and m["diag/teacher/topk_overlap_b1"] == 1.0
    assert (m["diag/teacher/in_topk_b0"], m["diag/teacher/in_topk_b1"]) == (1.0, 0.0)  # token 9 is outside
    assert m["diag/teacher/topk_mass_below_p_frac"] == 1.0  # 0.8 < 0.9 everywhere


# --- repetition, length, special tokens -------------------------------------------------------------------------


def test_ngram_repeat_rate():
    assert D.ngram_repeat_rate(np.array([1, 2, 3, 1, 2, 3]), 3) == pytest.approx(0.25)  # (1,2,3) seen again
    assert D.ngram_repeat_rate(np.array([1, 2, 3, 4]), 3) == 0.0
    assert D.ngram_repeat_rate(np.array([1, 2]), 3) is None


def test_repeat_loop_detected_at_known_positions_with_teacher_prob_inside():
    # the unit (5, 6) occurs three times back to back at 4..9; its second and third copies are the loop
    row0 = [1, 2, 3, 4, 5, 6, 5, 6, 5, 6, 7]
    loop = D.repeat_loop_mask(np.array(row0), max_period=4, min_repeats=3)
    assert np.flatnonzero(loop).tolist() == [6, 7, 8, 9]
    assert not D.repeat_loop_mask(np.array([1, 2, 5, 6, 5, 6, 7]), 4, 3).any()  # only two copies
    assert np.flatnonzero(D.repeat_loop_mask(np.array([4, 9, 9, 9, 1]), 4, 3)).tolist() == [2, 3]

    teacher = np.full((2, 11), 0.2)
    teacher[0, 6:10] = 0.95
    row1 = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    inp = make_inputs([row0, row1], np.log(np.full((2, 11), 0.5)), teacher_lp=np.log(teacher))
    m = D.step_diagnostics(inp, loop_max_period=4, loop_min_repeats=3)
    assert m["diag/rep/loop_frac"] == 0.5 and m["diag/rep/loop_tokens"] == 4.0
    assert m["diag/rep/loop_token_frac"] == pytest.approx(4 / 22)
    assert m["diag/rep/teacher_prob_in_loop"] == pytest.approx(0.95)
    assert m["diag/rep/teacher_prob_out_loop"] == pytest.approx(0.2)
    assert m["diag/rep/student_prob_in_loop"] == pytest.approx(0.5)


def test_length_truncation_and_special_token_share():
    # special id 0 is 1 of 4 completion tokens of row 0; row 1 has 2 tokens and was truncated
    inp = make_inputs([[3, 0, 4, 5], [6, 7, 8, 8]], [[0.0] * 4] * 2, teacher_lp=[[0.0, -20.0, 0.0, 0.0]] * 2,
                      lengths=[4, 2], special_ids=[0], truncated_B=torch.tensor([False, True]),
                      advantages_BT=torch.tensor([[1.0, -3.0, 1.0, 1.0], [1.0, 1.0, 9.0, 9.0]]))
    m = D.step_diagnostics(inp)
    assert (m["diag/len/mean"], m["diag/len/max"], m["diag/len/truncated_frac"]) == (3.0, 4.0, 0.5)
    assert m["diag/special/completion_frac"] == pytest.approx(1 / 6)
    assert m["diag/special/adv_mass_frac"] == pytest.approx(3 / 8)  # padded advantages do not count
    assert m["diag/special/reward_mean"] == pytest.approx(-20.0)
    inp.loss_mask_BT[0, 1] = False  # special-token masking removes it from the loss, not from the rollout
    m = D.step_diagnostics(inp)
    assert m["diag/special/loss_frac"] == 0.0 and m["diag/special/adv_mass_frac"] == 0.0
    assert m["diag/special/completion_frac"] == pytest.approx(1 / 6)


# --- edge cases and raw samples ----------------------------------------------------------------------------------


def test_all_masked_batch_is_finite_and_none_inputs_skip_metrics():
    full = make_inputs([[1, 1, 1]], [[0.0] * 3], teacher_lp=[[-1.0] * 3], lengths=[0],
                       student_entropy_BT=torch.ones(1, 3), teacher_topk_ids_BTK=torch.ones(1, 3, 2).long(),
                       teacher_topk_logprobs_BTK=torch.zeros(1, 3, 2))
    m = D.step_diagnostics(full)
    assert m and all(math.isfinite(v) for v in m.values())
    assert m["diag/n/completion_tokens"] == 0.0 and m["diag/signal/neg_reward_frac"] == 0.0

    bare = make_inputs([[1, 2, 3]], [[-1.0] * 3])
    m = D.step_diagnostics(bare)
    assert all(math.isfinite(v) for v in m.values())
    assert not any(k.startswith(("diag/signal/", "diag/teacher/")) for k in m)
    assert "diag/rep/ngram_repeat_rate" in m and "diag/dyn/student_entropy" not in m
    empty = make_inputs(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4))
    assert all(math.isfinite(v) for v in D.step_diagnostics(empty).values())


def test_dynamics_helpers():
    mask_BT = torch.tensor([[True, True, False], [True, False, False]])
    assert D.mean_response_length(mask_BT) == 1.5
    assert D.mean_entropy(torch.tensor([[1.0, 3.0, 100.0], [2.0, 100.0, 100.0]]), mask_BT) == pytest.approx(2.0)


def test_raw_samples_columns_subsampling_and_roundtrip(tmp_path):
    inp = make_inputs([[3, 0, 4, 5], [6, 7, 8, 8]], np.log([[0.5] * 4] * 2), teacher_lp=np.log([[0.25] * 4] * 2),
                      lengths=[4, 2], special_ids=[0])
    inp.teacher_logprobs_BT[1, 0] = 0.0  # id 6 gets the only positive reward
    raw = D.raw_samples(inp)
    assert raw["token_id"].tolist() == [3, 0, 4, 5, 6, 7]
    assert raw["abs_pos"].tolist() == [0, 1, 2, 3, 0, 1] and raw["row"].tolist() == [0, 0, 0, 0, 1, 1]
    assert raw["rel_pos"] == pytest.approx([0, 0.25, 0.5, 0.75, 0, 0.5])
    assert raw["is_special"].tolist() == [False, True, False, False, False, False]
    assert raw["student_prob"] == pytest.approx([0.5] * 6) and raw["teacher_prob"][4] == pytest.approx(1.0)
    sub = D.raw_samples(inp, max_tokens=3)
    assert len(sub["token_id"]) == 3 and set(sub["token_id"]) <= {3, 0, 4, 5, 6, 7}
    assert sub["abs_pos"].dtype == np.int32 and sub["teacher_prob"].dtype == np.float32

    path = D.save_raw_samples(tmp_path / "diag" / "step0.npz", inp)
    with np.load(path) as f:
        assert f["token_id"].tolist() == raw["token_id"].tolist()
        assert f["pos_signal_ids"].tolist() == [6] and f["pos_signal_shares"] == pytest.approx([1.0])


def test_diagnostic_rows_survive_log_every(smoke, tmp_path):
    """train.log_every=4 writes train/ rows every 4 steps, but a diagnostics step (every diag_every, and the last)
    is always written (they were dropped when the step was not a multiple of log_every)."""
    run = tmp_path / "run"
    summary = smoke.execute(run, "estimator=topk_rkl", "estimator.top_k=8", "train.log_every=4",
                            "train.diag_every=3", "train.diag_top_k=16")
    assert summary["status"] == "completed"
    rows = [r for r in smoke.metrics(run) if "step" in r and any(k.startswith("diag/") for k in r)]
    assert [r["step"] for r in rows] == [0, 3, 5]  # smoke: 6 steps; diag at 0, 3 and the last
    assert [r["step"] for r in smoke.metrics(run) if "train/loss" in r] == [0, 3, 5]  # step 3: log_every
