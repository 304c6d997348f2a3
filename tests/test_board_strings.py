"""What edgeft writes for the board's parsers (issue 26, devices/): a fleet file's ssh_config may not run
commands here; hostile names (spaces, quotes, $(), backticks, %, line breaks, a leading -) in the systemd
unit, in serve.sh and in the shell lines sent over ssh are refused in one line or reach the board exactly as
meant. The lines are checked by running them: `systemd-analyze verify` for the unit, a real `sh` for the
rest (a Remote whose transport is `sh -c` here, the shell sshd hands a command to). Fast tier."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.devices import serve, versions
from edgeft.devices.fleet import read_hosts
from edgeft.devices.ssh import Remote
from edgeft.errors import EdgeftError

from .conftest import assert_one_line_error

HOSTILE = ["my models", "it's", 'say "hi"', "$(touch PWNED)", "`touch PWNED`", "50% off", "line\nbreak",
           "-rf", "; touch PWNED ;", "back\\slash", "$HOME"]


class Here(Remote):
    """The remote shell run here: the same command lines, parsed by a real sh (as sshd hands them to one)."""

    def command(self, remote_cmd: str) -> list[str]:
        return ["sh", "-c", remote_cmd]


# ------------------------------------------------------------------------------------------- ssh_config
@pytest.mark.parametrize("directive,needle", [
    ("ProxyCommand sh -c 'touch {marker}; exit 1'", "ProxyCommand"),
    ("proxycommand=sh -c 'touch {marker}; exit 1'", "ProxyCommand"),
    ("PermitLocalCommand yes\n  LocalCommand touch {marker}", "PermitLocalCommand yes"),
    ("LocalCommand touch {marker}", "LocalCommand"),
    ("KnownHostsCommand /bin/sh -c 'touch {marker}'", "KnownHostsCommand"),
    ("Match exec \"touch {marker}\"", "Match exec"),
    ("Include {included}", "ProxyCommand"),
])
def test_a_fleet_ssh_config_that_runs_commands_is_refused(tiny_export_run, copy_run, tmp_path, directive, needle):
    """Before this check, deploy --hosts ran ssh with such a config: its command ran on this host (the
    marker file appeared) for every board."""
    marker = tmp_path / "PWNED"
    included = tmp_path / "included.conf"
    included.write_text(f"Host *\n  ProxyCommand sh -c 'touch {marker}; exit 1'\n")
    config = tmp_path / "fleet_ssh_config"
    config.write_text(f"Host pi\n  HostName 127.0.0.1\n  {directive.format(marker=marker, included=included)}\n")
    hosts = tmp_path / "fleet.yaml"
    hosts.write_text(yaml.safe_dump({"boards": [{"name": "kitchen", "host": "pi", "device": "rpi5",
                                                 "ssh_config": str(config)}]}))
    result = CliRunner().invoke(cli, ["deploy", str(copy_run(tiny_export_run)), "--hosts", str(hosts),
                                      "--quant", "q8_0", "--connect-timeout", "3"])
    assert_one_line_error(result, str(hosts), "'kitchen'", str(config), needle)
    assert not marker.exists()


def test_the_users_own_ssh_config_and_a_plain_one_are_taken(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host *\n  ProxyCommand ssh -W %h:%p jump\n")  # ssh reads it anyway
    plain = tmp_path / "plain.conf"
    plain.write_text("# ProxyCommand in a comment\nHost pi\n  HostName 10.0.0.7\n  ProxyJump gate\n"
                     "  PermitLocalCommand no\n")
    hosts = tmp_path / "fleet.yaml"
    hosts.write_text(yaml.safe_dump({"boards": [
        {"name": "a", "host": "pi", "device": "rpi5", "ssh_config": "~/.ssh/config"},
        {"name": "b", "host": "pi", "device": "rpi5", "ssh_config": str(plain)}]}))
    assert [b.ssh_config for b in read_hosts(str(hosts))] == [str(tmp_path / ".ssh" / "config"), str(plain)]


def test_status_and_rollback_read_the_fleet_file_through_the_same_check(tmp_path):
    config = tmp_path / "c.conf"
    config.write_text("Host *\n  LocalCommand id\n  PermitLocalCommand yes\n")
    hosts = tmp_path / "fleet.yaml"
    hosts.write_text(yaml.safe_dump({"boards": [{"name": "x", "host": "pi", "device": "rpi5",
                                                 "ssh_config": str(config)}]}))
    assert_one_line_error(CliRunner().invoke(cli, ["status", "--hosts", str(hosts)]), "LocalCommand")
    assert_one_line_error(CliRunner().invoke(cli, ["deploy", "--rollback", "--hosts", str(hosts)]), "LocalCommand")


# ------------------------------------------------------------------------------------------- the systemd unit
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", HOSTILE)
def test_the_unit_names_the_script_exactly_or_is_refused(tmp_path, name):
    """Each folder name is either refused in one line (systemd cannot start a program whose path holds a
    quote of either kind or a backslash, escaped or not, nor a line break) or ends up in a unit whose one ExecStart is that script: verify fails
    when the program it reads is not an executable file. The run names in Description cannot add lines."""
    script = tmp_path / name / "serve.sh"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    about = f"run {name}\nExecStartPre=/bin/touch {tmp_path}/PWNED"
    if any(ch in name for ch in '"\'\\\n'):
        with pytest.raises(EdgeftError, match="--dest .*quote or a backslash, or a line break") as refused:
            serve.unit_text(str(script), 8080, about)
        assert "\n" not in str(refused.value)
        return
    text = serve.unit_text(str(script), 8080, about)
    lines = text.splitlines()
    assert [l.split("=", 1)[0] for l in lines if "=" in l] == ["Description", "After", "ExecStart", "Restart",
                                                                "RestartSec", "WantedBy"]
    unit = tmp_path / "edgeft-serve-8080.service"
    unit.write_text(text)
    check = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert check.returncode == 0, (name, text, check.stderr)
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------------- serve.sh
FAKE_SERVER = f"""#!{sys.executable}
import json, os, sys
json.dump(sys.argv[1:], open(os.environ["ARGV_OUT"], "w"))
"""


@pytest.mark.parametrize("name", HOSTILE)
def test_serve_sh_runs_exactly_the_server_command_it_names(tmp_path, name):
    """serve.sh with hostile model, adapter, alias and run names, in a hostile folder, run by sh: the server
    gets exactly the argument list edgeft meant, and nothing else runs."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "llama-server").write_text(FAKE_SERVER)
    (folder / "llama-server").chmod(0o755)
    spec = serve.ServeSpec(model=f"{name}.gguf", loras=[f"{name}-lora.gguf"], context=512, threads=2, port=18080,
                           listen=False, alias=name, qemu=[])
    remote = Here("here")
    serve.install_script(remote, str(folder), spec, f"about {name}\ntouch {tmp_path}/PWNED")
    env = {**os.environ, "HOME": str(tmp_path), "ARGV_OUT": str(tmp_path / "argv.json")}
    subprocess.run(["sh", str(folder / "serve.sh")], env=env, check=True, cwd=tmp_path, timeout=30)
    assert json.loads((tmp_path / "argv.json").read_text()) == spec.argv()[1:]
    assert not (tmp_path / "PWNED").exists() and not (folder / "PWNED").exists()
    assert not (Path(tmp_path) / "PWNED").exists()


