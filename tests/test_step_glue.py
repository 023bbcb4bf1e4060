"""The glue between rollout and loss: collect -> Batch -> update on small random pairs (no SFT, in-process).

First mini-batch ratio 1, a frozen teacher, pi_old and the sampler at the sampling temperature, a teacher padded
by 64 rows with every objective, diagnostics at a fixed K, masks that remove tokens, start-up validation.
"""

import dataclasses

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from opd_exp.config import RunConfig, TaskConfig
from opd_exp.config.schema import check_cross_fields
from opd_exp.config.validation import ConfigError
from opd_exp.models.pair import ModelPair
from opd_exp.models.tokenization import build_tokenizer, resolve_token_ids
from opd_exp.objectives import ESTIMATORS
from opd_exp.rollout import make_backend
from opd_exp.tasks.math import MathTask
from opd_exp.train import loop
from opd_exp.train.collect import collect
from opd_exp.train.step import train_step
from opd_exp.train.update import update

TOK = build_tokenizer()
V = len(TOK)
TEACHER_ROWS = 192  # the teacher's embedding padded to a multiple of 64 (beyond V), as GPT-NeoX checkpoints are


def _ids():
    return {"bos_token_id": TOK.bos_token_id, "eos_token_id": TOK.eos_token_id, "pad_token_id": TOK.pad_token_id}


@pytest.fixture(scope="module")
def pair() -> ModelPair:
    """A Llama student over the V-id tokenizer and a GPT-NeoX teacher whose 34 padded rows would dominate every
    softmax (their output rows are scaled up) if they ever entered one."""
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                           tie_word_embeddings=True, **_ids()))
    teacher = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=TEACHER_ROWS, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               max_position_embeddings=128, **_ids()))
    with torch.no_grad():
        teacher.get_output_embeddings().weight[V:] *= 500.0
    teacher.eval().requires_grad_(False)
    return ModelPair(teacher=teacher, student=student.train(), tokenizer=TOK, teacher_tokenizer=TOK)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    task = MathTask(TaskConfig(n_train=32, n_eval=4, eval_splits={"id": {}}))
    return [task.prompt_ids(TOK, ex) for ex in task.train[:4]]


def run_cfg(name: str = "sampled_token", **groups) -> RunConfig:
    cfg = RunConfig()
    cfg.estimator = dataclasses.replace(cfg.estimator, name=name, **groups.pop("estimator", {}))
    cfg.sampling = dataclasses.replace(cfg.sampling, rollouts_per_prompt=2, max_new_tokens=12,
                                       **groups.pop("sampling", {}))
    cfg.train = dataclasses.replace(cfg.train, prompts_per_step=4, mini_batch_size=8, **groups.pop("train", {}))
    cfg.mask = dataclasses.replace(cfg.mask, **groups.pop("mask", {}))
    assert not groups
    return cfg


def test_first_mini_batch_ratio_is_one(pair, prompts):
    """One mini-batch of the whole batch: pi_theta == pi_old exactly before the update, so every PPO ratio is 1."""
    cfg = run_cfg("sampled_token")
    torch.manual_seed(1)
    batch, _ = collect(pair, prompts, cfg, ESTIMATORS["sampled_token"].needs(cfg.estimator),
                       make_backend(cfg.sampling.backend), [])
    opt = torch.optim.AdamW(pair.student.parameters(), lr=0.0)
    res = update(pair.student, batch, ESTIMATORS["sampled_token"], cfg, opt, pair.vocab_size)
    assert res.n_updates == 1
    assert res.metrics["clip_frac"] == 0.0
    assert abs(res.metrics["ppo_kl"]) < 1e-7


