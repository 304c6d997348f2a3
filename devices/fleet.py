"""`--hosts FLEET.yaml` for deploy and smoke: the same step on many boards at once.

The file is YAML with a list of boards:

    boards:
    - name: kitchen-pi          # how the table and the ledger name it (unique)
      host: pi@10.0.0.7         # ssh target (or an alias from your ssh config)
      device: rpi5              # board profile
      ram_gb: 4                 # optional: plan for this much RAM
      port: 22                  # optional: ssh port
      ssh_config: ~/.ssh/fleet  # optional
      emulate: false            # optional: the board's binaries run under qemu-user there
      dest: edgeft/kitchen      # optional: the folder on this board (default: the command's --dest)
      serve_port: 8080          # optional: the server's port there (boards sharing one login need their own)

A fleet file is trusted like code in what it may point at: `ssh_config` names a file ssh reads, and an ssh
config can run commands on this host (ProxyCommand, LocalCommand, Match exec, KnownHostsCommand). Such a
config is refused in one line (with the file, the board and the directive, also through Include) unless it
is the user's own ~/.ssh/config, which ssh reads anyway.

Boards are handled by a pool of --parallel threads (the work is ssh and the board's, not this host's CPU). A
board that fails is reported in its row and does not stop the others. Each step's result on each board is
its own ledger entry as always; the fleet adds one entry with the table (board, model, adapters, tok/s,
ppl change, pass/fail). Re-running resumes: boards whose row passed in the last fleet entry for the same
model are skipped unless --redo (a copy already on a board is skipped file by file anyway).
"""

from __future__ import annotations

import dataclasses
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..config import to_dict
from ..errors import EdgeftError, GateFailed
from ..inputs import shown_value

FIELDS = {"name": str, "host": str, "device": str, "ram_gb": (int, float), "port": int, "ssh_config": str,
          "emulate": bool, "dest": str, "serve_port": int}


@dataclass
class Board:
    name: str
    host: str
    device: str
    ram_gb: float = 0.0
    port: int = 0
    ssh_config: str = ""
    emulate: bool = False
    dest: str = ""  # the folder on this board, when it differs from the command's --dest
    serve_port: int = 0  # the server's port on this board, when it differs from the command's --serve-port


def read_hosts(path: str) -> list[Board]:
    from ..config import read_config_file

    boards = read_config_file(path, "--hosts").get("boards")
    if not isinstance(boards, list) or not boards:
        raise EdgeftError(f"--hosts {path}: no 'boards' list; write `boards:` and a list of boards, each with name, "
                          f"host and device")
    out, seen = [], set()
    for i, b in enumerate(boards, 1):
        where = f"--hosts {path}: board {i}"
        if not isinstance(b, dict):
            raise EdgeftError(f"{where}: not a mapping; give name, host and device")
        for key in ("name", "host", "device"):
            if not isinstance(b.get(key), str) or not b[key]:
                raise EdgeftError(f"{where}: field '{key}' is missing or not text; every board needs name, host, device")
        for key, value in b.items():
            if key not in FIELDS:
                raise EdgeftError(f"{where} ({b['name']}): unknown field '{key}'; use {', '.join(FIELDS)}")
            if not isinstance(value, FIELDS[key]) or (key != "emulate" and isinstance(value, bool)):
                raise EdgeftError(f"{where} ({b['name']}): field '{key}' has the wrong type ({shown_value(value)})")
        if b["name"] in seen:
            raise EdgeftError(f"{where}: the name {shown_value(b['name'])} is used twice; names must be unique")
        seen.add(b["name"])
        config = str(Path(b["ssh_config"]).expanduser()) if b.get("ssh_config") else ""
        if config:
            check_ssh_config(config, f"--hosts {path}: board {b['name']!r}: ssh_config")
        out.append(Board(**{**b, "ssh_config": config}))
    return out


# ssh config directives that make ssh run a command on this host (ssh_config(5)): a fleet file pointing at
# a config holding one would run it for every board.
RUNS_COMMANDS = ("proxycommand", "localcommand", "knownhostscommand")


def check_ssh_config(config: str, where: str, depth: int = 0) -> None:
    """Refuse an ssh config that runs local commands (directly or through Include), unless it is the user's
    own ~/.ssh/config. One line naming `where`, the file, the line and the directive."""
    import glob
    import shlex

    path = Path(config).expanduser()
    own = Path("~/.ssh/config").expanduser()
    if depth == 0 and path.resolve() == own.resolve():
        return
    if depth > 8:
        raise EdgeftError(f"{where} {config}: Include nested more than 8 deep")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise EdgeftError(f"{where} {config}: cannot be read ({e.strerror}); give a readable ssh config file") from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # ssh reads `Key value` and `Key=value`, keys in any case
        m = re.match(r"([A-Za-z]+)\s*(?:=|\s)\s*(.*)", line)
        key, rest = (m.group(1).lower(), m.group(2)) if m else (line.lower(), "")
        try:
            words = shlex.split(rest, comments=True)
        except ValueError:
            words = rest.split()
        bad = None
        if key in RUNS_COMMANDS:
            bad = key
        elif key == "permitlocalcommand" and words[:1] and words[0].lower() == "yes":
            bad = "PermitLocalCommand yes"
        elif key == "match" and any(w.lower() == "exec" for w in words):
            bad = "Match exec"
        if bad:
            name = {"proxycommand": "ProxyCommand", "localcommand": "LocalCommand",
                    "knownhostscommand": "KnownHostsCommand"}.get(bad, bad)
            raise EdgeftError(f"{where} {config} line {number} has {name}, which runs a command on this host; a "
                              f"fleet file may not point ssh at such a config: put that board in your own "
                              f"~/.ssh/config and drop ssh_config")
        if key == "include":
            for pattern in words:
                pattern = str(Path(pattern).expanduser())
                if not pattern.startswith("/"):  # relative: ~/.ssh for a user config (ssh_config(5))
                    pattern = str(Path("~/.ssh").expanduser() / pattern)
                for included in sorted(glob.glob(pattern)):
                    check_ssh_config(included, f"{where} {config} (Include)", depth + 1)


