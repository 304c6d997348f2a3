"""Training JSONL as users hand it over: files from Windows tools train, hostile and careless rows are one
line naming the file and line, and 400 fuzzed files never give a traceback."""

import codecs
import json
import random

import pytest

from edgeft.dataset import load_examples, read_rows
from edgeft.errors import EdgeftError


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


def test_fuzzed_jsonl_files_train_or_fail_in_one_line(tmp_path, tokenizer):
    """Seeded, bounded: 400 files from valid rows of every shape, with bytes flipped, lines cut, values
    swapped for other JSON, BOMs, NULs and surrogates: each loads or is one line naming file and line."""
    rng = random.Random(3)
    rows = [SYSTEM_CHAT, {"prompt": "2+2?", "completion": "4"}, {"text": "plain text"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    weird = [None, 1, -1.5, True, "", " ", [], {}, [[]], "\u0000", "\ud800", "x" * 2000, {"role": "user"},
             [{"role": "tool", "content": "x"}], "\u202e\ufeff"]

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
    for i in range(400):
        lines = []
        for _ in range(rng.randint(1, 4)):
            row = rng.choice(rows)
            lines.append(json.dumps(damage(row) if rng.random() < 0.5 else row, ensure_ascii=rng.random() < 0.5))
        data = bytearray(("\r\n" if rng.random() < 0.3 else "\n").join(lines).encode("utf-8", "surrogatepass"))
        if rng.random() < 0.3:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.1:
            data = data[:rng.randrange(len(data))]
        if rng.random() < 0.2:
            data = codecs.BOM_UTF8 + data
        path = tmp_path / f"f{i}.jsonl"
        path.write_bytes(bytes(data))
        try:
            load_examples(path, tokenizer, 128, strict=False)
            outcomes["loaded"] += 1
        except EdgeftError as e:
            assert "\n" not in str(e) and str(e).split(":")[0].endswith(path.name), str(e)
            outcomes["refused"] += 1
    assert outcomes["loaded"] > 40 and outcomes["refused"] > 200, outcomes


def test_rows_keep_their_line_numbers(tmp_path):
    (tmp_path / "d.jsonl").write_text('\n{"text": "a"}\r\n\n{"text": "b"}\n')
    assert [n for n, _ in read_rows(tmp_path / "d.jsonl")] == [2, 4]
