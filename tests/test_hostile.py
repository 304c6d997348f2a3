"""Files a user hands over are data: hostile and careless inputs to each reader give one line naming the file (and
field or line) and the fix, exit 2, and nothing runs from them. Fast tier."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.errors import EdgeftError
from edgeft.inputs import parse_json, parse_json_rows, parse_yaml

from .conftest import WINDOW, assert_one_line_error

SHIPPED = "rpi5.yaml"


def _profile(edgeft_home, name, **changes):
    from pathlib import Path

    import edgeft.devices as devices

    text = (Path(devices.__file__).parent / SHIPPED).read_text()
    folder = edgeft_home / "devices"
    folder.mkdir(exist_ok=True)
    lines = []
    for line in text.splitlines():
        key = line.split(":", 1)[0]
        lines.append(f"{key}: {json.dumps(changes[key])}" if key in changes else line)
    lines = [f"name: {name}" if line.startswith("name:") else line for line in lines]
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("field,value,needle", [
    ("c_flags", "-O2 ; touch pwned ; false", "'c_flags' has ';'"),
    ("c_flags", "-O2 $(touch pwned)", "'c_flags' has '$(touch'"),
    ("c_flags", "-march=`id`", "'c_flags' has '-march=`id`'"),
    ("cmake", ["-DGGML_NATIVE=OFF", "-DX=`touch pwned`"], "'cmake' entry '-DX=`touch pwned`'"),
    ("cmake", ["-DA=1 -DB=2"], "'cmake' entry '-DA=1 -DB=2'"),
    ("cmake", ["-DCMAKE_C_COMPILER_LAUNCHER=sh;-c"], "'cmake' entry"),
])
def test_a_profile_with_shell_in_its_flags_is_refused_before_any_build(edgeft_home, tmp_path, field, value, needle):
    path = _profile(edgeft_home, "evil-board", **{field: value})
    try:
        result = CliRunner().invoke(cli, ["build", "--device", "evil-board"])
        assert_one_line_error(result, str(path), needle)
        assert not (tmp_path / "pwned").exists()
    finally:
        path.unlink()


def test_the_shipped_profiles_pass_the_flag_check(edgeft_home):
    from edgeft.devices import profiles

    assert {"rpi4", "rpi5", "jetson-orin-nano", "x86-64", "x86-64-native"} <= set(profiles())


@pytest.mark.parametrize("text,needle", [
    ('{"a": 1,\n "b": 2,\n "a": 3}', "x.json:3: key 'a' is given twice"),
    ('{"rows": [1], "rows": [2]}', "x.json: key 'rows' is given twice"),
    ('{"m": {"role": "user", "role": "assistant"}}', "key 'role' is given twice"),
])
def test_duplicate_json_keys_are_refused_naming_key_and_line(text, needle):
    with pytest.raises(EdgeftError) as e:
        parse_json(text, "x.json", "fix it")
    assert needle in str(e.value)


def test_duplicate_keys_in_a_row_file_name_the_rows_line():
    text = '[\n{"prompt": "a", "completion": "b"},\n{"prompt": "c",\n "prompt": "d", "completion": "e"}\n]'
    with pytest.raises(EdgeftError, match=r"rows.json:4: key 'prompt' is given twice"):
        parse_json_rows(text, "rows.json", "fix it")


def test_duplicate_yaml_keys_are_refused_naming_key_and_line():
    with pytest.raises(EdgeftError, match=r"p.yaml:3: key 'max_steps' is given twice"):
        parse_yaml("train:\n  max_steps: 2\n  max_steps: 200\n", "p.yaml")
    assert parse_yaml("a: 1\nb: {a: 2}\n", "p.yaml") == {"a": 1, "b": {"a": 2}}  # same key in two mappings


def test_a_pipeline_file_with_a_key_twice_is_one_line(tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("train:\n  data: demo\n  lr: 0.001\n  lr: 0.1\n")
    result = CliRunner().invoke(cli, ["run", str(pipeline), "--run", str(tmp_path / "r")])
    assert_one_line_error(result, "p.yaml:4: key 'lr' is given twice")


@pytest.mark.parametrize("planted", ["../outside.txt", "/etc/hostname", "link-out", "fifo"])
def test_a_ledger_path_out_of_the_run_is_never_read_by_from(tiny_adapter_run, tmp_path, planted):
    """`edgeft run P --from merge` hashes the finished steps' outputs: a ledger naming a path outside the run
    (or /dev/zero through a link, or a FIFO) must be refused, not read."""
    import os

    run = tmp_path / "run"
    shutil.copytree(tiny_adapter_run, run)
    (tmp_path / "outside.txt").write_text("not the run's")
    if planted == "link-out":
        os.symlink("/dev/zero", run / "link-out")
    if planted == "fifo":
        os.mkfifo(run / "fifo")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["steps"][-1]["outputs"][0]["path"] = planted
    (run / "manifest.json").write_text(json.dumps(manifest))
    config = manifest["steps"][-1]["config"]
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({"run": str(run), "train": {"model": config["model"], "data": config["data"]},
                                    "merge": {"window": 128, "stride": 128}}))
    result = CliRunner().invoke(cli, ["run", str(pipeline), "--from", "merge"])
    needle = "not a regular file or folder" if planted == "fifo" else "outside the run folder"
    assert_one_line_error(result, "--from: the 'train' step", needle)


def test_deploy_runs_the_gguf_header_check_on_what_it_ships(tiny_export_run, tmp_path):
    """A truncated GGUF whose ledger digest was rewritten to match still never reaches a board."""
    from edgeft.atomic import sha256_file

    run = tmp_path / "run"
    shutil.copytree(tiny_export_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    entry = next(e for e in manifest["steps"] if e["step"] == "export-gguf" and e["inputs"]["quant"] == "q8_0")
    gguf = run / entry["outputs"][0]["path"]
    gguf.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    entry["outputs"][0].update(sha256=sha256_file(gguf), bytes=gguf.stat().st_size)
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["deploy", str(run), "--host", "nobody@127.0.0.1", "--port", "9",
                                      "--quant", "q8_0", "--device", "x86-64"])
    assert_one_line_error(result, gguf.name, "damaged")


def _copy_model(src, dest):
    shutil.copytree(src, dest)
    return dest


@pytest.mark.parametrize("damage,needle", [
    ("gpt2 config", "config.json says GPT2LMHeadModel, but tensor"),
    ("wider config", "do not have the shapes config.json gives"),
])
def test_a_model_folder_whose_config_is_another_models_is_refused(tiny_llama, tmp_path, damage, needle):
    folder = _copy_model(tiny_llama, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    if damage == "gpt2 config":
        config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config["vocab_size"],
                  "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024}
    else:
        config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["eval", "--model", str(folder), "--run", str(tmp_path / "r"), "--window", "128",
                                      "--stride", "128", "--eval-budget", "300"])
    assert_one_line_error(result, str(folder), needle)


def test_a_pickle_only_model_folder_is_refused_before_torch_sees_it(tiny_llama, tmp_path):
    folder = _copy_model(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    result = CliRunner().invoke(cli, ["eval", "--model", str(folder), "--run", str(tmp_path / "r")])
    assert_one_line_error(result, "pickle files (pytorch_model.bin)", "safetensors")


@pytest.mark.parametrize("body,needle", [
    ("train:\n  - data: demo\n", "section 'train' is list"),
    ("train: demo\n", "section 'train' is str"),
    ("merge: 3\n", "section 'merge' is int"),
    ("train:\n", "section 'train' is empty"),
    ("export: [1, 2]\n", "section 'export' is list"),
    ("run: [a]\n", "'run' is list"),
])
def test_pipeline_sections_of_the_wrong_shape_are_one_line(tmp_path, body, needle):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(body)
    result = CliRunner().invoke(cli, ["run", str(pipeline), "--run", str(tmp_path / "r")])
    assert_one_line_error(result, "p.yaml", needle)


@pytest.mark.parametrize("args,needle", [
    (["--warmup-ratio", "-1"], "--warmup-ratio: -1.0 is out of range; use a number of at least 0 and below 1"),
    (["--eval-generate", "-1"], "--eval-generate: -1 is out of range"),
    (["--threads", "-1"], "--threads: -1 is out of range"),
    (["--lora-dropout", "1"], "--lora-dropout: 1.0 is out of range"),
    (["--max-ppl-rise", "-5"], "--max-ppl-rise -5: -5 is a change of -500%"),
    (["--max-ppl-rise", "adapter=-1"], "a change of -100%"),
])
def test_numbers_that_cannot_mean_anything_are_refused_before_training(tiny_llama, tmp_path, args, needle):
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", "demo", "--run",
                                      str(tmp_path / "r"), *args])
    assert_one_line_error(result, needle)
    assert not (tmp_path / "r").exists()


def test_a_number_out_of_range_in_a_config_file_names_the_key(tiny_llama, tmp_path):
    config = tmp_path / "t.yaml"
    config.write_text("warmup_ratio: 2\n")
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", "demo", "--run",
                                      str(tmp_path / "r"), "--config", str(config)])
    assert_one_line_error(result, f"--config {config}: key 'warmup_ratio': 2.0 is out of range")


def test_stored_ids_past_the_vocabulary_are_one_line_not_an_index_error(tiny_llama, tmp_path):
    from edgeft.run import TOKENS_FILE

    args = ["eval", "--model", str(tiny_llama), "--run", str(tmp_path / "r"), "--window", "128", "--stride", "128",
            "--eval-budget", "300"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    stored = json.loads((tmp_path / "r" / TOKENS_FILE).read_text())
    stored["ids"][5] = 10**9  # under 2^31, past the 2,048-id vocabulary
    (tmp_path / "r" / TOKENS_FILE).write_text(json.dumps(stored))
    assert_one_line_error(CliRunner().invoke(cli, args), TOKENS_FILE, "token id 1000000000 is past the tokenizer's")


def test_a_chat_template_that_loops_for_hours_is_stopped_in_one_line(tiny_tokenizer, monkeypatch):
    import time

    from transformers import AutoTokenizer

    from edgeft import prompt
    from edgeft.prompt import prompt_ids

    monkeypatch.setattr(prompt, "RENDER_SECONDS", 1)  # the limit's value is not what is tested
    RENDER_SECONDS = 1

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}"
                         "{% endfor %}{% endfor %}{% endfor %}")
    start = time.monotonic()
    with pytest.raises(EdgeftError, match=f"did not render one conversation in {RENDER_SECONDS} s"):
        prompt_ids(tok)
    assert time.monotonic() - start < RENDER_SECONDS + 5


@pytest.mark.parametrize("tokenize", [False, True])
def test_a_chat_template_that_writes_without_end_is_stopped_by_length(tiny_tokenizer, monkeypatch, tokenize):
    from transformers import AutoTokenizer

    from edgeft import prompt
    from edgeft.prompt import apply_template

    monkeypatch.setattr(prompt, "RENDER_LENGTH", 100_000)  # the limit's value is not what is tested
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tok.chat_template = "{% for i in range(300) %}{{ 'lorem ipsum ' * 100 }}{% endfor %}"  # 360,000 characters
    with pytest.raises(EdgeftError, match=f"rendered one conversation as .* {'tokens' if tokenize else 'characters'}, "
                                          f"more than 100,000"):
        apply_template(tok, [{"role": "user", "content": "hi"}], True, tokenize=tokenize)


def test_columns_naming_a_column_the_file_lacks_is_one_line(tiny_llama, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(4)))
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", str(data), "--run",
                                      str(tmp_path / "r"), "--columns", "prompt=question,completion=answr"])
    assert_one_line_error(result, "--columns completion=answr", "has no column 'answr'", "answer, question")


@pytest.mark.parametrize("turn", [{"role": "assistant", "content": ""}, {"role": "assistant", "content": "  \n"},
                                  {"from": "gpt", "value": ""}])
def test_an_empty_assistant_turn_is_refused_like_an_empty_completion(tiny_llama, tmp_path, turn):
    data = tmp_path / "chat.jsonl"
    key = "conversations" if "from" in turn else "messages"
    user = {"from": "human", "value": "hi"} if "from" in turn else {"role": "user", "content": "hi"}
    good = {key: [user, {**turn, **({"value": "hello"} if "from" in turn else {"content": "hello"})}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps({key: [user, turn]}) + "\n")
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", str(data), "--run",
                                      str(tmp_path / "r"), "--max-steps", "1"])
    assert_one_line_error(result, f"{data}:2:", f"{key}[1] is an empty assistant turn", "write its answer")
    assert not (tmp_path / "r" / "adapter").exists()


def _rewrite_safetensors_header(folder: Path, change) -> None:
    """Rewrite the header of the folder's one safetensors file with `change(header)`, keeping the data."""
    import struct

    f = next(folder.glob("*.safetensors"))
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _overlap(header):
    norms = sorted(k for k in header if k.endswith("layernorm.weight"))
    header[norms[1]]["data_offsets"] = header[norms[0]]["data_offsets"]  # same size: the bytes are shared


