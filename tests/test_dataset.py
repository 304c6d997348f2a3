"""Training data as users hand it over: JSONL, JSON, CSV and Parquet files; messages, ShareGPT, Alpaca and
function-calling rows; a field mapping. Files from Windows tools train, hostile and careless rows are one
line naming the file and line (row, for Parquet), and fuzzed files never give a traceback."""

import codecs
import csv
import io
import json
import random
import shutil

import pytest
import yaml
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.dataset import IGNORE, column_map, load_examples, read_rows
from edgeft.errors import EdgeftError

from .conftest import WINDOW, assert_one_line_error


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from edgeft.models import load_tokenizer

    return load_tokenizer(tiny_llama)


SYSTEM_CHAT = {"messages": [{"role": "system", "content": "Answer in one word."},
                            {"role": "user", "content": "Capital of France?"},
                            {"role": "assistant", "content": "Paris"}]}


def test_a_windows_file_with_bom_crlf_and_a_system_turn_reads_as_written(tmp_path, tokenizer):
    unix = tmp_path / "unix.jsonl"
    unix.write_text(json.dumps(SYSTEM_CHAT) + "\n")
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(codecs.BOM_UTF8 + (json.dumps(SYSTEM_CHAT, ensure_ascii=False) + "\r\n").encode() * 2)
    (a,), _ = load_examples(unix, tokenizer, 256, strict=True)
    b, _ = load_examples(windows, tokenizer, 256, strict=True)
    assert [e.input_ids for e in b] == [a.input_ids] * 2 and b[0].labels == a.labels


@pytest.mark.parametrize("data,needle", [
    (b'{"text": "caf\xe9"}\n', "bad.jsonl:1: not UTF-8 text (byte 13)"),
    (b'{"prompt": "a", "completion": "\\udc00"}\n', "bad.jsonl:1: completion is not valid Unicode"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "bad.jsonl:1: JSON nested too deeply"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(),
     "bad.jsonl:1: messages[0] is an assistant turn with no user turn before it"),
    (json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"},
                              {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}).encode(),
     "bad.jsonl:1: messages[1] is an assistant turn"),
    (b'{"text": "ok"}\n\n{"messages": 5}\n', "bad.jsonl:3: 'messages' must be a non-empty list"),
])
def test_hostile_and_careless_rows_are_one_line_naming_file_and_line(tmp_path, tokenizer, data, needle):
    (tmp_path / "bad.jsonl").write_bytes(data)
    with pytest.raises(EdgeftError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_examples(tmp_path / "bad.jsonl", tokenizer, 256, strict=False)


def test_a_chat_template_that_refuses_a_conversation_names_the_row(tmp_path, tiny_llama):
    """A template's own check (Llama 3 and Mistral raise "roles must alternate") is the row's problem; a
    template that does not parse is the model folder's."""
    import shutil

    from edgeft.models import load_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    template = "{% if messages[1]['role'] == messages[2]['role'] %}{{ raise_exception('roles must alternate') }}" \
               "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (folder / "chat_template.jinja").write_text(template)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                             {"role": "user", "content": "c"},
                                             {"role": "assistant", "content": "d"}]}) + "\n")
    with pytest.raises(EdgeftError, match=r"rows.jsonl:1: the model's chat template refuses this conversation "
                                          r"\(roles must alternate\)"):
        load_examples(rows, load_tokenizer(folder), 256, strict=False)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(EdgeftError, match="its chat template does not parse"):
        load_examples(rows, load_tokenizer(folder), 256, strict=False)


