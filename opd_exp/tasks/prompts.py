"""A task's prompt through the pair's chat template: the rendered text and its token ids."""

from __future__ import annotations


def user_prompt_text(tokenizer, content: str) -> str:
    """``content`` as one user turn of the tokenizer's chat template, ending with the assistant's generation
    prompt (the template writes bos and every special token)."""
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of an already rendered prompt (no special tokens added: the template wrote them)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