# ------------------------------------------------------------------------------------------- ssh lines
@pytest.mark.parametrize("name", HOSTILE)
def test_copies_versions_and_links_reach_exactly_the_named_paths(tmp_path, name, monkeypatch):
    """The board's shell lines (send with its .part and resume, sha256, the version record, the current link,
    linking a file from another version) with a hostile board folder and version name, run by sh."""
    monkeypatch.chdir(tmp_path)  # a relative --dest, as on a board (the login's home)
    remote = Here("here")
    dest = name
    data = tmp_path / "model.gguf"
    data.write_bytes(os.urandom(3 << 20))
    from edgeft.atomic import sha256_file

    digest = sha256_file(data)
    version = versions.version_name(name, digest)
    folder = versions.version_dir(dest, version)
    target = f"{folder}/{name}.gguf"
    Path(folder).mkdir(parents=True)
    Path(target + ".part").write_bytes(data.read_bytes()[:1 << 20])  # an interrupted copy
    sent = remote.send(data, target, digest)
    assert sent["resumed_from"] == 1 << 20 and Path(target).read_bytes() == data.read_bytes()
    assert remote.sha256([target, f"{folder}/absent"]) == {target: digest}

    state = versions.read_state(remote, dest)
    state["versions"][version] = {"run": name, "files": {f"{name}.gguf": digest}, "check": {"passed": True}}
    versions.switch(remote, dest, version)
    versions.made_current(state, version)
    versions.write_state(remote, dest, state)
    again = versions.read_state(remote, dest)
    assert again["current"] == version and again["versions"][version]["run"] == name
    assert Path(dest, "current").resolve() == Path(folder).resolve()

    from edgeft.devices.deploy import _reuse  # linking a file another version holds

    other = versions.version_dir(dest, "other-0123456789ab")
    linked = _reuse(remote, dest, again, "other-0123456789ab", [(data, f"{name}.gguf")],
                    {f"{name}.gguf": digest}, {})
    assert linked == 1 and Path(other, f"{name}.gguf").read_bytes() == data.read_bytes()
    versions.remove(remote, dest, again, ["other-0123456789ab"])
    assert not Path(other).exists() and Path(folder).is_dir()
    assert not list(tmp_path.rglob("PWNED"))


