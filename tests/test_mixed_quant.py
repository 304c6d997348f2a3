"""--quant auto --budget: a per-tensor recipe chosen from the run's data, written by llama.cpp, gated and
compared with the stock recipes on the same ids (real llama.cpp, tiny models; the default model in slow)."""

import json
import shutil

import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from edgeft.cli import cli
from edgeft.merge import MergeConfig, merge

from .conftest import WINDOW, assert_one_line_error


def _export(*args):
    result = CliRunner().invoke(cli, ["export", *args, "--json", *WINDOW])
    return result, (json.loads(result.output.strip().splitlines()[-1]) if result.exit_code in (0, 3) else None)


def test_budget_recipe_fits_and_is_what_llama_cpp_stored(tiny_adapter_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_adapter_run, run)
    merge(MergeConfig(adapter=str(run), dtype="float32", window=128, stride=128))
    result, entries = _export("--run", str(run), "--quant", "f16,auto", "--budget", "q4_k_m", "--max-ppl-rise", "100")
    assert result.exit_code == 0, result.output
    quants = [e["inputs"]["quant"] for e in entries[:-1]]
    assert quants[0] == "f16" and quants[1] == "q4_k_m" and quants[-1] == "mixed" and len(quants) == 4
    mixed, choice = entries[-2], entries[-1]
    info = mixed["metrics"]["mixed"]
    stock = next(e for e in entries if e["inputs"]["quant"] == "q4_k_m")
    assert info["budget_bytes"] == stock["outputs"][0]["bytes"] >= mixed["outputs"][0]["bytes"]
    assert info["stored_differently"] == {}
    (path,) = (run / "gguf").glob("*-MIXED.gguf")
    stored = {t.name: t.tensor_type.name.lower() for t in GGUFReader(path).tensors}
    assert all(stored[n] == t for n, t in info["recipe"].items())
    print(json.dumps({k: v for k, v in info.items() if k not in ("recipe", "scales")}, indent=1))
    print(choice["metrics"])
