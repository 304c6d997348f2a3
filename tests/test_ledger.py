import json

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.errors import GateFailed
from edgeft.ledger import artifact
from edgeft.run import Run
from edgeft.tables import ledger_rows


def test_step_entry_round_trip(tmp_path):
    run = Run(tmp_path / "run")
    out_file = tmp_path / "run" / "weights.bin"
    with run.record("eval", {"model": "m"}, {"model": "m"}) as entry:
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
    with run.record("eval", {}, {}) as entry:
        entry["perplexity"] = {"ppl": 20.0, "tokens": 10, "model": "base"}
    with pytest.raises(GateFailed):
        with run.record("train", {}, {}) as entry:
            entry["perplexity"] = {"ppl": 25.0, "tokens": 10, "model": "base+adapter"}
            raise GateFailed("perplexity rose 25.0% (limit 10%)")
    rows = ledger_rows(run.manifest())
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[1]["delta_pct"] == 25.0
    assert "rose 25.0%" in rows[1]["reason"]


def test_show_prints_table_and_json(tmp_path):
    run = Run(tmp_path)
    with run.record("eval", {}, {}) as entry:
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


def _entry(i: int, **more) -> dict:
    return {"step": "export-gguf", "status": "ok", "inputs": {"i": i}, "outputs": [], "metrics": {}, **more}


