"""The character tokenizer: round trips, single-id special tokens, chat template, id resolution."""

import pytest

from opd_exp.config import TaskConfig
from opd_exp.models.tokenization import (
    ASSISTANT,
    BOS,
    CHARS,
    EOS,
    PAD,
    SPECIALS,
    THINK_CLOSE,
    THINK_OPEN,
    USER,
    build_tokenizer,
    resolve_token_ids,
)
from opd_exp.tasks.games import vocabulary_words
from opd_exp.tasks.math import MathTask


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_vocabulary_is_small_and_complete(tok):
    assert len(tok) == len(SPECIALS) + len(CHARS) + len(vocabulary_words())
    assert 100 <= len(tok) <= 200  # one vocabulary for math (characters) and the games (words)
    assert tok.padding_side == "left"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)


@pytest.mark.parametrize("special", SPECIALS)
def test_special_tokens_are_single_ids(tok, special):
    ids = tok(special, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and ids[0] == tok.convert_tokens_to_ids(special)
    assert tok.decode(ids) == special


def test_round_trip_of_task_texts(tok):
    task = MathTask(TaskConfig(n_train=50, n_eval=10, eval_splits={"id": {}, "wide": {"max_operand": 15}}))
    for ex in task.train[:20] + task.eval_splits["wide"]:
        for text in (ex.question, task.target_text(ex), task.prompt_text(tok, ex)):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
            assert tok.unk_token_id not in ids
    # one token per character outside special tokens
    text = "5+9=14;14-3=11"
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == len(text)


def test_chat_template_renders_prompt_and_turn(tok):
    msgs = [{"role": "user", "content": "Q:1+2=?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt == f"{BOS}{USER}Q:1+2=?{ASSISTANT}"
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": f"{THINK_OPEN}1+2=3{THINK_CLOSE}A:3"}],
                                   tokenize=False)
    assert full.endswith(f"A:3{EOS}")
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False).endswith(ASSISTANT)


def test_left_padding_batch(tok):
    batch = tok(["1", "1+2"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1]


def test_save_and_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = f"{THINK_OPEN}5+9=14{THINK_CLOSE}A:14{EOS}"
    assert again(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert again.chat_template == tok.chat_template


def test_resolve_token_ids(tok):
    assert resolve_token_ids(tok, [THINK_OPEN, 3, EOS]) == [tok.convert_tokens_to_ids(THINK_OPEN), 3, tok.eos_token_id]
    assert resolve_token_ids(tok, []) == []
    with pytest.raises(ValueError, match="<nope>"):
        resolve_token_ids(tok, ["<nope>"])
    with pytest.raises(ValueError, match="999"):
        resolve_token_ids(tok, [999])
    with pytest.raises(ValueError, match="-1"):
        resolve_token_ids(tok, [-1])
    with pytest.raises(ValueError):
        resolve_token_ids(tok, [1.5])