def _wrong_size(header):
    name = next(k for k in header if k.endswith("q_proj.weight"))
    start, stop = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, stop - 2]


@pytest.mark.parametrize("change, needle", [(_overlap, "overlap in the file"), (_wrong_size, "needs")])
def test_a_safetensors_header_with_overlapping_or_missized_ranges_is_one_line(tiny_llama, tmp_path, change, needle):
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    _rewrite_safetensors_header(model, change)
    result = CliRunner().invoke(cli, ["eval", "--model", str(model), "--run", str(tmp_path / "r"), *WINDOW])
    assert_one_line_error(result, ".safetensors", needle)
    entry = json.loads((tmp_path / "r" / "manifest.json").read_text())["steps"][-1]
    assert entry["status"] == "failed" and entry["perplexity"] is None and needle in entry["reason"]


def _tokenizer_cases():
    def field(key, value):
        return lambda doc: {**doc, key: value}

    return [(lambda doc: [], "not a JSON array"), (lambda doc: "x", "not a JSON string"),
            (lambda doc: None, "not a JSON null"), (lambda doc: {}, "field 'model'"),
            (field("model", 3), "field 'model'"), (field("added_tokens", {"a": 1}), "field 'added_tokens'"),
            (field("added_tokens", [{"id": "a"}]), "added_tokens[0]"),
            # a shape only the tokenizers library knows is wrong: its error, with the folder and the fix
            (lambda doc: {**doc, "model": {**doc["model"], "vocab": [1, 2]}}, "cannot load its tokenizer")]


