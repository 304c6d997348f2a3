"""The fixed chat prompt asked of every artifact and every board, rendered with the model's own template.

One prompt, rendered one way (the HF chat template, generation prompt added), and sent to every backend
as token ids: llama.cpp, onnxruntime and the board never guess the template themselves, so their greedy
answers are comparable token for token.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from .errors import EdgeftError, first_line

CHAT_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


class TemplateRefused(EdgeftError):
    """The chat template raised on this conversation (its own check, e.g. "roles must alternate"); the
    caller names the row."""


def apply_template(tokenizer, messages: list[dict], generation_prompt: bool, tokenize: bool,
                   tools: list[dict] | None = None):
    """The tokenizer's chat template applied (with the function schemas `tools` for a function-calling
    conversation), its failures as one-line errors: a template that does not parse or crashes is the model
    folder's fault, a raise_exception() in it refuses the conversation."""
    from jinja2 import TemplateError, TemplateSyntaxError

    from .templates import NO_TEMPLATE

    if not tokenizer.chat_template:
        raise EdgeftError(f"{tokenizer.name_or_path}: {NO_TEMPLATE}")
    try:
        with _time_limit(RENDER_SECONDS):
            out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=tokenize,
                                                **({"return_dict": True} if tokenize else {}),
                                                **({"tools": tools} if tools else {}))
    except _TooSlow:
        raise EdgeftError(f"{tokenizer.name_or_path}: its chat template did not render one conversation in "
                          f"{RENDER_SECONDS} s (a loop that never ends?); fix chat_template in the model folder") from None
    except TemplateSyntaxError as e:
        raise EdgeftError(f"{tokenizer.name_or_path}: its chat template does not parse ({first_line(e)}, template "
                          f"line {e.lineno}); fix chat_template in the model folder") from None
    except TemplateError as e:
        raise TemplateRefused(f"the model's chat template refuses this conversation ({first_line(e)})") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise EdgeftError(f"{tokenizer.name_or_path}: its chat template fails ({type(e).__name__}: "
                          f"{first_line(e)}); fix chat_template in the model folder") from None
    out = out["input_ids"] if tokenize else out
    if len(out) > RENDER_LENGTH:
        raise EdgeftError(f"{tokenizer.name_or_path}: its chat template rendered one conversation as {len(out):,} "
                          f"{'tokens' if tokenize else 'characters'}, more than {RENDER_LENGTH:,} (a loop that writes "
                          f"without end?); fix chat_template in the model folder")
    return out


# A chat template is code from the model folder: Jinja's sandbox keeps it from the system, but not from looping
# for hours (nested range() loops). One conversation renders in milliseconds; this is far past any real one.
RENDER_SECONDS = 10
# And not past this length (characters, or tokens): far beyond any conversation a small model takes (128k tokens
# of context is about 500k characters), and before a template's output is handed to the tokenizer.
RENDER_LENGTH = 4_000_000


class _TooSlow(Exception):
    pass


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Interrupt the Python code inside (Jinja renders in Python) after `seconds`; in the main thread only, where
    signals are delivered (elsewhere: no limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise _TooSlow

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def prompt_ids(tokenizer) -> list[int]:
    """The fixed prompt's ids: with the model's chat template, or plainly for a base model without one (as train
    renders its rows, templates.plain_prompt)."""
    from .templates import plain_prompt

    if not tokenizer.chat_template:
        return plain_prompt(tokenizer, CHAT_PROMPT)
    return list(apply_template(tokenizer, CHAT_PROMPT, generation_prompt=True, tokenize=True))


def prompt_text() -> str:
    """The question as a person reads it (for the ledger)."""
    return CHAT_PROMPT[-1]["content"]


def answer_ok(text: str) -> bool:
    """The sample-answer check every backend shares: some text, and valid UTF-8 (no replacement chars)."""
    return bool(text.strip()) and "\ufffd" not in text
