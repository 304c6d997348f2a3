"""The model served on the board: llama.cpp's llama-server, started by `edgeft deploy --serve`, reached from
the host through an SSH tunnel.

In the deployed folder on the board:
  serve.sh    the server's whole command line (model, adapters, context, threads, address); it writes its
              pid to ~/.edgeft/serve-PORT.pid and execs llama-server, so the pid is the server's
A board with a systemd user manager gets ~/.config/systemd/user/edgeft-serve-PORT.service (enabled,
restarted on failure); elsewhere serve.sh runs under nohup with its log in serve.log. Either way a server
is known by its port: deploying another model to the same port replaces the one there, `deploy --stop`
stops it.

Several adapters: the base GGUF is loaded once with every LoRA GGUF (`--lora A --lora B
--lora-init-without-apply`: loaded, none applied) and each request names its adapter in its `lora` field,
so switching is per request and costs no reload.
"""

from __future__ import annotations

import json
import shlex
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..errors import EdgeftError

DEFAULT_PORT = 8080
CONTEXTS = (8192, 4096, 2048, 1024, 512)  # the served context: the largest of these that fits (and was trained)
STATE_DIR = ".edgeft"  # under the login's home: one pid file per port


def load_seconds(gguf_bytes: int, emulate: bool) -> float:
    """How long a server may take to load a model: scaled with its size, and slow under qemu (every
    instruction translated)."""
    return 120 + (gguf_bytes / 2**20) * (2.0 if emulate else 0.2)


def pid_file(port: int) -> str:
    return f"$HOME/{STATE_DIR}/serve-{port}.pid"


def _running(port: int) -> str:
    """A shell test that sets $pid to edgeft's server on `port`. A pid file can outlive its process and the pid
    be reused: only a process running llama-server counts."""
    return f'pid=$(cat "{pid_file(port)}" 2>/dev/null) && grep -q llama-server "/proc/$pid/cmdline" 2>/dev/null'


def unit_name(port: int) -> str:
    return f"edgeft-serve-{port}.service"


def fit_context(requested: int, trained: int | None, fits) -> int:
    """The context to serve: `requested` if given (deploy's preflight then checks it), else the largest
    candidate within the trained context for which `fits(context)` holds."""
    if requested:
        return requested
    for n in CONTEXTS:
        if (not trained or n <= trained) and fits(n):
            return n
    return CONTEXTS[-1]  # the preflight will name what to change


@dataclass
class ServeSpec:
    model: str  # the GGUF's name in the deployed folder
    loras: list[str]  # LoRA GGUF names, in adapter-id order
    context: int
    threads: int
    port: int
    listen: bool  # bind 0.0.0.0 instead of 127.0.0.1
    alias: str
    qemu: list[str]  # the qemu-user prefix when the board's binaries run emulated, else []

    def argv(self) -> list[str]:
        args = [*self.qemu, "./llama-server", "--model", self.model]
        for lora in self.loras:
            args += ["--lora", lora]
        if self.loras:
            args.append("--lora-init-without-apply")  # loaded, none applied: each request picks its own
        # One slot: a board serves one request at a time, and the whole context is that request's. --jinja: the
        # GGUF's own chat template, rendered as transformers renders it.
        return args + ["--ctx-size", str(self.context), "--threads", str(self.threads), "--parallel", "1",
                       "--host", "0.0.0.0" if self.listen else "127.0.0.1", "--port", str(self.port), "--jinja",
                       "--alias", self.alias, "--no-webui"]

    def script(self, about: str) -> str:
        return (f"#!/bin/sh\n# Written by `edgeft deploy --serve` ({one_line(about)}). Run it by hand to see the "
                f"server's log.\n"
                f'cd "$(dirname "$0")" || exit 1\n'
                f'mkdir -p "$HOME/{STATE_DIR}" && echo $$ > "{pid_file(self.port)}"\n'
                f"exec {shlex.join(self.argv())}\n")


def one_line(text: str) -> str:
    """Free text (run names) for a comment or a unit's Description: a line break there would start a line of
    its own, a command in serve.sh or a directive in the unit."""
    return " ".join(str(text).split())


def _has_systemd(remote) -> bool:
    return remote.run("systemctl --user show-environment >/dev/null 2>&1 && echo yes || echo no",
                      timeout=remote.connect_timeout + 20).strip() == "yes"


