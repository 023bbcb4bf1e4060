"""Tokenizer audit and side-by-side scorer on hand-built tokenizers and tiny random models (opd_exp/models/audit.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opd_exp.models import audit as A

# "<think>", "</think>" and "<|im_end|>" are in the base vocabulary, so registering them as special tokens on one
# side changes how text splits without changing the token -> id map.
BASE_VOCAB = ["<unk>", "<s>", "</s>", "<|im_end|>", "<think>", "</think>", "<", ">", "/", "|", "_",
              "think", "im", "end", "user", "assistant", ":", "What", "is", "2", "3", "5", "+", "=", "?", ".",
              "The", "answer"]
TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
PROBES = {"think_open": "<think>", "think_close": "</think>", "end_of_turn": "<|im_end|>"}


def make_tok(vocab: list[str] = BASE_VOCAB, eos: str = "</s>", specials: tuple[str, ...] = (),
             template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that splits on whitespace and isolates punctuation ('<think>' -> '<' 'think' '>'
    unless '<think>' is registered as a special token)."""
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token=eos, unk_token="<unk>",
                                  extra_special_tokens=list(specials))
    tok.chat_template = template
    return tok


def tiny_llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


# --- the audit ---------------------------------------------------------------------------------------------------


def test_identical_pair_passes_with_no_mismatch(caplog):
    report = A.audit_tokenizers(make_tok(), make_tok(), PROBES)
    assert report.mismatches == [] and report.ok and report.shared_vocab
    assert report.n_vocab_diff == 0 and report.vocab_sizes == (len(BASE_VOCAB), len(BASE_VOCAB))
    assert "OK" in report.format() and "same ids" in report.template_note
    with caplog.at_level(logging.WARNING):
        A.check_pair_compatible(report, mapping=None)
    assert not caplog.records  # silent


def test_different_eos_is_flagged_but_the_pair_still_trains(caplog):
    report = A.audit_tokenizers(make_tok(eos="<|im_end|>"), make_tok(eos="</s>"), PROBES)
    assert report.shared_vocab and not report.ok
    eos_lines = [m for m in report.mismatches if m.startswith("EOS differs")]
    assert eos_lines == ["EOS differs: teacher '<|im_end|>' (id 3) vs student '</s>' (id 2)"]
    assert any(m.startswith("chat template renders different ids") for m in report.mismatches)  # eos in template
    assert "EOS differs" in report.format()
    with caplog.at_level(logging.WARNING):
        A.check_pair_compatible(report, mapping=None)  # shared vocabulary: warn, do not raise
    assert "EOS differs" in caplog.text


def test_think_delimiter_split_is_flagged():
    teacher, student = make_tok(specials=("<think>", "</think>")), make_tok()
    assert teacher("<think>", add_special_tokens=False)["input_ids"] == [4]
    assert student("<think>", add_special_tokens=False)["input_ids"] == [6, 11, 7]  # '<' 'think' '>'
    report = A.audit_tokenizers(teacher, student, PROBES)
    assert report.shared_vocab
    probe_lines = [m for m in report.mismatches if m.startswith("probe")]
    assert len(probe_lines) == 2 and "think_open" in probe_lines[0] and "['<', 'think', '>']" in probe_lines[0]
    assert "special token '<think>': teacher special (id 4) vs student plain (id 4)" in report.mismatches
    assert not any("end_of_turn" in m for m in report.mismatches)  # '<|im_end|>' splits the same on both


def test_remapped_vocab_is_flagged_and_refused_without_mapping():
    swapped = list(BASE_VOCAB)
    i, j = swapped.index("3"), swapped.index("5")
    swapped[i], swapped[j] = swapped[j], swapped[i]
    report = A.audit_tokenizers(make_tok(), make_tok(vocab=swapped), PROBES)
    assert not report.shared_vocab and report.n_vocab_diff == 2
    assert any(m.startswith("2 vocabulary entries map to different ids") for m in report.mismatches)
    with pytest.raises(ValueError, match="vocabularies differ .* no vocabulary mapping is configured"):
        A.check_pair_compatible(report, mapping=None)
    A.check_pair_compatible(report, mapping="by_string")  # a configured mapping lets it through


def test_extra_token_changes_size_and_missing_template_is_flagged():
    report = A.audit_tokenizers(make_tok(vocab=BASE_VOCAB + ["wait"]), make_tok(template=None), PROBES)
    assert report.vocab_sizes == (len(BASE_VOCAB) + 1, len(BASE_VOCAB)) and report.n_vocab_diff == 1
    assert f"vocabulary size differs: teacher {len(BASE_VOCAB) + 1} vs student {len(BASE_VOCAB)}" in report.mismatches
    assert "chat template: only the teacher tokenizer has one" in report.mismatches
    neither = A.audit_tokenizers(make_tok(template=None), make_tok(template=None), PROBES)
    assert neither.ok and neither.template_note.startswith("not checked")


# --- side-by-side scoring --------------------------------------------------------------------------------------


def test_side_by_side_matches_a_direct_forward_pass():
    tok = make_tok()
    teacher, student = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)
    text = "The answer is 5 . </s>"
    rows = A.score_side_by_side(teacher, student, tok, text)
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert [r.token for r in rows] == tok.convert_ids_to_tokens(ids[1:])
    with torch.no_grad():
        for model, col in ((teacher, "teacher_logprob"), (student, "student_logprob")):
            logprobs_LV = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
            expected = [logprobs_LV[t - 1, ids[t]].item() for t in range(1, len(ids))]
            assert [getattr(r, col) for r in rows] == pytest.approx(expected, abs=1e-5)
    assert rows[0].teacher_logprob != pytest.approx(rows[0].student_logprob)  # two different models

    with_prefix = A.score_side_by_side(teacher, student, tok, "5 .", prefix="What is 2 + 3 ?")
    assert [r.token for r in with_prefix] == ["5", "."]


def test_side_by_side_table_flags_large_gaps():
    rows = [A.TokenScore("<", -19.16, -0.07), A.TokenScore("think", -0.5, -0.4)]
    table = A.format_side_by_side(rows, flag_gap=5.0).splitlines()
    assert table[0].split() == ["token", "student", "teacher", "gap"]
    assert table[1].split() == ["'<'", "-0.07", "-19.16", "-19.09", "<--"]
    assert table[2].split() == ["'think'", "-0.40", "-0.50", "-0.10"]
