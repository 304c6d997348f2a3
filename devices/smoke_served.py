"""`edgeft smoke --adapters RUN,RUN --host H`: every adapter served on the board, checked.

For each adapter run, in its own ledger:
  - perplexity on the run's ids with that adapter applied to the served base (edgeft-board --lora, on the
    board, the same GGUFs the server holds) vs the host's fused GGUF of that run in the same quant: the
    per-token gate of every smoke (2%, beyond rounding noise);
  - the task's held-out prompts answered by the running server through /v1/chat/completions, the adapter
    chosen in the request: exact-match rate vs the host's (the fused GGUF through llama.cpp's Python binding,
    the same prompts), and how many answers are identical to the host's; the drop in exact-match rate is
    gated like a quant's (gates.EXACT_DROP_GATES);
  - decode tokens/s as the server reports it.
Shared by all of them:
  - switching: the latency of a one-token request right after a request with another adapter vs right
    after one with the same adapter (the same prompt, nothing cached);
  - memory: the server's RSS with N adapters vs N separate one-model servers (a server with the base alone
    is started on the next port, measured, and stopped: a merged model is the base's size).
"""

from __future__ import annotations

import shlex
import statistics
import time

from ..config import to_dict
from ..errors import EdgeftError, GateFailed
from ..gates import BOARD_MATCH, BOARD_Z, EXACT_DROP_GATE_OTHER, EXACT_DROP_GATES, Gate, check, parse_gates
from ..heldout import EvalTokens
from ..inputs import parse_json
from ..prompt import prompt_ids
from ..run import SMOKE, TOKENS_FILE, what_to_serve
from ..scoring import Comparison, model_bos, score, token_difference
from ..task import answer_budget, judge, read_task_set
from . import serve
from . import versions
from .versions import served_dest, served_version
from .target import board_perplexity, qemu_prefix, runner, target_threads

SWITCH_ROUNDS = 3  # per adapter: a request after another adapter's, then one after its own


def _board_manifest(remote, dest: str, served) -> dict:
    out = parse_json(remote.run(f"cat -- {shlex.quote(f'{dest}/{versions.MANIFEST}')}"),
                     f"{dest}/{versions.MANIFEST} on the board",
                     "run `edgeft deploy --adapters ... --serve` again")
    want = [lora.name for lora in served.loras]
    have = [a.get("lora") for a in (out.get("adapters") or [])] if isinstance(out, dict) else []
    if have != want or out.get("gguf") != served.model.name:
        raise EdgeftError(f"{remote.host}:{dest} serves {', '.join(map(str, have)) or 'no adapters'}, not "
                          f"{', '.join(want)}: run `edgeft deploy --adapters ... --serve` with these runs")
    return out


def _switching(client: serve.Client, n: int, ids: list[int]) -> dict:
    """Median latency of a one-token request after another adapter's request vs after its own."""
    after_other, after_same = [], []
    last = None
    for _ in range(SWITCH_ROUNDS):
        for i in range(n):
            for _ in range(2):  # the first of the pair follows another adapter (or nothing), the second its own
                t0 = time.perf_counter()
                client.complete(ids, 1, client.lora(n, i))
                ms = 1000 * (time.perf_counter() - t0)
                if last is not None:
                    (after_same if last == i else after_other).append(ms)
                last = i
    other, same = statistics.median(after_other), statistics.median(after_same)
    return {"requests": len(after_other) + len(after_same) + 1, "prompt_tokens": len(ids),
            "after_other_adapter_ms": round(other, 1), "after_same_adapter_ms": round(same, 1),
            "switch_cost_ms": round(other - same, 1)}


def _memory(c, remote, profile, served, dest: str, context: int, threads: int, n: int) -> dict:
    with_adapters = serve.rss_bytes(remote, c.serve_port)
    port = c.serve_port + 1
    spec = serve.ServeSpec(model=served.model.name, loras=[], context=context, threads=threads, port=port,
                           listen=False, alias="one-model", qemu=qemu_prefix(profile, c.emulate))
    serve.start(remote, dest, spec, "edgeft smoke: one model, to measure its memory", script="measure-one.sh",
                systemd=False)
    try:
        with remote.tunnel(port) as local:
            serve.Client(local).wait(serve.load_seconds(served.model.stat().st_size, c.emulate),
                                     lambda: serve.pid(remote, port) is not None)
        one = serve.rss_bytes(remote, port)
    finally:
        serve.stop(remote, port)
    if not (with_adapters and one):
        return {"note": "the board has no /proc/PID/status VmRSS to read"}
    return {"server_with_adapters_rss_bytes": with_adapters, "adapters": n, "one_model_server_rss_bytes": one,
            "separate_servers_rss_bytes": n * one, "ratio": round(with_adapters / (n * one), 4),
            "note": "separate servers: N x the RSS of a server holding the base alone (a merged model is the "
                    "base's size)" + ("; emulated: RSS of the qemu-user process" if c.emulate else "")}