def stop(remote, port: int) -> dict:
    """Stop edgeft's server on `port` (systemd unit or nohup'd script); {"stopped": bool, "manager": ...}."""
    unit = unit_name(port)
    out = remote.run(
        f"if command -v systemctl >/dev/null 2>&1 && systemctl --user is-active --quiet {unit} 2>/dev/null; then "
        f"systemctl --user stop {unit} && echo systemd; "
        f'elif {_running(port)}; then '
        f'kill "$pid"; for i in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.2; done; '
        f'[ -d "/proc/$pid" ] && kill -9 "$pid"; rm -f "{pid_file(port)}"; echo nohup; '
        f"else echo none; fi", timeout=remote.connect_timeout + 30).strip().splitlines()
    manager = out[-1] if out else "none"
    return {"stopped": manager != "none", "manager": manager if manager != "none" else None, "port": port}


def unit_text(script_path: str, port: int, about: str) -> str:
    """The systemd user unit that runs `script_path`. systemd splits ExecStart at spaces and expands %
    specifiers, so the path is quoted and its % doubled ("my models" works); it refuses a program whose path
    holds a quote or a backslash, which is a one-line error here, before anything on the board changes."""
    if any(ch in script_path for ch in '"\'\\\n\r'):  # systemd-analyze verify: "bad unit file setting", escaped too
        raise EdgeftError(f"--dest {script_path.rsplit('/', 1)[0]!r}: systemd cannot start a program whose path holds "
                          f"a quote or a backslash, or a line break; deploy --serve to a folder without them")

    def plain(text: str) -> str:
        return text.replace("%", "%%")

    return (f"[Unit]\nDescription={plain(f'edgeft: llama-server on port {port} ({one_line(about)})')}\nAfter=network.target\n\n"
            f"[Service]\nExecStart=\"{plain(script_path)}\"\nRestart=on-failure\nRestartSec=2\n\n"
            f"[Install]\nWantedBy=default.target\n")


def install_script(remote, folder: str, spec: ServeSpec, about: str, script: str = "serve.sh") -> None:
    """Write the start script into `folder` on the board (beside it, then renamed)."""
    q_dest, q_script = shlex.quote(folder), shlex.quote(script)
    remote.run(f"cd -- {q_dest} && printf '%s' {shlex.quote(spec.script(about))} > {q_script}.tmp && "
               f"chmod +x {q_script}.tmp && mv -f {q_script}.tmp {q_script}")


def start(remote, dest: str, spec: ServeSpec, about: str, script: str = "serve.sh", systemd: bool = True) -> dict:
    """Install the start script (and the systemd unit where there is a user manager, unless `systemd` is off)
    in `dest`, replace whatever edgeft server held the port, and start this one. Returns how it was started."""
    install_script(remote, dest, spec, about, script)
    info = launch(remote, dest, spec.port, about, script, systemd)
    return {**info, "listen": spec.listen, "context": spec.context, "threads": spec.threads, "argv": spec.argv()}


def launch(remote, folder: str, port: int, about: str, script: str = "serve.sh", systemd: bool = True) -> dict:
    """Start `folder`/`script` (already on the board) as the server on `port`, replacing edgeft's server there.
    `folder` may be a link (DEST/current): the unit and the nohup start go through it, so after a switch of
    the link a launch serves the other version."""
    q_dest = shlex.quote(folder)
    q_script = shlex.quote(script)
    systemd = systemd and _has_systemd(remote)
    if systemd:
        # pwd, not pwd -P: the unit names the link, not the version folder it points at today
        text = unit_text(remote.run(f"cd -- {q_dest} && pwd").strip() + "/" + script, port, about)
    replaced = stop(remote, port)
    if systemd:
        unit = unit_name(port)
        remote.run(f"mkdir -p ~/.config/systemd/user && printf '%s' {shlex.quote(text)} > ~/.config/systemd/user/{unit}"
                   f" && systemctl --user daemon-reload && systemctl --user enable {unit} >/dev/null 2>&1; "
                   f"systemctl --user restart {unit}")
        manager = "systemd"
        boot = _linger(remote)
    else:
        # setsid + every stream redirected: the ssh session returns and the server outlives it.
        log = shlex.quote(script.rsplit(".", 1)[0] + ".log")
        remote.run(f"cd -- {q_dest} && (setsid nohup ./{q_script} > {log} 2>&1 < /dev/null &)")
        manager = "nohup"
        path = remote.run(f"cd -- {q_dest} && pwd").strip()
        line = f"@reboot cd {shlex.quote(path)} && ./{script} > {script.rsplit('.', 1)[0]}.log 2>&1"
        boot = {"after_reboot": False,
                "note": f"no systemd user manager on the board: the server will not start after a reboot; to make "
                        f"it, run there: (crontab -l 2>/dev/null; echo {shlex.quote(line)}) | crontab -"}
    return {"manager": manager, "replaced": replaced["stopped"], "port": port, "boot": boot}


