"""`edgeft smoke RUN --device P (--host H | --local | --emulate)`: the shipped GGUF run where it will run.

On the target: a greedy answer to a fixed chat prompt (checks: non-empty, no replacement characters, stops
at end-of-generation), prompt and decode tokens/s, and perplexity on the run's token ids with the same
windows as everywhere else. The board's perplexity must match the host's (llama.cpp's Python binding, same
GGUF, same ids) within 2%: ARM's dot-product kernels round differently, more than that means a broken
build. Decode tokens/s is also given as a fraction of the profile's bandwidth bound (bandwidth / model size).

--emulate runs the board's aarch64 build under qemu-user with the board's own CPU model (-cpu cortex-a76
for a Pi 5), on this host or, with --host, on that host: a build whose flags do not fit the CPU dies with
SIGILL, a free check. llama.cpp is 20-50x slower there, so emulated runs score --max-tokens ids (default 129).
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import to_dict
from .deploy import TASK_PIECES, TASK_PROMPTS, bundle, pick_gguf
from .errors import EdgeftError
from .gates import BOARD_MATCH, Gate, check
from .heldout import TOKENS_FILE, EvalTokens
from .ledger import Run
from .progress import console
from .prompt import answer_ok, prompt_ids, prompt_text
from .scoring import Comparison, PerplexityResult, score
from .ssh import SSHOptions
from .task import TaskScore, changes, judge_answers, read_task_set, score_task

SIGILL = 132


@dataclass
class SmokeConfig(SSHOptions):
    run: str = field(default="", metadata={"help": "run folder (deployed, for --host)"})
    device: str = field(default="", metadata={"help": "board profile (default: rpi5, or x86-64-native with --local)"})
    local: bool = field(default=False, metadata={"help": "run here, with this host's build"})
    emulate: bool = field(default=False, metadata={"help": "run the aarch64 build under qemu-user (here or on --host)"})
    quant: str = field(default="", metadata={"help": "which GGUF (default: as deploy picks)"})
    max_tokens: int = field(default=0, metadata={"help": "score the first N ids (0: all; 129 when emulating)"})
    task_items: int = field(default=0, metadata={
        "help": "task examples scored and answered on the target (0: all; 3 when emulating)"})
    threads: int = field(default=0, metadata={"help": "threads on the target (0: the profile's)"})


@dataclass
class SmokeResult:
    run: Path
    entry: dict


def _runner(c: SmokeConfig, profile, workdir: str):
    """A function running a shell command in the target's work folder, returning stdout."""
    prefix = ""
    if c.emulate:
        prefix = f"qemu-{profile.arch}-static -cpu {profile.qemu_cpu or 'max'} "
    sigill = (f"the {profile.name} build died with SIGILL (illegal instruction) on the target CPU"
              + (f" (qemu -cpu {profile.qemu_cpu})" if c.emulate else "")
              + ": the profile's compiler flags use instructions that CPU lacks; pick the board's profile")

    if c.host:
        remote = c.remote()

        def run(cmd: str, timeout: float, board: bool = True) -> str:
            try:
                return remote.run(f"cd {shlex.quote(workdir)} && {prefix if board else ''}{cmd}", timeout=timeout)
            except EdgeftError as e:
                if f"(exit {SIGILL})" in str(e):
                    raise EdgeftError(sigill) from None
                raise
        return run

    def run_local(cmd: str, timeout: float, board: bool = True) -> str:
        proc = subprocess.run(f"{prefix if board else ''}{cmd}", shell=True, cwd=workdir, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode in (SIGILL, -4):
            raise EdgeftError(sigill)
        if proc.returncode != 0:
            raise EdgeftError(f"`{cmd[:60]}` failed on the target (exit {proc.returncode}): "
                              f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
        return proc.stdout
    return run_local


def _task_on_target(entry: dict, task, c: SmokeConfig, target, q: str, threads: int, host_model, tokenizer,
                    slow: int, label: str, run: Run) -> None:
    """The task's perplexity and exact answers on the target, against the host's llama.cpp on the same GGUF
    and the same examples (a subset when emulating: qemu runs llama.cpp 20-50x slower)."""
    n = min(c.task_items or (3 if c.emulate else len(task.items)), len(task.items))
    pieces, prompts_file = TASK_PIECES, TASK_PROMPTS
    if n < len(task.items):  # the first n lines, cut on the target with POSIX tools
        target(f"head -n {n} {TASK_PIECES} > n{n}-{TASK_PIECES} && head -n {n} {TASK_PROMPTS} > n{n}-{TASK_PROMPTS}",
               timeout=60, board=False)
        pieces, prompts_file = f"n{n}-{TASK_PIECES}", f"n{n}-{TASK_PROMPTS}"
    tokens = sum(len(i.ids) for i in task.items[:n])
    with console.status(f"smoke: the task's perplexity and answers on {n} examples"):
        scored = json.loads(target(f"./edgeft-board score {q} {pieces} {threads}", timeout=(60 + tokens / 10) * slow))
        answered = json.loads(target(f"./edgeft-board answers {q} {prompts_file} {threads}",
                                     timeout=(60 + n * 10) * slow))
    rate, fields, count, samples = judge_answers(task, answered["answers"], tokenizer)
    on_board = TaskScore(ppl=PerplexityResult(ppl=scored["ppl"], nll_sum=scored["nll_sum"], tokens=scored["tokens"],
                                              windows=scored["pieces"], window=0, stride=0,
                                              seconds=scored["seconds"], backend="llama.cpp (target)"),
                         exact_match=rate, field_accuracy=fields, answered=count, samples=samples, items=n,
                         of=len(task.items))
    on_host = score_task(task, host_model.logits, lambda p, m: host_model.generate(p, m)[0], tokenizer,
                         "llama.cpp (host)", answer_limit=n, limit=n)
    out = on_board.record(entry, label, task.source, on_host.entry("host", task.source), "host")
    merged = next((e.get("task") for e in reversed(run.steps()) if e["step"] in ("merge-choice", "merge")
                   and e["status"] == "ok" and e.get("task")), None)
    if merged and n == len(task.items):
        out["vs_merged"] = changes(out, merged)
    elif n < len(task.items):
        out["note"] = f"{n} of {len(task.items)} task examples (emulated: qemu is slow); compared with the host on the same {n}"


def smoke(config: SmokeConfig) -> SmokeResult:
    from .board_build import build
    from .devices import get
    from .llamacpp import LlamaCpp
    from .models import load_tokenizer

    c = config
    modes = [m for m, on in (("host", bool(c.host)), ("local", c.local)) if on]
    if len(modes) != 1 and not (c.emulate and not modes):
        raise EdgeftError("say where to run: --host user@board, --local, or --emulate (optionally with --host)")
    run = Run(c.run)
    if not run.manifest_path.is_file():
        raise EdgeftError(f"{c.run}: not a run folder (no manifest.json)")
    profile = get(c.device or ("x86-64-native" if c.local else "rpi5"))
    if c.emulate and not profile.qemu_cpu and profile.arch == "aarch64":
        raise EdgeftError(f"--device {profile.name}: the profile has no qemu_cpu to emulate")
    gguf, export_entry = pick_gguf(run, c.quant)
    tokens = EvalTokens.from_json(json.loads((run.path / TOKENS_FILE).read_text()))
    limit = c.max_tokens or (129 if c.emulate else len(tokens.ids))
    ids = tokens.ids[:limit]
    window = min(export_entry["config"]["window"], len(ids))
    stride = min(export_entry["config"]["stride"], window)
    threads = c.threads or profile.threads or 2
    if c.emulate:
        threads = c.threads or 2  # qemu-user runs on the host's cores
    source = run.path / "merged" if (run.path / "merged").is_dir() else Path(export_entry["inputs"]["source"])
    tokenizer = load_tokenizer(source)

    if c.host:
        workdir = c.board_dir(run.path)
        model_file = gguf.name
    else:
        board_build = build(profile.name)
        workdir = tempfile.mkdtemp(prefix="edgeft-smoke-")
        for local, name in bundle(run, gguf, board_build.bin, tokenizer):
            Path(workdir, name).symlink_to(local.resolve())
        model_file = gguf.name
    target = _runner(c, profile, workdir)
    slow = 50 if c.emulate else 1
    inputs = {"gguf": gguf.name, "quant": export_entry["inputs"]["quant"], "device": profile.name,
              "mode": "emulated" if c.emulate else ("board" if c.host else "local"), "host": c.host or None,
              "tokens": len(ids), "eval_tokens": TOKENS_FILE}
    with run.step("smoke", to_dict(c), inputs) as entry:
        q = shlex.quote(model_file)
        with console.status(f"smoke on {inputs['mode']} {profile.name}: generate"):
            gen = json.loads(target(f"./edgeft-board generate {q} prompt_ids.txt 32 {threads}", timeout=60 * slow))
        answer = tokenizer.decode(gen["ids"], skip_special_tokens=True)
        # Gated: an answer at all, and valid UTF-8 text. Recorded: whether it stopped at end-of-generation
        # and whether it is the host's greedy answer for the same GGUF (a small quant of a small model can
        # ramble on the host too; the board reproducing the host is what the smoke test is about).
        gen_ok = answer_ok(answer)
        with console.status(f"smoke on {inputs['mode']} {profile.name}: bench"):
            pp, tg = (32, 8) if c.emulate else (128, 32)
            bench = json.loads(target(f"./edgeft-board bench {q} {pp} {tg} {threads}", timeout=60 * slow))
        with console.status(f"smoke on {inputs['mode']} {profile.name}: perplexity on {len(ids)} ids"):
            sub = "eval_ids.txt"
            if limit < len(tokens.ids):  # the first N ids, cut on the target with POSIX tools
                target(f"tr ' ' '\\n' < eval_ids.txt | head -n {limit} > eval_ids_{limit}.txt", timeout=60,
                       board=False)
                sub = f"eval_ids_{limit}.txt"
            board = json.loads(target(f"./edgeft-board perplexity {q} {sub} {window} {stride} {threads}",
                                      timeout=120 * slow + len(ids) * slow / 10))
        task = read_task_set(run.path, tokenizer)
        host_model = LlamaCpp(gguf, n_ctx=max(window, 128, task.longest if task else 0))
        host = score(ids, host_model.logits, window=window, stride=stride, backend="llama.cpp (host)")
        host_ids, _ = host_model.generate(prompt_ids(tokenizer), 32)
        if task:
            _task_on_target(entry, task, c, target, q, threads, host_model, tokenizer, slow,
                            f"{gguf.name} on {profile.name}" + (" (emulated)" if c.emulate else ""), run)
        host_model.close()
        same = next((i for i, (a, b) in enumerate(zip(gen["ids"], host_ids)) if a != b), min(len(gen["ids"]), len(host_ids)))
        on_board = PerplexityResult(ppl=board["ppl"], nll_sum=math.log(board["ppl"]) * board["tokens"],
                                    tokens=board["tokens"], windows=board["windows"], window=window, stride=stride,
                                    seconds=board["seconds"], backend=f"llama.cpp on {inputs['mode']} {profile.name}")
        vs_host = Comparison(measured=on_board, reference=host)
        vs_host.record(entry, f"{gguf.name} on {profile.name}" + (" (emulated)" if c.emulate else ""),
                       f"{gguf.name} on host", "host", tokens.source)
        bound = (profile.memory_bandwidth_gbs * 1e9 / bench["model_bytes"]) if profile.memory_bandwidth_gbs else None
        entry["metrics"].update({
            "generation": {"prompt": prompt_text(), "answer": answer, "ok": gen_ok, **gen,
                           "host_answer": tokenizer.decode(host_ids, skip_special_tokens=True),
                           "tokens_equal_to_host": same, "identical_to_host": gen["ids"] == host_ids},
            "bench": bench, "decode_bound_tokens_per_s": round(bound, 1) if bound else None,
            "decode_fraction_of_bound": round(bench["tg_tokens_per_s"] / bound, 4) if bound else None,
            "bound_note": ("emulated: qemu speed, not the board's" if c.emulate else
                           f"bound = {profile.memory_bandwidth_gbs} GB/s / model bytes "
                           f"({profile.memory_bandwidth_source})" if bound else "no bandwidth figure in the profile"),
            "threads": threads, "qemu_cpu": profile.qemu_cpu if c.emulate else None})
        diff = vs_host.change
        failure = (f"board perplexity {board['ppl']:.4f} is {100 * diff:+.2f}% from the host's {host.ppl:.4f} on "
                   f"the same {board['tokens']} tokens (limit {100 * BOARD_MATCH:.0f}%)")
        if not gen_ok and abs(diff) <= BOARD_MATCH:
            failure = f"the board's answer failed its checks (empty or replacement characters): {answer[:80]!r}"
        check(entry, Gate("board vs host perplexity", diff, BOARD_MATCH, failure, absolute=True, also=gen_ok))
    return SmokeResult(run=run.path, entry=entry)
