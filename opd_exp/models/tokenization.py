"""The embedded pair's tokenizer: one vocabulary for the math task and the text games, built with ``tokenizers``.

Pre-tokenisation splits text into runs of lowercase letters (one id per game word: rooms, objects, verbs,
the observation's words; :func:`opd_exp.tasks.games.vocabulary_words`) and single other characters (digits,
operators, punctuation, space), so the math task is tokenised character by character exactly as before (its
texts hold no lowercase letters: token counts equal character counts) and a game's text word by word.
Every special token (bos, eos, pad, the chat roles, the think delimiters) is one id. The vocabulary also
reserves an alternative convention (``<reason>``/``</reason>``, ``<|endoftext|>``) so that a mismatched pair
can share it while disagreeing on conventions, as in the paper's Fig. 5. A word or character outside the
vocabulary becomes ``<|unk|>``: :func:`unknown_pieces` names them and :func:`warn_unknown` warns once.

Rendered conversation (the chat template, ``add_generation_prompt=True``; a multi-turn task continues it with
``<|user|>observation<|assistant|>action<|im_end|>`` turns):

    <|bos|><|user|>Q:5+9-3+8=?<|assistant|>          <- prompt_ids
    <think>5+9=14;14-3=11;11+8=19</think>A:19<|im_end|>  <- target (the student's response)

The idea of a tiny vocabulary wrapped as a HF fast tokenizer follows nanochat's test byte tokenizer and the
HF "build a tokenizer from scratch" guide; the code is ours.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opd_exp.tasks.games import vocabulary_words

# ------------------------------------------------------------------------------------------------------------
# vocabulary

CHARS = list("0123456789+-=?;:QA .,")  # every character the math task's and the games' texts use
PIECE = r"[a-z]+|[^a-z]"  # pre-tokenisation: a run of lowercase letters, or any other single character
BOS, EOS, PAD, UNK = "<|bos|>", "<|im_end|>", "<|pad|>", "<|unk|>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# reserved for the mismatched pair (shared vocabulary, different conventions); unused by the default pair
ALT_THINK_OPEN, ALT_THINK_CLOSE, ALT_EOS = "<reason>", "</reason>", "<|endoftext|>"
SPECIALS = [PAD, BOS, EOS, UNK, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE, ALT_THINK_OPEN, ALT_THINK_CLOSE,
            ALT_EOS]


@dataclass(frozen=True)
class Convention:
    """How a model writes its response: think delimiters, the answer-line prefix and the end token.

    The default pair shares :data:`DEFAULT_CONVENTION`; a mismatched teacher uses another one over the same
    vocabulary (e.g. ``Convention("<reason>", "</reason>", "A:", "<|endoftext|>")``).
    """

    think_open: str = THINK_OPEN
    think_close: str = THINK_CLOSE
    answer_prefix: str = "A:"
    end: str = EOS


DEFAULT_CONVENTION = Convention()

# Jinja chat template: one user turn, the assistant's turns end with the end-of-turn token (eos).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ------------------------------------------------------------------------------------------------------------
# building


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The fast tokenizer: special tokens first, then one id per character, then one per game word.

    Left padding (generation batches prompts of different lengths); no automatic bos/eos (the chat
    template writes them), so ``tokenizer(text)`` encodes exactly the pieces of ``text``.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS + vocabulary_words())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # special tokens are matched before pre-tokenization
    core.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(PIECE), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, THINK_OPEN, THINK_CLOSE, ALT_THINK_OPEN, ALT_THINK_CLOSE,
                                   ALT_EOS],
        padding_side="left", model_max_length=512, clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def resolve_token_ids(tokenizer, tokens: list[str | int]) -> list[int]:
    """Token strings or ids -> ids; a string must be one token of ``tokenizer``'s vocabulary.

    Raises ValueError naming the first unknown token (a string outside the vocabulary, or an id outside
    ``[0, len(tokenizer))``).
    """
    vocab = tokenizer.get_vocab()
    size = len(tokenizer)
    ids = []
    for tok in tokens:
        if isinstance(tok, bool):
            raise ValueError(f"token {tok!r} is neither a token string nor an id")
        if isinstance(tok, int):
            if not 0 <= tok < size:
                raise ValueError(f"token id {tok} is outside the vocabulary (size {size})")
            ids.append(tok)
        elif isinstance(tok, str):
            if tok not in vocab:
                raise ValueError(f"token {tok!r} is not in the tokenizer's vocabulary "
                                 f"(special tokens: {', '.join(tokenizer.all_special_tokens)})")
            ids.append(vocab[tok])
        else:
            raise ValueError(f"token {tok!r} is neither a token string nor an id")
    return ids


def unknown_pieces(tokenizer, text: str) -> list[str]:
    """The pieces of ``text`` (words, characters; special tokens aside) that ``tokenizer`` maps to unk, sorted."""
    vocab = tokenizer.get_vocab()
    specials = "|".join(re.escape(t) for t in sorted(tokenizer.all_special_tokens, key=len, reverse=True))
    plain = re.sub(specials, "", text) if specials else text
    return sorted({p for p in re.findall(PIECE, plain) if p not in vocab})


def warn_unknown(tokenizer, texts, where: str) -> list[str]:
    """Warn once, naming them, when ``texts`` hold pieces outside the vocabulary (they silently become
    ``<|unk|>``); returns the unknown pieces."""
    unknown = sorted({p for text in texts for p in unknown_pieces(tokenizer, text)})
    if unknown:
        warnings.warn(f"{where}: {len(unknown)} pieces outside the embedded vocabulary become {UNK}: "
                      f"{', '.join(map(repr, unknown[:20]))}{' ...' if len(unknown) > 20 else ''}", stacklevel=2)
    return unknown