@pytest.mark.parametrize("suffix,files", [(".jsonl", 400), (".json", 150)])
def test_fuzzed_files_train_or_fail_in_one_line(tmp_path, tokenizer, suffix, files):
    """Seeded, bounded: files (JSON Lines, and JSON lists) from valid rows of every shape, with bytes flipped,
    lines cut, values swapped for other JSON, BOMs, NULs and surrogates: each loads or is one line naming file
    and line."""
    rng = random.Random(3)
    rows = [SYSTEM_CHAT, {"prompt": "2+2?", "completion": "4"}, {"text": "plain text"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"instruction": "Say hi", "input": "", "output": "hi", "history": [["a", "b"]]},
            {"system": "s", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    weird = [None, 1, -1.5, True, "", " ", [], {}, [[]], "\u0000", "\ud800", "x" * 2000, {"role": "user"},
             [{"role": "tool", "content": "x"}], "\u202e\ufeff", {"from": "function_call", "value": "{"},
             [{"type": "function", "function": {"name": "f"}}], {"name": "f", "arguments": "[]"}, "[{}]"]

    def damage(row):
        row = json.loads(json.dumps(row))
        node = row
        while True:  # replace one value somewhere inside the row
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                return row
            key = rng.choice(keys)
            if rng.random() < 0.5 or not isinstance(node[key], (dict, list)):
                node[key] = rng.choice(weird)
                return row
            node = node[key]

    outcomes = {"loaded": 0, "refused": 0}
    for i in range(files):
        lines = []
        for _ in range(rng.randint(1, 4)):
            row = rng.choice(rows)
            lines.append(json.dumps(damage(row) if rng.random() < 0.5 else row, ensure_ascii=rng.random() < 0.5))
        newline = "\r\n" if rng.random() < 0.3 else "\n"
        text = newline.join(lines) if suffix == ".jsonl" else "[" + f",{newline}".join(lines) + "]"
        data = bytearray(text.encode("utf-8", "surrogatepass"))
        if rng.random() < 0.3:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.1:
            data = data[:rng.randrange(len(data))]
        if rng.random() < 0.2:
            data = codecs.BOM_UTF8 + data
        path = tmp_path / f"f{i}{suffix}"
        path.write_bytes(bytes(data))
        try:
            load_examples(path, tokenizer, 128, strict=False)
            outcomes["loaded"] += 1
        except EdgeftError as e:
            assert "\n" not in str(e) and str(e).split(":")[0].endswith(path.name), str(e)
            outcomes["refused"] += 1
    print(f"fuzz {suffix}: {files} files, {outcomes}, 0 tracebacks")  # the counts the README states
    assert outcomes["loaded"] > files / 10 and outcomes["refused"] > files / 2, outcomes


def test_rows_keep_their_line_numbers(tmp_path):
    (tmp_path / "d.jsonl").write_text('\n{"text": "a"}\r\n\n{"text": "b"}\n')
    assert [n for n, _ in read_rows(tmp_path / "d.jsonl")] == [2, 4]


# ---------------------------------------------------------------------------------------- other formats
def _loaded(path, tokenizer, columns=None):
    mapped = {"columns": columns} if columns else {}
    return [(e.input_ids, e.labels) for e in load_examples(path, tokenizer, 512, strict=True, **mapped)[0]]


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_struct_array(pa.array(rows)), path)  # columns: the union of the keys
    return path


def _csv(path, header, *records):
    out = io.StringIO()
    csv.writer(out).writerows([header, *records])
    path.write_text(out.getvalue())
    return path


def test_alpaca_sharegpt_json_csv_and_parquet_train_exactly_as_the_same_messages(tmp_path, tokenizer):
    """Every shape and file format is the same conversation as a messages row: same ids, same labels."""
    expected = tmp_path / "chat.jsonl"
    expected.write_text(json.dumps(SYSTEM_CHAT) + "\n")
    (want,) = _loaded(expected, tokenizer)
    system, user, answer = (m["content"] for m in SYSTEM_CHAT["messages"])
    alpaca = {"instruction": user, "input": "", "output": answer, "system": system}
    sharegpt = {"conversations": [{"from": "system", "value": system}, {"from": "human", "value": user},
                                  {"from": "gpt", "value": answer}]}
    sharegpt_system_key = {"system": system, "conversations": sharegpt["conversations"][1:]}
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (alpaca, sharegpt, sharegpt_system_key)))
    assert _loaded(tmp_path / "rows.jsonl", tokenizer) == [want] * 3
    (tmp_path / "rows.json").write_text(json.dumps([SYSTEM_CHAT, alpaca], indent=2))
    assert _loaded(tmp_path / "rows.json", tokenizer) == [want] * 2
    # messages as list<struct<role, content>>; a row of another shape has nulls in the columns it lacks
    qa = {"prompt": "2+2?", "completion": "4"}
    (tmp_path / "qa.jsonl").write_text(json.dumps(qa) + "\n")
    _parquet(tmp_path / "rows.parquet", [SYSTEM_CHAT, qa, SYSTEM_CHAT])
    assert _loaded(tmp_path / "rows.parquet", tokenizer) == [want, *_loaded(tmp_path / "qa.jsonl", tokenizer), want]
    # A spreadsheet's own column names, mapped to Alpaca's fields; messages as JSON text in a cell
    _csv(tmp_path / "sheet.csv", ["task", "context", "answer", "persona"], [user, "", answer, system])
    mapping = {"instruction": "task", "input": "context", "output": "answer", "system": "persona"}
    assert _loaded(tmp_path / "sheet.csv", tokenizer, mapping) == [want]
    _csv(tmp_path / "msgs.csv", ["messages"], [json.dumps(SYSTEM_CHAT["messages"])])
    assert _loaded(tmp_path / "msgs.csv", tokenizer) == [want]

    # Alpaca's input goes after the instruction; history turns come first and are learned too
    row = {"instruction": "Name the capital.", "input": "France", "output": "Paris",
           "history": [["Hi", "Hello!"]]}
    (tmp_path / "alpaca.jsonl").write_text(json.dumps(row) + "\n")
    (e,), _ = load_examples(tmp_path / "alpaca.jsonl", tokenizer, 512, strict=True)
    assert e.row["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "Name the capital.\n\nFrance"},
                                 {"role": "assistant", "content": "Paris"}]
    assert tokenizer.decode([t for t in e.labels if t != IGNORE]) == "Hello!<|im_end|>\nParis<|im_end|>\n"


