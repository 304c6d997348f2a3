"""The user's own OpenSSH against a real sshd on 127.0.0.1: host keys enforced, unreachable boards fail fast,
copies verified by sha256, resumed from a partial file, sent again when corrupted, paths quoted."""

import hashlib
import time

import pytest

from edgeft.devices.ssh import SSHOptions
from edgeft.errors import EdgeftError


def _remote(board, host="board"):
    return SSHOptions(host=host, ssh_config=board.config, connect_timeout=3).remote()


def test_commands_run_on_the_board_and_failures_are_one_line(board):
    remote = _remote(board)
    assert remote.run("echo hello").strip() == "hello"
    with pytest.raises(EdgeftError, match=r"failed \(exit 3\)"):
        remote.run("exit 3")


def test_unknown_host_key_and_unreachable_board_are_refused(board):
    with pytest.raises(EdgeftError, match="host key verification failed"):
        _remote(board, "stranger").run("true")
    start = time.perf_counter()
    with pytest.raises(EdgeftError, match="unreachable"):
        _remote(board, "nowhere").run("true")
    assert time.perf_counter() - start < 20


def test_copy_is_verified_resumed_and_resent(board, tmp_path):
    remote = _remote(board)
    local = tmp_path / "model.bin"
    data = bytes(range(256)) * 4096 + b"tail"
    local.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    dest = tmp_path / "on board; with 'quotes'" / "model.bin"  # spaces, ; and quotes reach the shell quoted

    first = remote.send(local, str(dest), digest)
    assert first == {"resumed_from": 0, "sent": len(data), "attempts": 1} and dest.read_bytes() == data
    assert remote.sha256([str(dest), str(dest) + ".missing"]) == {str(dest): digest}

    dest.unlink()  # killed half-way: the .part file holds a prefix
    (dest.parent / "model.bin.part").write_bytes(data[: len(data) // 2])
    resumed = remote.send(local, str(dest), digest)
    assert resumed["resumed_from"] == len(data) // 2 and resumed["sent"] == len(data) - len(data) // 2
    assert dest.read_bytes() == data

    bad = bytearray(data[: len(data) // 2])
    bad[10] ^= 0xFF  # a corrupt prefix: detected by the hash, the file is sent again from the start
    dest.unlink()
    (dest.parent / "model.bin.part").write_bytes(bytes(bad))
    again = remote.send(local, str(dest), digest)
    assert again["attempts"] == 2 and dest.read_bytes() == data
    assert not (dest.parent / "model.bin.part").exists()


def test_a_host_that_is_an_ssh_option_is_refused_and_runs_nothing(board, tmp_path):
    """`--host=-oProxyCommand=CMD` reached ssh as an option and ran CMD here; now it is refused, and every
    ssh call puts `--` before the destination."""
    marker = tmp_path / "pwned"
    for host in (f"-oProxyCommand=touch {marker}", "-F/dev/null", "", "board\nHostName evil"):
        with pytest.raises(EdgeftError, match="not a host name"):
            SSHOptions(host=host, ssh_config=board.config).remote().run("true")
    assert not marker.exists()
    cmd = _remote(board).command("true")
    assert cmd[-3:] == ["--", "board", "true"]
    assert _remote(board).run("echo ok").strip() == "ok"  # `--` is what OpenSSH expects


def test_remote_paths_starting_with_a_dash_are_paths(board, tmp_path):
    """A relative --dest such as '-rf' is a folder name in the login's home, never an option of mkdir, mv,
    rm or sha256sum on the board."""
    import uuid

    remote = _remote(board)
    local = tmp_path / "f.bin"
    local.write_bytes(b"abc" * 1000)
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    folder = f"-edgeft-test-{uuid.uuid4().hex[:8]}"
    try:
        assert remote.send(local, f"{folder}/-n.bin", digest)["sent"] == 3000
        assert remote.sha256([f"{folder}/-n.bin"]) == {f"{folder}/-n.bin": digest}
    finally:
        remote.run(f"rm -rf -- {folder}")
