"""The fixed chat prompt asked of every artifact and every board, rendered with the model's own template.

One prompt, rendered one way (the HF chat template, generation prompt added), and sent to every backend
as token ids: llama.cpp, onnxruntime and the board never guess the template themselves, so their greedy
answers are comparable token for token.
"""

from __future__ import annotations

CHAT_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def prompt_ids(tokenizer) -> list[int]:
    return list(tokenizer.apply_chat_template(CHAT_PROMPT, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def prompt_text() -> str:
    """The question as a person reads it (for the ledger)."""
    return CHAT_PROMPT[-1]["content"]


def answer_ok(text: str) -> bool:
    """The sample-answer check every backend shares: some text, and valid UTF-8 (no replacement chars)."""
    return bool(text.strip()) and "\ufffd" not in text
