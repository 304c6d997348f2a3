import json

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.errors import GateFailed
from edgeft.ledger import Run, artifact, ledger_rows


def test_step_entry_round_trip(tmp_path):
    run = Run(tmp_path / "run")
    out_file = tmp_path / "run" / "weights.bin"
    with run.step("eval", {"model": "m"}, {"model": "m"}) as entry:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_bytes(b"x" * 1000)
        buf = bytearray(50 * 2**20)  # touch memory so the step's peak RSS is visibly real
        buf[::4096] = b"\1" * len(buf[::4096])
        entry["outputs"].append(artifact(out_file, run.path))
        entry["perplexity"] = {"ppl": 20.0, "tokens": 100, "model": "m"}
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    (e,) = manifest["steps"]
    assert e["status"] == "ok"
    assert e["outputs"] == [{"path": "weights.bin", "bytes": 1000, "sha256": artifact(out_file)["sha256"]}]
    assert e["peak_rss_mb"] >= 50
    assert e["wall_s"] >= 0
    assert e["versions"]["torch"] and e["versions"]["transformers"]
    assert e["config"] == {"model": "m"}


def test_failed_step_is_recorded_with_reason_and_delta(tmp_path):
    run = Run(tmp_path)
    with run.step("eval", {}, {}) as entry:
        entry["perplexity"] = {"ppl": 20.0, "tokens": 10, "model": "base"}
    with pytest.raises(GateFailed):
        with run.step("train", {}, {}) as entry:
            entry["perplexity"] = {"ppl": 25.0, "tokens": 10, "model": "base+adapter"}
            raise GateFailed("perplexity rose 25.0% (limit 10%)")
    rows = ledger_rows(run.manifest())
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[1]["delta_pct"] == 25.0
    assert "rose 25.0%" in rows[1]["reason"]


def test_show_prints_table_and_json(tmp_path):
    run = Run(tmp_path)
    with run.step("eval", {}, {}) as entry:
        entry["perplexity"] = {"ppl": 14.9206, "tokens": 8176, "model": "smollm2-135m"}
    result = CliRunner().invoke(cli, ["show", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "14.9206" in result.output and "smollm2-135m" in result.output
    result = CliRunner().invoke(cli, ["show", str(tmp_path), "--json"])
    assert json.loads(result.output)["steps"][0]["perplexity"]["ppl"] == 14.9206


def test_show_on_a_folder_without_manifest(tmp_path):
    result = CliRunner().invoke(cli, ["show", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "manifest.json" in result.output