@pytest.mark.parametrize("change, needle", _tokenizer_cases())
def test_a_tokenizer_json_of_the_wrong_shape_is_one_line(tiny_llama, tmp_path, change, needle):
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    doc = json.loads((model / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps(change(doc)))
    result = CliRunner().invoke(cli, ["eval", "--model", str(model), "--run", str(tmp_path / "r"), *WINDOW])
    assert_one_line_error(result, "model", needle, "save_pretrained")


def test_a_failed_build_points_to_a_log_that_is_still_there(edgeft_home):
    path = _profile(edgeft_home, "broken-board", cmake=["-DLLAMA_CPP_SOURCE=/nonexistent/llama.cpp"])
    try:
        result = CliRunner().invoke(cli, ["build", "--device", "broken-board"])
        assert_one_line_error(result, "configure for broken-board failed (log: ")
        log = Path(result.output.split("(log: ", 1)[1].split(")", 1)[0])
        assert log.is_file() and "/nonexistent/llama.cpp" in log.read_text()
        assert edgeft_home in log.parents
    finally:
        path.unlink()


# Read-only and full folders for real: a tmpfs mounted in a private mount namespace (`unshare -rm`, which needs
# no privilege where user namespaces are allowed), so the commands meet EROFS and ENOSPC from the kernel even
# when the tests run as root (root writes through file permissions). One child process runs every command.
_IN_NAMESPACE = r"""
import json, os, shutil, subprocess, sys
from pathlib import Path
from click.testing import CliRunner
from edgeft.cli import cli

adapter_run, export_run, model, mnt, src_gguf = map(Path, sys.argv[1:6])
window = ["--window", "128", "--stride", "128"]

def mount(size, readonly=False):
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)

out = {}
mount("64m")
shutil.copytree(adapter_run, mnt / "adapter-run")
shutil.copytree(export_run, mnt / "export-run")
subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
commands = {
    "report": ["report", str(mnt / "export-run")],
    "eval": ["eval", "--model", str(model), "--run", str(mnt / "export-run"), *window],
    "eval-new-run": ["eval", "--model", str(model), "--run", str(mnt / "new"), *window],
    "export": ["export", "--model", str(model), "--run", str(mnt / "export-run"), "--quant", "q8_0", *window],
    "train": ["train", "--model", str(model), "--data", "demo", "--run", str(mnt / "adapter-run"), "--max-steps", "1",
              *window],
    "merge": ["merge", "--adapter", str(mnt / "adapter-run"), *window],
}
for name, args in commands.items():
    r = CliRunner().invoke(cli, args)
    out[name] = [r.exit_code, r.output, repr(r.exception) if r.exit_code not in (0, 2, 3) else ""]
subprocess.run(["umount", "-l", str(mnt)], check=True)

# a full disk while llama.cpp quantizes: the source fits, the output does not
from edgeft.atomic import atomic_file
from edgeft.errors import EdgeftError
from edgeft.llamacpp import quantize
mount(f"{src_gguf.stat().st_size // 8}")
try:
    with atomic_file(mnt / "out.gguf") as tmp:  # as export writes it
        quantize(src_gguf, tmp, "q8_0")
    out["quantize"] = [0, "", ""]
except EdgeftError as e:
    out["quantize"] = [2, str(e), ""]
out["quantize-left"] = sorted(p.name for p in mnt.iterdir())
print("RESULT " + json.dumps(out))
"""


def test_a_read_only_or_full_folder_is_one_line_naming_it(tiny_llama, tiny_adapter_run, tiny_export_run, tmp_path):
    import subprocess
    import sys

    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (a private mount namespace) is not allowed here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    f16 = next(tiny_export_run.rglob("*-F16.gguf"))
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", _IN_NAMESPACE, str(tiny_adapter_run),
                           str(tiny_export_run), str(tiny_llama), str(mnt), str(f16)],
                          capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = json.loads(line[len("RESULT "):])
    for name in ("report", "eval", "eval-new-run", "export", "train", "merge"):
        code, output, exception = got[name]
        assert code == 2, f"{name}: exit {code} {exception}\n{output[-1500:]}"
        lines = [x for x in output.splitlines() if x.startswith("error: ")]
        assert len(lines) == 1 and str(mnt) in lines[0] and "read-only file system" in lines[0], (name, output)
        assert "give a folder you can write" in lines[0]
    code, message, _ = got["quantize"]
    assert code == 2 and "no space left on device while quantizing to q8_0" in message and str(mnt) in message
    assert got["quantize-left"] == []  # the partial output was removed


