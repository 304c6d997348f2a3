"""The board serves: llama-server (the aarch64 build, under qemu-user) started by `edgeft deploy --serve` behind
the loopback sshd, one base with two adapters (the demo task's and the dates task's) chosen per request,
checked by `edgeft smoke --adapters` through an SSH tunnel; and a fleet of two boards plus an unreachable one."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.devices import serve
from edgeft.devices.ssh import Remote

from .conftest import WINDOW, assert_one_line_error, free_serve_port, needs_cross, train_tiny

# The board's tests run the aarch64 build under qemu behind the loopback sshd (slow tier); the fleet file's
# checks and the systemd unit's are fast.
on_the_board = [pytest.mark.slow, needs_cross]


@pytest.fixture(scope="module")
def two_adapters(tiny_llama, tmp_path_factory):
    """Two adapter runs on the tiny Llama, one per shipped task, each exported as fused F16/Q8_0 GGUFs and as a
    LoRA GGUF with the base in F16 and Q8_0. Trained long enough at a high rate that each has learnt its
    answer's shape, so the two answer the same prompt differently."""
    from edgeft.data import date_task, demo_task

    root = tmp_path_factory.mktemp("served")
    runs = []
    for name, rows in (("demo", demo_task.make_rows(24)), ("dates", date_task.make_rows(24))):
        run = train_tiny(tiny_llama, root / name, rows=rows, lr=1e-2, max_steps=30, save_every=30).run
        result = CliRunner().invoke(cli, ["export", "--adapter", str(run), "--quant", "f16,q8_0", "--adapter-only",
                                          "--max-ppl-rise", "100", *WINDOW])
        assert result.exit_code == 0, result.output
        runs.append(run)
    return runs


def _json_out(result):
    """The --json line of a command's output (progress lines and a final error line go around it)."""
    return json.loads(next(l for l in reversed(result.output.splitlines()) if l.startswith(("{", "["))))


def _ssh(board, *args):
    return ["--host", "board", "--ssh-config", board.config, *args]


@on_the_board[0]
@on_the_board[1]
def test_one_base_two_adapters_served_and_switched_per_request(two_adapters, tiny_llama, board, tmp_path):
    demo, dates = two_adapters
    port = free_serve_port()
    dest = str(tmp_path / "served")
    common = ["--adapters", f"{demo},{dates}", "--device", "rpi5", "--emulate", "--serve-port", str(port),
              "--dest", dest, *_ssh(board)]
    remote = Remote("board", board.config)
    try:
        _served_and_checked(common, board, remote, port, dest, demo, dates, tiny_llama)
    finally:  # a failed assertion must not leave the server running
        serve.stop(remote, port)
        serve.stop(remote, port + 1)


def _served_and_checked(common, board, remote, port, dest, demo, dates, tiny_llama):
    result = CliRunner().invoke(cli, ["deploy", *common, "--serve", "--json"])
    assert result.exit_code == 0, result.output
    entry = _json_out(result)
    served = entry["metrics"]["serve"]
    assert served["manager"] == "nohup" and served["listen"] is False  # no systemd user manager in the container
    assert [a["run"] for a in served["adapters"]] == ["demo", "dates"]
    # the base ships once: one base GGUF, two LoRA GGUFs, each run's ids in its own folder
    names = [o["path"].rsplit("/", 1)[-1] for o in entry["outputs"]]
    assert sum(n.endswith("-base-Q8_0.gguf") for n in names) == 1 and sum("LoRA" in n for n in names) == 2
    assert any(o["path"].endswith("/dates/task_prompts.txt") for o in entry["outputs"])
    # both runs' ledgers say where they are served
    assert json.loads((dates / "manifest.json").read_text())["steps"][-1]["step"] == "deploy"
    assert "127.0.0.1" in open(f"{dest}/current/serve.sh").read()  # bound to the board's loopback unless --listen

    # the same prompt through the server with each adapter: two different answers, each its fused model's
    from edgeft.llamacpp import LlamaCpp
    from edgeft.models import load_tokenizer
    from edgeft.task import read_task_set

    tokenizer = load_tokenizer(tiny_llama)
    item = read_task_set(dates, tokenizer).items[0]
    answers = []
    with remote.tunnel(port) as local:
        client = serve.Client(local)
        for i, run in enumerate((demo, dates)):
            got = client.complete(item.prompt, 24, client.lora(2, i))["tokens"]
            fused = LlamaCpp(next((run / "gguf").glob("*-fused-Q8_0.gguf")), n_ctx=256)
            want = fused.generate(item.prompt, 24)[0]
            fused.close()
            answers.append(got)
            assert got[:8] == want[:8], (i, got, want)
        base = client.complete(item.prompt, 24, client.lora(2, None))["tokens"]
    assert answers[0] != answers[1] and base not in answers

    result = CliRunner().invoke(cli, ["smoke", *common, "--json"])
    assert result.exit_code == 0, result.output
    entries = _json_out(result)
    assert [e["inputs"]["adapter_id"] for e in entries] == [0, 1]
    for e in entries:
        assert e["status"] == "ok" and all(g["passed"] for g in e["gates"])
        a = e["metrics"]["served_answers"]
        assert a["endpoint"] == "/v1/chat/completions" and a["items"] == min(3, a["of"]) > 0
        assert e["reference"]["model"].endswith("-fused-Q8_0.gguf on host")
    sw, mem = entries[0]["metrics"]["switching"], entries[0]["metrics"]["memory"]
    assert sw["after_other_adapter_ms"] > 0 and sw["after_same_adapter_ms"] > 0
    assert mem["server_with_adapters_rss_bytes"] < mem["separate_servers_rss_bytes"]
    assert serve.pid(remote, port + 1) is None  # the one-model server smoke measured is gone

    # re-deploying replaces the server on that port; --stop stops it
    again = CliRunner().invoke(cli, ["deploy", *common, "--serve", "--json"])
    assert again.exit_code == 0, again.output
    assert _json_out(again)["metrics"]["serve"]["replaced"] is True
    stopped = CliRunner().invoke(cli, ["deploy", "--stop", "--serve-port", str(port), *_ssh(board)])
    assert stopped.exit_code == 0 and "stopped the server" in stopped.output, stopped.output
    assert serve.pid(remote, port) is None
    gone = CliRunner().invoke(cli, ["smoke", *common])
    assert_one_line_error(gone, "no server answers")


