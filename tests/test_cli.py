"""The CLI starts without torch, prints a one-line error for bad input, and hides only known library noise."""

import logging
import subprocess
import sys
import warnings

from click.testing import CliRunner

from edgeft.cli import cli


def test_help_devices_show_and_report_import_neither_torch_nor_transformers():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom edgeft.cli import cli\n"
            "for args in (['--help'], ['train', '--help'], ['export', '--help'], ['devices'], ['show', '/nowhere']):\n"
            "    CliRunner().invoke(cli, args)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'llama_cpp', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_step_command_has_config_and_json():
    for name in ("eval", "train", "merge", "export", "deploy", "smoke"):
        text = CliRunner().invoke(cli, [name, "--help"]).output
        assert "--config" in text and "--json" in text, name


def test_known_library_noise_is_hidden_and_everything_else_shown(caplog):
    from edgeft.noise import silence

    silence()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        silence()  # filters are re-applied inside the recording context
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something the user should read", FutureWarning)
    assert [str(w.message) for w in caught] == ["something the user should read"]
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no module")
    logger.warning("Another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["Another bitsandbytes warning"]


def test_verbose_is_a_global_flag():
    assert "--verbose" in CliRunner().invoke(cli, ["--help"]).output
    assert CliRunner().invoke(cli, ["--verbose", "devices"]).exit_code == 0
