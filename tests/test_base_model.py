"""A base model without a chat template (most hub base checkpoints) through train -> merge -> export -> smoke:
rendered plainly without --chat-template, with the given template (stored with the adapter) with it."""

import json
import shutil

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.templates import CHATML

from .conftest import WINDOW, assert_one_line_error, needs_cross


@pytest.fixture(scope="module")
def base_without_template(tiny_llama, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("base") / "tiny-base"
    shutil.copytree(tiny_llama, path)
    for leftover in path.glob("chat_template.*"):
        leftover.unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert not AutoTokenizer.from_pretrained(path).chat_template
    return path


def _chain(base, run, *train_args):
    runner = CliRunner()
    steps = [["train", "--model", str(base), "--data", "demo", "--run", str(run), "--max-steps", "2", "--batch-size",
              "4", "--eval-generate", "2", "--max-ppl-rise", "100", *train_args],
             ["merge", "--adapter", str(run), "--eval-generate", "2"],
             ["export", "--run", str(run), "--quant", "f16", "--max-exact-drop", "1"]]
    for args in steps:
        result = runner.invoke(cli, [*args, *WINDOW])
        assert result.exit_code == 0, f"{args[0]}: {result.output}"
    return next((run / "gguf").glob("*-F16.gguf"))


def _gguf_template(gguf):
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.chat_template")
    return field.contents() if field else None


@pytest.mark.slow
def test_without_a_template_the_chain_renders_plainly_and_chat_asks_for_one(base_without_template, tmp_path):
    gguf = _chain(base_without_template, tmp_path / "plain")
    assert _gguf_template(gguf) is None
    modelfile = gguf.with_suffix(".Modelfile").read_text()
    assert "no chat template" in modelfile and '{{ .Content }}\n{{ end }}' in modelfile
    steps = json.loads((tmp_path / "plain" / "manifest.json").read_text())["steps"]
    assert [s["status"] for s in steps] == ["ok"] * len(steps)
    result = CliRunner().invoke(cli, ["chat", str(tmp_path / "plain" / "merged"), "--prompt", "hi"])
    assert_one_line_error(result, "has no chat template", "--chat-template chatml")


@pytest.mark.slow
@pytest.mark.parametrize("given", ["chatml", "file"])
def test_a_given_template_is_stored_with_the_adapter_and_reaches_the_gguf_and_modelfile(base_without_template,
                                                                                      tmp_path, given):
    spec = "chatml"
    if given == "file":
        (tmp_path / "t.jinja").write_text(CHATML)
        spec = str(tmp_path / "t.jinja")
    gguf = _chain(base_without_template, tmp_path / "run", "--chat-template", spec)
    from transformers import AutoTokenizer

    for folder in ("adapter", "merged"):
        assert AutoTokenizer.from_pretrained(tmp_path / "run" / folder).chat_template == CHATML
    assert _gguf_template(gguf) == CHATML
    modelfile = gguf.with_suffix(".Modelfile").read_text()
    assert "<|im_start|>" in modelfile and "no chat template" not in modelfile


@pytest.mark.parametrize("content,needle", [
    ("{% for m in messages %}{{ m['content'] }", "line 1"),
    ("hello", "never reads `messages`"),
])
def test_a_bad_template_file_is_one_line_before_training(base_without_template, tmp_path, content, needle):
    (tmp_path / "bad.jinja").write_text(content)
    result = CliRunner().invoke(cli, ["train", "--model", str(base_without_template), "--data", "demo", "--run",
                                      str(tmp_path / "r"), "--chat-template", str(tmp_path / "bad.jinja"), *WINDOW])
    assert_one_line_error(result, "--chat-template", needle)
    assert not (tmp_path / "r" / "manifest.json").exists()


@pytest.mark.slow
@needs_cross
@pytest.mark.parametrize("train_args", [[], ["--chat-template", "chatml"]], ids=["plain", "chatml"])
def test_a_base_model_is_smoked_with_and_without_a_template(base_without_template, tmp_path, train_args):
    _chain(base_without_template, tmp_path / "run", *train_args)
    result = CliRunner().invoke(cli, ["smoke", str(tmp_path / "run"), "--local", "--quant", "f16", "--task-items", "4",
                                      "--json"])
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["steps"][-1]
    assert entry["step"] == "smoke" and entry["inputs"]["mode"] == "local", result.output
    assert entry["gate"]["value"] < 1e-3, result.output  # same GGUF, same kernels: the perplexity gate passed
    # the sample prompt was rendered as trained (plainly, or with the given template) and answered on the target;
    # a random tiny model's greedy answer may be blank lines: the answer check, recorded, is then the one gate
    # that failed (exit 3, naming it), else every gate passed (exit 0)
    answer_ok = entry["metrics"]["generation"]["ok"]
    assert result.exit_code == (0 if answer_ok else 3), result.output
    if not answer_ok:
        assert "the board's answer failed its checks" in result.output.strip().splitlines()[-1]