def test_waves_are_checked_in_one_line():
    from edgeft.devices.rollout import plan_waves

    assert plan_waves("1,25%,100%", 20) == [1, 5, 20]
    assert plan_waves("1,25%,100%", 3) == [1, 3]  # 25% of 3 boards adds none after the canary
    assert plan_waves("100%", 1) == [1]
    for spec, needle in (("1,50%", "end with 100%"), ("5,2,100%", "cumulative"), ("0,100%", "out of range"),
                         ("one,100%", "not a count"), ("1,150%", "out of range")):
        with pytest.raises(EdgeftError, match=needle):
            plan_waves(spec, 10)


def test_previous_and_pruning_follow_the_boards_record():
    state = versions.empty_state()
    for name, passed in (("a", True), ("b", True), ("c", False)):
        state["versions"][name] = {"check": {"passed": passed}}
        versions.made_current(state, name)
    assert versions.previous(state) == "b"  # c is current; b served before it and passed
    state["versions"]["b"]["rolled_back"] = "now"
    assert versions.previous(state) == "a"  # rolled back from: skipped
    versions.made_current(state, "a")
    assert versions.to_remove(state, 2) == ["c"]  # a (current) and b (the newest other that passed) stay
    assert versions.to_remove(state, 1) == ["b", "c"]


def test_unreachable_boards_stop_a_rollout_beyond_max_unavailable(tiny_export_run, copy_run, tmp_path):
    """Boards that cannot be reached are rows; more of them than --max-unavailable stop the rollout after
    their wave (later waves untouched), within it every wave runs; either way the exit is 2, not a gate's 3."""
    if not shutil.which("ssh"):
        pytest.skip("openssh-client not installed")
    import socket

    def closed_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    run = copy_run(tiny_export_run)
    hosts = tmp_path / "fleet.yaml"
    hosts.write_text(yaml.safe_dump({"boards": [{"name": f"dead{i}", "host": "127.0.0.1", "device": "rpi5",
                                                 "port": closed_port()} for i in range(3)]}))
    args = ["deploy", str(run), "--hosts", str(hosts), "--serve", "--quant", "q8_0", "--waves", "1,100%",
            "--connect-timeout", "3", "--json"]
    stopped = CliRunner().invoke(cli, args)
    assert stopped.exit_code == 2 and "later waves were not touched" in stopped.output.splitlines()[-1]
    summary = json.loads(next(l for l in stopped.output.splitlines() if l.startswith("{")))
    assert [r["board"] for r in summary["metrics"]["boards"]] == ["dead0"] and summary["metrics"]["not_reached"] == 2
    assert summary["metrics"]["boards"][0]["unavailable"] and "unreachable" in summary["metrics"]["boards"][0]["error"]

    tolerated = CliRunner().invoke(cli, [*args, "--max-unavailable", "3"])
    assert tolerated.exit_code == 2 and "every wave ran" in tolerated.output.splitlines()[-1], tolerated.output
    summary = json.loads(next(l for l in tolerated.output.splitlines() if l.startswith("{")))
    assert summary["metrics"]["unavailable"] == 3 and summary["metrics"]["not_reached"] == 0
    steps = [e["step"] for e in json.loads((run / "manifest.json").read_text())["steps"]]
    # the first rollout: one wave; the second: two waves; each ends with its rollout entry
    assert steps[-5:] == ["rollout-wave", "rollout", "rollout-wave", "rollout-wave", "rollout"]


def test_a_damaged_versions_record_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("edgeft").mkdir()
    for text in ("{not json", "[1, 2]", '{"versions": 3}'):
        Path("edgeft", versions.STATE).write_text(text)
        with pytest.raises(EdgeftError, match="versions.json") as raised:
            versions.read_state(Here("here"), "edgeft")
        assert "\n" not in str(raised.value)
    Path("edgeft", versions.STATE).unlink()
    assert versions.read_state(Here("here"), "edgeft") == versions.empty_state()
