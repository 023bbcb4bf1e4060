"""Real-pair code path on tiny random-init Llama, Qwen2 and GPT-NeoX checkpoints (tests/pair_factory.py): loading
with padded embeddings, each pair's own special tokens and template, rollouts, math-verify grading, avg@k /
pass@k with a per-split k, LoRA and gradient checkpointing, and the real CLI on task=champ."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from pair_factory import FAMILIES, PAD_ROWS, write_pair

from opd_exp.config import EvalConfig, ModelConfig, SamplingConfig, TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.models.audit import audit_tokenizers, pair_probes
from opd_exp.models.forward import response_head
from opd_exp.models.pair import load_pair, masked_token_ids, pair_special_tokens
from opd_exp.rollout import rollout, stop_ids
from opd_exp.tasks.benchmark import BenchmarkTask
from opd_exp.train.evaluate import evaluate_model

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["llama", "qwen2", "gpt_neox"]
ROWS = [{"problem": "What is 2 + 3?", "answer": "5"}, {"problem": "Compute \\frac{1}{4} + \\frac{1}{4}.",
                                                         "answer": "\\frac{1}{2}"}]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("pairs")
    return {arch: write_pair(root, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def loaded(pairs):
    return {arch: load_pair(model_cfg(pairs[arch]), TaskConfig()) for arch in ARCHS}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> BenchmarkTask:
    root = tmp_path_factory.mktemp("data")
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 2))
    cfg = TaskConfig(name="benchmark", n_eval=2, train_data={"path": str(path)},
                     eval_splits={"small": {"path": str(path)}, "aime": {"path": str(path), "k": 3}})
    return BenchmarkTask(cfg)


def model_cfg(dirs: dict[str, Path], **kw) -> ModelConfig:
    return ModelConfig(**{"name": "t", "kind": "pretrained", "teacher_path": str(dirs["teacher"]),
                          "student_path": str(dirs["student"]), "special_tokens": None, **kw})


@pytest.mark.parametrize("arch", ARCHS)
def test_pair_loads_with_its_own_tokens(loaded, arch):
    pair = loaded[arch]
    fam = FAMILIES[arch]
    assert pair.vocab_size == len(pair.tokenizer)
    assert pair.student.get_input_embeddings().weight.shape[0] == pair.vocab_size + PAD_ROWS
    assert pair.tokenizer.eos_token == fam["eos"] and pair.tokenizer.padding_side == "left"
    expected = [t for t in ("<think>", "</think>") if t in fam["special"]] + list(dict.fromkeys(fam["stops"]))
    assert pair_special_tokens(pair.tokenizer, pair.student) == expected
    stops = {pair.tokenizer.convert_ids_to_tokens(i) for i in stop_ids(pair.student, pair.tokenizer)}
    assert stops == set(fam["stops"])
    probes = pair_probes(pair)  # the pair's own end token, not the tiny pair's <|im_end|>
    assert probes["student_end"] == fam["eos"] and ("<|im_end|>" in probes.values()) == (arch == "qwen2")
    assert audit_tokenizers(pair.teacher_tokenizer, pair.tokenizer, probes).ok


def test_student_stop_tokens_end_its_responses(pairs):
    """model.student_stop_tokens adds to the student's stop ids (here llama's <|eot_id|> + <|end_header_id|>), so
    a response ends at the added token in rollouts and evaluation (completion_mask over stop_ids)."""
    from opd_exp.rollout import completion_mask

    pair = load_pair(model_cfg(pairs["llama"], student_stop_tokens=["<|end_header_id|>"]), TaskConfig())
    tok = pair.tokenizer
    stops = stop_ids(pair.student, tok)
    assert tok.convert_ids_to_tokens(stops) == ["<|eot_id|>", "<|end_header_id|>"]
    word, extra = tok.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>"])
    mask_BT, truncated_B = completion_mask(torch.tensor([[word, extra, word, word]]), stops)
    assert mask_BT.tolist() == [[True, True, False, False]] and not truncated_B.item()
    with pytest.raises(ConfigError, match=r"model\.student_stop_tokens.*<\|nosuch\|>"):
        load_pair(model_cfg(pairs["llama"], student_stop_tokens=["<|nosuch|>"]), TaskConfig())


def test_masking_names_what_it_removes(loaded, caplog):
    pair = loaded["qwen2"]
    with caplog.at_level(logging.WARNING, logger="opd_exp.models.pair"):
        ids = masked_token_ids(pair, None, None, enabled=True)
    assert pair.tokenizer.convert_ids_to_tokens(ids) == ["<think>", "</think>", "<|im_end|>", "<|endoftext|>"]
    assert "removes '<think>'" in caplog.text and "the pair's tokenizer and generation config" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="opd_exp.models.pair"):
        assert masked_token_ids(loaded["gpt_neox"], ["<think>"], None, enabled=False) == []  # copied tokens
    assert "left out" in caplog.text
    with pytest.raises(ConfigError, match="model.special_tokens.*'<think>'"):
        masked_token_ids(loaded["gpt_neox"], None, ["<think>", "</think>"], enabled=True)
    with caplog.at_level(logging.WARNING, logger="opd_exp.models.pair"):
        assert masked_token_ids(loaded["gpt_neox"], None, [], enabled=True) == []
    assert "removes nothing" in caplog.text


@pytest.mark.parametrize("arch", ARCHS)
def test_templates_rollouts_and_grading(loaded, bench, arch):
    pair = loaded[arch]
    tok = pair.tokenizer
    example = bench.eval_splits["small"][1]
    text = bench.prompt_text(tok, example)
    assert example.question in text and "\\boxed{}" in text and text == tok.decode(bench.prompt_ids(tok, example))
    # a correct response survives the pair's encode / decode (as evaluate decodes) and grades right
    response = tok(f"<think>1/4 + 1/4</think> So \\boxed{{\\frac{{1}}{{2}}}}.{tok.eos_token}",
                   add_special_tokens=False)["input_ids"]
    decoded = tok.batch_decode([response], skip_special_tokens=False)[0]
    assert bench.grade(decoded, example) and not bench.grade(decoded, bench.eval_splits["small"][0])
    prompts = [bench.prompt_ids(tok, ex) for ex in bench.train[:2]]
    ro = rollout(pair.student, prompts, SamplingConfig(max_new_tokens=6, rollouts_per_prompt=2),
                 eos_id=stop_ids(pair.student, tok), pad_id=tok.pad_token_id, vocab_size=pair.vocab_size)
    assert int(ro.completion_ids_BT.max()) < pair.vocab_size  # never a padded embedding row
    assert torch.isfinite(ro.sample_logprobs_BT).all()


def test_avg_and_pass_at_k_with_a_per_split_k(loaded, bench):
    cfg = EvalConfig(k=2, max_new_tokens=4, batch_size=8)
    res = evaluate_model(loaded["qwen2"].student, loaded["qwen2"].tokenizer, bench, cfg, bench.eval_splits)
    assert {"small/avg@2", "small/pass@2", "aime/avg@3", "aime/pass@3", "avg/greedy@1", "avg/avg@2",
            "avg/avg@3", "aime/pass@3_strict", "aime/avg@2", "aime/pass@2"} <= set(res)
    assert res["aime/avg@2"] == res["aime/avg@3"] and res["aime/pass@2"] <= res["aime/pass@3"]
    assert res["avg/avg@2"] == (res["small/avg@2"] + res["aime/avg@2"]) / 2  # every split has eval.k's metrics
    assert all(0.0 <= res[k] <= 1.0 for k in ("small/avg@2", "aime/pass@3", "avg/greedy@1"))


def test_lora_and_gradient_checkpointing(pairs):
    pytest.importorskip("peft")
    pair = load_pair(model_cfg(pairs["qwen2"], lora_rank=4, gradient_checkpointing=True), TaskConfig())
    trainable = [n for n, p in pair.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(getattr(m, "gradient_checkpointing", False) for m in pair.student.modules())
    assert type(pair.student).__name__ == "Qwen2ForCausalLM"  # adapters injected in place
    ids_BT = torch.randint(0, pair.vocab_size, (2, 5))
    head = response_head(pair.student, ids_BT[:, :3], torch.ones(2, 3, dtype=torch.bool), ids_BT,
                         torch.ones(2, 5, dtype=torch.bool), pair.vocab_size)
    (head.hidden_BTH @ head.weight_VH.T).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in pair.student.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    with pytest.raises(ConfigError, match="model.lora_target_modules"):
        load_pair(model_cfg(pairs["qwen2"], lora_rank=4, lora_target_modules=["nosuch_proj"]), TaskConfig())


@pytest.mark.slow
def test_entrypoint_runs_a_real_pair_on_champ(pairs, tmp_path, monkeypatch, caplog):
    """`opd-exp model=pair_template model.teacher_path=... task=champ` as the README has it (no `+` needed),
    through the entrypoint's execute() in this process."""
    pytest.importorskip("champ_dataset")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from opd_exp.__main__ import execute

    monkeypatch.setenv("OPD_EXP_CACHE", str(tmp_path / "cache"))
    dirs = pairs["llama"]
    args = ["model=pair_template", f"model.teacher_path={dirs['teacher']}", f"model.student_path={dirs['student']}",
            "model.dtype=float32", "model.name=tiny_llama", "task=champ", "task.n_eval=2", "task.n_train=8",
            "train.steps=1", "train.prompts_per_step=2", "sampling.rollouts_per_prompt=2", "train.mini_batch_size=4",
            "sampling.max_new_tokens=4", "eval.k=2", "eval.max_new_tokens=4", "mask.enabled=true", "device=cpu"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        node = compose("config", overrides=args)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger="opd_exp.models.pair"):
        summary = execute(node, run_dir, args, False)
    assert summary["status"] == "completed", summary.get("error")
    assert {"teacher/champ/avg@2", "student_after/champ/pass@2"} <= set(summary["results"])
    assert "special-token masking removes '<|eot_id|>'" in caplog.text
    assert list((tmp_path / "cache" / "evals").glob("before-*.json"))  # OPD_EXP_CACHE holds the eval cache


def test_hub_ids_and_the_cache_root(monkeypatch, tmp_path):
    import huggingface_hub

    from opd_exp.models.pair import ModelLoadError, cache_root, resolve_checkpoint

    assert resolve_checkpoint(str(tmp_path), None, "teacher") == tmp_path  # a local dir is used as is
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision=None: calls.append((repo, revision)) or str(tmp_path / "snap"))
    assert resolve_checkpoint("org/model", "abc123", "teacher") == tmp_path / "snap"
    assert calls == [("org/model", "abc123")]

    def offline(repo, revision=None):
        raise OSError("offline\nno network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match="teacher checkpoint org/model: not a local dir and not downloadable "
                                             "from the hub at revision main \\(OSError: no network\\)"):
        resolve_checkpoint("org/model", None, "teacher")
    monkeypatch.setenv("OPD_EXP_CACHE", str(tmp_path / "c"))
    assert cache_root(ModelConfig(cache_dir="~/elsewhere")) == tmp_path / "c"
    monkeypatch.delenv("OPD_EXP_CACHE")
    assert cache_root(ModelConfig(cache_dir=str(tmp_path))) == tmp_path