@on_the_board[0]
@on_the_board[1]
def test_adapters_of_different_bases_are_refused(two_adapters, tiny_qwen2, tmp_path, board):
    other = tmp_path / "other"
    train_tiny(tiny_qwen2, other, max_steps=2)
    result = CliRunner().invoke(cli, ["export", "--adapter", str(other), "--quant", "f16,q8_0", "--adapter-only",
                                      "--max-ppl-rise", "100", *WINDOW])
    assert result.exit_code == 0, result.output
    refused = CliRunner().invoke(cli, ["deploy", "--adapters", f"{two_adapters[0]},{other}", "--device", "rpi5",
                                       "--emulate", *_ssh(board)])
    assert_one_line_error(refused, "not exported from the same base")


@on_the_board[0]
@on_the_board[1]
def test_a_fleet_deploys_in_parallel_a_dead_board_fails_alone_and_a_rerun_resumes(tiny_export_run, board, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_export_run, run)
    hosts = tmp_path / "fleet.yaml"
    boards = [{"name": "pi-a", "host": "board", "device": "rpi5", "ssh_config": board.config, "emulate": True,
               "dest": str(tmp_path / "a")},
              {"name": "pi-b", "host": "board2", "device": "rpi5", "ssh_config": board.config, "emulate": True,
               "dest": str(tmp_path / "b")},
              {"name": "pi-dead", "host": "nowhere", "device": "rpi5", "ssh_config": board.config, "emulate": True,
               "dest": str(tmp_path / "c"), "ram_gb": 4}]
    hosts.write_text(yaml.safe_dump({"boards": boards}))
    result = CliRunner().invoke(cli, ["deploy", str(run), "--hosts", str(hosts), "--quant", "q8_0", "--json"])
    assert result.exit_code == 2, result.output
    fleet = _json_out(result)
    rows = {r["board"]: r for r in fleet["metrics"]["boards"]}
    assert rows["pi-a"]["passed"] and rows["pi-b"]["passed"] and not rows["pi-dead"]["passed"]
    assert "unreachable" in rows["pi-dead"]["error"]
    assert (tmp_path / "a" / "current" / "deploy.json").is_file() and (tmp_path / "b" / "current" / "deploy.json").is_file()

    smoke = CliRunner().invoke(cli, ["smoke", str(run), "--hosts", str(hosts), "--quant", "q8_0", "--json"])
    rows = {r["board"]: r for r in _json_out(smoke)["metrics"]["boards"]}
    # exit 2 for the unreachable board, 3 when a board also failed a gate: a random tiny model's answer may be
    # blank lines, and the answer check is then the one gate that failed, on both boards alike
    gated = [name for name in ("pi-a", "pi-b") if rows[name]["failed_gate"]]
    assert gated in ([], ["pi-a", "pi-b"]) and smoke.exit_code == (3 if gated else 2), smoke.output
    for name in ("pi-a", "pi-b"):
        assert rows[name]["passed"] == (not gated)
        assert not gated or "the board's answer failed its checks" in rows[name]["error"]
        assert rows[name]["tokens_per_s"] > 0 and abs(rows[name]["ppl_change"]) < 0.02
    assert "unreachable" in rows["pi-dead"]["error"] and not rows["pi-dead"]["failed_gate"]

    # the dead board comes back (now the second port): a re-run does it alone and keeps the others' rows
    boards[2]["host"] = "board2"
    hosts.write_text(yaml.safe_dump({"boards": boards}))
    result = CliRunner().invoke(cli, ["deploy", str(run), "--hosts", str(hosts), "--quant", "q8_0", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["board"]: r for r in _json_out(result)["metrics"]["boards"]}
    assert rows["pi-a"]["skipped"] and rows["pi-b"]["skipped"] and not rows["pi-dead"]["skipped"]
    assert all(r["passed"] for r in rows.values())
    steps = [e["step"] for e in json.loads((run / "manifest.json").read_text())["steps"]]
    assert steps.count("fleet-deploy") == 2 and steps.count("fleet-smoke") == 1


def test_fleet_files_are_checked_in_one_line(tiny_export_run, tmp_path):
    hosts = tmp_path / "fleet.yaml"
    for text, needle in (("boards: 3\n", "no 'boards' list"),
                         ("boards:\n- {name: a, host: pi}\n", "field 'device'"),
                         ("boards:\n- {name: a, host: pi, device: rpi5, colour: red}\n", "unknown field 'colour'"),
                         ("boards:\n- {name: a, host: pi, device: rpi5}\n- {name: a, host: pi2, device: rpi5}\n",
                          "used twice")):
        hosts.write_text(text)
        assert_one_line_error(CliRunner().invoke(cli, ["deploy", str(tiny_export_run), "--hosts", str(hosts)]),
                              "--hosts", needle)


def test_a_python_caller_that_sets_hosts_gets_a_fleet(tiny_export_run, copy_run, tmp_path):
    """deploy() runs the fleet itself (not only the CLI): an unreachable board is its failed row, the fleet's
    entry is recorded like any step's (versions, peak RSS) and raised with the error (exit 2: no gate failed)."""
    from edgeft.devices.deploy import DeployConfig, deploy
    from edgeft.errors import EdgeftError, GateFailed
    from edgeft.run import Run

    if not shutil.which("ssh"):
        pytest.skip("openssh-client not installed")
    run = copy_run(tiny_export_run)
    hosts = tmp_path / "fleet.yaml"
    hosts.write_text(yaml.safe_dump({"boards": [{"name": "gone", "host": "127.0.0.1", "device": "rpi5",
                                                 "port": free_serve_port()}]}))  # nothing listens there
    with pytest.raises(EdgeftError) as raised:
        deploy(DeployConfig(run=str(run), hosts=str(hosts), quant="q8_0", connect_timeout=5))
    assert not isinstance(raised.value, GateFailed) and "1 of 1 boards failed: gone" in str(raised.value)
    entry = raised.value.fleet_entry
    assert entry == Run(run).last("fleet-deploy", status="failed")
    assert entry["metrics"]["failed"] == 1 and not entry["metrics"]["boards"][0]["failed_gate"]
    assert entry["versions"]["edgeft"] and entry["peak_rss_mb"] > 0 and entry["wall_s"] >= 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_runs_the_script_wherever_the_folder_is(tmp_path):
    """systemd splits ExecStart at spaces and expands %: a --dest like "my models" or "50% off" must still name
    the script (systemd-analyze verify fails when the program it reads is not an executable file)."""
    import subprocess

    from edgeft.errors import EdgeftError

    for name in ("plain", "my models", "50% off", "cost $HOME", 'say "hi"', "back\\slash"):
        script = tmp_path / name / "serve.sh"
        script.parent.mkdir()
        script.write_text("#!/bin/sh\n")
        script.chmod(0o755)
        if '"' in name or "\\" in name:  # systemd refuses these in a program's path: one line, before any change
            with pytest.raises(EdgeftError, match="--dest .*quote or a backslash"):
                serve.unit_text(str(script), 8080, name)
            continue
        unit = tmp_path / "edgeft-serve-8080.service"
        unit.write_text(serve.unit_text(str(script), 8080, f"run {name}"))
        check = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert check.returncode == 0, (name, unit.read_text(), check.stderr)
