"""Config is data: defaults < file < flags, one-line errors, shared option groups, renamed settings."""

import json

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.config import load_config
from edgeft.errors import EdgeftError
from edgeft.evaluate import EvalConfig
from edgeft.export import GGUFExportConfig, OnnxExportConfig, load_export_config
from edgeft.heldout import HeldOutOptions
from edgeft.merge import MergeConfig
from edgeft.ssh import SSHOptions
from edgeft.smoke import SmokeConfig
from edgeft.deploy import DeployConfig
from edgeft.train import TrainConfig

from .conftest import assert_one_line_error


def test_precedence_defaults_file_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.001\nmax_steps: 7\nquant: none\n")
    c = load_config(TrainConfig, f, {"max_steps": 9, "quant": None})
    assert (c.lr, c.max_steps, c.quant, c.lora_r) == (0.001, 9, "none", 16)


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
