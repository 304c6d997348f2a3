"""edgeft build: llama.cpp and edgeft-board cross-compiled statically for a board profile, cached."""

import json
import subprocess

import pytest
from click.testing import CliRunner

from edgeft.cli import cli

from .conftest import needs_cross

pytestmark = [pytest.mark.slow, needs_cross]


def test_build_rpi5_is_static_aarch64_and_cached(edgeft_home):
    result = CliRunner().invoke(cli, ["build", "--device", "rpi5", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.strip().splitlines()[-1])
    for binary in ("edgeft-board", "llama-server", "llama-cli"):
        kind = subprocess.run(["file", f"{info['bin']}/{binary}"], capture_output=True, text=True).stdout
        assert "ARM aarch64" in kind and "statically linked" in kind, (binary, kind)
    # what serving adds to a cold build is measured apart from edgeft-board (kept with the cached build)
    parts = info["cold_build_seconds_by_part"]
    assert set(parts) == {"board", "runtime"} and parts["board"] > 0 and parts["runtime"] > 0
    again = json.loads(CliRunner().invoke(cli, ["build", "--device", "rpi5", "--json"]).output.strip())
    assert again["cached"] and again["bin"] == info["bin"]
