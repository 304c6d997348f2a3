"""`edgeft deploy RUN --device P --host user@board`: the run's GGUF, the board's build of edgeft-board, the
eval token ids and a manifest, copied over the user's own SSH and verified by sha256 on the board.

Before copying, a preflight reads the board's architecture, free disk and RAM over ssh and refuses a model
that would not fit (model + KV cache for --context + runtime), naming the quant that would. Files already
on the board with the right hash are skipped; an interrupted copy resumes.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import sha256_file
from .config import to_dict
from .errors import EdgeftError
from .heldout import TOKENS_FILE, EvalTokens
from .inputs import read_json
from .ledger import Run
from .progress import bar
from .prompt import prompt_ids
from .ssh import SSHOptions


@dataclass
class DeployConfig(SSHOptions):
    run: str = field(default="", metadata={"help": "run folder with exported GGUFs"})
    device: str = field(default="rpi5", metadata={"help": "board profile (see `edgeft devices`)"})
    quant: str = field(default="", metadata={"help": "which GGUF (default: export's auto choice, else the smallest "
                                                     "that passed its gate)"})
    context: int = field(default=2048, metadata={"help": "context the board will run (for the RAM preflight)"})
    emulate: bool = field(default=False, metadata={"help": "the host runs the board's binaries under qemu-user"})


@dataclass
class DeployResult:
    run: Path
    dest: str
    files: dict[str, str]  # name on the board -> sha256
    entry: dict


def gguf_entries(run: Run) -> list[dict]:
    """The ledger's GGUF exports, with what deploy and smoke read from them (a quant name, the scoring
    windows) of the right kind: a run folder can come from anywhere."""
    def usable(e: dict) -> bool:
        config = e.get("config") or {}
        return (e["step"] == "export-gguf" and bool(e["outputs"]) and e["outputs"][0]["path"].endswith(".gguf")
                and isinstance(e["inputs"].get("quant"), str)
                and all(type(config.get(k)) is int and config[k] > 0 for k in ("window", "stride")))

    return [e for e in run.steps() if usable(e)]


def pick_gguf(run: Run, quant: str) -> tuple[Path, dict]:
    """The GGUF to ship: --quant's, else export's auto choice, else the smallest that passed its gate."""
    entries = gguf_entries(run)
    if not entries:
        raise EdgeftError(f"{run.path}: no exported GGUF in this run; run `edgeft export --format gguf --run {run.path}`")
    if quant:
        match = [e for e in entries if e["inputs"]["quant"] == quant.lower()]
        if not match:
            have = sorted({e["inputs"]["quant"] for e in entries})
            raise EdgeftError(f"--quant {quant}: no such GGUF in {run.path} (have: {', '.join(have)})")
        entry = match[-1]
    else:
        choice = next((e for e in reversed(run.steps()) if e["step"] == "export-gguf-choice" and e["status"] == "ok"),
                      None)
        chosen = next((e for e in reversed(entries) if choice and e["inputs"]["quant"] == choice["metrics"].get(
            "chosen")), None)
        passed = [e for e in entries if e["status"] == "ok"]
        if chosen:
            entry = chosen
        elif passed:
            entry = min(passed, key=lambda e: e["outputs"][0]["bytes"])
        else:
            raise EdgeftError(f"{run.path}: no GGUF passed its gate; pass --quant to ship one anyway")
    path = run.path / entry["outputs"][0]["path"]
    if not path.resolve().is_relative_to(run.path.resolve()):
        raise EdgeftError(f"{run.path / 'manifest.json'}: the GGUF it names ({entry['outputs'][0]['path']}) is outside "
                          f"the run folder; restore the manifest or export again")
    if not path.is_file() or sha256_file(path) != entry["outputs"][0]["sha256"]:
        raise EdgeftError(f"{path}: missing or changed since export (sha256 differs from the ledger); export again")
    return path, entry


def export_source(run: Run, entry: dict) -> Path:
    """The HF folder a GGUF was exported from (its tokenizer and config): the run's merged model, else the
    folder the export entry names."""
    if (run.path / "merged").is_dir():
        return run.path / "merged"
    source = entry["inputs"].get("source")
    if not isinstance(source, str) or not Path(source, "config.json").is_file():
        raise EdgeftError(f"{run.path}: the model {entry['outputs'][0]['path']} was exported from is gone ({source}); "
                          f"export again")
    return Path(source)


TASK_PIECES = "task_pieces.txt"  # the task set's pieces for `edgeft-board score`
TASK_PROMPTS = "task_prompts.txt"  # its prompts for `edgeft-board answers`


def bundle(run: Run, gguf: Path, build_bin: Path, tokenizer) -> list[tuple[Path, str]]:
    """(local file, name on the board) pairs; the id files are written into a temp folder. The run's task
    set travels as two plain text files the board program reads (one piece / one prompt per line)."""
    from .task import answer_budget, read_task_set

    tokens = EvalTokens.read(run.path / TOKENS_FILE)
    tmp = Path(tempfile.mkdtemp(prefix="edgeft-deploy-"))
    (tmp / "eval_ids.txt").write_text(" ".join(map(str, tokens.ids)) + "\n")
    (tmp / "prompt_ids.txt").write_text(" ".join(map(str, prompt_ids(tokenizer))) + "\n")
    files = [(gguf, gguf.name), (build_bin / "edgeft-board", "edgeft-board"), (tmp / "eval_ids.txt", "eval_ids.txt"),
             (tmp / "prompt_ids.txt", "prompt_ids.txt")]
    task = read_task_set(run.path, tokenizer)
    if task:
        (tmp / TASK_PIECES).write_text("".join(f"{' '.join(map(str, i.ids))} | {' '.join(map(str, i.targets))}\n"
                                               for i in task.items))
        (tmp / TASK_PROMPTS).write_text("".join(f"{answer_budget(tokenizer, i.expected)} | "
                                                f"{' '.join(map(str, i.prompt))}\n" for i in task.items if i.prompt))
        files += [(tmp / TASK_PIECES, TASK_PIECES), (tmp / TASK_PROMPTS, TASK_PROMPTS)]
    return files


def preflight(remote, profile, gguf: Path, run: Run, model_config: dict, context: int, send_bytes: int, dest: str,
              emulate: bool) -> dict:
    from .devices import fits, memory_need

    out = remote.run(f"uname -m; df -Pk -- {shlex.quote(dest)} 2>/dev/null | tail -1 || df -Pk . | tail -1; "
                     f"grep -E '^MemTotal|^MemAvailable' /proc/meminfo; command -v sha256sum; "
                     f"command -v {shlex.quote(f'qemu-{profile.arch}-static')} || true",
                     timeout=remote.connect_timeout + 20)
    lines = out.strip().splitlines()
    arch = lines[0].strip()
    disk_free = int(lines[1].split()[3]) * 1024
    mem = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in lines[2:] if l.startswith("Mem")}
    if not any("sha256sum" in l for l in lines):
        raise EdgeftError(f"--host {remote.host}: the board has no sha256sum (coreutils); install it to verify copies")
    if arch != profile.arch and not emulate:
        raise EdgeftError(f"--host {remote.host} is {arch}, but --device {profile.name} is {profile.arch}; "
                          f"pick the board's profile (or --emulate on an {arch} host with qemu-user)")
    if emulate and not any(f"qemu-{profile.arch}-static" in l for l in lines):
        raise EdgeftError(f"--emulate: qemu-{profile.arch}-static not found on {remote.host}; "
                          f"apt-get install qemu-user-static")
    config = model_config
    need = memory_need(gguf.stat().st_size, config, context)
    ok, usable = fits(profile, need, mem.get("MemTotal"))
    facts = {"arch": arch, "disk_free_bytes": disk_free, "mem_total_bytes": mem.get("MemTotal"),
             "mem_available_bytes": mem.get("MemAvailable"), "need_bytes": need, "usable_bytes": usable}
    if not ok:
        smaller = [e for e in gguf_entries(run) if e["status"] == "ok" and
                   fits(profile, memory_need(e["outputs"][0]["bytes"], config, context), mem.get("MemTotal"))[0]]
        hint = (f"try --quant {min(smaller, key=lambda e: e['outputs'][0]['bytes'])['inputs']['quant']}" if smaller
                else "export a smaller quant or lower --context")
        raise EdgeftError(f"{gguf.name} needs {need / 2**20:.0f} MiB with a {context}-token KV cache but {remote.host} "
                          f"has {usable / 2**20:.0f} MiB usable; {hint}")
    if send_bytes > disk_free:
        raise EdgeftError(f"--host {remote.host}: {send_bytes / 2**20:.0f} MiB to copy but {disk_free / 2**20:.0f} MiB "
                          f"free on the board's disk")
    return facts


def deploy(config: DeployConfig) -> DeployResult:
    from .board_build import build
    from .devices import get
    from .models import load_tokenizer

    c = config
    if not c.host:
        raise EdgeftError("--host is required: user@board, or an alias from your ssh config")
    remote = c.remote()  # a host that is not a host name is refused before anything else
    run = Run(c.run)
    if not run.manifest_path.is_file():
        raise EdgeftError(f"{c.run}: not a run folder (no manifest.json)")
    profile = get(c.device)
    gguf, export_entry = pick_gguf(run, c.quant)
    dest = c.board_dir(run.path)
    remote.run("true", timeout=c.connect_timeout + 10)  # reachable, key accepted, host key known
    source = export_source(run, export_entry)
    tokenizer = load_tokenizer(source)
    board_build = build(c.device)
    files = bundle(run, gguf, board_build.bin, tokenizer)
    hashes = {name: sha256_file(local) for local, name in files}
    send_bytes = sum(local.stat().st_size for local, _ in files)
    inputs = {"gguf": gguf.name, "quant": export_entry["inputs"]["quant"], "host": c.host, "dest": dest,
              "device": profile.name, "build": board_build.folder.name}
    with run.step("deploy", to_dict(c), inputs) as entry:
        remote.run(f"mkdir -p -- {shlex.quote(dest)}")
        model_config = read_json(source / "config.json", "the exported model's folder is damaged; export again")
        entry["metrics"]["preflight"] = preflight(remote, profile, gguf, run, model_config, c.context, send_bytes,
                                                  dest, c.emulate)
        present = remote.sha256([f"{dest}/{name}" for _, name in files])
        start = time.perf_counter()
        sent = skipped = resumed = 0
        with bar(f"copy to {c.host}:{dest}", send_bytes) as update:
            done = 0
            for local, name in files:
                target = f"{dest}/{name}"
                size = local.stat().st_size
                if present.get(target) == hashes[name]:
                    skipped += 1
                else:
                    r = remote.send(local, target, hashes[name], lambda n, base=done: update(base + n))
                    sent += r["sent"]
                    resumed += bool(r["resumed_from"])
                done += size
                update(done)
        remote.run(f"chmod +x -- {shlex.quote(dest + '/edgeft-board')}")
        manifest = {"run": str(run.path.resolve()), "device": profile.name, "files": hashes,
                    "gguf": gguf.name, "quant": inputs["quant"]}
        remote.run(f"printf '%s\\n' {shlex.quote(json.dumps(manifest))} > {shlex.quote(dest + '/deploy.json')}")
        seconds = time.perf_counter() - start
        entry["outputs"] = [{"path": f"{c.host}:{dest}/{name}", "bytes": local.stat().st_size,
                             "sha256": hashes[name]} for local, name in files]
        entry["metrics"].update({"bytes_sent": sent, "files_skipped": skipped, "files_resumed": resumed,
                                 "seconds": round(seconds, 2),
                                 "mb_per_s": round(sent / 2**20 / seconds, 2) if seconds and sent else None})
    return DeployResult(run=run.path, dest=dest, files=hashes, entry=entry)