def _ledger_with_everything(tiny_adapter_run, tiny_export_run, folder: Path) -> dict:
    """One ledger holding a training entry (loss curve, task) and export entries (KL, tensor types, gates)."""
    steps = [*json.loads((tiny_adapter_run / "manifest.json").read_text())["steps"],
             *json.loads((tiny_export_run / "manifest.json").read_text())["steps"]]
    doc = {"edgeft_version": "0.1.0", "steps": steps}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(doc))
    return doc


def _show_and_report(folder: Path, report: bool = True) -> list:
    runs = [CliRunner().invoke(cli, ["show", str(folder)]), CliRunner().invoke(cli, ["show", str(folder), "--json"])]
    return runs + ([CliRunner().invoke(cli, ["report", str(folder)])] if report else [])


@pytest.mark.parametrize("where, value, needle", [
    (("task",), "oops", ".task is \"oops\""),
    (("metrics", "kl_mean"), "0.5", ".metrics.kl_mean is \"0.5\""),
    (("metrics", "loss_curve"), ["a"], ".metrics.loss_curve[0] is \"a\""),
    (("metrics", "boards"), "x", ".metrics.boards is a str"),
    (("metrics", "boards"), [{"board": 3}], ".metrics.boards[0].board is 3"),
    (("perplexity", "ppl"), [1, "x"], ".perplexity.ppl is [1, \"x\"]"),
    (("status",), "[/bold]", ".status is \"[/bold]\", not one of ok, failed"),
    (("gate",), 3, ".gate is 3"),
])
def test_a_crafted_ledger_field_is_one_line_in_show_and_report(tiny_adapter_run, tiny_export_run, tmp_path, where,
                                                                value, needle):
    doc = _ledger_with_everything(tiny_adapter_run, tiny_export_run, tmp_path / "run")
    entry = next(e for e in doc["steps"] if all(k in e for k in where[:-1]) and
                 (where[0] != "metrics" or e["step"] == "train"))
    node = entry
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(doc))
    for result in _show_and_report(tmp_path / "run"):
        assert_one_line_error(result, "manifest.json: steps[", needle, "restore it from a copy")


