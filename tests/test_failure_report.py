"""opd_exp.report.failure on hand-built `failure_modes` run dirs whose numbers are known by construction.

Each fixture run dir holds what the loop writes (config.yaml, run_summary.json, metrics.jsonl and the raw
per-token samples diag/samples_step{0,4}.npz) for one (pair, cell, seed):

- pairs: ``tiny`` (matched: the teacher gives the student's special tokens probability 1) and ``tiny_mismatch``
  (the teacher gives them e^-20, the student 1: a gap of -20 nats, failure mode 3);
- cells: the baseline (sampled_token, top-p 1), Ours without the mask, Ours with the mask (the fix);
- first step: of the 36 plain tokens of a run, 36 / 18 / 27 (seeds 0 / 1 / 2) have teacher prob 0.5 < student
  prob 0.8 (below the diagonal), the rest 0.9; so the matched pair's shares are 0.75 / 0.375 / 0.5625;
- last step: in the baseline the teacher gives the last plain token 0.08 (gap log 0.1 in the last quarter,
  0 elsewhere: failure mode 2), in Ours 0.8 everywhere (gap 0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from opd_exp.report import cli as report
from opd_exp.report import failure as failure_report
from opd_exp.report import failure_verdicts, stats
from opd_exp.report import runs as runs_mod
from opd_exp.report.stats import Stat

ROWS, LENGTH = 4, 12  # responses per batch, tokens per response
THINK_OPEN, THINK_CLOSE, END = 6, 7, 2  # ids of <think>, </think>, <|im_end|> in the tiny vocabulary
SPECIAL = ["<think>", "</think>", "<|im_end|>"]
BELOW = {0: 36, 1: 18, 2: 27}  # plain tokens below the diagonal at the first step, per seed
T975_2DOF = 4.302652729911275
CELLS = {  # name -> (estimator, top_p, mask)
    "baseline": ("sampled_token", 1.0, False),
    "ours": ("topk_rkl", 0.9, False),
    "ours_mask": ("topk_rkl", 0.9, True),
}
TRUNCATED = {  # (pair, cell) -> last-step truncated share per seed
    ("tiny_mismatch", "ours"): [0.9, 0.8, 0.85], ("tiny_mismatch", "ours_mask"): [0.1, 0.1, 0.2],
    ("tiny", "ours"): [0.1, 0.1, 0.1], ("tiny", "ours_mask"): [0.1, 0.15, 0.1],
}


def token_ids(loop: bool) -> np.ndarray:
    """(ROWS, LENGTH): <think>, nine plain ids, </think>, <|im_end|>; row 3 loops on a 2-token unit if asked."""
    ids = np.zeros((ROWS, LENGTH), dtype=np.int32)
    for r in range(ROWS):
        plain = [11 + (i % 2) for i in range(9)] if loop and r == 3 else [11 + i for i in range(9)]
        ids[r] = [THINK_OPEN, *plain, THINK_CLOSE, END]
    return ids


def samples(pair: str, cell: str, seed: int, last: bool, loop: bool) -> dict[str, np.ndarray]:
    ids_RL = token_ids(loop)
    special_RL = np.isin(ids_RL, [THINK_OPEN, THINK_CLOSE, END])
    student_RL = np.where(special_RL, 1.0, 0.8)
    teacher_RL = np.where(special_RL, math.exp(-20) if pair == "tiny_mismatch" else 1.0, 0.0)
    plain = ~special_RL
    if not last:  # mode 1: the first BELOW[seed] plain tokens (row-major) below the diagonal
        values = np.where(np.arange(plain.sum()) < BELOW[seed], 0.5, 0.9)
    else:  # mode 2: the baseline's teacher drops on the last plain token of each response (position 9)
        values = np.full(plain.sum(), 0.8)
        if cell == "baseline":
            values[8::9] = 0.08
    teacher_RL[plain] = values
    pos_RL = np.broadcast_to(np.arange(LENGTH), (ROWS, LENGTH))
    mask = CELLS[cell][2]
    return {"teacher_prob": teacher_RL.ravel().astype(np.float32), "student_prob": student_RL.ravel().astype(
        np.float32), "rel_pos": (pos_RL / LENGTH).ravel().astype(np.float32), "abs_pos": pos_RL.ravel().astype(
        np.int32), "token_id": ids_RL.ravel(), "is_special": (special_RL & mask).ravel(),
        "in_loss": (~(special_RL & mask)).ravel(), "row": np.repeat(np.arange(ROWS), LENGTH).astype(np.int32),
        "pos_signal_ids": np.array([11, 12], dtype=np.int64), "pos_signal_shares": np.array([0.6, 0.3])}


def make_run(root: Path, pair: str, cell: str, seed: int, loop: bool = False) -> Path:
    estimator, top_p, mask = CELLS[cell]
    recipe = "baseline" if cell == "baseline" else "ours"
    overrides = [f"recipe={recipe}", f"mask.enabled={str(mask).lower()}", f"model={pair}", f"seed={seed}",
                 "experiment=failure_modes"]
    run = root / f"{pair}-{cell}-{seed}"
    (run / "diag").mkdir(parents=True)
    config = {"experiment": "failure_modes", "runner": "opd", "seed": seed,
              "model": {"name": pair, "kind": "tiny", "special_tokens": SPECIAL,
                        # as conf/model/*.yaml: the mismatched teacher names its convention, the others write the
                        # default one without naming it
                        "bootstrap": {"teacher": {"sft_steps": 500} | ({"convention": {"end": "<|endoftext|>"}}
                                                                       if pair == "tiny_mismatch" else {}),
                                      "student": {"sft_steps": 250}}},
              "estimator": {"name": estimator}, "sampling": {"top_p": top_p}, "mask": {"enabled": mask},
              "train": {"steps": 5}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"status": "completed", "runner": "opd", "experiment": "failure_modes", "seed": seed,
               "overrides": overrides, "wall_time_s": 60.0,
               "results": {"student_before/id/avg@2": 0.3, "student_after/id/avg@2": 0.5}}
    (run / "run_summary.json").write_text(json.dumps(summary))
    trunc = TRUNCATED.get((pair, cell), [0.5, 0.5, 0.5])[seed]
    rows = [{"step": step, "train/response_len": 12.0 + step, "train/grad_norm": 1.0, "train/entropy": 1.0,
             "train/logprob_gap": -1.0, "diag/len/truncated_frac": trunc if step else 0.0,
             "diag/rep/loop_frac": 0.0, "diag/rep/loop_tokens": 0.0} for step in (0, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step, last in ((0, False), (4, True)):
        np.savez_compressed(run / "diag" / f"samples_step{step}.npz",
                            **samples(pair, cell, seed, last, loop and cell == "baseline" and last))
    return run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("failure_modes")
    for pair in ("tiny", "tiny_mismatch"):
        for cell in CELLS:
            for seed in BELOW:
                make_run(root, pair, cell, seed, loop=pair == "tiny_mismatch")
    return root


@pytest.fixture(scope="module")
def written(sweep, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("results") / "failure_modes"
    report.report([str(sweep)], out=str(out))
    return out


def row(frame: pd.DataFrame, **where) -> pd.Series:
    hit = frame
    for k, v in where.items():
        hit = hit[hit[k] == v]
    assert len(hit) == 1, (where, hit)
    return hit.iloc[0]


def test_report_writes_the_figures_tables_and_readme(written):
    for name in ("README.md", "fig2_scatter.png", "fig3_loop_example.png", "fig4_gap_by_position.png",
                 "dynamics_tiny.png", "dynamics_tiny_mismatch.png", "mode1_signal.csv",
                 "mode2_gap_by_position.csv", "mode3_special_tokens.csv", "dynamics.csv"):
        assert (written / name).is_file(), name
    text = (written / "README.md").read_text()
    assert text.index("## Verdicts") < text.index("## How this was made")  # ours first, then provenance
    assert "seeds: 0, 1, 2; 18 finished runs in 6 cells" in text


def test_share_below_the_diagonal_and_its_interval(written):
    frame = pd.read_csv(written / "mode1_signal.csv")
    got = row(frame, pair="tiny", cell="sampled_token, p=1", step="first")
    assert got["below_diag"] == pytest.approx(0.5625)  # mean of 0.75, 0.375, 0.5625
    half = T975_2DOF * 0.1875 / math.sqrt(3)  # sd of the three shares is 0.1875
    assert got["below_diag_ci_lo"] == pytest.approx(0.5625 - half)
    assert got["below_diag_ci_hi"] == pytest.approx(0.5625 + half)
    assert got["above_diag"] == pytest.approx((0 + 18 + 9) / 48 / 3)  # the other plain tokens (0.9 > 0.8)
    assert got["top5_ids_pos_share"] == pytest.approx(0.9)
    # the mismatched teacher puts the 12 special tokens below the diagonal too: (36 + 12) / 48 ... -> 0.8125
    assert row(frame, pair="tiny_mismatch", cell="sampled_token, p=1", step="first")["below_diag"] == \
        pytest.approx(0.8125)


def test_gap_by_position_widens_in_the_baseline_only(written):
    frame = pd.read_csv(written / "mode2_gap_by_position.csv")
    base = row(frame, pair="tiny", cell="sampled_token, p=1", step="last")
    assert base["gap_p10_q1"] == pytest.approx(0.0, abs=1e-6)
    assert base["q4_minus_q1"] == pytest.approx(math.log(0.1), abs=1e-5)
    assert row(frame, pair="tiny", cell="topk_rkl, p=0.9, +mask", step="last")["q4_minus_q1"] == \
        pytest.approx(0.0, abs=1e-6)


def test_special_token_table(written):
    frame = pd.read_csv(written / "mode3_special_tokens.csv")
    mis = row(frame, pair="tiny_mismatch", cell="sampled_token, p=1", step="first", token="<|im_end|>")
    assert mis["student_logprob"] == pytest.approx(0.0, abs=1e-6)
    assert mis["teacher_logprob"] == pytest.approx(-20.0, abs=1e-4)
    assert mis["gap"] == pytest.approx(-20.0, abs=1e-4)
    assert mis["count"] == ROWS * 3  # once per response, 3 seeds
    assert row(frame, pair="tiny", cell="sampled_token, p=1", step="first", token="<think>")["gap"] == \
        pytest.approx(0.0, abs=1e-6)


def test_verdicts(written):
    text = (written / "README.md").read_text()
    verdicts = text[text.index("## Verdicts"):text.index("## Figures")]
    assert "Mode 3, special-token mismatch (tiny_mismatch)**: reproduces" in verdicts
    # the matched pair shares one convention: a control, not a claim
    assert "Mode 3, special-token mismatch (tiny)**: control (teacher and student share one convention" in verdicts
    assert "Mode 1, imbalanced one-token signal (tiny)**: not significant (MDE " in verdicts  # CI reaches < 0.5
    assert "Mode 2, unreliable guidance on student prefixes (tiny)**: reproduces" in verdicts
    assert "The fix removes it" in verdicts
    # mismatched pair, Ours: truncation 0.85 without the mask vs 0.133 with it, as low as the matched control
    mismatch = verdicts[verdicts.index("(tiny_mismatch)**: reproduces"):]
    assert "masking removes it" in mismatch.split("\n- ")[0] + mismatch


def test_loop_example_or_a_plain_statement(written, tmp_path):
    assert "A loop from tiny_mismatch" in (written / "README.md").read_text()
    for seed in BELOW:  # matched pair only: no response loops
        make_run(tmp_path / "runs", "tiny", "baseline", seed)
    runs = [runs_mod.load_run(p) for p in runs_mod.find_run_dirs([str(tmp_path / "runs")])]
    md = "\n".join(failure_report.write_failure_report(runs, tmp_path / "out"))
    assert "no repetition loop" in md
    assert not (tmp_path / "out" / "fig3_loop_example.png").exists()


def test_mode2_without_loops_is_untestable_not_refuted(sweep, tmp_path, monkeypatch):
    """Where mode 2's test does not reproduce, a pair none of whose responses loops (tiny) is untestable, not
    refuted; a pair whose responses loop (tiny_mismatch) keeps the test's verdict."""
    runs = [runs_mod.load_run(p) for p in runs_mod.find_run_dirs([str(sweep)])]
    monkeypatch.setattr(failure_verdicts, "decide", lambda test, p_holm: "not significant (MDE 1)")
    md = "\n".join(failure_report.write_failure_report(runs, tmp_path / "out"))
    assert "Mode 2, unreliable guidance on student prefixes (tiny)**: untestable at this scale: no response" in md
    assert "Mode 2, unreliable guidance on student prefixes (tiny_mismatch)**: not significant (MDE 1)" in md
    monkeypatch.undo()
    assert "Mode 2, unreliable guidance on student prefixes (tiny_mismatch)**: not significant (MDE 1) (p " in md


