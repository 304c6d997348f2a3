"""`edgeft deploy RUN --device P --host user@board`: the run's GGUF, the board's build (edgeft-board,
llama-server, llama-cli), the eval token ids and a manifest, copied over the user's own SSH and verified by
sha256 on the board.

Before copying, a preflight reads the board's architecture, free disk and RAM over ssh and refuses a model
that would not fit (model + KV cache for the context + runtime), naming the quant that would. Files already
on the board with the right hash are skipped; an interrupted copy resumes.

`--adapters RUN,RUN`: adapter runs trained on one base, served together. The base GGUF (in the chosen quant,
written by `export --adapter-only`) ships once, each run's LoRA GGUF beside it, and each run's ids in a
folder of its own. `--serve` then starts llama-server on the board (devices/serve.py); `--stop` stops it.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

from ..atomic import sha256_file
from ..config import accepts_old_names, to_dict
from ..errors import EdgeftError
from ..heldout import EvalTokens
from ..inputs import read_json
from ..progress import bar
from ..prompt import prompt_ids
from ..run import DEPLOY, Run, Served, what_to_serve
from . import versions
from .versions import TASK_PIECES, TASK_PROMPTS, served_dest, served_version
from .ssh import SSHOptions
from .target import qemu_prefix, target_threads


@accepts_old_names
@dataclass
class DeployConfig(SSHOptions):
    run: str = field(default="", metadata={"help": "run folder with exported GGUFs"})
    device: str = field(default="rpi5", metadata={"help": "board profile (see `edgeft devices`)"})
    quant: str = field(default="", metadata={"help": "which GGUF (default: export's auto choice, else the smallest "
                                                     "that passed its gate)"})
    context: int = field(default=0, metadata={"help": "context the board will run (0: the largest of 8192/4096/2048/"
                                                      "1024/512 that the model was trained for and the RAM fits)"})
    emulate: bool = field(default=False, metadata={"help": "the host runs the board's binaries under qemu-user"})
    ram_gb: float = field(default=0.0, metadata={"help": "plan for this much RAM (default: what the board reports)"})
    adapters: list[str] = field(default_factory=list, metadata={
        "help": "adapter runs on one base, served together (comma-separated; RUN may be one of them): the base "
                "GGUF ships once, one LoRA GGUF per run (from `export --adapter-only`)"})
    serve: bool = field(default=False, metadata={"help": "start llama-server on the board with what was deployed "
                                                         "(a systemd user unit where the board has one)"})
    serve_port: int = field(default=8080, metadata={"help": "the server's port on the board"})
    listen: bool = field(default=False, metadata={"help": "serve on every interface (default: the board's "
                                                          "127.0.0.1 only; reach it through ssh -L)"})
    stop: bool = field(default=False, metadata={"help": "stop edgeft's server on --serve-port and exit"})
    hosts: str = field(default="", metadata={"help": "fleet: YAML file with `boards:`, a list of name, host, device "
                                                     "(optional ram_gb, port, ssh_config, emulate, dest), in parallel"})
    parallel: int = field(default=4, metadata={"help": "fleet: boards handled at once"})
    redo: bool = field(default=False, metadata={"help": "fleet: redo boards that already succeeded"})
    waves: str = field(default="", metadata={
        "help": "fleet, with --serve: staged rollout, e.g. 1,25%,100% (a canary board first): each wave's boards "
                "are checked through their server before the next wave starts; a wave that fails switches its "
                "boards back and stops (exit 3)"})
    max_unavailable: int = field(default=0, metadata={
        "help": "rollout: boards that may be unreachable (or fail without a gate) before the rollout stops"})
    keep: int = field(default=2, metadata={"help": "versions kept on a board once a newer one passed its checks "
                                                   "(the current one counts)"})
    rollback: bool = field(default=False, metadata={
        "help": "switch the board(s) back to the version served before, and check them (no RUN needed)"})
    task_items: int = field(default=0, metadata={
        "help": "rollout checks: task prompts asked through the server (0: all; 3 when emulating)"})
    max_tokens: int = field(default=0, metadata={
        "help": "rollout checks: held-out ids scored on the board (0: all; 129 when emulating)"})
    max_exact_drop: str = field(default="", metadata={
        "help": "rollout checks: the largest drop of the exact-answer rate, one number or per quant "
                "('q4_k_m=0.1'; default: the quant's gate, as export's)"})
    max_task_ppl_rise: str = field(default="", metadata={
        "help": "rollout checks: the largest task-perplexity rise vs the version replaced (same syntax)"})

    ALIASES: ClassVar[dict[str, str]] = {"jobs": "parallel"}  # one vocabulary: issue 28 names it --parallel


@dataclass
class DeployResult:
    run: Path | None  # None for --stop
    dest: str  # the board's folder; the files are in its version folder (versions.py)
    files: dict[str, str]  # name on the board -> sha256
    entry: dict  # the first run's (every served run gets the same); with --hosts, the fleet's
    fleet: bool = False  # --hosts: `entry` is the fleet entry (its table in metrics.boards)
    version: str = ""  # the version folder's name on the board




def id_files(run: Run, tokenizer, folder: str = "") -> list[tuple[Path, str]]:
    """The run's ids as the board program reads them, (local file, name on the board) pairs written into a temp
    folder: held-out ids, the fixed prompt, and the task set as two plain text files (one piece / one prompt
    per line). `folder`: a subfolder on the board (one per adapter run when several are served)."""
    from ..task import answer_budget, read_task_set

    tokens = EvalTokens.read(run.ids)
    tmp = Path(tempfile.mkdtemp(prefix="edgeft-deploy-"))
    at = f"{folder}/" if folder else ""
    (tmp / "eval_ids.txt").write_text(" ".join(map(str, tokens.ids)) + "\n")
    (tmp / "prompt_ids.txt").write_text(" ".join(map(str, prompt_ids(tokenizer))) + "\n")
    files = [(tmp / "eval_ids.txt", at + "eval_ids.txt"), (tmp / "prompt_ids.txt", at + "prompt_ids.txt")]
    task = read_task_set(run.path, tokenizer)
    if task:
        (tmp / TASK_PIECES).write_text("".join(f"{' '.join(map(str, i.ids))} | {' '.join(map(str, i.targets))}\n"
                                               for i in task.items))
        (tmp / TASK_PROMPTS).write_text("".join(f"{answer_budget(tokenizer, i.expected)} | "
                                                f"{' '.join(map(str, i.prompt))}\n" for i in task.items if i.prompt))
        files += [(tmp / TASK_PIECES, at + TASK_PIECES), (tmp / TASK_PROMPTS, at + TASK_PROMPTS)]
    return files


def bundle(run: Run, gguf: Path, build_bin: Path, tokenizer) -> list[tuple[Path, str]]:
    """(local file, name on the board) pairs of a one-model deploy: the GGUF, the board's binaries, the ids."""
    from .build import BINARIES

    # A smoke-only build (build.build(runtime=False)) has edgeft-board alone.
    return [(gguf, gguf.name), *[(build_bin / b, b) for b in BINARIES if (build_bin / b).is_file()],
            *id_files(run, tokenizer)]