# A Qwen2.5-style chat template with tool support, for the tiny tokenizer (our own text): the functions in the
# system turn, each call as <tool_call>JSON</tool_call> in the assistant's turn, consecutive tool results in
# one user turn. Newlines after block tags are written as expressions: HF renders with trim_blocks.
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n' }}{% if messages[0].role == 'system' %}"
    "{{ messages[0].content + '\n\n' }}{% endif %}{{ 'You may call these functions:\n<tools>' }}"
    "{% for t in tools %}{{ '\n' + (t | tojson) }}{% endfor %}"
    "{{ '\n</tools>\nCall one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n' }}"
    "{% elif messages[0].role == 'system' %}{{ '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' %}"
    "{% elif m.role == 'tool' %}"
    "{% if loop.previtem is not defined or loop.previtem.role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + m.content + '\n</tool_response>' }}"
    "{% if loop.nextitem is not defined or loop.nextitem.role != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% elif m.role == 'assistant' and m.tool_calls %}{{ '<|im_start|>assistant' }}"
    "{% if m.content %}{{ '\n' + m.content }}{% endif %}"
    "{% for c in m.tool_calls %}{{ '\n<tool_call>\n{\"name\": \"' + c.function.name + '\", \"arguments\": ' + "
    "(c.function.arguments | tojson) + '}\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TOOL_CHAT = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18, "sky": "sunny"}'},
    {"role": "assistant", "content": "It is 18 C and sunny in Paris."}]}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
ANSWER = "It is 18 C and sunny in Paris.<|im_end|>\n"


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_llama, tmp_path_factory):
    from edgeft.models import load_tokenizer

    folder = tmp_path_factory.mktemp("tool-model")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    for name in ("tokenizer_config.json",):  # the template file is the one transformers 5 reads
        cfg = json.loads((folder / name).read_text())
        cfg.pop("chat_template", None)
        (folder / name).write_text(json.dumps(cfg))
    return load_tokenizer(folder)


def _spans(ids, labels):
    """The labelled stretches of a row, each as one list of ids."""
    spans, current = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_tool_calls_are_rendered_with_the_templates_tool_support_and_only_the_assistant_is_learned(
        tmp_path, tool_tokenizer, tokenizer):
    from edgeft.task import build_task_set

    tok = tool_tokenizer
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(TOOL_CHAT) + "\n")
    (e,), _ = load_examples(data, tok, 512, strict=True)
    text = tok.decode(e.input_ids)
    # rendered through the template's tool support: the schema in the system turn, the result as a response
    assert text == tok.apply_chat_template(e.row["messages"], tools=[WEATHER], tokenize=False)
    assert '"name": "get_weather", "description": "Weather now in a city"' in text
    assert '<tool_response>\n{"temp_c": 18, "sky": "sunny"}\n</tool_response>' in text
    # labels: exactly the assistant's call and its final answer; the tool's result and the prompt are context
    assert [tok.decode(s) for s in _spans(e.input_ids, e.labels)] == [CALL, ANSWER]

    # ShareGPT's function_call/observation and file-level tools in a .json are the same conversation
    sharegpt = {"tools": json.dumps([WEATHER["function"]]), "conversations": [
        {"from": "human", "value": "What is the weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temp_c": 18, "sky": "sunny"}'},
        {"from": "gpt", "value": "It is 18 C and sunny in Paris."}]}
    (tmp_path / "sharegpt.jsonl").write_text(json.dumps(sharegpt) + "\n")
    (tmp_path / "file_tools.json").write_text(json.dumps({"tools": [WEATHER], "rows": [
        {"messages": TOOL_CHAT["messages"]}]}, indent=1))
    for other in ("sharegpt.jsonl", "file_tools.json"):
        (o,), _ = load_examples(tmp_path / other, tok, 512, strict=True)
        assert (o.input_ids, o.labels) == (e.input_ids, e.labels), other

    # the held-out prompt is the training context before the final answer, tools included
    task = build_task_set(tok, [e], "test")
    answer_start = len(e.input_ids) - len(_spans(e.input_ids, e.labels)[-1])
    assert task.items[0].prompt == e.input_ids[:answer_start] and task.items[0].expected == ANSWER[:-11]

    # A template without tool support would train the calling turn as an empty answer: refused, naming the row
    with pytest.raises(EdgeftError, match=r"tools.jsonl:1: the model's chat template does not render tool calls "
                                          r"\('get_weather' is not in"):
        load_examples(data, tokenizer, 512, strict=True)
    (tmp_path / "schema_only.jsonl").write_text(json.dumps({**SYSTEM_CHAT, "tools": [WEATHER]}) + "\n")
    with pytest.raises(EdgeftError, match=r"schema_only.jsonl:1: the model's chat template ignores 'tools'"):
        load_examples(tmp_path / "schema_only.jsonl", tokenizer, 512, strict=True)


