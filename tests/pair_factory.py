"""Tiny random-init pairs of real architectures, written with ``save_pretrained``, for the real-pair tests.

    dirs = write_pair(tmp_path, "qwen2")      # {"teacher": Path, "student": Path}, each with its own tokenizer

Each architecture gets its own byte-level BPE tokenizer (trained here on a small math corpus), its own special
tokens, EOS and chat template, mimicking the family it stands for:

    llama     <|begin_of_text|> ... <|eot_id|>   (Llama 3 headers), eos <|eot_id|>, untied head
    qwen2     <|im_start|> ... <|im_end|>        (ChatML), eos <|im_end|>, <think> </think> special, tied head,
              generation config stopping at <|im_end|> or <|endoftext|> (as Qwen2.5 does)
    gpt_neox  <|user|> ... <|assistant|> plain text, eos <|endoftext|>, the NeoX head (embed_out)

Embeddings are padded beyond the tokenizer (len(tokenizer) + 7 rows), as real checkpoints pad theirs.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Let's think step by step and output the final answer within \\boxed{}.",
    "The answer is \\boxed{\\frac{1}{2}} so #### 60 and A:19 is 2+3=5.",
    "What is 2 + 3? Find the number of integers x with x^2 < 10. Compute \\sqrt{3} + \\pi.",
    "Problem: a string of digits 0 1 2 3 4 5 6 7 8 9 has length 6; how many such strings?",
] * 4
PAD_ROWS = 7

FAMILIES = {
    "llama": {
        "special": ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None, "stops": ["<|eot_id|>"],
        "template": ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                     "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    },
    "qwen2": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "stops": ["<|im_end|>", "<|endoftext|>"],
        "template": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                     "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    },
    "gpt_neox": {
        "special": ["<|endoftext|>"],
        "bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None, "stops": ["<|endoftext|>"],
        "template": ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
    },
}


def make_tokenizer(family: str):
    """A PreTrainedTokenizerFast over a byte-level BPE trained on :data:`CORPUS`, with the family's tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    f = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=f["special"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f["bos"], eos_token=f["eos"],
                                   pad_token=f["pad"])
    fast.chat_template = f["template"]
    return fast


def model_config(family: str, vocab_rows: int, hidden: int, layers: int, tok):
    """A tiny config of the family with ``vocab_rows`` embedding rows."""
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = {"vocab_size": vocab_rows, "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": 2, "intermediate_size": 2 * hidden, "max_position_embeddings": 4096,
              "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if family == "llama":
        return LlamaConfig(num_key_value_heads=1, tie_word_embeddings=False, **common)
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **common)
    return GPTNeoXConfig(rotary_pct=0.25, tie_word_embeddings=False, **common)


def write_pair(root: Path, family: str, seed: int = 0) -> dict[str, Path]:
    """Teacher (hidden 48, 2 layers) and student (hidden 32, 1 layer) of ``family`` under ``root``, each saved
    with the tokenizer and a generation config stopping at the family's stop tokens."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = make_tokenizer(family)
    stops = [tok.convert_tokens_to_ids(s) for s in FAMILIES[family]["stops"]]
    out = {}
    for role, hidden, layers in (("teacher", 48, 2), ("student", 32, 1)):
        torch.manual_seed(seed + (role == "teacher"))
        model = AutoModelForCausalLM.from_config(model_config(family, len(tok) + PAD_ROWS, hidden, layers, tok))
        model.generation_config = GenerationConfig(eos_token_id=stops if len(stops) > 1 else stops[0],
                                                   bos_token_id=tok.bos_token_id,
                                                   pad_token_id=tok.pad_token_id or tok.eos_token_id)
        path = root / family / role
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[role] = path
    return out
