"""`edgeft status --hosts FLEET.yaml` (or --host): one row per board, what it serves and whether it is healthy.

Per board, over ssh: the board's record (versions.py: the current version's run, artifact, digest, quant,
adapters, its last check on this board and when), the server's process and, through a tunnel, its /health
and /props; free RAM (MemAvailable) and free disk in the board's folder. A board that cannot be reached is a
row with the reason. Nothing on the boards changes.
"""

from __future__ import annotations

import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import EdgeftError
from . import serve, versions
from .fleet import Board, board_config, boards_of
from .ssh import SSHOptions


@dataclass
class StatusConfig(SSHOptions):
    hosts: str = field(default="", metadata={"help": "fleet: YAML file with `boards:` (as for deploy)"})
    device: str = field(default="", metadata={"help": "board profile (only names the row with --host)"})
    emulate: bool = field(default=False, metadata={"help": "unused: a fleet file's field, accepted"})
    serve_port: int = field(default=8080, metadata={"help": "the server's port on the board"})
    parallel: int = field(default=8, metadata={"help": "boards asked at once"})


def status(c: StatusConfig) -> list[dict]:
    boards = boards_of(c, "status")
    with ThreadPoolExecutor(max_workers=max(1, c.parallel)) as pool:
        return list(pool.map(lambda b: board_status(c, b), boards))


def board_status(c: StatusConfig, board: Board) -> dict:
    bc = board_config(c, board)
    dest = bc.dest or versions.DEFAULT_DEST
    row = {"board": board.name, "host": board.host, "device": board.device or None, "reachable": False,
           "version": None, "run": None, "gguf": None, "sha256": None, "quant": None, "adapters": None,
           "server": None, "health": None, "checked": None, "check_passed": None, "tokens_per_s": None,
           "exact_match": None, "mem_available_bytes": None, "disk_free_bytes": None, "versions": None,
           "error": None}
    try:
        remote = bc.remote()
        state = versions.read_state(remote, dest)
        row["reachable"] = True
        facts = remote.run(f"grep '^MemAvailable' /proc/meminfo; df -Pk -- {shlex.quote(dest)} 2>/dev/null | tail -1 "
                           f"|| df -Pk . | tail -1", timeout=bc.connect_timeout + 20, check=False).splitlines()
        for line in facts:
            if line.startswith("MemAvailable"):
                row["mem_available_bytes"] = int(line.split()[1]) * 1024
            elif len(line.split()) >= 4 and line.split()[3].isdigit():
                row["disk_free_bytes"] = int(line.split()[3]) * 1024
        row["versions"] = sorted(state["versions"])
        current = state["versions"].get(state["current"] or "") or {}
        check = current.get("check") or {}
        row.update({"version": state["current"], "run": current.get("runs") and "+".join(current["runs"]),
                    "gguf": current.get("gguf"), "sha256": (current.get("sha256") or "")[:12] or None,
                    "quant": current.get("quant"), "adapters": current.get("adapters"),
                    "checked": check.get("at"), "check_passed": check.get("passed"),
                    "tokens_per_s": check.get("tokens_per_s"), "exact_match": check.get("exact_match")})
        pid = serve.pid(remote, bc.serve_port)
        row["server"] = f"up (pid {pid})" if pid else "down"
        if pid:
            with remote.tunnel(bc.serve_port) as port:
                client = serve.Client(port, timeout=10)
                try:
                    row["health"] = client.request("/health").get("status")
                    props = client.request("/props")
                    row["served_model"] = str(props.get("model_path") or "").rsplit("/", 1)[-1] or None
                except EdgeftError as e:
                    row["health"] = f"no answer ({e})"
    except EdgeftError as e:
        row["error"] = str(e)
    return row