def smoke_adapters(c) -> list[dict]:
    """The served adapters' checks; one smoke entry per adapter run. Raises GateFailed naming every adapter
    that failed, after all were measured."""
    from . import get
    from ..models import load_tokenizer

    if not c.host:
        raise EdgeftError("--adapters: smoke checks the served adapters on a board: pass --host (the board that "
                          "`edgeft deploy --adapters ... --serve` served them on)")
    served = what_to_serve(c.run, c.adapters, c.quant)
    profile = get(c.device or "rpi5")
    remote = c.remote()
    folder = versions.version_dir(served_dest(c, served), served_version(served))
    _board_manifest(remote, folder, served)
    tokenizer = load_tokenizer(served.source)
    threads = target_threads(profile, c.emulate, c.threads)
    n = len(served.runs)
    with remote.tunnel(c.serve_port) as port:
        client = serve.Client(port, timeout=60 * (50 if c.emulate else 1))
        if not client.ready():
            raise EdgeftError(f"no server answers on {c.host}:{c.serve_port}; start it with `edgeft deploy --adapters "
                              f"... --serve --host {c.host}`")
        loaded = client.adapters()
        if [a.get("path", "").rsplit("/", 1)[-1] for a in loaded] != [lora.name for lora in served.loras]:
            raise EdgeftError(f"the server on {c.host}:{c.serve_port} holds other adapters "
                              f"({', '.join(str(a.get('path')) for a in loaded)}); deploy these runs with --serve")
        props = client.request("/props")
        context = int((props.get("default_generation_settings") or {}).get("n_ctx") or 0) or 2048
        switching = _switching(client, n, prompt_ids(tokenizer))
        memory = _memory(c, remote, profile, served, folder, context, threads, n)
        return check_each(c, remote, served, folder, client, profile, tokenizer,
                          {"switching": switching, "memory": memory})


def check_each(c, remote, served, folder: str, client, profile, tokenizer, metrics: dict | None = None,
               more_gates=None, inputs: dict | None = None) -> list[dict]:
    """Each served run checked through the running server (`client`, tunnelled) and on the board in `folder`
    (the version folder): one smoke entry per run, in its ledger, with `metrics` added and the gates that
    `more_gates(entry)` returns (the rollout's regression gate). One model (no adapters) is checked the
    same way, with no adapter chosen. Raises GateFailed naming every run that failed, after all were measured."""
    threads = target_threads(profile, c.emulate, getattr(c, "threads", 0))
    slow = 50 if c.emulate else 1
    loras = served.loras or [None]
    failures, entries = [], []
    for i, (run, lora) in enumerate(zip(served.runs, loras)):
        where = f"{folder}/{run.path.resolve().name}" if lora else folder
        entry_inputs = {"gguf": served.model.name, "lora": lora.name if lora else None,
                        "adapter_id": i if lora else None, "quant": served.quant, "device": profile.name,
                        "mode": "served" + (" (emulated)" if c.emulate else ""), "host": c.host, "port": c.serve_port,
                        "eval_tokens": TOKENS_FILE, **(inputs or {})}
        try:
            with run.record(SMOKE, to_dict(c), entry_inputs) as entry:
                entry["metrics"].update(metrics or {})
                gates = _one_adapter(c, entry, run, served, i if lora else None, client,
                                     runner(c, profile, where), threads, slow, tokenizer, profile)
                check(entry, *gates, *(more_gates(entry) if more_gates else []))
        except GateFailed as e:
            failures.append(f"{run.path.name}: {e}")
        entries.append(entry)
    if failures:
        error = GateFailed("; ".join(failures))
        error.entries = entries
        raise error
    return entries


