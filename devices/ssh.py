"""The user's own OpenSSH, driven from Python: commands on the board and resumable, verified copies.

Everything goes through the `ssh` binary, so ~/.ssh/config, agents, jump hosts and known_hosts work as
they do for the user. Host keys are checked as OpenSSH checks them (we never pass StrictHostKeyChecking=no);
BatchMode makes an unknown key or a password prompt fail at once instead of hanging. Every remote path
is quoted with shlex.quote and follows `--` in the remote commands, and the host follows `--` on ssh's own
command line: a host such as `-oProxyCommand=...` would otherwise reach ssh as an option and run a local
command, so hosts starting with '-' are refused outright.

Copies stream the file into `ssh HOST 'cat >> DEST.part'`: an interrupted copy leaves DEST.part, the next
copy appends from its size, the whole file's sha256 is checked on the board, and only then is it renamed
to DEST. Streaming through ssh ourselves (instead of rsync/scp) gives a progress bar, resume and the
verify-then-rename step with nothing but a POSIX shell and sha256sum on the board.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import EdgeftError

CHUNK = 1 << 20


@dataclass
class SSHOptions:
    """How to reach a board, shared by deploy and smoke."""

    host: str = field(default="", metadata={"help": "user@board (anything your ssh accepts, e.g. a config alias)"})
    dest: str = field(default="", metadata={"help": "the board's folder, one per served model (default: edgeft in "
                                                     "the home); each deploy is a version folder in it"})
    ssh_config: str = field(default="", metadata={"help": "ssh config file (ssh -F)"})
    port: int = field(default=0, metadata={"help": "ssh port (default: ssh's)"})
    connect_timeout: int = field(default=10, metadata={"help": "seconds to wait for the board"})

    def remote(self) -> "Remote":
        return Remote(self.host, self.ssh_config, self.port, self.connect_timeout)


@dataclass
class Remote:
    host: str
    ssh_config: str = ""
    port: int = 0
    connect_timeout: int = 10
    extra: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.host or self.host.startswith("-") or any(ch in self.host for ch in "\0\n\r"):
            raise EdgeftError(f"--host {self.host!r}: not a host name; give user@board or an alias from your ssh "
                              f"config (a host may not start with '-': ssh would read it as an option)")

    def command(self, remote_cmd: str) -> list[str]:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}",
               "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if self.ssh_config:
            cmd += ["-F", self.ssh_config]
        if self.port:
            cmd += ["-p", str(self.port)]
        return cmd + self.extra + ["--", self.host, remote_cmd]

    def run(self, remote_cmd: str, timeout: float | None = 60, check: bool = True) -> str:
        try:
            proc = subprocess.run(self.command(remote_cmd), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EdgeftError(f"--host {self.host}: no answer within {timeout:.0f} s running {remote_cmd[:60]!r}") from None
        if proc.returncode == 255:  # ssh's own failure: connection, authentication, host key
            raise EdgeftError(f"--host {self.host}: {_ssh_error(proc.stderr)}")
        if check and proc.returncode != 0:
            raise EdgeftError(f"--host {self.host}: `{remote_cmd[:80]}` failed (exit {proc.returncode}): "
                              f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no message'}")
        return proc.stdout

    @contextmanager
    def tunnel(self, remote_port: int, timeout: float = 20):
        """A local port forwarded to 127.0.0.1:remote_port on the board, for as long as the block runs: the
        board's server stays bound to its loopback and nothing else is opened."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            local = s.getsockname()[1]
        cmd = self.command("")[:-1]  # the same options and host, no remote command
        cmd[1:1] = ["-N", "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{local}:127.0.0.1:{remote_port}"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise EdgeftError(f"--host {self.host}: the tunnel to port {remote_port} failed: "
                                      f"{_ssh_error(proc.stderr.read().decode(errors='replace'))}")
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", local)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise EdgeftError(f"--host {self.host}: the tunnel to port {remote_port} did not open within "
                                      f"{timeout:.0f} s")
                time.sleep(0.1)
            yield local
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

    def sha256(self, paths: list[str]) -> dict[str, str]:
        """sha256 of the remote files that exist (missing ones are left out)."""
        if not paths:
            return {}
        quoted = " ".join(shlex.quote(p) for p in paths)
        # One digest (or -) per path, in order, read from stdin: sha256sum escapes a name holding a line break or
        # a backslash in its output, so names are never read back.
        out = self.run(f"for f in {quoted}; do if [ -f \"$f\" ]; then sha256sum < \"$f\" | cut -d' ' -f1; "
                       f"else echo -; fi; done", timeout=600)
        digests = out.split()
        if len(digests) != len(paths):
            raise EdgeftError(f"--host {self.host}: sha256sum printed {len(digests)} digests for {len(paths)} files")
        return {p: d for p, d in zip(paths, digests) if d != "-"}

    def size(self, path: str) -> int:
        out = self.run(f"if [ -f {shlex.quote(path)} ]; then wc -c < {shlex.quote(path)}; else echo -1; fi").strip()
        return int(out or -1)

    def send(self, local: Path, dest: str, sha256: str, progress: Callable[[int], None] | None = None) -> dict:
        """Copy `local` to `dest` on the board, resuming a partial copy; verified before the final rename."""
        part = dest + ".part"
        q_part, q_dest = shlex.quote(part), shlex.quote(dest)
        self.run(f"mkdir -p -- {shlex.quote(str(Path(dest).parent))}")
        total = local.stat().st_size
        for attempt in (1, 2):
            have = self.size(part)
            if have > total:  # longer than the source: not a prefix of it
                self.run(f"rm -f -- {q_part}")
                have = -1
            offset = max(have, 0)
            if offset < total or have < 0:
                self._stream(local, offset, f"cat >> {q_part}" if offset else f"cat > {q_part}", progress)
            got = self.sha256([part]).get(part)
            if got == sha256:
                self.run(f"mv -f -- {q_part} {q_dest}")
                return {"resumed_from": offset, "sent": total - offset, "attempts": attempt}
            self.run(f"rm -f -- {q_part}")  # a corrupt prefix: start over once
        raise EdgeftError(f"{local.name}: the copy on the board does not match its sha256 after two tries")

    def _stream(self, local: Path, offset: int, remote_cmd: str, progress) -> None:
        proc = subprocess.Popen(self.command(remote_cmd), stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with open(local, "rb") as f:
                f.seek(offset)
                done = offset
                while block := f.read(CHUNK):
                    proc.stdin.write(block)
                    done += len(block)
                    if progress:
                        progress(done)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise EdgeftError(f"--host {self.host}: copy of {local.name} failed: {_ssh_error(err)}")


def _ssh_error(stderr: str) -> str:
    text = stderr.strip()
    if "Host key verification failed" in text or "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        return ("host key verification failed: the board's key is not in your known_hosts (or changed); connect "
                "once with ssh to check and accept it")
    if "Permission denied" in text:
        return "permission denied: set up key login (ssh-copy-id) or an agent; edgeft never asks for passwords"
    if "timed out" in text or "Connection refused" in text or "No route to host" in text or "resolve" in text:
        return f"unreachable ({text.splitlines()[-1]})"
    return text.splitlines()[-1] if text else "ssh failed"