def test_a_rule_is_a_one_sample_t_test_against_its_threshold_read_through_holm():
    """p from the stat's interval (the t-test of the seeds' mean against the threshold); the verdict from the
    adjusted p, on the paper's side or the other."""
    rule = failure_verdicts.RuleTest
    above = rule(Stat(0.7, 0.6, 0.8, 3), 0.5, +1)  # t = 0.2 / (0.1 / 4.303) = 8.6, 2 dof
    assert above.p == pytest.approx(stats.paired_t_p([0.2 + d for d in (-0.1 / 4.303 * math.sqrt(3), 0.0,
                                                                        0.1 / 4.303 * math.sqrt(3))]), rel=1e-3)
    assert failure_verdicts.decide(above, above.p) == "reproduces"
    assert failure_verdicts.decide(above, 0.06).startswith("not significant (MDE ")  # Holm can take it away
    assert failure_verdicts.decide(rule(Stat(0.3, 0.2, 0.4, 3), 0.5, +1), 0.01) == "opposite (significant)"
    assert failure_verdicts.decide(rule(Stat(0.0, -0.1, 0.1, 3), 0.0, -1), 1.0).startswith("not significant (MDE ")
    assert failure_verdicts.decide(rule(Stat(0.3, 0.3, 0.3, 1), 0.5, +1), math.nan) == "not enough seeds (n = 1)"


def test_one_seed_is_undetermined(tmp_path):
    make_run(tmp_path / "runs", "tiny_mismatch", "baseline", 0)
    runs = [runs_mod.load_run(p) for p in runs_mod.find_run_dirs([str(tmp_path / "runs")])]
    md = "\n".join(failure_report.write_failure_report(runs, tmp_path / "out"))
    assert "not enough seeds (n = 1)" in md
