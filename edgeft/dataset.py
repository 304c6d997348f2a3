"""Training data: JSONL rows rendered with the base model's chat template, loss on answers only.

Accepted row shapes (one JSON object per line):
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   loss on assistant turns
  {"prompt": "...", "completion": "..."}                                        loss on the completion
  {"text": "..."}                                                               loss on every token

A chat or prompt/completion row is rendered with the tokenizer's own chat template; each assistant turn
(including the end-of-turn token, so the model learns to stop) gets labels, everything else is -100.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeftError
from .inputs import parse_json
from .prompt import TemplateRefused, apply_template

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    line: int  # 1-based line in its file, for messages
    row: dict  # the source row, for generation-based checks on held-out prompts

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """Parse and shape-check a JSONL file; return (line number, row) pairs. Blank lines are skipped. Files
    from Windows tools (a UTF-8 BOM, CRLF line ends) read as they are; invalid UTF-8, lone surrogate
    escapes and JSON nested beyond the parser's depth are refused naming the line."""
    path = Path(path)
    if not path.is_file():
        raise EdgeftError(f"--data {path}: no such file; pass a JSONL file (one JSON object per line)")
    rows = []
    try:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = parse_json(line, f"{path}:{n}", "each line must be one JSON object in UTF-8")
                _check_shape(row, path, n)
                rows.append((n, row))
    except OSError as e:
        raise EdgeftError(f"--data {path}: cannot read it ({e.strerror})") from None
    if not rows:
        raise EdgeftError(f"{path}: the file has no rows; add JSON lines with 'messages', "
                          f"'prompt'+'completion' or 'text'")
    return rows


def _check_shape(row, path: Path, n: int) -> None:
    where = f"{path}:{n}"
    if not isinstance(row, dict):
        raise EdgeftError(f"{where}: a row must be a JSON object, not {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise EdgeftError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise EdgeftError(f"{where}: messages[{i}] needs string 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise EdgeftError(f"{where}: messages[{i}].role is '{m['role']}'; use system, user or assistant")
        if not any(m["role"] == "assistant" for m in msgs):
            raise EdgeftError(f"{where}: 'messages' has no assistant turn, so there is nothing to learn")
        first = next((i for i, m in enumerate(msgs) if m["role"] != "system"), None)
        if msgs[first]["role"] != "user":
            raise EdgeftError(f"{where}: messages[{first}] is an assistant turn with no user turn before it; a "
                              f"conversation starts with a user turn (after an optional system turn)")
    elif "prompt" in row or "completion" in row:
        if not (isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)):
            raise EdgeftError(f"{where}: a prompt/completion row needs both 'prompt' and 'completion' as strings")
        if not row["completion"]:
            raise EdgeftError(f"{where}: 'completion' is empty, so there is nothing to learn")
    elif "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise EdgeftError(f"{where}: 'text' must be a non-empty string")
    else:
        keys = ", ".join(sorted(row)) or "none"
        raise EdgeftError(f"{where}: row has neither 'messages', 'prompt'+'completion' nor 'text' (keys: {keys})")


def as_messages(row: dict) -> list[dict] | None:
    if "messages" in row:
        return row["messages"]
    if "prompt" in row:
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    return None


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return apply_template(tokenizer, messages, generation_prompt, tokenize=False)


def render(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row. The rendered chat is cut at turn boundaries: every piece before an
    assistant answer (rendered with the generation prompt, exactly what inference will feed) is context,
    the answer up to the next turn is trained. Pieces are tokenized separately, which is what makes the
    label boundary exact."""
    messages = as_messages(row)
    if messages is None:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return ids, list(ids)
    if not tokenizer.chat_template:
        # No template (a base model): prompt and answer joined plainly, answer + EOS trained.
        prompt = "".join(m["content"] + "\n" for m in messages if m["role"] != "assistant")
        answer = "".join(m["content"] for m in messages if m["role"] == "assistant")
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return p + a, [IGNORE] * len(p) + a
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the part of the rendered chat already tokenized
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[:i + 1], generation_prompt=False)
        if not (before.startswith(done) and through.startswith(before)):
            raise EdgeftError("the model's chat template does not render turns as a growing prefix; "
                              "train on 'text' rows rendered by you instead")
        context = tokenizer(before[len(done):], add_special_tokens=False)["input_ids"]
        answer = tokenizer(through[len(before):], add_special_tokens=False)["input_ids"]
        ids += context + answer
        labels += [IGNORE] * len(context) + answer
        done = through
    return ids, labels


def load_examples(path: str | Path, tokenizer, max_seq_len: int, strict: bool) -> tuple[list[Example], int]:
    """Tokenized examples and how many were truncated to max_seq_len (refused instead with strict)."""
    examples = []
    truncated = 0
    for n, row in read_rows(path):
        try:
            ids, labels = render(tokenizer, row)
        except TemplateRefused as e:
            raise EdgeftError(f"{path}:{n}: {e}") from None
        if len(ids) > max_seq_len:
            if strict:
                raise EdgeftError(f"{path}:{n}: row is {len(ids)} tokens, longer than max_seq_len {max_seq_len}; "
                                  f"raise --max-seq-len or drop --strict to truncate")
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            truncated += 1
        if not any(x != IGNORE for x in labels[1:]):
            raise EdgeftError(f"{path}:{n}: after truncation to {max_seq_len} tokens nothing is left to learn; "
                              f"raise --max-seq-len")
        examples.append(Example(ids, labels, n, row))
    return examples, truncated


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split: at least one example each side when there are two or more."""
    if not 0 <= fraction < 1:
        raise EdgeftError(f"--eval-split {fraction}: must be in [0, 1)")
    if fraction == 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    k = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    held = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
