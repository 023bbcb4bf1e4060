"""The gradient probe (opd_exp/train/probe.py): its pure functions, one probe step on a small random pair, and
(slow) a run with the probe on that trains exactly as the same run without it.

Run: pytest tests/test_probe.py -q
"""

import dataclasses
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd_exp.config import RunConfig, TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.models.pair import ModelPair
from opd_exp.models.tokenization import build_tokenizer
from opd_exp.objectives import Needs
from opd_exp.rollout import make_backend
from opd_exp.tasks.math import MathTask
from opd_exp.train import probe

TOK = build_tokenizer()
V = len(TOK)
OBJECTIVES = ["sampled_token", "vopd", "iw_opd", "topk_sg", "jsd"]


# ----------------------------------------------------------------------------- pure functions


def test_cosine_and_variance_by_hand():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    assert probe.cosine(a, b) == pytest.approx(2 ** -0.5, abs=1e-12)
    assert probe.cosine(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert probe.cosine(a, torch.zeros(3)) != probe.cosine(a, torch.zeros(3))  # NaN
    # g_1 = (0, 2), g_2 = (2, 0): mean (1, 1), sum of squared deviations 2 + 2 = 4, / (M - 1) = 4
    assert probe.micro_batch_variance(torch.tensor([[0.0, 2.0], [2.0, 0.0]])) == pytest.approx(4.0, abs=1e-12)
    assert probe.micro_batch_variance(torch.ones(5, 3)) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        probe.micro_batch_variance(torch.ones(1, 3))


def test_split_rows_and_union_needs():
    parts = probe.split_rows(10, 4)
    assert [len(p) for p in parts] == [3, 3, 2, 2] and torch.equal(torch.cat(parts), torch.arange(10))
    with pytest.raises(ValueError, match="micro-batches"):
        probe.split_rows(3, 4)
    union = probe.union_needs([Needs(teacher_sampled=True), Needs(teacher_topk=8), Needs(student_topk=4),
                               Needs(teacher_full=True)])
    assert union == Needs(teacher_sampled=True, teacher_topk=8, teacher_full=True, student_topk=4)


def test_presets_resolve_and_unknown_names_fail():
    objectives = probe.probe_objectives(None)
    assert next(iter(objectives)) == probe.REFERENCE and "seq_kd" not in objectives
    assert {"sampled_token", "vopd", "power_opd", "iw_opd", "topk_sg", "topk_mopd"} <= set(objectives)
    assert objectives["topk_sg"][1].topk_stop_grad and objectives["iw_opd"][1].iw_opd_weight_max == 1.5
    with pytest.raises(ConfigError, match="allowed values"):
        probe.probe_objectives(["nope"])


# ----------------------------------------------------------------------------- one probe step


@pytest.fixture(scope="module")
def pair() -> ModelPair:
    torch.manual_seed(0)
    ids = {"bos_token_id": TOK.bos_token_id, "eos_token_id": TOK.eos_token_id, "pad_token_id": TOK.pad_token_id}
    make = lambda h: LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=h, intermediate_size=32,  # noqa: E731
                                                  num_hidden_layers=1, num_attention_heads=2,
                                                  num_key_value_heads=2, max_position_embeddings=128, **ids))
    student, teacher = make(16), make(24)
    teacher.eval().requires_grad_(False)
    return ModelPair(teacher=teacher, student=student.train(), tokenizer=TOK, teacher_tokenizer=TOK)


def probe_cfg(**estimator) -> RunConfig:
    cfg = RunConfig()
    cfg.estimator = dataclasses.replace(cfg.estimator, probe_objectives=OBJECTIVES, **estimator)
    cfg.sampling = dataclasses.replace(cfg.sampling, rollouts_per_prompt=2, max_new_tokens=10)
    return cfg


@pytest.fixture(scope="module")
def rows_and_params(pair):
    task = MathTask(TaskConfig(n_train=32, n_eval=4, eval_splits={"id": {}}))
    prompts = [task.prompt_ids(TOK, ex) for ex in task.train[:4]]
    before = [p.detach().clone() for p in pair.student.parameters()]
    torch.manual_seed(1)
    rows = probe.probe_step(pair, prompts, probe_cfg(), make_backend("hf"), [])
    return rows, before


def test_probe_rows_cover_every_objective_and_reference_is_exact(rows_and_params):
    rows, _ = rows_and_params
    by = {r["objective"]: r for r in rows}
    assert list(by) == [probe.REFERENCE] + OBJECTIVES
    ref = by[probe.REFERENCE]
    assert ref["cosine"] == pytest.approx(1.0, abs=1e-6) and ref["cosine_mb"] == pytest.approx(1.0, abs=1e-6)
    for r in rows:
        assert -1.0 <= r["cosine"] <= 1.0 + 1e-9 and r["variance"] > 0 and r["rel_variance"] > 0
        assert r["time_s"] > 0 and r["grad_norm"] > 0
    # the sampled-token family estimates the same expected gradient with one sample: noisier than the exact one
    assert by["sampled_token"]["rel_variance"] > ref["rel_variance"]


def test_probe_changes_neither_parameters_nor_grads(pair, rows_and_params):
    _, before = rows_and_params
    assert all(torch.equal(p, b) for p, b in zip(pair.student.parameters(), before, strict=True))
    assert all(p.grad is None for p in pair.student.parameters())


def test_flat_grad_matches_backward(pair):
    """flat_grad is d loss / d theta, the same as .backward() puts into .grad."""
    task = MathTask(TaskConfig(n_train=32, n_eval=4, eval_splits={"id": {}}))
    prompts = [task.prompt_ids(TOK, ex) for ex in task.train[:2]]
    cfg = probe_cfg()
    objectives = probe.probe_objectives(["topk_sg"])
    spec, est = objectives["topk_sg"]
    from opd_exp.train.collect import collect

    torch.manual_seed(2)
    batch, _ = collect(pair, prompts, cfg, spec.needs(est), make_backend("hf"), [])
    flat = probe.flat_grad(pair.student, batch, spec, est, V, cfg.sampling.temperature)
    from opd_exp.models.forward import response_head

    head = response_head(pair.student, batch.prompt_ids_BP, batch.prompt_mask_BP, batch.ids_BT,
                         batch.attention_mask_BT, V, cfg.sampling.temperature)
    spec.loss(head, batch, est).loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in pair.student.parameters()])
    pair.student.zero_grad(set_to_none=True)
    assert torch.allclose(flat, expected, atol=1e-7, rtol=1e-5) and flat.abs().max() > 0


# ----------------------------------------------------------------------------- in a run (slow: the smoke pair)


def test_run_with_probe_trains_exactly_as_without(smoke, reference_run, tmp_path):
    """The probe forks the RNG: metrics.jsonl matches the reference run's (same seed, no probe) value for value,
    and probe.jsonl holds one row per objective at steps 0, 2, ..."""
    run_dir = tmp_path / "run"
    summary = smoke.execute(run_dir, "estimator.probe_every=2", "estimator.probe_objectives=[sampled_token,topk_sg]",
                            "estimator.probe_micro_batches=2")
    assert summary["status"] == "completed", summary
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k} for r in rows]  # noqa: E731
    assert strip(smoke.metrics(run_dir)) == strip(smoke.metrics(reference_run))
    rows = [json.loads(line) for line in (run_dir / "probe.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in rows})
    assert steps[0] == 0 and all(b - a == 2 for a, b in zip(steps, steps[1:], strict=False))
    assert [r["objective"] for r in rows if r["step"] == 0] == [probe.REFERENCE, "sampled_token", "topk_sg"]