def test_concurrent_steps_lose_no_entry(tmp_path):
    """Steps of one run side by side (export gguf and onnx at once): 4 processes x 100 appends keep all 400."""
    import subprocess
    import sys

    code = ("import sys\nfrom edgeft.run import Run\nrun = Run(sys.argv[1])\nfor i in range(100):\n"
            "    with run.record('p' + sys.argv[2], {}, {'i': i}):\n        pass\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(p)]) for p in range(4)]
    assert [p.wait() for p in procs] == [0] * 4
    steps = Run(tmp_path).steps()
    assert len(steps) == 400
    for p in range(4):  # and each process's own entries in its order
        assert [e["inputs"]["i"] for e in steps if e["step"] == f"p{p}"] == list(range(100))


def test_a_nan_perplexity_is_written_as_null_with_the_reason(tmp_path):
    import math

    run = Run(tmp_path)
    with pytest.raises(GateFailed, match="not a number"):
        with run.record("export-gguf", {}, {}) as entry:
            entry["perplexity"] = {"ppl": math.nan, "tokens": 10, "model": "broken"}
            entry["metrics"]["kl_mean"] = math.inf
            from edgeft.gates import Gate, check

            check(entry, Gate("perplexity rise", math.nan, 0.02, "Q4_K_M: perplexity rose too much"))
    text = (tmp_path / "manifest.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    (e,) = json.loads(text)["steps"]
    assert e["status"] == "failed" and "not a number" in e["reason"]
    assert e["perplexity"]["ppl"] is None and e["gate"] == {"metric": "perplexity rise", "max": 0.02, "value": None,
                                                           "passed": False, "not_finite": "nan"}
    assert e["non_finite"] == {"perplexity.ppl": "nan", "metrics.kl_mean": "inf"}
    assert entry["perplexity"]["ppl"] is None  # what the step returns matches what was written
    result = CliRunner().invoke(cli, ["show", str(tmp_path)])
    assert result.exit_code == 0 and "broken" in result.output


@pytest.mark.parametrize("content,needle", [
    (b"\x00\x01\x02garbage\xff", "not UTF-8"),
    (b"[1, 2, 3]", "holds a JSON array, not an object"),
    (b"{\"steps\": {}}", "no 'steps' list"),
    (b"{\"steps\": [{\"step\": \"train\"}]}", "steps[0].status"),
    (b"{\"steps\": [{\"step\": \"eval\", \"status\": \"ok\", \"inputs\": {}, \"outputs\": [], \"metrics\": {}, "
     b"\"perplexity\": {\"ppl\": \"high\"}}]}", "steps[0].perplexity.ppl"),
    (b"{\"steps\": [" + b"[" * 50000 + b"]" * 50000 + b"]}", "nested too deeply"),
    (b"{\"steps\": [], \"x\": \"\\udc00\"}", "not valid Unicode"),
])
def test_show_refuses_what_is_not_a_ledger_in_one_line(tmp_path, content, needle):
    from .conftest import assert_one_line_error

    (tmp_path / "manifest.json").write_bytes(content)
    assert_one_line_error(CliRunner().invoke(cli, ["show", str(tmp_path)]), "manifest.json", needle)
    assert_one_line_error(CliRunner().invoke(cli, ["show", str(tmp_path), "--json"]), needle)


def test_an_old_manifest_with_a_bare_nan_reads_as_null(tmp_path):
    (tmp_path / "manifest.json").write_text('{"steps": [{"step": "eval", "status": "ok", "inputs": {}, "outputs": [],'
                                            ' "metrics": {}, "perplexity": {"ppl": NaN, "tokens": 3}}]}')
    assert Run(tmp_path).steps()[0]["perplexity"]["ppl"] is None
    result = CliRunner().invoke(cli, ["show", str(tmp_path), "--json"])
    assert result.exit_code == 0 and "NaN" not in result.output


def test_fuzzed_manifests_give_a_table_or_one_line_never_a_traceback(tmp_path):
    """Seeded, bounded: 300 damaged copies of a real ledger (byte flips, truncations, values swapped for
    other JSON types) through `edgeft show` and the reader every step uses."""
    import random

    from edgeft.errors import EdgeftError

    run = Run(tmp_path / "good")
    for i in range(3):
        with run.record("eval", {"i": i}, {"model": "m"}) as entry:
            entry["perplexity"] = {"ppl": 10.0 + i, "tokens": 100, "model": "m"}
            entry["outputs"].append({"path": "x.bin", "bytes": 10, "sha256": "0" * 64})
    good = run.manifest_path.read_bytes()
    rng = random.Random(13)
    weird = [None, True, -1, 1e308, "", "x" * 300, [], {}, [[[]]], {"ppl": "a"}, "\u202e", 2**70]

    def mutate() -> bytes:
        kind = rng.randrange(3)
        if kind == 0:
            b = bytearray(good)
            for _ in range(rng.randint(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            return bytes(b)
        if kind == 1:
            return good[:rng.randrange(len(good))]
        doc = node = json.loads(good)
        while keys := list(node) if isinstance(node, dict) else list(range(len(node))):
            key = rng.choice(keys)  # walk down to a random place, replace its value
            if rng.random() < 0.4 or not isinstance(node[key], (dict, list)):
                node[key] = rng.choice(weird)
                break
            node = node[key]
        return json.dumps(doc).encode()

    outcomes = {"shown": 0, "refused": 0}
    folder = tmp_path / "fuzz"
    folder.mkdir()
    for _ in range(300):
        (folder / "manifest.json").write_bytes(mutate())
        result = CliRunner().invoke(cli, ["show", str(folder)])
        assert result.exit_code in (0, 2) and "Traceback" not in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        if result.exit_code == 2:
            assert result.output.strip().count("\n") == 0 and result.output.startswith("error: ")
            with pytest.raises(EdgeftError):
                Run(folder).manifest()
        outcomes["shown" if result.exit_code == 0 else "refused"] += 1
    print(f"fuzz manifest: {outcomes}, 0 tracebacks")  # the counts the README states
    assert outcomes["shown"] > 20 and outcomes["refused"] > 100, outcomes


def test_steps_recorded_at_once_from_threads_each_close_their_own_entry(tmp_path):
    """A fleet records each board's step from its own thread while its own entry is open: every entry is
    written once, with its peak RSS, however their starts and ends interleave."""
    import threading

    run = Run(tmp_path)
    started, go = threading.Barrier(4), threading.Event()

    def step(i):
        with run.record(f"p{i}", {}, {"i": i}):
            started.wait()
            go.wait(5)

    with run.record("fleet-smoke", {}, {}) as outer:
        threads = [threading.Thread(target=step, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join()
    steps = run.steps()
    assert sorted(e["step"] for e in steps) == ["fleet-smoke", "p0", "p1", "p2", "p3"]
    assert all(e["status"] == "ok" and e["peak_rss_mb"] > 0 for e in steps)
    assert outer["peak_rss_mb"] >= max(e["peak_rss_mb"] for e in steps if e["step"] != "fleet-smoke")
