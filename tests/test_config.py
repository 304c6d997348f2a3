"""Config is data: defaults < file < flags, one-line errors, shared option groups, renamed settings."""

import json
import re

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.config import load_config
from edgeft.devices.deploy import DeployConfig
from edgeft.devices.smoke import SmokeConfig
from edgeft.devices.ssh import SSHOptions
from edgeft.errors import EdgeftError
from edgeft.evaluate import EvalConfig
from edgeft.export import GGUFExportConfig, OnnxExportConfig, load_export_config
from edgeft.heldout import HeldOutOptions
from edgeft.merge import MergeConfig
from edgeft.train import TrainConfig

from .conftest import assert_one_line_error


def test_precedence_defaults_file_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.001\nmax_steps: 7\nbase_quant: none\n")
    c = load_config(TrainConfig, f, {"max_steps": 9, "base_quant": None})
    assert (c.lr, c.max_steps, c.base_quant, c.lora_r) == (0.001, 9, "none", 16)


def test_bad_keys_and_values_are_one_line_errors(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lora_rank = 8\n')
    with pytest.raises(EdgeftError, match="unknown key 'lora_rank'"):
        load_config(TrainConfig, f)
    with pytest.raises(EdgeftError, match="--max-steps: 'many' is not a valid int"):
        load_config(TrainConfig, None, {"max_steps": "many"})


def test_held_out_and_ssh_options_are_shared_not_copied():
    for cls in (TrainConfig, MergeConfig, EvalConfig, GGUFExportConfig, OnnxExportConfig):
        assert issubclass(cls, HeldOutOptions)
    for cls in (DeployConfig, SmokeConfig):
        assert issubclass(cls, SSHOptions)
    assert TrainConfig().eval_budget == EvalConfig().eval_budget == MergeConfig().eval_budget


def test_a_renamed_setting_still_works_and_says_so(tmp_path, capsys):
    c = load_config(EvalConfig, None, {"budget": 1024})
    assert c.eval_budget == 1024
    assert "--budget is deprecated; use --eval-budget" in capsys.readouterr().err
    f = tmp_path / "e.yaml"
    f.write_text("budget: 512\n")
    assert load_config(EvalConfig, f).eval_budget == 512
    assert "key 'budget'" in capsys.readouterr().err
    result = CliRunner().invoke(cli, ["eval", "--help"])
    assert "--eval-budget" in result.output and "--budget" not in result.output.replace("--eval-budget", "")


def test_export_settings_belong_to_their_format(tmp_path):
    assert isinstance(load_export_config(None, {"format": "onnx", "block_size": 64}), OnnxExportConfig)
    assert isinstance(load_export_config(None, {"imatrix": "train"}), GGUFExportConfig)
    with pytest.raises(EdgeftError, match="--block-size is a setting of --format onnx, not gguf"):
        load_export_config(None, {"block_size": 64})
    f = tmp_path / "x.json"
    f.write_text(json.dumps({"format": "onnx", "imatrix": "train"}))
    with pytest.raises(EdgeftError, match="--imatrix is a setting of --format gguf, not onnx"):
        load_export_config(f)
    assert_one_line_error(CliRunner().invoke(cli, ["export", "--format", "tflite"]), "--format tflite")


@pytest.mark.parametrize("text,needle", [
    ("max_steps: 1.5\n", "c.yaml: key 'max_steps': 1.5 is not a valid int"),
    ("lr: .nan\n", "key 'lr': nan is not a valid float"),
    ("lr: [1, 2]\n", "key 'lr': [1, 2] is not a valid float"),
    ("data: {a: 1}\n", "key 'data': {'a': 1} is not a valid str"),
    ("strict: 2\n", "key 'strict': 2 is not a valid bool"),
    ("target_modules: 5\n", "key 'target_modules': 5 is not a valid"),
    ("1: 2\n", "key 1 is not a name"),
    ("- a\n- b\n", "must hold a mapping"),
    ("a: [\n", "cannot parse it"),
])
def test_config_values_of_the_wrong_kind_are_refused_not_truncated(tmp_path, text, needle):
    """A float for an integer setting was silently truncated (1.5 -> 1); now every value must be of its
    setting's kind (a whole float such as 8.0 is a whole number)."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(EdgeftError, match=needle.replace("[", r"\[").replace("{", r"\{")):
        load_config(TrainConfig, f)
    f.write_text("max_steps: 8.0\nlr: 3\n")
    assert (load_config(TrainConfig, f).max_steps, load_config(TrainConfig, f).lr) == (8, 3.0)


def test_a_pipeline_step_with_a_float_for_an_integer_is_refused(tmp_path):
    from edgeft.pipeline import load_pipeline, run_pipeline

    f = tmp_path / "p.yaml"
    f.write_text(f"run: {tmp_path / 'run'}\ntrain: {{data: demo, base: /nowhere, max_steps: 2.5}}\n")
    with pytest.raises(EdgeftError, match="--max-steps: 2.5 is not a valid int"):
        run_pipeline(load_pipeline(f))


def test_fuzzed_config_files_load_or_fail_in_one_line(tmp_path):
    """Seeded, bounded: 400 config files (YAML, TOML and JSON; valid keys with values of every kind, then
    bytes flipped and files cut) through the loader of every step's config: no traceback, ever."""
    import dataclasses
    import random

    rng = random.Random(5)
    classes = [TrainConfig, MergeConfig, EvalConfig, GGUFExportConfig, OnnxExportConfig, SmokeConfig, DeployConfig]
    values = ["1", "-3", "1.5", "1e400", ".inf", ".nan", "yes", "null", "''", "[1, 2]", "{a: 1}", "'x'", "2e3",
              "[[[[[]]]]]", "&a [1]", "\"\\ud800\"", "0x10", "'1,2,3'", "~", "[a, *b]"]
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(400):
        cls = rng.choice(classes)
        names = [f.name for f in dataclasses.fields(cls)]
        lines = [f"{rng.choice(names + ['nope'])}: {rng.choice(values)}" for _ in range(rng.randint(1, 4))]
        suffix = rng.choice([".yaml", ".toml", ".json"])
        text = "\n".join(lines) + "\n"
        if suffix == ".toml":
            text = text.replace(": ", " = ")
        data = bytearray(text.encode())
        if rng.random() < 0.3:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.1:
            data = data[:rng.randrange(len(data))]
        f = tmp_path / f"c{i}{suffix}"
        f.write_bytes(bytes(data))
        try:
            load_config(cls, f)
            outcomes["loaded"] += 1
        except EdgeftError as e:
            assert "\n" not in str(e), str(e)
            outcomes["refused"] += 1
    print(f"fuzz config: {outcomes}, 0 tracebacks")  # the counts the README states
    assert outcomes["loaded"] > 30 and outcomes["refused"] > 200, outcomes


# ------------------------------------------------------------------ one flag vocabulary (issue 15, item 4)
def _last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


@pytest.mark.parametrize("command,old,new,value,needle", [
    (["train", "--data", "demo"], "--base", "--model", "FILE", "--model {}: is a file, not a model folder"),
    (["train", "--data", "demo"], "--quant", "--base-quant", "16bit",
     "--base-quant 16bit: use auto, 4bit, 8bit or none"),
    (["eval"], "--budget", "--eval-budget", "1", "--eval-budget 1: must be at least 2 tokens"),
    (["merge", "--adapter", "ADAPTER"], "--base", "--model", "FILE", "--model {}: is a file, not a model folder"),
])
def test_each_old_flag_spelling_works_for_a_release_and_says_so(request, tmp_path, command, old, new, value, needle):
    """The old spelling reaches the same setting (the same refusal of a bad value proves it) with one
    deprecation line; the new spelling says nothing more."""
    if value == "FILE":
        value = str(tmp_path / "weights.bin")
        (tmp_path / "weights.bin").write_bytes(b"x")
    command = [str(request.getfixturevalue("tiny_adapter_run")) if a == "ADAPTER" else a for a in command]
    command += ["--run", str(tmp_path / "run")]
    note = f"note: {old} is deprecated; use {new}"
    with_old = CliRunner().invoke(cli, [*command, old, value])
    assert_one_line_error(with_old, needle.format(value))
    assert note in with_old.output
    with_new = CliRunner().invoke(cli, [*command, new, value])
    assert_one_line_error(with_new, needle.format(value))
    assert "deprecated" not in with_new.output
    shown = CliRunner().invoke(cli, [command[0], "--help"]).output
    assert re.search(rf"(?<![\w-]){new}(?![\w-])", shown) and not re.search(rf"(?<![\w-]){old}(?![\w-])", shown)
    both = CliRunner().invoke(cli, [*command, old, value, new, value])
    assert_one_line_error(both, f"{old} and {new} are the same setting")


def test_old_names_work_in_config_files_python_and_stored_records(tmp_path, capsys):
    from edgeft.train import TRAIN_CONFIG, read_train_config

    f = tmp_path / "t.yaml"
    f.write_text("base: some-model\nquant: none\n")
    c = load_config(TrainConfig, f)
    assert (c.model, c.base_quant) == ("some-model", "none")
    err = capsys.readouterr().err
    assert f"note: key 'base' in {f} is deprecated; use key 'model' in {f}" in err and "key 'quant'" in err
    f.write_text("base: a\nmodel: b\n")
    with pytest.raises(EdgeftError, match="keys 'base' and 'model' are the same setting"):
        load_config(TrainConfig, f)

    assert TrainConfig(base="x", quant="4bit").model == "x" and MergeConfig(base="y").model == "y"
    assert "note: TrainConfig(base=...) is deprecated; use TrainConfig(model=...)" in capsys.readouterr().err
    with pytest.raises(TypeError, match="give model= only"):
        TrainConfig(base="x", model="y")

    # a run trained by the previous release: its record is read as it was meant, without notes
    (tmp_path / TRAIN_CONFIG).write_text(json.dumps({"base": "old-base", "quant": "none", "max_ppl_rise": 0.2,
                                                      "data": "demo"}))
    old = read_train_config(tmp_path)
    assert (old.model, old.base_quant, old.max_ppl_rise) == ("old-base", "none", "0.2")
    assert "deprecated" not in capsys.readouterr().err


def test_every_gate_flag_takes_one_syntax():
    """--max-ppl-rise was a fraction in train and a per-quant spec in export; --max-drift likewise in merge.
    Now each takes one number for all, or NAME=number per artifact, and refuses the same mistakes."""
    from edgeft.gates import GGUF_GATES, parse_gates
    from edgeft.train import rise_limit

    for spec, want in (("0.25", 0.25), ("adapter=0.25", 0.25), (0.5, 0.5), ("-0.5", -0.5), ("1e-2", 0.01)):
        assert rise_limit(load_config(TrainConfig, None, {"max_ppl_rise": spec})) == want
    assert parse_gates("1e-2", GGUF_GATES, ["q8_0", "q4_k_m"]) == {"q8_0": 0.01, "q4_k_m": 0.01}
    assert parse_gates("original=0.02", {}, ["original", "dequantized"], 0.01, "--max-drift") == \
        {"original": 0.02, "dequantized": 0.01}
    with pytest.raises(EdgeftError, match="--max-ppl-rise q8_0=0.1: 'q8_0' is not among the artifacts being made "
                                          r"\(adapter\)"):
        rise_limit(load_config(TrainConfig, None, {"max_ppl_rise": "q8_0=0.1"}))
    with pytest.raises(EdgeftError, match="--max-drift nan: a gate's limit must be a finite number"):
        parse_gates("nan", {}, ["original"], 0.01, "--max-drift")
    result = CliRunner().invoke(cli, ["train", "--data", "demo", "--max-ppl-rise", "adapter=lots"])
    assert_one_line_error(result, "--max-ppl-rise adapter=lots: 'lots' is not a number")


def test_the_run_is_run_everywhere_and_the_positional_run_still_works(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"steps": []}))
    for args in (["show", str(run)], ["show", "--run", str(run)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0 and f"ledger of {run}" in result.output, result.output
    assert_one_line_error(CliRunner().invoke(cli, ["show", str(run), "--run", str(tmp_path)]), "two run folders")
    for command in ("show", "report", "deploy", "smoke"):
        assert "--run" in CliRunner().invoke(cli, [command, "--help"]).output
        assert_one_line_error(CliRunner().invoke(cli, [command]), "which run? pass --run RUN")
    assert_one_line_error(CliRunner().invoke(cli, ["smoke", "--run", str(tmp_path / "nowhere"), "--local"]),
                          "nowhere: not a run folder")
