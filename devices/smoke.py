"""`edgeft smoke RUN --device P (--host H | --local | --emulate)`: the shipped GGUF run where it will run.

On the target: a greedy answer to a fixed chat prompt (checks: non-empty, no replacement characters, stops
at end-of-generation), prompt and decode tokens/s, and perplexity on the run's token ids with the same
windows as everywhere else. The board's perplexity must match the host's (llama.cpp's Python binding, same
GGUF, same ids) within 2%: ARM's dot-product kernels round differently, more than that means a broken
build. Both score every token, so the comparison is token by token: what the gate takes is the change
beyond 3 standard errors of the per-token differences (see gates.BOARD_Z), not the raw perplexity ratio,
which a sample of 128 tokens moves by about 1% by chance. Decode tokens/s is also given as a fraction of
the profile's bandwidth bound (bandwidth / model size).

--emulate runs the board's aarch64 build under qemu-user with the board's own CPU model (-cpu cortex-a76
for a Pi 5), on this host or, with --host, on that host: a build whose flags do not fit the CPU dies with
SIGILL, a free check. llama.cpp is 20-50x slower there, so emulated runs score --max-tokens ids (default 129).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

from ..config import accepts_old_names, to_dict
from ..errors import EdgeftError
from ..gates import BOARD_MATCH, BOARD_Z, Gate, check
from ..heldout import EvalTokens
from ..inputs import parse_json
from ..progress import activity
from ..prompt import answer_ok, prompt_ids, prompt_text
from ..run import MANIFEST, MERGE, MERGE_CHOICE, SMOKE, TOKENS_FILE, Run, what_to_serve
from ..scoring import Comparison, PerplexityResult, model_bos, score, token_difference
from ..task import TaskScore, changes, judge_answers, read_task_set, score_task
from .deploy import bundle
from .versions import TASK_PIECES, TASK_PROMPTS
from .ssh import SSHOptions
from .target import board_perplexity, runner, target_threads


@accepts_old_names
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
    adapters: list[str] = field(default_factory=list, metadata={
        "help": "adapter runs served together by `deploy --adapters ... --serve`: check each through the server"})
    serve_port: int = field(default=8080, metadata={"help": "the server's port on the board (with --adapters)"})
    hosts: str = field(default="", metadata={"help": "fleet: YAML list of boards (as for deploy), in parallel"})
    parallel: int = field(default=4, metadata={"help": "fleet: boards handled at once"})
    redo: bool = field(default=False, metadata={"help": "fleet: redo boards that already passed"})

    ALIASES: ClassVar[dict[str, str]] = {"jobs": "parallel"}  # one vocabulary with deploy's


@dataclass
class SmokeResult:
    run: Path
    entry: dict  # the first run's
    entries: list[dict] = field(default_factory=list)  # every adapter's, with --adapters
    fleet: bool = False  # --hosts: `entry` is the fleet entry (its table in metrics.boards)


def _task_on_target(entry: dict, task, c: SmokeConfig, board_json, model_file: str, threads: int, host_model,
                    tokenizer, slow: int, label: str, run: Run) -> None:
    """The task's perplexity and exact answers on the target, against the host's llama.cpp on the same GGUF
    and the same examples (a subset when emulating: qemu runs llama.cpp 20-50x slower)."""
    n = min(c.task_items or (3 if c.emulate else len(task.items)), len(task.items))
    tokens = sum(len(i.ids) for i in task.items[:n])
    with activity(f"smoke: the task's perplexity and answers on {n} examples"):
        scored = board_json("score", model_file, TASK_PIECES, str(threads), str(n), timeout=(60 + tokens / 10) * slow,
                            keys=("ppl", "nll_sum", "tokens", "pieces", "seconds"))
        answered = board_json("answers", model_file, TASK_PROMPTS, str(threads), str(n), timeout=(60 + n * 10) * slow,
                              keys=("answers",))
    rate, fields, count, samples = judge_answers(task, answered["answers"], tokenizer)
    on_board = TaskScore(ppl=PerplexityResult(ppl=scored["ppl"], nll_sum=scored["nll_sum"], tokens=scored["tokens"],
                                              windows=scored["pieces"], window=0, stride=0,
                                              seconds=scored["seconds"], backend="llama.cpp (target)"),
                         exact_match=rate, field_accuracy=fields, answered=count, samples=samples, items=n,
                         of=len(task.items))
    on_host = score_task(task, host_model.logits, lambda p, m: host_model.generate(p, m)[0], tokenizer,
                         "llama.cpp (host)", answer_limit=n, limit=n)
    out = on_board.record(entry, label, task.source, on_host.entry("host", task.source), "host")
    merged = (run.last(MERGE_CHOICE, MERGE, where=lambda e: bool(e.get("task"))) or {}).get("task")
    if merged and n == len(task.items):
        out["vs_merged"] = changes(out, merged)
    elif n < len(task.items):
        out["note"] = (f"{n} of {len(task.items)} task examples (emulated: qemu is slow); compared with the host on "
                       f"the same {n}")


def smoke(config: SmokeConfig) -> SmokeResult:
    from ..llamacpp import LlamaCpp
    from ..models import load_tokenizer
    from . import get
    from .build import build

    c = config
    if c.hosts:  # every board of the fleet, each through this function with its own host
        from .fleet import run_fleet

        entry = run_fleet(c, SMOKE, smoke)
        return SmokeResult(run=Path(c.run or c.adapters[0]), entry=entry, fleet=True)
    if c.adapters:
        from .smoke_served import smoke_adapters

        entries = smoke_adapters(c)
        return SmokeResult(run=Path(c.run or c.adapters[0]), entry=entries[0], entries=entries)
    modes = [m for m, on in (("host", bool(c.host)), ("local", c.local)) if on]
    if len(modes) != 1 and not (c.emulate and not modes):
        raise EdgeftError("say where to run: --host user@board, --local, or --emulate (optionally with --host)")
    run = Run(c.run)
    if not run.is_run():
        raise EdgeftError(f"{c.run}: not a run folder (no {MANIFEST})")
    profile = get(c.device or ("x86-64-native" if c.local else "rpi5"))
    if c.emulate and not profile.qemu_cpu and profile.arch == "aarch64":
        raise EdgeftError(f"--device {profile.name}: the profile has no qemu_cpu to emulate")
    gguf, export_entry = run.chosen_gguf(c.quant)
    tokens = EvalTokens.read(run.ids)
    limit = c.max_tokens or (129 if c.emulate else len(tokens.ids))
    ids = tokens.ids[:limit]
    window = min(export_entry["config"]["window"], len(ids))
    stride = min(export_entry["config"]["stride"], window)
    threads = target_threads(profile, c.emulate, c.threads)
    source = run.export_source(export_entry)
    tokenizer = load_tokenizer(source)

    if c.host:
        from . import versions
        from .versions import served_dest, served_version

        # the version folder deploy put this run's GGUF in (its name: the run's and the GGUF's digest)
        workdir = versions.version_dir(served_dest(c), served_version(what_to_serve(c.run, [], c.quant)))
        model_file = gguf.name
    else:
        board_build = build(profile.name, runtime=False)
        workdir = tempfile.mkdtemp(prefix="edgeft-smoke-")
        for local, name in bundle(run, gguf, board_build.bin, tokenizer):
            Path(workdir, name).symlink_to(local.resolve())
        model_file = gguf.name
    target = runner(c, profile, workdir)
    slow = 50 if c.emulate else 1
    inputs = {"gguf": gguf.name, "quant": export_entry["inputs"]["quant"], "device": profile.name,
              "mode": "emulated" if c.emulate else ("board" if c.host else "local"), "host": c.host or None,
              "tokens": len(ids), "eval_tokens": TOKENS_FILE}
    def board_json(*args: str, timeout: float, keys: tuple[str, ...]) -> dict:
        """edgeft-board's one JSON object; anything else means another (older) build on the board."""
        out = parse_json(target(["./edgeft-board", *args], timeout), f"edgeft-board {args[0]} on the target",
                         "run `edgeft deploy` again so the board has this edgeft's build")
        if not isinstance(out, dict) or any(k not in out for k in keys):
            raise EdgeftError(f"edgeft-board {args[0]} on the target printed no {', '.join(keys)}: it is another "
                              f"version's build; run `edgeft deploy` again")
        return out

    with run.record(SMOKE, to_dict(c), inputs) as entry:
        with activity(f"smoke on {inputs['mode']} {profile.name}: generate"):
            gen = board_json("generate", model_file, "prompt_ids.txt", "32", str(threads), timeout=60 * slow,
                             keys=("ids",))
        answer = tokenizer.decode(gen["ids"], skip_special_tokens=True)
        # Gated: an answer at all, and valid UTF-8 text. Recorded: whether it stopped at end-of-generation
        # and whether it is the host's greedy answer for the same GGUF (a small quant of a small model can
        # ramble on the host too; the board reproducing the host is what the smoke test is about).
        gen_ok = answer_ok(answer)
        with activity(f"smoke on {inputs['mode']} {profile.name}: bench"):
            pp, tg = (32, 8) if c.emulate else (128, 32)
            bench = board_json("bench", model_file, str(pp), str(tg), str(threads), timeout=60 * slow,
                               keys=("tg_tokens_per_s", "model_bytes"))
        with activity(f"smoke on {inputs['mode']} {profile.name}: perplexity on {len(ids)} ids"):
            board = board_json("perplexity", model_file, "eval_ids.txt", str(window), str(stride), str(threads),
                               str(len(ids)), timeout=120 * slow + len(ids) * slow / 10,
                               keys=("ppl", "tokens", "windows", "seconds", "token_nll", "top1"))
        task = read_task_set(run.path, tokenizer)
        host_model = LlamaCpp(gguf, n_ctx=max(window, 128, task.longest if task else 0))
        host = score(ids, host_model.logits, window=window, stride=stride, backend="llama.cpp (host)", per_token=True,
                     bos=model_bos(tokenizer))
        host_ids, _ = host_model.generate(prompt_ids(tokenizer), 32)
        if task:
            _task_on_target(entry, task, c, board_json, model_file, threads, host_model, tokenizer, slow,
                            f"{gguf.name} on {profile.name}" + (" (emulated)" if c.emulate else ""), run)
        host_model.close()
        same = next((i for i, (a, b) in enumerate(zip(gen["ids"], host_ids)) if a != b), min(len(gen["ids"]), len(host_ids)))
        on_board = board_perplexity(board, host, f"llama.cpp on {inputs['mode']} {profile.name}")
        vs_host = Comparison(measured=on_board, reference=host)
        per_token = token_difference(on_board, host, BOARD_Z)
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
            "threads": threads, "qemu_cpu": profile.qemu_cpu if c.emulate else None,
            "board_vs_host": per_token.to_json()})
        low, high = per_token.bounds
        failure = (f"board perplexity {on_board.ppl:.4f} is {100 * per_token.change:+.2f}% from the host's "
                   f"{host.ppl:.4f} on the same {host.tokens} tokens ({100 * low:+.2f}% to {100 * high:+.2f}% at "
                   f"{BOARD_Z:g} standard errors of the per-token differences), beyond the {100 * BOARD_MATCH:.0f}% "
                   f"that rounding explains: the board's build computes something else")
        if not gen_ok and per_token.excess <= BOARD_MATCH:
            failure = f"the board's answer failed its checks (empty or replacement characters): {answer[:80]!r}"
        check(entry, Gate(f"board vs host perplexity change beyond {BOARD_Z:g} standard errors", per_token.excess,
                          BOARD_MATCH, failure, also=gen_ok))
    return SmokeResult(run=run.path, entry=entry)