def boards_of(c, what: str) -> list[Board]:
    """The boards a command names: those of --hosts FLEET.yaml, or the one --host (with --device)."""
    if c.hosts:
        return read_hosts(c.hosts)
    if c.host:
        return [Board(name=c.host, host=c.host, device=c.device)]
    raise EdgeftError(f"{what}: which boards? pass --hosts FLEET.yaml or --host user@board")


def board_config(c, board: Board):
    """The step's config for one board: its host, profile and ssh settings over the command's."""
    changes = {"host": board.host, "device": board.device, "hosts": "", "emulate": board.emulate or c.emulate}
    if hasattr(c, "waves"):  # each board's own deploy is a plain one; the rollout is the fleet's
        changes.update(waves="", rollback=False)
    if board.port:
        changes["port"] = board.port
    if board.ssh_config:
        changes["ssh_config"] = board.ssh_config
    if board.dest:
        changes["dest"] = board.dest
    if board.serve_port and hasattr(c, "serve_port"):
        changes["serve_port"] = board.serve_port
    if board.ram_gb and hasattr(c, "ram_gb"):
        changes["ram_gb"] = float(board.ram_gb)
    return dataclasses.replace(c, **changes)


def _row(board: Board, step: str, result=None, error: Exception | None = None, model: str = "",
         skipped: bool = False, entries: list[dict] | None = None) -> dict:
    row = {"board": board.name, "host": board.host, "device": board.device, "step": step, "model": model,
           "adapters": None, "tokens_per_s": None, "ppl_change": None, "passed": error is None, "skipped": skipped,
           "error": str(error) if error else None,
           "failed_gate": isinstance(error, GateFailed)}
    if entries is None:
        entries = [] if result is None else (getattr(result, "entries", None) or [result.entry])
    if entries:
        e = entries[0]
        row["model"] = e["inputs"].get("gguf", model)
        adapters = e["inputs"].get("adapters")
        row["adapters"] = len(adapters) if adapters else (len(entries) if "lora" in e["inputs"] else 0)
        m = e["metrics"]
        speed = (m.get("bench") or {}).get("tg_tokens_per_s") or (m.get("served_answers") or {}).get(
            "decode_tokens_per_s")
        row["tokens_per_s"] = round(speed, 2) if speed else None
        changes = [x["perplexity"]["ppl"] / x["reference"]["ppl"] - 1 for x in entries
                   if (x.get("perplexity") or {}).get("ppl") and (x.get("reference") or {}).get("ppl")]
        row["ppl_change"] = round(max(changes, key=abs), 6) if changes else None  # the worst adapter's
    return row


def run_fleet(c, step: str, one) -> dict:
    """`one(config)` (deploy or smoke) on every board of c.hosts; the fleet entry, written to every run. A
    failed board raises after all were tried: GateFailed when a board failed a gate, else EdgeftError, with
    the entry as the exception's `fleet_entry` (the CLI shows the table, then exits 3 or 2)."""
    from ..run import fleet_step, what_to_serve

    boards = read_hosts(c.hosts)
    served = what_to_serve(c.run, c.adapters, c.quant)  # the same model for every board, checked once
    model = served.model.name
    runs = served.runs
    done = set()
    if not c.redo:  # resume: the boards that passed this step for this model last time
        last = runs[0].last(fleet_step(step), status=None, where=lambda e: e["inputs"].get("model") == model)
        if last:
            done = {r["board"] for r in last["metrics"].get("boards", []) if r.get("passed")}

    def work(board: Board) -> dict:
        if board.name in done:
            return _row(board, step, model=model, skipped=True)
        try:
            return _row(board, step, one(board_config(c, board)), model=model)
        except GateFailed as e:  # measured but failed: the row keeps the figures the board's entries hold
            mine = [r.last(step, status="failed", where=lambda x: x["inputs"].get("host") == board.host) for r in runs]
            return _row(board, step, error=e, model=model, entries=[x for x in mine if x])
        except EdgeftError as e:  # one board's failure is its row, not the fleet's end
            return _row(board, step, error=e, model=model)

    inputs = {"hosts": str(Path(c.hosts).resolve()), "model": model, "boards": len(boards)}
    with runs[0].record(fleet_step(step), to_dict(c), inputs, also=runs[1:]) as entry:
        with ThreadPoolExecutor(max_workers=max(1, c.parallel)) as pool:
            rows = list(pool.map(work, boards))
        if done:  # a skipped board keeps its measured figures from the last fleet entry
            previous = {r["board"]: r for r in last["metrics"]["boards"]}
            rows = [{**previous[r["board"]], "skipped": True} if r["skipped"] else r for r in rows]
        entry["metrics"] = {"boards": rows, "passed": sum(r["passed"] for r in rows), "failed":
                            sum(not r["passed"] for r in rows), "skipped": sum(r["skipped"] for r in rows),
                            "parallel": c.parallel}
        failed = [r["board"] for r in rows if not r["passed"]]
        if failed:
            entry["status"] = "failed"
            entry["reason"] = f"{len(failed)} of {len(rows)} boards failed: {', '.join(failed)}"
    if entry["status"] != "ok":
        gate = any(r.get("failed_gate") for r in entry["metrics"]["boards"])
        error = (GateFailed if gate else EdgeftError)(entry["reason"])
        error.fleet_entry = entry
        raise error
    return entry