def test_markup_in_ledger_text_is_shown_as_written(tiny_adapter_run, tiny_export_run, tmp_path):
    doc = _ledger_with_everything(tiny_adapter_run, tiny_export_run, tmp_path / "run")
    doc["steps"][-1]["note"] = "[/bold]"  # short: a table column this narrow wraps longer text
    doc["steps"][-1]["perplexity"]["model"] = "[red]m[/"
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(doc))
    show, as_json, report = _show_and_report(tmp_path / "run")
    assert show.exit_code == 0, show.output
    assert "[/bold]" in show.output and "[red]m[/" in show.output
    assert as_json.exit_code == 0 and report.exit_code == 0, report.output
    assert "[/bold]" in (tmp_path / "run" / "report.html").read_text()


def test_fuzzed_rich_ledgers_through_show_and_report_never_give_a_traceback(tiny_adapter_run, tiny_export_run,
                                                                          tmp_path):
    """Seeded: 150 copies of a ledger with training, task and export entries, one value anywhere replaced by a
    hostile one (markup, wrong JSON types, non-finite, huge), through show, show --json and (every fifth) report."""
    import random

    good = _ledger_with_everything(tiny_adapter_run, tiny_export_run, tmp_path / "good")
    rng = random.Random(26)
    hostile = ["oops", "[/bold]", "[red]x", 3, -1.5, None, [], {}, [1, "x"], {"a": "[red]"}, True, 1e300, 2**70,
               "\u202e", "x" * 500]

    def places(node, path=()):
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node[:2])):
            yield path + (key,)
            if isinstance(value, (dict, list)) and len(path) < 4:
                yield from places(value, path + (key,))

    spots = list(places(good))
    folder = tmp_path / "fuzz"
    outcomes = {"cases": 0, "shown": 0, "one-line error": 0, "traceback": 0}
    for i in range(150):
        doc = json.loads(json.dumps(good))
        *parents, last = rng.choice(spots)
        node = doc
        for key in parents:
            node = node[key]
        node[last] = rng.choice(hostile)
        folder.mkdir(exist_ok=True)
        (folder / "manifest.json").write_text(json.dumps(doc))
        for result in _show_and_report(folder, report=i % 5 == 0):
            outcomes["cases"] += 1
            if result.exit_code == 0:
                outcomes["shown"] += 1
            elif result.exit_code == 2 and result.output.count("\n") == 1 and result.output.startswith("error: "):
                outcomes["one-line error"] += 1
            else:
                outcomes["traceback"] += 1
                raise AssertionError(f"{parents + [last]} = {node[last]!r}: {result.exception!r}\n{result.output}")
    print(f"fuzz ledger (show, report): {outcomes}")  # the counts the closing note states
    assert outcomes["shown"] > 50 and outcomes["one-line error"] > 50, outcomes


