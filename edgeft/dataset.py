"""Training data in the formats users have, rendered with the base model's chat template, loss on answers only.

Files (by name): .json (a list of rows, or {"tools": [...], "rows": [...]} to give every row the same
tools), .csv/.tsv (a header row; a cell holding a list, such as messages or tools, as JSON text),
.parquet, and JSON Lines (one row per line) for any other name. Row shapes:
  {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...], "tools": [...]}
      loss on assistant turns; an assistant turn may make "tool_calls" ([{"type": "function", "function":
      {"name", "arguments"}}]) instead of or beside its content, and "tool" turns hold their results
  {"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation"|"tool", "value"}],
   "system", "tools"}                                     ShareGPT (function_call: a call as JSON; observation:
                                                          its result), loss on gpt and function_call turns
  {"instruction", "input", "output", "system", "history"} Alpaca (input joined to the instruction after a
                                                          blank line; history: earlier [user, assistant] pairs)
  {"prompt": "...", "completion": "..."}                  loss on the completion
  {"text": "..."}                                         loss on every token
A field mapping (`columns: {prompt: question, completion: answer}` in the train config, or `--columns
prompt=question,completion=answer`) renames a file's own columns to these fields first.

A chat row is rendered with the tokenizer's own chat template, given the row's (or the file's) `tools`;
each assistant turn, its text and its tool calls, including the end-of-turn token (so the model learns to
stop) gets labels; system, user and tool-result turns are context (-100). A row with tools or tool calls
is refused, naming it, when the template renders neither (most templates without tool support drop them
silently).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeftError, first_line
from .inputs import decode_utf8, parse_json, parse_json_rows
from .prompt import TemplateRefused, apply_template
from .scoring import model_bos
from .templates import plain_prompt


IGNORE = -100
# The fields a row may have, which --columns maps a file's own columns to.
FIELDS = ("messages", "conversations", "tools", "system", "instruction", "input", "output", "history", "prompt",
          "completion", "text")
DEMO_DATA = "demo"  # --data demo: the shipped demo dataset (edgeft/data/demo.jsonl)
# --data NAME for the datasets shipped in edgeft/data/ (one per shipped task, so two adapters can share a base).
SHIPPED_DATA = {DEMO_DATA: "demo.jsonl", "dates": "dates.jsonl"}
SHAPES = "'messages', 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca), 'prompt'+'completion' or 'text'"
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
            "function_call": "assistant", "observation": "tool", "tool": "tool"}
PARQUET = (".parquet", ".pq")
_LISTS = ("messages", "conversations", "history", "tools")  # fields that hold lists
NO_TOOLS = "use a base whose chat template supports tools (e.g. Qwen2.5, Llama 3.1)"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    line: int  # 1-based line in its file (row for Parquet), for messages
    row: dict  # the row in this module's shape, for generation-based checks on held-out prompts

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def place(path: str | Path, n: int) -> str:
    """Where a row is, as messages name it: file:line (a Parquet file has rows, not lines)."""
    return f"{path}:row {n}" if Path(path).suffix.lower() in PARQUET else f"{path}:{n}"


def column_map(value) -> dict[str, str]:
    """The field mapping as {field: the file's column}, from a config file's mapping or --columns'
    FIELD=COLUMN pairs (comma-separated)."""
    if not value:
        return {}
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        pairs = {}
        for item in value:
            key, eq, column = str(item).partition("=")
            if not (eq and key.strip() and column.strip()):
                raise EdgeftError(f"--columns {item!r}: write FIELD=COLUMN pairs separated by commas, e.g. "
                                  f"prompt=question,completion=answer")
            pairs[key.strip()] = column.strip()
        value = pairs
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise EdgeftError("columns: must map fields to your file's columns, e.g. "
                          "{prompt: question, completion: answer}")
    for key, column in value.items():
        if key not in FIELDS:
            hint = f" (did you mean {column}={key}?)" if column in FIELDS else ""
            raise EdgeftError(f"--columns {key}={column}: '{key}' is not a field edgeft reads; write FIELD=COLUMN with "
                              f"FIELD one of {', '.join(FIELDS)}{hint}")
    if len(set(value.values())) < len(value):
        raise EdgeftError(f"--columns {value}: one column is mapped to two fields; map each column once")
    return dict(value)


# ------------------------------------------------------------------------------------------------ files
def read_rows(path: str | Path, columns=None) -> list[tuple[int, dict]]:
    """Read and shape-check a data file; return (line, row) pairs with each row in this module's shape
    (see shape()). Blank lines are skipped. Files from Windows tools (a UTF-8 BOM, CRLF line ends) read as
    they are; invalid UTF-8, lone surrogate escapes and JSON nested beyond the parser's depth are refused
    naming the line (the row, for Parquet)."""
    path = Path(path)
    if not path.is_file():
        raise EdgeftError(f"--data {path}: no such file; pass a JSONL, JSON, CSV or Parquet file of training rows")
    columns = column_map(columns)
    suffix = path.suffix.lower()
    tools = None
    try:
        if suffix in PARQUET:
            raw = _parquet_rows(path)
        elif suffix in (".csv", ".tsv"):
            raw = _csv_rows(path, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".json" and (found := parse_json_rows(path.read_bytes(), str(path), _JSON_FIX)) is not None:
            raw, settings = found
            tools = _tools(settings.get("tools"), f"{path}: 'tools'")
        else:  # JSON Lines, also under a .json name
            raw = _jsonl_rows(path)
    except OSError as e:
        raise EdgeftError(f"--data {path}: cannot read it ({e.strerror or first_line(e)})") from None
    if columns:  # a mapped column no row has is a typo, not a field to leave out: found before any row is read
        raw = list(raw)
        present = {key for _, row in raw if isinstance(row, dict) for key in row}
        absent = next(((f, col) for f, col in columns.items() if col not in present), None)
        if absent is not None and present:
            raise EdgeftError(f"--columns {absent[0]}={absent[1]}: {path} has no column '{absent[1]}' (its columns: "
                              f"{', '.join(sorted(map(str, present))[:12])}); map to one of them")
    rows = [(n, shape(row, place(path, n), columns, tools)) for n, row in raw]
    if not rows:
        raise EdgeftError(f"{path}: the file has no rows; add rows with {SHAPES}")
    return rows


_JSON_FIX = "a .json file holds a list of rows (or {\"tools\": [...], \"rows\": [...]})"


def _jsonl_rows(path: Path) -> list[tuple[int, object]]:
    rows = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rows.append((n, parse_json(line, f"{path}:{n}", "each line must be one JSON object in UTF-8")))
    return rows


def _csv_rows(path: Path, delimiter: str) -> list[tuple[int, dict]]:
    """Rows of a CSV file with a header, each numbered by the line it starts on (a quoted cell may span
    lines). Every cell is text."""
    import csv
    import io

    text = decode_utf8(path.read_bytes(), str(path), "save the file as UTF-8", by_line=True)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    try:
        header = [h.strip() for h in next(reader, [])]
        twice = next((h for h in header if header.count(h) > 1), None)
        if twice is not None:
            raise EdgeftError(f"{path}:1: the header names the column '{twice}' twice; rename one")
        start = reader.line_num + 1
        for record in reader:
            n, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in record):
                continue
            if len(record) != len(header):
                raise EdgeftError(f"{path}:{n}: {len(record)} cells where the header has {len(header)}; quote cells "
                                  f"that hold {'a tab' if delimiter == chr(9) else 'a comma'} or a line break")
            rows.append((n, dict(zip(header, record))))
    except csv.Error as e:
        raise EdgeftError(f"{path}:{reader.line_num}: not valid CSV ({e}); quote cells as spreadsheets "
                          f"export them") from None
    return rows


def _parquet_rows(path: Path) -> list[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[tuple[int, dict]] = []
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            rows += enumerate(batch.to_pylist(), len(rows) + 1)
    except (pa.ArrowException, OSError, ValueError, TypeError, UnicodeDecodeError) as e:
        raise EdgeftError(f"{path}: cannot read it as Parquet after {len(rows)} rows ({first_line(e)}); the file is "
                          f"damaged or not Parquet: write it again (pandas: df.to_parquet(path))") from None
    return rows


# ------------------------------------------------------------------------------------------------- rows
def shape(row, where: str, columns: dict[str, str] | None = None, tools: list[dict] | None = None) -> dict:
    """One row of any accepted shape (see the module docstring) in the shape the rest of edgeft reads:
    {"messages": [...], "tools"?: [...]}, {"prompt", "completion", "tools"?} or {"text"}. `columns`
    renames the file's columns first; `tools` are the file's, for rows that give none."""
    if not isinstance(row, dict):
        raise EdgeftError(f"{where}: a row must be a JSON object, not {type(row).__name__}")
    if columns:  # built anew, so that swapped names (input=output, output=input) work
        moved = set(columns.values())
        row = {**{k: v for k, v in row.items() if k not in moved},
               **{key: row[column] for key, column in columns.items() if column in row}}
    # A table holds every column in every row: a null (Parquet, JSON) is a field the row does not have, and
    # so is an empty cell where a CSV file holds a list as JSON text.
    row = {k: v for k, v in row.items() if v is not None and not (k in _LISTS and isinstance(v, str) and not v.strip())}
    for key in _LISTS:
        if isinstance(row.get(key), str):  # CSV and Parquet cells, and some exports, hold lists as JSON text
            row = {**row, key: parse_json(row[key], f"{where}: '{key}'", f"'{key}' must be a JSON list")}
    tools = _tools(row["tools"], f"{where}: 'tools'") if "tools" in row else tools
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        messages = _conversation(row[key], where, key)
        system = row.get("system")
        if system is not None and not isinstance(system, str):
            raise EdgeftError(f"{where}: 'system' must be a string")
        if system and messages[0]["role"] == "system":
            raise EdgeftError(f"{where}: both 'system' and a system turn in '{key}'; keep one")
        out: dict = {"messages": ([{"role": "system", "content": system}] if system else []) + messages}
    elif "instruction" in row or "output" in row:
        out = {"messages": _alpaca(row, where)}
    elif "prompt" in row or "completion" in row:
        if not (isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)):
            raise EdgeftError(f"{where}: a prompt/completion row needs both 'prompt' and 'completion' as strings")
        if not row["completion"]:
            raise EdgeftError(f"{where}: 'completion' is empty, so there is nothing to learn")
        out = {"prompt": row["prompt"], "completion": row["completion"]}
    elif "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise EdgeftError(f"{where}: 'text' must be a non-empty string")
        return {"text": row["text"]}
    else:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise EdgeftError(f"{where}: row has neither {SHAPES.replace(' or ', ' nor ')} (keys: {keys}); name your "
                          f"columns' fields with --columns FIELD=COLUMN, e.g. prompt=question,completion=answer")
    if tools:
        out["tools"] = tools
    return out


def _alpaca(row: dict, where: str) -> list[dict]:
    instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
    if not (isinstance(instruction, str) and isinstance(output, str) and isinstance(extra, str)):
        raise EdgeftError(f"{where}: an Alpaca row needs 'instruction' and 'output' as strings ('input' optional)")
    if not output:
        raise EdgeftError(f"{where}: 'output' is empty, so there is nothing to learn")
    system, history = row.get("system") or "", row.get("history") or []
    if not isinstance(system, str):
        raise EdgeftError(f"{where}: 'system' must be a string")
    if not (isinstance(history, list) and all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h)
                                              for h in history)):
        raise EdgeftError(f"{where}: 'history' must be a list of [instruction, answer] pairs of strings")
    messages = [{"role": "system", "content": system}] if system else []
    for asked, answered in history:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _conversation(turns, where: str, key: str) -> list[dict]:
    """The turns of a messages (role/content) or ShareGPT (from/value) list, checked as a conversation."""
    if not isinstance(turns, list) or not turns:
        raise EdgeftError(f"{where}: '{key}' must be a non-empty list of {{role, content}} objects")
    messages = [_turn(t, f"{where}: {key}[{i}]") for i, t in enumerate(turns)]
    if not any(m["role"] == "assistant" for m in messages):
        raise EdgeftError(f"{where}: '{key}' has no assistant turn, so there is nothing to learn")
    first = next(i for i, m in enumerate(messages) if m["role"] != "system")
    if messages[first]["role"] != "user":
        role = messages[first]["role"]
        raise EdgeftError(f"{where}: {key}[{first}] is {'an' if role == 'assistant' else 'a'} {role} turn with no "
                          f"user turn before it; a conversation starts with a user turn (after an optional system "
                          f"turn)")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m.get("tool_calls") and not m["content"].strip():
            # trained on, it teaches the model to end its turn at once (an empty completion is refused too)
            raise EdgeftError(f"{where}: {key}[{i}] is an empty assistant turn, so it would teach an empty answer; "
                              f"write its answer or drop the turn")
        before = messages[i - 1] if i else {}
        if m["role"] == "tool" and not (before.get("role") == "tool" or before.get("tool_calls")):
            raise EdgeftError(f"{where}: {key}[{i}] is a tool result with no tool call before it; put the assistant "
                              f"turn that calls the tool (tool_calls, or ShareGPT's function_call) before its results")
    return messages


def _turn(t, at: str) -> dict:
    if isinstance(t, dict) and "role" not in t and "from" in t:  # ShareGPT
        src = t["from"]
        if not isinstance(src, str) or src not in SHAREGPT:
            raise EdgeftError(f"{at}.from is {src!r}; use {', '.join(SHAREGPT)}")
        if src == "function_call":
            t = {"role": "assistant", "content": "", "tool_calls": t.get("value")}
        else:
            t = {"role": SHAREGPT[src], "content": t.get("value")}
    if not (isinstance(t, dict) and isinstance(t.get("role"), str)):
        raise EdgeftError(f"{at} needs string 'role' and 'content' (or ShareGPT's 'from' and 'value')")
    role, content, calls = t["role"], t.get("content"), t.get("tool_calls")
    if role not in ROLES:
        raise EdgeftError(f"{at}.role is '{role}'; use system, user, assistant or tool")
    if calls is not None and calls != []:
        if role != "assistant":
            raise EdgeftError(f"{at}: a {role} turn has tool_calls; only assistant turns call tools")
        if content is not None and not isinstance(content, str):
            raise EdgeftError(f"{at}: 'content' must be a string (or null beside tool_calls)")
        return {"role": role, "content": content or "", "tool_calls": _calls(calls, f"{at}.tool_calls")}
    if not isinstance(content, str):
        raise EdgeftError(f"{at} needs string 'role' and 'content'")
    out = {"role": role, "content": content}
    out.update({k: t[k] for k in ("name", "tool_call_id") if isinstance(t.get(k), str)})  # which call a result answers
    return out


def _calls(value, at: str) -> list[dict]:
    """Tool calls in the shape chat templates read: [{"type": "function", "function": {"name", "arguments":
    an object}}] (arguments given as JSON text, as OpenAI's API returns them, are parsed: templates write
    them with tojson, which would quote the text again)."""
    fix = 'a call is {"name": "...", "arguments": {...}}'
    if isinstance(value, str):
        value = parse_json(value, at, fix)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise EdgeftError(f"{at}: must be a list of tool calls; {fix}")
    out = []
    for j, call in enumerate(value):
        fn = call.get("function", call) if isinstance(call, dict) else None
        name, args = (fn.get("name"), fn.get("arguments", {})) if isinstance(fn, dict) else (None, None)
        if isinstance(args, str):
            args = parse_json(args, f"{at}[{j}].arguments", "arguments must be a JSON object")
        if not (isinstance(name, str) and name and isinstance(args, dict)):
            raise EdgeftError(f"{at}[{j}] needs a 'name' and 'arguments' (an object); {fix}")
        out.append({"type": "function", "function": {"name": name, "arguments": args},
                    **({"id": call["id"]} if isinstance(call.get("id"), str) else {})})
    return out


def _tools(value, at: str) -> list[dict] | None:
    """Function schemas ({name, description, parameters}, bare or as {"type": "function", "function": ...})
    in the second form, which every tool-aware template reads."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        value = parse_json(value, at, "'tools' must be a JSON list of function schemas")
    if isinstance(value, dict):
        value = [value]
    out = []
    for t in value if isinstance(value, list) else [None]:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise EdgeftError(f"{at}: must be a list of function schemas, each with a 'name' (and 'description', "
                              f"'parameters')")
        out.append({**t, "type": "function", "function": fn} if "function" in t else {"type": "function",
                                                                                      "function": fn})
    return out


def as_messages(row: dict) -> list[dict] | None:
    if "messages" in row:
        return row["messages"]
    if "prompt" in row:
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    return None


def tools_of(row: dict) -> list[dict] | None:
    """The function schemas a chat row is rendered with (None: no tools)."""
    return row.get("tools")


def _render(tokenizer, messages: list[dict], generation_prompt: bool, tools: list[dict] | None) -> str:
    return apply_template(tokenizer, messages, generation_prompt, tokenize=False, tools=tools)


def render(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row. The rendered chat is cut at turn boundaries: every piece before an
    assistant answer (rendered with the generation prompt, exactly what inference will feed) is context,
    the answer up to the next turn is trained. Pieces are tokenized separately, which is what makes the
    label boundary exact. Tool results fall in the context before the next assistant turn."""
    messages, tools = as_messages(row), tools_of(row)
    # Rows rendered without a chat template start with the BOS the tokenizer adds to every text (Gemma, Llama),
    # as llama.cpp and transformers put it in front of a prompt; it is context, never a target. A template
    # writes its own BOS (bos_token in the template), so templated rows are left as rendered.
    head = [] if (bos := model_bos(tokenizer)) is None else [bos]
    if messages is None:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return head + ids, [IGNORE] * len(head) + ids
    uses_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if not tokenizer.chat_template:
        if uses_tools:
            raise TemplateRefused(f"the model has no chat template, so tools and tool calls cannot be rendered; "
                                  f"{NO_TOOLS}")
        # No template (a base model): prompt and answer joined plainly, answer + EOS trained.
        p = plain_prompt(tokenizer, messages)  # the same ids the sample prompt and the Modelfile's TEMPLATE give
        answer = "".join(m["content"] for m in messages if m["role"] == "assistant")
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return p + a, [IGNORE] * len(p) + a
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the part of the rendered chat already tokenized
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, tools)
        through = _render(tokenizer, messages[:i + 1], False, tools)
        if not (before.startswith(done) and through.startswith(before)):
            raise TemplateRefused(f"the model's chat template does not render turns as a growing prefix (at "
                                  f"turn {i}, an assistant turn); fix the template (--chat-template) or train on "
                                  f"'text' rows rendered by you instead")
        turn = through[len(before):]
        if m["content"].strip() and not turn.strip():
            raise TemplateRefused(f"the model's chat template drops turn {i} (an assistant turn renders as nothing), "
                                  f"so there is nothing to learn; fix the template (--chat-template) or train on "
                                  f"'text' rows rendered by you instead")
        # A template without tool support renders a calling turn as empty content: training on that
        # would teach the model to say nothing.
        missing = next((c["function"]["name"] for c in m.get("tool_calls", ()) if c["function"]["name"] not in turn),
                       None)
        if missing:
            raise TemplateRefused(f"the model's chat template does not render tool calls ('{missing}' is not in the "
                                  f"assistant's rendered turn); {NO_TOOLS}")
        context = tokenizer(before[len(done):], add_special_tokens=False)["input_ids"]
        answer = tokenizer(turn, add_special_tokens=False)["input_ids"]
        ids += context + answer
        labels += [IGNORE] * len(context) + answer
        done = through
    ignored = next((t["function"]["name"] for t in tools or () if t["function"]["name"] not in done), None)
    if ignored:
        raise TemplateRefused(f"the model's chat template ignores 'tools' ('{ignored}' is not in the rendered "
                              f"conversation); {NO_TOOLS}")
    return ids, labels


def shipped_data_path(name: str) -> Path:
    return Path(__file__).parent / "data" / SHIPPED_DATA[name]


def demo_data_path() -> Path:
    return shipped_data_path(DEMO_DATA)


def data_file(data: str) -> Path:
    """What --data names: a shipped dataset (demo, dates) or a file."""
    return shipped_data_path(data) if data in SHIPPED_DATA else Path(data)


def load_examples(path: str | Path, tokenizer, max_seq_len: int, strict: bool, columns=None
                  ) -> tuple[list[Example], int]:
    """Tokenized examples and how many were truncated to max_seq_len (refused instead with strict).
    `columns`: the field mapping (see column_map)."""
    examples = []
    truncated = 0
    for n, row in read_rows(path, columns):
        where = place(path, n)
        try:
            ids, labels = render(tokenizer, row)
        except TemplateRefused as e:
            raise EdgeftError(f"{where}: {e}") from None
        if len(ids) > max_seq_len:
            if strict:
                raise EdgeftError(f"{where}: row is {len(ids)} tokens, longer than max_seq_len {max_seq_len}; "
                                  f"raise --max-seq-len or drop --strict to truncate")
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            truncated += 1
        if not any(x != IGNORE for x in labels[1:]):
            raise EdgeftError(f"{where}: after truncation to {max_seq_len} tokens nothing is left to learn; "
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
