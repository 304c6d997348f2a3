"""A staged rollout to a fleet of N boards on loopback: one OpenSSH server on 127.0.0.1, one folder and one server
port per board (issue 28: "a fleet file of 20 boards finishes a rollout of the demo's Q4_K_M").

    python bench/rollout_fleet.py --run runs/demo                       # 20 boards, x86-64-native, q4_k_m
    python bench/rollout_fleet.py --run runs/demo --device rpi5 --emulate --boards 3

It writes the fleet file, then times `edgeft deploy RUN --hosts FLEET --serve --waves 1,25%,100% --parallel P`
(every board: the version copied and verified, switched to, served by llama-server, checked through its server
with the gates), then the same command again (every board already serving the version with a passed check:
the resume path), and prints one JSON object: the boards, waves, seconds of each, bytes sent. The boards'
servers are stopped at the end. With one sshd the boards share this machine's cores and disk: the time is an
upper bound for real boards copying in parallel over a network, and a measure of edgeft's own overhead.
"""

from __future__ import annotations

import argparse
import getpass
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sshd(root: Path) -> tuple[subprocess.Popen, Path]:
    """A throwaway sshd on a loopback port with its own host key and a client key; the ssh config's alias `b`."""
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nMaxStartups 100:30:200\n"
        f"MaxSessions 100\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", str(root / "sshd_config")],
                            stderr=open(root / "sshd.log", "w"))
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {(root / 'host_key.pub').read_text()}")
    config = root / "ssh_config"
    config.write_text(f"Host b\n  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n"
                      f"  IdentityFile {root / 'client_key'}\n  IdentitiesOnly yes\n  StrictHostKeyChecking yes\n"
                      f"  UserKnownHostsFile {root / 'known_hosts'}\n  LogLevel ERROR\n")
    return proc, config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run with the quant exported (the demo's: runs/demo)")
    ap.add_argument("--boards", type=int, default=20)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--waves", default="1,25%,100%")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--device", default="x86-64-native")
    ap.add_argument("--emulate", action="store_true")
    ap.add_argument("--context", type=int, default=1024, help="each server's context (20 servers share this RAM)")
    ap.add_argument("--task-items", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--max-unavailable", type=int, default=0, help="boards whose check may fail without a gate (on "
                    "one loaded host, a request can outlast its timeout); the second run retries them")
    ap.add_argument("--keep", default="", help="keep the boards' folders here (default: a temporary folder)")
    args = ap.parse_args()

    root = Path(args.keep or tempfile.mkdtemp(prefix="edgeft-fleet-"))
    root.mkdir(parents=True, exist_ok=True)
    proc, config = sshd(root)
    run = root / "run"
    if not run.exists():  # the rollout writes into the run's ledger: a copy keeps the original as it was
        shutil.copytree(args.run, run)
    boards = [{"name": f"board{i:02d}", "host": "b", "device": args.device, "ssh_config": str(config),
               "emulate": args.emulate, "dest": str(root / f"board{i:02d}"), "serve_port": free_port()}
              for i in range(1, args.boards + 1)]
    import yaml

    hosts = root / "fleet.yaml"
    hosts.write_text(yaml.safe_dump({"boards": boards}))
    cmd = [sys.executable, "-m", "edgeft", "deploy", str(run), "--hosts", str(hosts), "--serve", "--quant", args.quant,
           "--waves", args.waves, "--parallel", str(args.parallel), "--context", str(args.context),
           "--task-items", str(args.task_items), "--max-tokens", str(args.max_tokens), "--max-unavailable",
           str(args.max_unavailable), "--json"]
    out = {"boards": args.boards, "parallel": args.parallel, "waves": args.waves, "device": args.device,
           "emulate": args.emulate, "quant": args.quant, "context": args.context, "task_items": args.task_items,
           "max_tokens": args.max_tokens, "command": " ".join(cmd[2:])}
    try:
        for label in ("first", "again"):
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            line = next((l for l in reversed(done.stdout.splitlines()) if l.startswith("{")), None)
            if line is None:
                out[label] = {"exit": done.returncode, "seconds": round(seconds, 1), "stderr": done.stderr[-2000:]}
                break
            entry = json.loads(line)  # printed also when boards failed (exit 2) or a gate did (exit 3)
            rows = entry["metrics"]["boards"]
            steps = json.loads((run / "manifest.json").read_text())["steps"]
            waves = [e for e in steps if e["step"] == "rollout-wave" and e["started"] >= entry["started"]]
            out[label] = {"exit": done.returncode, "seconds": round(seconds, 1), "passed": entry["metrics"]["passed"],
                          "skipped": entry["metrics"]["skipped"], "unavailable": entry["metrics"]["unavailable"],
                          "errors": sorted({(r["error"] or "")[:120] for r in rows if r["error"]}),
                          "wave_seconds": [w["wall_s"] for w in waves], "wave_boards": [w["inputs"]["boards"]
                                                                                        for w in waves],
                          "bytes_sent": sum(r.get("bytes_sent") or 0 for r in rows),
                          "decode_tokens_per_s_median": sorted(r["tokens_per_s"] for r in rows
                                                               if r["tokens_per_s"])[len(rows) // 2]
                          if any(r["tokens_per_s"] for r in rows) else None}
    finally:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from edgeft.devices import serve
        from edgeft.devices.ssh import Remote

        for b in boards:
            try:
                serve.stop(Remote("b", str(config)), b["serve_port"])
            except Exception as e:  # report and go on: every other server must still stop
                print(f"stopping {b['name']}: {e}", file=sys.stderr)
        proc.terminate()
        proc.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
