"""Staged rollouts on an emulated fleet (issue 28): three boards behind the one loopback sshd (each its own
folder and server port; the aarch64 build under qemu-user), a model that passes reaching them wave by wave,
a model that fails its task gate on the canary stopping there and the canary serving its previous version
again, `deploy --rollback`, `edgeft status`, and a rollout killed mid-wave finishing when run again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.devices import serve
from edgeft.devices.ssh import Remote

from .conftest import WINDOW, free_serve_port, needs_cross, train_tiny

pytestmark = [pytest.mark.slow, needs_cross]

QUESTIONS = [f"Is item {i} on the list? Answer yes or no." for i in range(24)]


def _export(run: Path) -> None:
    from edgeft.merge import MergeConfig, merge

    merge(MergeConfig(adapter=str(run), dtype="float32", window=128, stride=128))
    result = CliRunner().invoke(cli, ["export", "--run", str(run), "--quant", "f16,q8_0", "--max-ppl-rise", "100",
                                      *WINDOW])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def models(tiny_llama, tmp_path_factory):
    """Runs on the tiny Llama whose task is one answer ("yes") to every question. `good` learnt it (its task
    perplexity fell); `bad` is the same data trained one step at a tiny rate: the fine-tune did not take. The
    two share the held-out split (same data, same seed), so their task figures are measured on the same items."""
    root = tmp_path_factory.mktemp("rollout-models")
    rows = [{"prompt": q, "completion": "yes"} for q in QUESTIONS]
    out = {}
    for name, settings in (("good", dict(lr=1e-2, max_steps=30)), ("bad", dict(lr=1e-6, max_steps=1))):
        run = train_tiny(tiny_llama, root / name, rows=rows, save_every=30, **settings).run
        _export(run)
        out[name] = run
    return out


def _fleet(tmp_path: Path, board, names=("canary", "second", "third")) -> tuple[Path, list[dict]]:
    """Three boards on the one sshd (two of its ports), each its own folder and server port."""
    boards = [{"name": n, "host": ("board", "board2")[i % 2], "device": "rpi5", "ssh_config": board.config,
               "emulate": True, "dest": str(tmp_path / n), "serve_port": free_serve_port()} for i, n in enumerate(names)]
    hosts = tmp_path / "fleet.yaml"
    hosts.write_text(yaml.safe_dump({"boards": boards}))
    return hosts, boards


def _json_out(result):
    return json.loads(next(l for l in reversed(result.output.splitlines()) if l.startswith(("{", "["))))


def _rollout(run, hosts, *extra):
    return CliRunner().invoke(cli, ["deploy", str(run), "--hosts", str(hosts), "--serve", "--quant", "q8_0",
                                    "--json", *extra])


def _entries(run: Path, step: str) -> list[dict]:
    return [e for e in json.loads((run / "manifest.json").read_text())["steps"] if e["step"] == step]


def _current(b: dict) -> str | None:
    link = Path(b["dest"]) / "current"
    return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None


def _ask(board, b: dict) -> str:
    """One question of the task through the board's server, as an app asks it."""
    remote = Remote(b["host"], board.config)
    with remote.tunnel(b["serve_port"]) as port:
        resp = serve.Client(port, timeout=300).chat([{"role": "user", "content": QUESTIONS[0]}], 8, [])
    return resp["choices"][0]["message"]["content"]


def _stop_all(board, boards):
    for b in boards:
        serve.stop(Remote(b["host"], board.config), b["serve_port"])


def test_waves_gate_switch_back_rollback_and_status(models, board, tmp_path):
    hosts, boards = _fleet(tmp_path, board)
    good, other, bad = (tmp_path / n for n in ("good", "other", "bad"))
    for name, path in zip(("good", "good", "bad"), (good, other, bad)):  # `other`: the same model, another run
        shutil.copytree(models[name], path)
    try:
        _waves_and_gates(board, hosts, boards, good, other, bad, tmp_path)
    finally:  # a failed assertion must not leave servers running
        _stop_all(board, boards)