def preflight(remote, profile, gguf: Path, run: Run, model_config: dict, context: int, send_bytes: int, dest: str,
              emulate: bool, model_bytes: int | None = None, ram_bytes: int | None = None) -> dict:
    """The board's facts, checked: arch, disk, sha256sum, qemu when emulating, and RAM for the model (plus
    adapters: `model_bytes`) with a `context` KV cache; `context` 0 picks the largest that fits. `ram_bytes`
    (a fleet file's ram_gb) caps what the board reports."""
    from . import fits, memory_need

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
    from .serve import fit_context

    config = model_config
    ram = min(x for x in (mem.get("MemTotal"), ram_bytes) if x) if (mem.get("MemTotal") or ram_bytes) else None
    size = model_bytes or gguf.stat().st_size
    context = fit_context(context, config.get("max_position_embeddings"),
                          lambda n: fits(profile, memory_need(size, config, n), ram)[0])
    need = memory_need(size, config, context)
    ok, usable = fits(profile, need, ram)
    facts = {"arch": arch, "disk_free_bytes": disk_free, "mem_total_bytes": mem.get("MemTotal"),
             "mem_available_bytes": mem.get("MemAvailable"), "ram_planned_bytes": ram, "context": context,
             "need_bytes": need, "usable_bytes": usable}
    if not ok:
        smaller = [e for e in run.gguf_exports() if e["status"] == "ok" and
                   fits(profile, memory_need(e["outputs"][0]["bytes"], config, context), ram)[0]]
        hint = (f"try --quant {min(smaller, key=lambda e: e['outputs'][0]['bytes'])['inputs']['quant']}" if smaller
                else "export a smaller quant or lower --context")
        raise EdgeftError(f"{gguf.name} needs {need / 2**20:.0f} MiB with a {context}-token KV cache but {remote.host} "
                          f"has {usable / 2**20:.0f} MiB usable; {hint}")
    if send_bytes > disk_free:
        raise EdgeftError(f"--host {remote.host}: {send_bytes / 2**20:.0f} MiB to copy but {disk_free / 2**20:.0f} MiB "
                          f"free on the board's disk")
    return facts