def _one_adapter(c, entry, run, served, i, client, target, threads, slow, tokenizer, profile) -> list[Gate]:
    """Adapter i of the served base (None: the one served model) on the board and through the server."""
    from ..llamacpp import LlamaCpp

    fused, export_entry = run.chosen_gguf(served.quant)
    tokens = EvalTokens.read(run.ids)
    ids = tokens.ids[:c.max_tokens or (129 if c.emulate else len(tokens.ids))]
    window = min(export_entry["config"]["window"], len(ids))
    stride = min(export_entry["config"]["stride"], window)
    if i is None:  # the version folder holds the model, the binaries and the ids side by side
        argv = ["./edgeft-board", "perplexity", served.model.name]
        what = served.model.name
    else:  # each adapter run's ids are in a folder of its own beside the base
        lora = served.loras[i].name
        argv = ["../edgeft-board", "--lora", f"../{lora}", "perplexity", f"../{served.model.name}"]
        what = f"{served.model.name} + {lora}"
    out = parse_json(target([*argv, "eval_ids.txt", str(window), str(stride), str(threads), str(len(ids))],
                            120 * slow + len(ids) * slow / 10),
                     "edgeft-board perplexity on the target", "run `edgeft deploy` again")
    task = read_task_set(run.path, tokenizer)
    if task:  # the task's perplexity on the board: the answers' tokens, prompt as context (what training lowered)
        n = min(c.task_items or (3 if c.emulate else len(task.items)), len(task.items))
        scored = parse_json(target([*argv[:-2], "score", argv[-1], versions.TASK_PIECES, str(threads), str(n)],
                                   (60 + sum(len(t.ids) for t in task.items[:n]) / 10) * slow),
                            "edgeft-board score on the target", "run `edgeft deploy` again")
        entry["metrics"]["served_task"] = {"ppl": scored.get("ppl"), "tokens": scored.get("tokens"), "items": n,
                                           "of": len(task.items)}
    host_model = LlamaCpp(fused, n_ctx=max(window, 128, task.longest if task else 0))
    try:
        host = score(ids, host_model.logits, window=window, stride=stride, backend="llama.cpp (host, fused)",
                     per_token=True, bos=model_bos(tokenizer))
        on_board = board_perplexity(out, host, f"llama.cpp on {profile.name}" + (", base + LoRA" if i is not None
                                                                                  else ""))
        Comparison(measured=on_board, reference=host).record(
            entry, f"{what} on {profile.name}" + (" (emulated)" if c.emulate else ""),
            f"{fused.name} on host", "host", tokens.source)
        per_token = token_difference(on_board, host, BOARD_Z)
        entry["metrics"]["board_vs_host"] = per_token.to_json()
        name = f"adapter {i} ({what})" if i is not None else what
        gates = [Gate(f"served {'adapter' if i is not None else 'model'} vs host perplexity change beyond "
                      f"{BOARD_Z:g} standard errors", per_token.excess, BOARD_MATCH,
                      f"{name} on the board: perplexity {on_board.ppl:.4f} is "
                      f"{100 * per_token.change:+.2f}% from the host's {host.ppl:.4f}, beyond the "
                      f"{100 * BOARD_MATCH:.0f}% rounding explains")]
        if task:
            gates.append(_answers(c, entry, task, client, i, len(served.loras), host_model, tokenizer, name,
                                  served.quant))
        speed = (entry["metrics"].get("served_answers") or {}).get("decode_tokens_per_s")
        bound = (profile.memory_bandwidth_gbs * 1e9 / served.model.stat().st_size) if profile.memory_bandwidth_gbs \
            else None
        entry["metrics"]["decode"] = {
            "tokens_per_s": speed, "bound_tokens_per_s": round(bound, 1) if bound else None,
            "fraction_of_bound": round(speed / bound, 4) if speed and bound else None,
            "note": "emulated: qemu speed, not the board's" if c.emulate else
                    f"bound = {profile.memory_bandwidth_gbs} GB/s / model bytes" if bound else "no bandwidth figure"}
    finally:
        host_model.close()
    return gates


def exact_limit(c, quant: str) -> float:
    """The largest exact-answer drop: the quant's gate (as export's), unless the config sets one (a rollout's
    --max-exact-drop, in the one syntax of every gate flag)."""
    return parse_gates(getattr(c, "max_exact_drop", ""), EXACT_DROP_GATES, [quant], EXACT_DROP_GATE_OTHER,
                       "--max-exact-drop")[quant]


def _answers(c, entry, task, client, i, n, host_model, tokenizer, lora, quant) -> Gate:
    """The task's prompts through /v1/chat/completions with adapter i, and the host's fused GGUF's answers."""
    items = [t for t in task.items if t.prompt][:c.task_items or (3 if c.emulate else None)]
    rows, board_exact, host_exact, same, speeds = [], 0, 0, 0, []
    for item in items:
        budget = answer_budget(tokenizer, item.expected)
        if item.messages is not None:
            resp = client.chat(item.messages, budget, client.lora(n, i), item.tools)
            got = resp["choices"][0]["message"].get("content") or ""
            how = "/v1/chat/completions"
        else:  # a task file from before messages were stored: the same prompt as ids
            resp = client.complete(item.prompt, budget, client.lora(n, i))
            got = resp.get("content", "")
            how = "/completion (token ids)"
        speed = (resp.get("timings") or {}).get("predicted_per_second")
        if speed:
            speeds.append(speed)
        host_text = tokenizer.decode(host_model.generate(item.prompt, budget)[0], skip_special_tokens=True)
        b, h = judge(got, item.expected, task.kind)[0], judge(host_text, item.expected, task.kind)[0]
        board_exact += b
        host_exact += h
        same += got.strip() == host_text.strip()
        rows.append({"expected": item.expected, "board": got, "host": host_text, "board_exact": b, "host_exact": h})
    k = max(len(items), 1)
    drop = (host_exact - board_exact) / k
    limit = exact_limit(c, quant)
    entry["metrics"]["served_answers"] = {
        "endpoint": how if items else None, "adapter_id": i, "items": len(items), "of": len(task.items),
        "exact_match": board_exact / k, "host_exact_match": host_exact / k, "identical_to_host": same,
        "decode_tokens_per_s": round(statistics.median(speeds), 2) if speeds else None, "samples": rows[:5]}
    return Gate("served exact-match drop vs host", drop, limit,
                f"{lora}: the server answered {board_exact}/{len(items)} exactly where the host's fused "
                f"GGUF answered {host_exact}/{len(items)} (limit: a drop of {100 * limit:.0f}%)")