def _waves_and_gates(board, hosts, boards, good, other, bad, tmp_path):
    # 1. a model that passes reaches every board, one wave at a time, each wave an entry in the ledger
    result = _rollout(good, hosts, "--waves", "1,2,100%")
    assert result.exit_code == 0, result.output
    summary = _json_out(result)
    assert summary["step"] == "rollout" and summary["metrics"]["passed"] == 3
    waves = _entries(good, "rollout-wave")
    assert [(w["inputs"]["wave"], w["inputs"]["names"], w["status"]) for w in waves] == [
        (1, ["canary"], "ok"), (2, ["second"], "ok"), (3, ["third"], "ok")]
    v1 = summary["inputs"]["version"]
    assert all(_current(b) == v1 for b in boards)
    smokes = _entries(good, "smoke")
    assert len(smokes) == 3 and all(e["status"] == "ok" for e in smokes)
    for e in smokes:  # checked through the server: the board's perplexity, the chat API's answers, decode speed
        assert e["metrics"]["served_answers"]["endpoint"] == "/v1/chat/completions"
        assert e["metrics"]["served_task"]["ppl"] > 0 and e["metrics"]["decode"]["tokens_per_s"] > 0
        assert e["inputs"]["version"] == v1
    before = {b["name"]: _ask(board, b) for b in boards}

    # 2. another version (another run of the same GGUF): every file is linked from the version before, not sent
    result = _rollout(other, hosts, "--waves", "1,100%")
    assert result.exit_code == 0, result.output
    rows = _json_out(result)["metrics"]["boards"]
    assert all(r["passed"] and r["files_linked"] >= 4 and r["bytes_sent"] == 0 and r["previous"] == v1
               for r in rows), rows
    v2 = _json_out(result)["inputs"]["version"]
    assert all(_current(b) == v2 for b in boards)
    assert all(sorted(p.name for p in (Path(b["dest"]) / "versions").iterdir()) == sorted([v1, v2]) for b in boards)

    # 3. deploy --rollback: every board back on the version before, checked serving (its run's full check)
    result = CliRunner().invoke(cli, ["deploy", "--rollback", "--hosts", str(hosts), "--json"])
    assert result.exit_code == 0, result.output
    rows = _json_out(result)["metrics"]["boards"]
    assert all(r["passed"] and r["version"] == v1 and r["left"] == v2 and r["checked"] == "full" for r in rows), rows
    assert all(_current(b) == v1 for b in boards)
    assert {b["name"]: _ask(board, b) for b in boards} == before
    assert _entries(other, "rollback")[-1]["status"] == "ok"

    # 4. a model whose fine-tune did not take fails the task gate on the canary: it stops there (exit 3), the
    # canary serves its previous model again, answering as before; the other boards never see it
    result = _rollout(bad, hosts, "--waves", "1,100%")
    assert result.exit_code == 3, result.output
    summary = _json_out(result)
    v3 = summary["inputs"]["version"]
    assert summary["metrics"]["not_reached"] == 2 and summary["status"] == "failed"
    (canary,) = summary["metrics"]["boards"]
    assert canary["failed_gate"] and "task perplexity" in canary["error"] and "the version it replaces" in \
        canary["error"], canary
    assert canary["switched_back"]["passed"] and canary["switched_back"]["version"] == v1
    waves = _entries(bad, "rollout-wave")
    assert [(w["inputs"]["wave"], w["status"]) for w in waves] == [(1, "failed")]
    switch = _entries(bad, "rollout-switch")
    assert len(switch) == 1 and switch[0]["status"] == "ok" and switch[0]["inputs"]["names"] == ["canary"]
    assert _current(boards[0]) == v1 and _ask(board, boards[0]) == before["canary"]
    for b in boards[1:]:
        assert _current(b) == v1 and not (Path(b["dest"]) / "versions" / v3).exists()

    # 5. status: one row per board with its version and health; an unreachable board is a row too
    fleet = yaml.safe_load(hosts.read_text())
    fleet["boards"].append({"name": "gone", "host": "nowhere", "device": "rpi5", "ssh_config": board.config})
    (tmp_path / "status.yaml").write_text(yaml.safe_dump(fleet))
    result = CliRunner().invoke(cli, ["status", "--hosts", str(tmp_path / "status.yaml"), "--json",
                                      "--connect-timeout", "3"])
    assert result.exit_code == 0, result.output
    rows = {r["board"]: r for r in _json_out(result)}
    assert list(rows) == ["canary", "second", "third", "gone"]
    for name in ("canary", "second", "third"):
        r = rows[name]
        assert r["version"] == v1 and r["health"] == "ok" and r["server"].startswith("up") and r["check_passed"]
        assert r["quant"] == "q8_0" and r["mem_available_bytes"] > 0 and r["disk_free_bytes"] > 0
    assert rows["canary"]["versions"] == sorted([v1, v2, v3])  # the failed one stays until a newer one passes
    assert not rows["gone"]["reachable"] and "unreachable" in rows["gone"]["error"]
    table = CliRunner().invoke(cli, ["status", "--hosts", str(tmp_path / "status.yaml"), "--connect-timeout", "3"])
    assert table.exit_code == 0 and "UNREACHABLE" in table.output and v1[:20] in table.output, table.output


def test_a_rollout_killed_mid_wave_finishes_when_run_again(models, board, tmp_path):
    hosts, boards = _fleet(tmp_path, board, names=("one", "two"))
    run = tmp_path / "good"
    shutil.copytree(models["good"], run)
    cmd = [sys.executable, "-m", "edgeft", "deploy", str(run), "--hosts", str(hosts), "--serve", "--quant", "q8_0",
           "--waves", "1,100%"]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        # killed outright once the second wave's board holds the GGUF verified (its binaries are being sent)
        second = Path(boards[1]["dest"]) / "versions"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if second.is_dir() and any(second.rglob("*.gguf")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        waves = _entries(run, "rollout-wave")
        assert [w["status"] for w in waves] == ["ok"]  # the first wave finished, the second never wrote its entry

        result = _rollout(run, hosts, "--waves", "1,100%")
        assert result.exit_code == 0, result.output
        rows = {r["board"]: r for r in _json_out(result)["metrics"]["boards"]}
        assert rows["one"]["skipped"] and rows["one"]["passed"]  # serving this version, checked: not touched
        assert not rows["two"]["skipped"] and rows["two"]["passed"]
        deploys = [e for e in _entries(run, "deploy") if e["inputs"]["dest"] == boards[1]["dest"]]
        total = sum(o["bytes"] for o in deploys[-1]["outputs"])
        m = deploys[-1]["metrics"]
        # what the killed run had verified on the board (the GGUF at least) was not sent again
        assert m["bytes_sent"] < total and m["files_skipped"] >= 1, m
        assert all(_current(b) == rows["one"]["version"] for b in boards)
    finally:
        _stop_all(board, boards)