def _linger(remote) -> dict:
    """A user unit starts at boot only when the user's manager does: lingering. Enabled here when loginctl lets
    the user do it (most distributions' polkit rules do for oneself), else one line with the command."""
    out = remote.run('u=$(id -un); loginctl show-user "$u" -p Linger 2>/dev/null | grep -q "=yes" && echo on || '
                     '{ loginctl enable-linger "$u" >/dev/null 2>&1 && echo enabled || echo "off $u"; }',
                     check=False).strip()
    if out in ("on", "enabled"):
        return {"after_reboot": True, "note": f"lingering {'was on' if out == 'on' else 'enabled'}: the unit starts "
                                              f"at boot"}
    user = out.split(" ", 1)[-1] if out.startswith("off ") else "USER"
    return {"after_reboot": False, "note": f"lingering is off and could not be enabled: the server starts at boot "
                                           f"only after, on the board: sudo loginctl enable-linger {user}"}


def pid(remote, port: int) -> int | None:
    out = remote.run(f'{_running(port)} && echo "$pid" || true').strip()
    return int(out) if out.isdigit() else None


def rss_bytes(remote, port: int) -> int | None:
    """The server process's resident memory (VmRSS). Under qemu-user it is the emulator's process, which holds
    the guest's memory plus the translator's."""
    p = pid(remote, port)
    if p is None:
        return None
    out = remote.run(f"grep VmRSS /proc/{p}/status || true").split()
    return int(out[1]) * 1024 if len(out) >= 2 and out[1].isdigit() else None


def log_tail(remote, dest: str, lines: int = 5) -> str:
    out = remote.run(f"tail -n {lines} -- {shlex.quote(dest + '/serve.log')} 2>/dev/null; "
                     f"journalctl --user -n {lines} -u edgeft-serve-* 2>/dev/null || true", check=False)
    return " | ".join(l.strip() for l in out.strip().splitlines() if l.strip())[-400:]


class Client:
    """llama-server's HTTP API on a local (tunnelled) port."""

    def __init__(self, port: int, timeout: float = 300):
        self.base = f"http://127.0.0.1:{port}"
        self.timeout = timeout

    def request(self, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:200]
            raise EdgeftError(f"the board's server answered {path} with HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            raise EdgeftError(f"the board's server did not answer {path}: {getattr(e, 'reason', e)}") from None

    def ready(self) -> bool:
        try:
            return self.request("/health", timeout=10).get("status") == "ok"
        except EdgeftError:
            return False

    def wait(self, seconds: float, alive) -> float:
        """Seconds until /health says ok; `alive()` is asked between tries so a crashed server fails at once."""
        start = time.perf_counter()
        while not self.ready():
            if time.perf_counter() - start > seconds:
                raise EdgeftError(f"the board's server was not ready within {seconds:.0f} s")
            if not alive():
                raise EdgeftError("the board's server exited while loading the model")
            time.sleep(1)
        return time.perf_counter() - start

    def adapters(self) -> list[dict]:
        out = self.request("/lora-adapters")
        return out if isinstance(out, list) else []

    @staticmethod
    def lora(n_adapters: int, chosen: int | None) -> list[dict]:
        """The per-request adapter choice: `chosen` at scale 1, the others 0 (None: the base alone)."""
        return [{"id": i, "scale": 1.0 if i == chosen else 0.0} for i in range(n_adapters)]

    def chat(self, messages: list[dict], max_tokens: int, lora: list[dict], tools: list[dict] | None = None) -> dict:
        """A greedy answer through the OpenAI-compatible endpoint, the way an app on the board asks."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "top_k": 1, "seed": 0,
                "lora": lora, "cache_prompt": False}
        if tools:
            body["tools"] = tools
        return self.request("/v1/chat/completions", body)

    def complete(self, ids: list[int], max_tokens: int, lora: list[dict]) -> dict:
        """A greedy continuation of token ids (/completion takes ids: for task files without the chat)."""
        return self.request("/completion", {"prompt": ids, "n_predict": max_tokens, "temperature": 0, "top_k": 1,
                                            "seed": 0, "lora": lora, "cache_prompt": False, "return_tokens": True})