def _alias_bomb(depth: int = 8) -> str:
    """A YAML flow value of a few hundred bytes whose aliases expand to 9**depth strings."""
    names = "abcdefghij"
    levels = ["&a [x, x, x, x, x, x, x, x, x]"]
    levels += [f"&{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * 9) + "]" for i in range(1, depth)]
    return "[" + ", ".join(levels) + "]"


@pytest.mark.parametrize("name, text, args", [
    ("fleet.yaml", "boards:\n- name: b\n  host: x\n  device: rpi5\n  port: {v}\n", ["deploy", "--hosts", "{f}", "{d}"]),
    ("train.yaml", "lr: {v}\n", ["train", "--config", "{f}"]),
    ("pipeline.yaml", "train:\n  lr: {v}\n", ["run", "{f}"]),
])
def test_a_yaml_alias_bomb_is_one_short_line(tmp_path, name, text, args):
    path = tmp_path / name
    path.write_text(text.format(v=_alias_bomb()))
    result = CliRunner().invoke(cli, [a.format(f=path, d=tmp_path) for a in args])
    assert_one_line_error(result, str(path), "aliases (*name) expand to more than 100,000 values")
    assert len(result.output) < 400


def test_a_long_value_echoed_in_an_error_is_cut(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("boards:\n- name: b\n  host: x\n  device: rpi5\n  port: [" + ", ".join(["x" * 50] * 5000) + "]\n")
    result = CliRunner().invoke(cli, ["deploy", "--hosts", str(path), str(tmp_path)])
    assert_one_line_error(result, "field 'port' has the wrong type (['xxx")
    assert len(result.output) < 400


@pytest.mark.parametrize("template, needle", [
    # assistant turns left out of the rendering
    ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}",
     "drops turn 1 (an assistant turn renders as nothing)"),
    # a template that renders earlier turns differently once a later one follows
    ("{% for m in messages %}{{ loop.length }}{{ m['content'] }}{% endfor %}", "growing prefix (at turn 1"),
])
def test_a_template_that_loses_assistant_turns_names_the_file_and_row(tiny_llama, tmp_path, template, needle):
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    (model / "chat_template.jinja").write_text(template)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                  "content": "hello"}]}) + "\n")
    result = CliRunner().invoke(cli, ["train", "--model", str(model), "--data", str(data), "--run",
                                      str(tmp_path / "r"), "--max-steps", "1"])
    assert_one_line_error(result, f"{data}:1: the model's chat template", needle, "--chat-template")


def test_a_model_folder_with_its_own_code_never_runs_it(tiny_llama, tmp_path):
    """config.json's auto_map names Python files in the folder (transformers' remote code): edgeft never trusts
    remote code, so the folder loads as the architecture its model_type names (a Llama) and the file is never
    imported."""
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "pwned"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for args in (["eval", "--model", str(model), "--run", str(tmp_path / "r"), *WINDOW],
                 ["export", "--model", str(model), "--run", str(tmp_path / "e"), "--quant", "f16", *WINDOW]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert not marker.exists()


def test_a_training_loss_that_was_not_finite_is_shown_not_refused(tiny_adapter_run, tmp_path):
    """A NaN loss is written as null (strict JSON): the ledger holding it is still a ledger, and report draws it."""
    run = Path(shutil.copytree(tiny_adapter_run, tmp_path / "run"))
    doc = json.loads((run / "manifest.json").read_text())
    next(e for e in doc["steps"] if e["step"] == "train")["metrics"]["loss_curve"][1] = None
    (run / "manifest.json").write_text(json.dumps(doc))
    for result in _show_and_report(run):
        assert result.exit_code == 0, result.output