def deploy(config: DeployConfig) -> DeployResult:
    from ..models import load_tokenizer
    from . import get, serve
    from .build import BINARIES, build

    c = config
    if c.hosts and (c.waves or c.rollback):  # a staged rollout, or every board back to its previous version
        from .rollout import rollback, rollout

        entry = rollback(c) if c.rollback else rollout(c, deploy)
        return DeployResult(run=Path(c.run) if c.run else None, dest="", files={}, entry=entry, fleet=True)
    if c.waves:
        raise EdgeftError("--waves needs --hosts FLEET.yaml (waves are groups of a fleet's boards)")
    if c.hosts:  # every board of the fleet, each through this function with its own host
        from .fleet import run_fleet

        entry = run_fleet(c, DEPLOY, deploy)
        return DeployResult(run=Path(c.run or c.adapters[0]), dest="", files={}, entry=entry, fleet=True)
    if not c.host:
        raise EdgeftError("--host is required: user@board, or an alias from your ssh config")
    remote = c.remote()  # a host that is not a host name is refused before anything else
    if c.stop:
        return DeployResult(run=None, dest="", files={}, entry={"step": "serve-stop", "status": "ok",
                                                                 "metrics": serve.stop(remote, c.serve_port)})
    if c.rollback:
        from .rollout import rollback

        entry = rollback(c)
        return DeployResult(run=None, dest=served_dest(c), files={}, entry=entry, fleet=True)
    served = what_to_serve(c.run, c.adapters, c.quant)
    run = served.runs[0]
    profile = get(c.device)
    dest = served_dest(c, served)
    remote.run("true", timeout=c.connect_timeout + 10)  # reachable, key accepted, host key known
    tokenizer = load_tokenizer(served.source)
    board_build = build(c.device)
    files = [(served.model, served.model.name), *[(lora, lora.name) for lora in served.loras],
             *[(board_build.bin / b, b) for b in BINARIES]]
    for r in served.runs:
        files += id_files(r, tokenizer, r.path.resolve().name if served.adapter_mode else "")
    hashes = {name: sha256_file(local) for local, name in files}
    version = served_version(served, hashes)
    folder = versions.version_dir(dest, version)
    model_bytes = served.model.stat().st_size + sum(lora.stat().st_size for lora in served.loras)
    inputs = {"gguf": served.model.name, "quant": served.quant, "host": c.host, "dest": dest, "version": version,
              "device": profile.name, "build": board_build.folder.name,
              "adapters": [{"id": i, "run": str(r.path.resolve()), "lora": lora.name}
                           for i, (r, lora) in enumerate(zip(served.runs, served.loras))] or None}
    # every served run's ledger says where it now runs
    with run.record(DEPLOY, to_dict(c), inputs, also=served.runs[1:],
                    also_inputs={"served_with": str(run.path.resolve())}) as entry:
        remote.run(f"mkdir -p -- {shlex.quote(folder)}")
        state = versions.read_state(remote, dest)
        present = remote.sha256([f"{folder}/{name}" for _, name in files])
        linked = _reuse(remote, dest, state, version, files, hashes, present)
        if linked:
            present = remote.sha256([f"{folder}/{name}" for _, name in files])
        send_bytes = sum(local.stat().st_size for local, name in files
                         if present.get(f"{folder}/{name}") != hashes[name])
        model_config = read_json(served.source / "config.json", "the exported model's folder is damaged; export again")
        # The versions already there stay while this one is copied (a rollback must find them): the free disk
        # must hold what is still to send on top of them.
        facts = preflight(remote, profile, served.model, run, model_config, c.context, send_bytes, dest, c.emulate,
                          model_bytes=model_bytes, ram_bytes=int(c.ram_gb * 2**30) or None)
        facts["versions_on_board"] = len(set(state["versions"]) | {version})
        entry["metrics"]["preflight"] = facts
        start = time.perf_counter()
        sent = skipped = resumed = 0
        total = sum(local.stat().st_size for local, _ in files)
        with bar(f"copy to {c.host}:{folder}", total) as update:
            done = 0
            for local, name in files:
                target = f"{folder}/{name}"
                size = local.stat().st_size
                if present.get(target) == hashes[name]:
                    skipped += 1
                else:
                    r = remote.send(local, target, hashes[name], lambda n, base=done: update(base + n))
                    sent += r["sent"]
                    resumed += bool(r["resumed_from"])
                done += size
                update(done)
        remote.run("chmod +x -- " + " ".join(shlex.quote(f"{folder}/{b}") for b in BINARIES))
        manifest = {"run": str(run.path.resolve()), "device": profile.name, "files": hashes, "version": version,
                    "gguf": served.model.name, "quant": served.quant, "adapters": inputs["adapters"]}
        remote.run(f"printf '%s\\n' {shlex.quote(json.dumps(manifest))} > "
                   f"{shlex.quote(f'{folder}/{versions.MANIFEST}')}")
        seconds = time.perf_counter() - start
        before = state.get("current")
        state["versions"][version] = {
            "run": str(run.path.resolve()), "runs": [r.path.resolve().name for r in served.runs],
            "gguf": served.model.name, "sha256": hashes[served.model.name], "quant": served.quant,
            "adapters": [lora.name for lora in served.loras], "device": profile.name, "deployed": versions.now(),
            "files": hashes, "check": None}
        versions.switch(remote, dest, version)
        versions.made_current(state, version)
        versions.write_state(remote, dest, state)
        entry["outputs"] = [{"path": f"{c.host}:{folder}/{name}", "bytes": local.stat().st_size,
                             "sha256": hashes[name]} for local, name in files]
        entry["metrics"].update({"bytes_sent": sent, "files_skipped": skipped, "files_resumed": resumed,
                                 "files_linked": linked, "seconds": round(seconds, 2), "previous": before,
                                 "mb_per_s": round(sent / 2**20 / seconds, 2) if seconds and sent else None})
        if c.serve:
            entry["metrics"]["serve"] = start_server(c, remote, profile, served, dest, facts["context"])
    return DeployResult(run=run.path, dest=dest, files=hashes, entry=entry, version=version)


