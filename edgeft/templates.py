"""Chat templates for a model that has none (most hub base models), and the plain rendering used without one.

Without a chat template, train renders a chat or prompt/completion row plainly: every prompt turn's text followed
by a newline, then the answer and EOS (dataset.render). The fixed sample prompt, the task's exact-answer prompts
and the Modelfile use the same plain rendering, so a base model goes through the chain as it was trained. A
conversation (edgeft chat, tools) needs a real template: `train --chat-template NAME|FILE` gives the base one
(a named built-in or a Jinja file), which train stores with the adapter's tokenizer; merge copies that tokenizer,
so export, the GGUF's tokenizer.chat_template, the Modelfile and chat all use it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import EdgeftError

# ChatML as Qwen and SmolLM write it (no default system turn).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
BUILTIN = {"chatml": CHATML}
MAX_BYTES = 256 * 1024  # hub templates are a few KiB; a larger file is not a template

NO_TEMPLATE = ("the model has no chat template (a base model); train it with --chat-template chatml (or a Jinja "
               "file), which every later step then uses")


def load(spec: str) -> str:
    """--chat-template: a built-in name or a Jinja file, checked to parse (in Jinja's sandbox, as transformers
    renders templates) before anything is trained with it."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec)
    if not path.is_file():
        raise EdgeftError(f"--chat-template {spec}: neither a built-in ({', '.join(BUILTIN)}) nor a file; name one or "
                          f"give the path of a Jinja template")
    if path.stat().st_size > MAX_BYTES:
        raise EdgeftError(f"--chat-template {spec}: {path.stat().st_size:,} bytes, more than a chat template's "
                          f"{MAX_BYTES:,}; give the template file itself")
    try:
        text = path.read_text(encoding="utf-8")
        ImmutableSandboxedEnvironment().parse(text)
    except UnicodeDecodeError:
        raise EdgeftError(f"--chat-template {spec}: not UTF-8 text; give a Jinja template file") from None
    except TemplateSyntaxError as e:
        raise EdgeftError(f"--chat-template {spec}: line {e.lineno}: {e.message}; fix the template") from None
    if "messages" not in text:
        raise EdgeftError(f"--chat-template {spec}: the template never reads `messages`; a chat template renders "
                          f"them (see the built-in chatml)")
    return text


def plain_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation's prompt rendered without a template, as train renders a base model's rows (dataset.render):
    the BOS the tokenizer adds to every text, if any, then each turn that is not the assistant's, followed by a
    newline."""
    from .scoring import model_bos

    head = [] if (bos := model_bos(tokenizer)) is None else [bos]
    text = "".join(m["content"] + "\n" for m in messages if m["role"] != "assistant")
    return head + tokenizer(text, add_special_tokens=False)["input_ids"]
