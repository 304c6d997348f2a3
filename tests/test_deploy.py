"""edgeft deploy against a real sshd on 127.0.0.1 standing in for the board (aarch64 build, qemu-user):
verified copies, skip, resume, corruption, quoting, refusals."""

import json
import time

import pytest
from click.testing import CliRunner

from edgeft.cli import cli

from .conftest import deploy_cli, needs_cross

pytestmark = [pytest.mark.slow, needs_cross]


def test_deploy_verifies_skips_resumes_and_resends(tiny_export_run, copy_run, board, tmp_path):
    run = copy_run(tiny_export_run)  # deploy appends to the run's ledger
    dest = tmp_path / "board dir; with 'quotes'"  # quoting: spaces, ;, quotes
    first = deploy_cli(run, board, dest, "--quant", "q8_0")
    assert first.exit_code == 0, first.output
    entry = json.loads(first.output.strip().splitlines()[-1])
    # the files are in a version folder named by the run and the GGUF's digest; `current` links to it
    folder = dest / "versions" / entry["inputs"]["version"]
    assert (dest / "current").resolve() == folder.resolve()
    gguf = next(p for p in folder.iterdir() if p.suffix == ".gguf")
    assert entry["inputs"]["version"] == f"run-{entry['outputs'][0]['sha256'][:12]}"
    assert {p.name for p in folder.iterdir()} >= {gguf.name, "edgeft-board", "eval_ids.txt", "deploy.json"}
    assert entry["metrics"]["files_skipped"] == 0 and entry["metrics"]["bytes_sent"] > 0
    assert not list(folder.glob("*.part"))

    again = json.loads(deploy_cli(run, board, dest, "--quant", "q8_0").output.strip().splitlines()[-1])
    # the GGUF, edgeft-board, llama-server, llama-cli, the held-out ids and the prompt's
    assert again["metrics"]["files_skipped"] == len(again["outputs"]) == 6 and again["metrics"]["bytes_sent"] == 0

    # killed mid-file: half the GGUF is left as .part; the next deploy sends only the rest
    data = gguf.read_bytes()
    gguf.unlink()
    (folder / (gguf.name + ".part")).write_bytes(data[: len(data) // 2])
    resumed = json.loads(deploy_cli(run, board, dest, "--quant", "q8_0").output.strip().splitlines()[-1])
    assert resumed["metrics"]["files_resumed"] == 1
    assert resumed["metrics"]["bytes_sent"] == len(data) - len(data) // 2
    assert gguf.read_bytes() == data

    # a corrupted file on the board is detected by its hash and sent again
    corrupt = bytearray(data)
    corrupt[len(data) // 3] ^= 0xFF
    gguf.write_bytes(bytes(corrupt))
    fixed = json.loads(deploy_cli(run, board, dest, "--quant", "q8_0").output.strip().splitlines()[-1])
    assert fixed["metrics"]["bytes_sent"] == len(data) and gguf.read_bytes() == data


def test_unknown_host_key_unreachable_board_and_too_big_model_are_refused(tiny_export_run, copy_run, board, tmp_path):
    run = copy_run(tiny_export_run)  # a refused deploy's entry is in the run's ledger
    args = ["deploy", str(run), "--device", "rpi5", "--ssh-config", board.config, "--dest", str(tmp_path / "d"),
            "--emulate", "--connect-timeout", "3"]
    result = CliRunner().invoke(cli, args + ["--host", "stranger"])
    assert result.exit_code == 2 and "host key verification failed" in result.output.strip().splitlines()[-1]
    start = time.perf_counter()
    result = CliRunner().invoke(cli, args + ["--host", "nowhere"])
    assert result.exit_code == 2 and "unreachable" in result.output.strip().splitlines()[-1]
    assert time.perf_counter() - start < 20
    result = CliRunner().invoke(cli, args + ["--host", "board", "--context", "100000000"])
    line = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and "KV cache" in line and "usable" in line, result.output
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").rglob("*.gguf"))