def test_teacher_is_frozen_through_a_step(pair, prompts):
    cfg = run_cfg("full_rkl")
    before = {k: v.clone() for k, v in pair.teacher.state_dict().items()}
    opt = torch.optim.AdamW(pair.student.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    student_before = [p.clone() for p in pair.student.parameters()]
    train_step(pair, prompts, cfg, ESTIMATORS["full_rkl"], make_backend(cfg.sampling.backend), opt, sched, [])
    assert all(torch.equal(before[k], v) for k, v in pair.teacher.state_dict().items())
    assert all(p.grad is None for p in pair.teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(student_before, pair.student.parameters(), strict=True))


@pytest.mark.parametrize("backend", ["decode", "hf"])
def test_pi_old_and_sampler_are_at_the_sampling_temperature(pair, prompts, backend):
    """With top-p 1 the sampler's recorded log-probs and pi_old are the same distribution (softmax(z / 0.7) over
    the tokenizer's ids): equal up to the KV-cache vs full-forward rounding. At temperature 1 they would differ."""
    cfg = run_cfg("sampled_token", sampling={"temperature": 0.7, "top_p": 1.0})
    torch.manual_seed(2)
    batch, _ = collect(pair, prompts, cfg, ESTIMATORS["sampled_token"].needs(cfg.estimator), make_backend(backend), [])
    m = batch.loss_mask_BT
    assert torch.allclose(batch.sampler_logprobs_BT[m], batch.old_logprobs_BT[m], atol=1e-4)
    cfg_p = run_cfg("sampled_token", sampling={"temperature": 0.7, "top_p": 0.5})
    batch_p, _ = collect(pair, prompts, cfg_p, ESTIMATORS["sampled_token"].needs(cfg.estimator), make_backend(backend),
                         [])
    m = batch_p.loss_mask_BT  # top-p renormalises: the sampler's log-prob is >= pi_old's, strictly somewhere
    assert (batch_p.sampler_logprobs_BT[m] >= batch_p.old_logprobs_BT[m] - 1e-4).all()
    assert (batch_p.sampler_logprobs_BT[m] > batch_p.old_logprobs_BT[m] + 1e-3).any()


@pytest.mark.parametrize("name", ["sampled_token", "seq_rkl", "full_rkl", "forward_kl", "jsd", "topk_rkl",
                                  "topk_v2", "topk_v3", "topk_v4", "topk_v5", "seq_kd"])
def test_padded_teacher_works_with_every_objective(pair, prompts, name):
    """Padded ids never appear in a rollout, a top-K or a normaliser: the teacher's log-probs are normalised over
    the V real ids (its 500x-scaled padded rows would otherwise take all the mass) and the step is finite."""
    variants = {"topk_v2": {"support": "student", "add_sampled": True}, "topk_v3": {"add_sampled": True},
                "topk_v4": {"support": "student", "normalize": "none", "tail": "sampled_is"},
                "topk_v5": {"normalize": "none", "tail": "sampled_is"}}
    est = name if not name.startswith("topk_v") else "topk_rkl"
    cfg = run_cfg(est, estimator={"top_k": 8, **variants.get(name, {})}, train={"diag_top_k": 16})
    spec = ESTIMATORS[est]
    opt = torch.optim.AdamW(pair.student.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(3)
    metrics, finite, diag = train_step(pair, prompts, cfg, spec, make_backend(cfg.sampling.backend), opt, sched, [],
                                       diagnose=True)
    assert finite and all(v == v for k, v in metrics.items() if k.startswith("train/") and "nonfinite" not in k)
    assert int(diag.tokens_BT.max()) < V
    assert int(diag.teacher_topk_ids_BTK.max()) < V and int(diag.student_topk_ids_BTK.max()) < V
    # teacher scores normalised over the V real ids: its top-16 hold at least their share of the mass of those ids
    # (16 / V for the near-uniform random teacher), not ~0 as they would if the padded rows entered the softmax
    mass_BT = diag.teacher_topk_logprobs_BTK.exp().sum(-1)
    assert (mass_BT[diag.completion_mask_BT] <= 1.0 + 1e-5).all()
    assert mass_BT[diag.completion_mask_BT].mean() > 0.5 * 16 / V
    # diagnostics at train.diag_top_k whatever the objective's K
    assert diag.teacher_topk_ids_BTK.shape[-1] == 16


def test_special_token_mask_removes_tokens_from_the_loss(pair, prompts):
    """mask.enabled: the first occurrence of each listed id is out of loss_mask_BT (and in attention_mask_BT)."""
    special = resolve_token_ids(TOK, ["<think>", "</think>", "<|im_end|>"])
    cfg = run_cfg("sampled_token", mask={"enabled": True, "mode": "all"})
    torch.manual_seed(4)
    batch, _ = collect(pair, prompts, cfg, ESTIMATORS["sampled_token"].needs(cfg.estimator),
                       make_backend(cfg.sampling.backend), special)
    is_special = torch.isin(batch.ids_BT, torch.tensor(special)) & batch.attention_mask_BT
    assert is_special.any(), "the random student wrote no special token: pick another seed"
    assert not (batch.loss_mask_BT & is_special).any()
    assert torch.equal(batch.loss_mask_BT, batch.attention_mask_BT & ~is_special)


def test_estimator_switches_fail_at_start_up():
    cfg = run_cfg("topk_rkl", estimator={"tail": "sampled_is"})  # renormalized + a tail: incoherent
    with pytest.raises(ConfigError, match="estimator.tail"):
        check_cross_fields(cfg)
    cfg = run_cfg("topk_rkl", estimator={"tail": "sampled_is", "normalize": "none", "add_sampled": True})
    with pytest.raises(ConfigError, match="estimator.add_sampled"):
        check_cross_fields(cfg)


def test_fork_rng_forks_every_cuda_device(monkeypatch):
    """The before-training evaluation must restore the CUDA generators too, not only the CPU one."""
    seen = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: seen.setdefault("devices", devices))
    loop.fork_rng(torch.device("cuda"))
    assert seen["devices"] == [0, 1]
    seen.clear()
    loop.fork_rng(torch.device("cpu"))
    assert seen["devices"] == []