def _reuse(remote, dest: str, state: dict, version: str, files, hashes: dict, present: dict) -> int:
    """Files of this version that another version on the board already holds (the board's binaries, an
    unchanged base GGUF) are hard-linked from there instead of sent again (a copy where links fail). The
    caller hashes them again on the board, so a link to a damaged file is sent anew."""
    folder = versions.version_dir(dest, version)
    have = {}
    for name, v in state["versions"].items():
        if name != version:
            for f, sha in (v.get("files") or {}).items():
                have.setdefault(sha, f"{versions.version_dir(dest, name)}/{f}")
    lines = []
    for _, name in files:
        target = f"{folder}/{name}"
        source = have.get(hashes[name])
        if present.get(target) != hashes[name] and source:
            q_s, q_t = shlex.quote(source), shlex.quote(target)
            lines.append(f"{{ [ -f {q_s} ] && mkdir -p -- \"$(dirname -- {q_t})\" && "
                         f"{{ ln -f -- {q_s} {q_t} 2>/dev/null || cp -f -- {q_s} {q_t}; }}; }}")
    if lines:
        remote.run("; ".join(lines) + "; true")
    return len(lines)


def start_server(c: DeployConfig, remote, profile, served: Served, dest: str, context: int) -> dict:
    """llama-server started on the board with what was deployed, and waited for through a tunnel until its
    /health says the model is loaded (and, with adapters, that every one is loaded)."""
    from . import serve

    threads = target_threads(profile, c.emulate)
    spec = serve.ServeSpec(model=served.model.name, loras=[lora.name for lora in served.loras], context=context,
                           threads=threads, port=c.serve_port, listen=c.listen,
                           alias=served.runs[0].path.resolve().name if not served.adapter_mode else "adapters",
                           qemu=qemu_prefix(profile, c.emulate))
    about = ", ".join(r.path.resolve().name for r in served.runs)
    info = serve.start(remote, versions.current_dir(dest), spec, about)
    limit = serve.load_seconds(served.model.stat().st_size, c.emulate)
    with remote.tunnel(c.serve_port) as port:
        client = serve.Client(port)
        try:
            info["ready_seconds"] = round(client.wait(limit, lambda: serve.pid(remote, c.serve_port) is not None), 1)
        except EdgeftError as e:
            raise EdgeftError(f"{e} on {c.host}:{c.serve_port} (its log: "
                              f"{serve.log_tail(remote, versions.current_dir(dest))})") from None
        loaded = client.adapters()
        if len(loaded) != len(served.loras):
            raise EdgeftError(f"the board's server loaded {len(loaded)} adapters of {len(served.loras)}: "
                              f"{serve.log_tail(remote, versions.current_dir(dest))}")
    info["rss_bytes"] = serve.rss_bytes(remote, c.serve_port)
    info["adapters"] = [{"id": i, "run": r.path.resolve().name, "lora": lora.name}
                        for i, (r, lora) in enumerate(zip(served.runs, served.loras))]
    return info