@pytest.mark.parametrize("name,content,columns,needle", [
    # CSV: lines as an editor shows them (a quoted cell spans lines 2-3)
    ("bad.csv", 'question,answer\n"two\nlines",ok\nq,\n', {"prompt": "question", "completion": "answer"},
     "bad.csv:4: 'completion' is empty"),
    ("bad.csv", "question,answer\nq,a\nq,a,extra\n", None, "bad.csv:3: 3 cells where the header has 2"),
    ("bad.csv", b"prompt,completion\nq,a\nq,caf\xe9\n", None, "bad.csv:3: not UTF-8 text"),
    ("bad.csv", "question,answer\nq,a\n", None, "bad.csv:2: row has neither 'messages'"),
    ("bad.json", '[\n  {"text": "a"},\n  {"prompt": "q"}\n]', None, "bad.json:3: a prompt/completion row needs"),
    ("bad.json", '[\n  {"text": "a"},\n  {"text": "b",}\n]', None, "bad.json:3: not valid JSON"),
    ("bad.json", '[{"text": "a"}]\n{"text": "b"}', None, "bad.json:2: not valid JSON (more data after the rows)"),
    ("bad.json", '{"tools": 5, "rows": [{"text": "a"}]}', None, "bad.json: 'tools': must be a list"),
    ("bad.parquet", [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""}], None,
     "bad.parquet:row 2: 'completion' is empty"),
    ("bad.parquet", b"PAR1 not really parquet PAR1", None, "bad.parquet: cannot read it as Parquet"),
    ("bad.jsonl", {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, None,
     "bad.jsonl:1: conversations[1].from is 'bot'; use human, user, gpt"),
    ("bad.jsonl", {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
                                {"role": "assistant", "content": "a"}]}, None,
     "bad.jsonl:1: messages[1] is a tool result with no tool call before it"),
    ("bad.jsonl", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{city: Paris}"}}]}]}, None,
     "bad.jsonl:1: messages[1].tool_calls[0].arguments: not valid JSON"),
    ("bad.jsonl", {"instruction": "q", "output": ""}, None, "bad.jsonl:1: 'output' is empty"),
])
def test_refused_rows_of_every_format_name_file_and_line(tmp_path, tokenizer, name, content, columns, needle):
    path = tmp_path / name
    if isinstance(content, list):
        _parquet(path, content)
    elif isinstance(content, dict):
        path.write_text(json.dumps(content) + "\n")
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(EdgeftError) as e:
        load_examples(path, tokenizer, 256, strict=False, **({"columns": columns} if columns else {}))
    assert str(e.value).startswith(str(tmp_path / needle.split(":")[0])) and "\n" not in str(e.value)
    assert needle in str(e.value).replace(str(tmp_path) + "/", "")


def test_column_mapping_from_the_config_file_and_the_flag(tmp_path, tiny_llama):
    """`columns: {field: column}` in the config, --columns FIELD=COLUMN on the command line; the other order
    is refused with the fix."""
    assert column_map("prompt=question, completion=answer") == {"prompt": "question", "completion": "answer"}
    with pytest.raises(EdgeftError, match=r"'question' is not a field edgeft reads.*did you mean prompt=question"):
        column_map("question=prompt")
    rows = [{"question": f"{a}+{b}?", "answer": str(a + b)} for a in range(4) for b in range(3)]
    _parquet(tmp_path / "qa.parquet", rows)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"columns": {"prompt": "question", "completion": "answer"}}))
    run = tmp_path / "run"
    common = ["train", "--model", str(tiny_llama), "--data", str(tmp_path / "qa.parquet"), "--max-steps", "1",
              "--batch-size", "4", "--eval-generate", "0", "--max-ppl-rise", "100", *WINDOW]
    result = CliRunner().invoke(cli, [*common, "--config", str(config), "--run", str(run)])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["columns"] == {"prompt": "question", "completion": "answer"}
    assert len(json.loads((run / "task_tokens.json").read_text())["items"]) == 1  # 10% of 12 rows held out
    result = CliRunner().invoke(cli, [*common, "--columns", "question=prompt", "--run", str(tmp_path / "r2")])
    assert_one_line_error(result, "--columns question=prompt", "did you mean prompt=question")
    result = CliRunner().invoke(cli, [*common, "--run", str(tmp_path / "r3")])
    assert_one_line_error(result, "qa.parquet:row 1: row has neither", "keys: answer, question", "--columns")
