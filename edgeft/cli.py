"""The `edgeft` command. It only parses flags and prints; every step is a library function.

Starts without torch or transformers: the config classes it builds its flags from live in modules that
import those only when a step runs, so `edgeft --help`, `devices`, `show` and `report` print at once.
"""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .atomic import json_text
from .chat import ChatConfig
from .compare import CompareConfig
from .config import config_options, load_config, step_options
from .devices.deploy import DeployConfig
from .devices.smoke import SmokeConfig
from .devices.status import StatusConfig
from .errors import EdgeftError, cannot_write
from .evaluate import EvalConfig
from .export import ExportConfig, GGUFExportConfig, OnnxExportConfig, load_export_config
from .merge import MergeConfig
from .run import FLEET_PREFIX, Run
from .steps import STEPS
from .tables import fleet_rows, ledger_rows, methods_columns, served_rows
from .train import TrainConfig

# results on stdout; progress and errors go to stderr. No markup: the ledger's text (model names, reasons) is
# data and may hold "[...]"; colour is given as a style.
out = Console(markup=False)
if not out.is_terminal:
    out.width = 160  # piped or captured: don't squeeze the ledger table into 80 columns


class _Group(click.Group):
    """Turns EdgeftError into one line on stderr and its exit code (2 bad input, 3 failed gate)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeftError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except OSError as e:  # a place that cannot be written, wherever it was met: one line too
            bad = cannot_write(e)
            if bad is None:
                raise
            click.echo(f"error: {bad}", err=True)
            ctx.exit(bad.exit_code)


@click.group(cls=_Group, context_settings={"show_default": False})
@click.version_option(package_name="edgeft")
@click.option("--verbose", is_flag=True, help="show every library warning (some harmless ones are hidden)")
def cli(verbose):
    """Fine-tune a small LLM and ship it to an edge board, with the perplexity of every step in one ledger.

    The chain: train -> merge -> export -> deploy -> smoke. Each step writes its entry into RUN/manifest.json;
    `edgeft show RUN` prints the ledger.
    """
    if not verbose:
        from .noise import silence

        silence()


# --------------------------------------------------------------------------------------------------- eval
@cli.command("eval")
@step_options(EvalConfig, what="the result")
def eval_cmd(config_file, as_json, **flags):
    """Perplexity of a model on held-out text (default: the CPython docs, ~8k tokens).

    The text is tokenized once with the model's tokenizer and the ids are stored in the run folder, so every
    later step and backend scores exactly the same tokens.
    """
    from .evaluate import evaluate

    config = load_config(EvalConfig, config_file, flags)
    result = evaluate(config)
    p = result.perplexity
    task = result.entry.get("task")
    if as_json:
        click.echo(json_text({"run": str(result.run), "model": str(result.model), **p.to_json(), "task": task},
                             indent=None))
        return
    out.print(f"perplexity {p.ppl:.4f}  ({p.tokens} tokens, {p.windows} windows of {p.window}, "
              f"{p.seconds:.1f} s)  model {config.model}  run {result.run}")
    if task:
        em = "" if task["exact_match"] is None else f", exact answers {100 * task['exact_match']:.0f}% " \
                                                     f"(n={task['answered']})"
        fields = "" if task["field_accuracy"] is None else f", fields {100 * task['field_accuracy']:.0f}%"
        out.print(f"task {task['source']}: perplexity {task['ppl']:.4f} on {task['tokens']} answer tokens of "
                  f"{task['items']} examples{em}{fields}")


# -------------------------------------------------------------------------------------------------- train
@cli.command("train")
@step_options(TrainConfig)
def train_cmd(config_file, as_json, **flags):
    """Fine-tune a LoRA adapter (QLoRA on CUDA) on a JSONL, JSON, CSV or Parquet dataset.

    Rows: {"messages": [...]} (tool calls too), ShareGPT {"conversations"}, Alpaca {"instruction", "output"},
    {"prompt", "completion"} or {"text"}; --columns maps other names; loss on answers only. Writes RUN/adapter
    (PEFT format + base fingerprint) and a ledger entry with held-out perplexity before and after; exits 3 if
    it rose more than --max-ppl-rise (the adapter is kept). Ctrl-C saves a checkpoint; --resume continues.
    Data-parallel under `accelerate launch --num_processes N -m edgeft train ...`.
    """
    from .train import train

    config = load_config(TrainConfig, config_file, flags)
    result = train(config)
    entry = result.entry
    if entry is None:  # another process of a data-parallel run: the main process reports
        return
    if as_json:
        click.echo(json_text(entry, indent=None))
        return
    m = entry["metrics"]
    out.print(ledger_table({"steps": [entry]}, f"train → {result.adapter}"))
    em = ""
    if m.get("exact_match_after") is not None:
        em = f"; exact answers on held-out prompts {m['exact_match_before']:.0%} → {m['exact_match_after']:.0%}" \
             f" (n={m['exact_match_n']})"
    loss_before = m["eval_loss_before"]
    out.print(f"{m['steps']} steps, {m['tokens_per_s']:,.0f} tok/s, {m['trainable_params']:,} trainable params "
              f"({m['trainable_pct']}%); task eval loss "
              + (f"{loss_before:.4f} → {m['eval_loss_after']:.4f}" if loss_before is not None else "n/a") + em)


# -------------------------------------------------------------------------------------------------- merge
@cli.command("merge")
@step_options(MergeConfig, what="the ledger entries")
def merge_cmd(config_file, as_json, **flags):
    """Merge a LoRA adapter into its unquantized base (float16 by default; never 4-bit).

    Refuses an adapter whose recorded base fingerprint, module names or shapes do not match the base.
    --into original|dequantized|auto: an adapter trained on a 4-bit base may only work on top of the
    NF4-rounded weights it was trained against; auto merges both ways, scores each on the task's held-out
    split and the held-out text, keeps the better by task metric and records both. Writes RUN/merged, a
    plain HF folder; exits 3 if the merged perplexity drifts from base+adapter by more than --max-drift.
    """
    from .merge import merge

    config = load_config(MergeConfig, config_file, flags)
    result = merge(config)
    if as_json:
        click.echo(json_text(result.entries, indent=None))
        return
    out.print(ledger_table({"steps": result.entries}, f"merge → {result.merged} (into {result.into})"))


# ------------------------------------------------------------------------------------------------- export
_SHARED_EXPORT = tuple(f for f in ExportConfig.__dataclass_fields__)


@cli.command("export")
@step_options(GGUFExportConfig, what="the ledger entries")
@config_options(OnnxExportConfig, skip=_SHARED_EXPORT)
def export_cmd(config_file, as_json, **flags):
    """Export a merged model (or base + adapter, fused while converting) to GGUF or ONNX, and quantize it.

    GGUF: our own streaming converter writes the unquantized GGUF (--converter llamacpp: llama.cpp's own
    convert_hf_to_gguf.py; auto, the default, uses it for an architecture ours lacks); llama.cpp quantizes it.
    Every artifact is validated into the ledger: tokenizer parity with HF, perplexity on the run's token ids (the
    unquantized artifact within 0.1% of HF), KL divergence and top-1 agreement vs it, a greedy sample answer, and a
    perplexity-rise gate per quant (exit 3 when one fails). An Ollama Modelfile sits next to each GGUF.
    ONNX: a KV-cache graph, MatMulNBits int8/int4, the same checks on onnxruntime.
    """
    from .export import export

    config = load_export_config(config_file, flags)
    result = export(config)
    if as_json:
        click.echo(json_text(result.entries, indent=None))
        return
    out.print(ledger_table({"steps": result.entries}, f"export → {result.run / config.format}"))
    for e in result.entries:
        m = e["metrics"]
        extra = ""
        if "kl_mean" in m:
            extra = f"KL {m['kl_mean']:.4f}, top-1 {100 * m['top1_agreement']:.1f}%; "
        if "sample" in m:
            out.print(f"{e['inputs']['quant']}: {extra}sample: {m['sample']['answer'][:100]!r}")


# --------------------------------------------------------------------------------------------------- chat
@cli.command("chat")
@click.argument("target", metavar="RUN|MODEL|GGUF")
@step_options(ChatConfig, skip=("model",), what="each turn (with its token ids)")
def chat_cmd(target, config_file, as_json, **flags):
    """Talk to a model: a run (its merged model; --quant q4_k_m for one of its GGUFs), a model folder/name, or a GGUF.

    Without --prompt, reads one message per line from stdin until EOF or /exit; each answer sees the conversation
    so far. Turns are rendered with the model's HF chat template and sent as token ids (llama.cpp for a GGUF,
    transformers for a folder; greedy), the way every check in the ledger asks its sample prompt.
    """
    from .chat import EXIT, chat

    config = load_config(ChatConfig, config_file, {**flags, "model": target})
    stdin = sys.stdin
    interactive = not config.prompt and stdin.isatty()

    def lines():
        while True:
            if interactive:
                click.echo("> ", nl=False, err=True)
            line = stdin.readline()
            if not line:
                return
            yield line

    def show(turn):
        click.echo(json_text(turn.to_json(), indent=None) if as_json else turn.answer)

    if interactive:
        click.echo(f"chatting with {target}; {EXIT} or Ctrl-D ends", err=True)
    chat(config, lines(), show)


# ------------------------------------------------------------------------------------------------ devices
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print the profiles as JSON")
def devices(as_json):
    """List the board profiles (shipped, plus yours in $EDGEFT_HOME/devices/*.yaml)."""
    from .devices import profiles

    found = profiles()
    if as_json:
        click.echo(json_text({n: {**p.__dict__, "source": str(p.source)} for n, p in found.items()}, indent=None))
        return
    table = Table(title="board profiles")
    for col in ("name", "arch", "cpu", "threads", "RAM GB", "bandwidth GB/s", "description"):
        table.add_column(col)
    for p in found.values():
        table.add_row(p.name, p.arch, p.cpu, str(p.threads or "all"),
                      "/".join(f"{r:g}" for r in p.ram_gb) if min(p.ram_gb) else "host",
                      f"{p.memory_bandwidth_gbs:g}" if p.memory_bandwidth_gbs else "?", p.description)
    out.print(table)


# --------------------------------------------------------------------------------------------------- show
def _fmt_bytes(n):
    if not n:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):  # binary units, as the report and the ledger's RSS figures use
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def ledger_table(manifest: dict, title: str) -> Table:
    rows = ledger_rows(manifest)
    with_task = any(r["task_ppl"] is not None or r["exact_match"] is not None for r in rows)
    table = Table(title=title)
    columns = [("step", "left"), ("model", "left"), ("status", "left"), ("perplexity", "right"), ("Δ", "right"),
               ("tokens", "right")]
    if with_task:
        columns += [("task ppl", "right"), ("task Δ", "right"), ("exact", "right")]
    columns += [("size", "right"), ("wall", "right"), ("peak RSS", "right"), ("note", "left")]
    for col, justify in columns:
        table.add_column(col, justify=justify)
    for r in rows:
        status = Text(r["status"], style={"ok": "green", "ref": "dim"}.get(r["status"], "red"))
        step = r["step"] + (" (quick)" if r["checks"] == "quick" else "")  # not comparable with full checks
        if not r["comparable"]:  # scored under the other BOS convention than the run's newest rows
            step += " (BOS)" if r["bos"] else " (no BOS)"

        cells = [step, r["model"], status, "" if r["ppl"] is None else f"{r['ppl']:.4f}",
                 "" if r["delta_pct"] is None else f"{r['delta_pct']:+.2f}%",
                 "" if r["tokens"] is None else str(r["tokens"])]
        if with_task:
            cells += ["" if r["task_ppl"] is None else f"{r['task_ppl']:.4f}",
                      "" if r["task_delta_pct"] is None else f"{r['task_delta_pct']:+.2f}%",
                      "" if r["exact_match"] is None else f"{100 * r['exact_match']:.0f}%"]
        cells += [_fmt_bytes(r["bytes"]), "" if r["wall_s"] is None else f"{r['wall_s']:.1f} s",
                  "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f} MiB", r["reason"][:80]]
        table.add_row(*cells)
    return table


def _run_folder(positional: str | None, flag: str | None, required: bool = True) -> str | None:
    """The run folder of show, report, deploy and smoke: `--run RUN` as in every command, or RUN as their one
    argument (how they took it before the flags were made one vocabulary; both stay)."""
    if positional and flag and positional != flag:
        raise EdgeftError(f"two run folders: {positional} and --run {flag}; give one")
    if required and not (positional or flag):
        raise EdgeftError("which run? pass --run RUN, the run folder")
    return positional or flag


_RUN_ARGUMENT = click.argument("run_arg", metavar="[RUN]", required=False)
_RUN_OPTION = click.option("--run", "run_flag", help="run folder (or give it as the argument RUN)")


@cli.command()
@_RUN_ARGUMENT
@_RUN_OPTION
@click.option("--json", "as_json", is_flag=True, help="print the whole manifest as JSON")
def show(run_arg, run_flag, as_json):
    """Print a run's perplexity ledger: one row per step, Δ against the step's reference; a step run with
    --checks quick is marked "(quick)"."""
    run = _run_folder(run_arg, run_flag)
    r = Run(run)
    if not r.manifest_path.is_file():
        raise EdgeftError(f"{run}: no {r.manifest_path.name} here; pass a run folder written by an edgeft step")
    manifest = r.manifest()
    if as_json:
        click.echo(json_text(manifest))
    else:
        out.print(ledger_table(manifest, f"ledger of {run}"))


# ------------------------------------------------------------------------------ build, deploy, smoke
@cli.command("build")
@click.option("--device", required=True, help="board profile (see `edgeft devices`)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def build_cmd(device, as_json):
    """Compile llama.cpp (the version the Python binding uses) for a board profile: edgeft-board (what smoke
    runs), llama-server (what deploy --serve starts) and llama-cli.

    aarch64 boards are cross-compiled statically with Debian's gcc-aarch64-linux-gnu; builds are cached in
    $EDGEFT_HOME/builds, so a second call is instant.
    """
    from .devices.build import build

    b = build(device)
    info = {"device": device, "bin": str(b.bin), "seconds": round(b.seconds, 1), "cached": b.cached,
            "cold_build_seconds_by_part": b.seconds_by_part}
    if as_json:
        click.echo(json_text(info, indent=None))
        return
    parts = b.seconds_by_part
    split = (f"; cold build: edgeft-board {parts['board']:.0f} s, llama-server + llama-cli {parts['runtime']:.0f} s more"
             if {"board", "runtime"} <= set(parts) else "")
    out.print(f"{device}: {b.bin} ({'cached' if b.cached else f'built in {b.seconds:.0f} s'}{split})")


@cli.command("deploy")
@_RUN_ARGUMENT
@step_options(DeployConfig)
def deploy_cmd(run_arg, config_file, as_json, **flags):
    """Copy a run's GGUF, the board's build (edgeft-board, llama-server, llama-cli) and the eval ids to a board
    over your own SSH; --serve starts llama-server there, --stop stops it.

    Preflight (arch, disk, RAM for the model + KV cache) refuses what will not fit; every file is verified
    by sha256 on the board; files already there are skipped and interrupted copies resume. --adapters RUN,RUN
    ships one base and a LoRA GGUF per run, served together and chosen per request. --hosts FLEET.yaml does
    it on every board of a fleet in parallel.
    """
    from .devices.deploy import deploy

    config = load_config(DeployConfig, config_file, {**flags, "run": _run_folder(run_arg, flags["run"], False)})
    if not config.stop and not config.adapters and not config.rollback:
        _run_folder(config.run, None)
    if config.hosts or config.rollback:
        return _fleet(config, deploy, as_json)
    result = deploy(config)
    if as_json:
        click.echo(json_text(result.entry, indent=None))
        return
    m = result.entry["metrics"]
    if config.stop:
        out.print(f"{config.host}: " + (f"stopped the server on port {m['port']} ({m['manager']})" if m["stopped"]
                                        else f"no edgeft server was running on port {m['port']}"))
        return
    out.print(f"{config.host}:{result.dest}: {len(result.files)} files verified ({m['files_skipped']} already there, "
              f"{m['files_resumed']} resumed, {m['bytes_sent'] / 2**20:.1f} MiB sent in {m['seconds']:.1f} s)")
    if "serve" in m:
        s = m["serve"]
        where = "every interface" if s["listen"] else "the board's 127.0.0.1"
        out.print(f"serving on {where}, port {s['port']} ({s['manager']}; context {s['context']}, {s['threads']} "
                  f"threads; ready in {s['ready_seconds']:.0f} s" + (f"; RSS {s['rss_bytes'] / 2**20:.0f} MiB"
                                                                     if s.get("rss_bytes") else "") + ")")
        for a in s["adapters"]:
            out.print(f"  adapter {a['id']}: {a['run']} ({a['lora']}); ask with \"lora\": [{{\"id\": {a['id']}, "
                      f"\"scale\": 1}}]")
        if not s["listen"]:
            out.print(f"  from here: ssh -N -L {s['port']}:127.0.0.1:{s['port']} {config.host}, then "
                      f"http://127.0.0.1:{s['port']}/v1/chat/completions")


def _fleet(config, step_function, as_json: bool) -> None:
    """deploy or smoke with --hosts (the step runs the fleet): its table, also when a board failed."""
    try:
        entry = step_function(config).entry
    except EdgeftError as e:
        if not hasattr(e, "fleet_entry"):
            raise
        _print_fleet(e.fleet_entry, as_json)
        raise
    _print_fleet(entry, as_json)


def _print_fleet(entry: dict, as_json: bool) -> None:
    step = entry["step"].removeprefix(FLEET_PREFIX)
    if as_json:
        click.echo(json_text(entry, indent=None))
    else:
        table = Table(title=f"{step} on {entry['inputs']['boards']} boards ({entry['inputs']['model']})")
        rows = fleet_rows(entry)
        versioned = any("version" in r for r in rows)  # a rollout's or a rollback's rows
        for col in ("board", "version" if versioned else "model", "adapters", "tok/s", "ppl Δ",
                    *(["exact"] if versioned else []), "result"):
            table.add_column(col)
        for r in rows:
            result = "pass" if r["passed"] else f"FAIL: {(r['error'] or '')[:60]}"
            back = r.get("switched_back")
            if back:
                result += f"; back to {back['version']}" + ("" if back["passed"] else f" FAILED: {back['error'][:40]}")
            table.add_row(r["board"], str(r.get("version") or "") if versioned else r["model"], str(r["adapters"] or ""),
                          "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}",
                          "" if r["ppl_change"] is None else f"{100 * r['ppl_change']:+.2f}%",
                          *([("" if r.get("exact_match") is None else f"{100 * r['exact_match']:.0f}%")]
                            if versioned else []),
                          result + (" (earlier run)" if r["skipped"] else ""))
        out.print(table)
        notes = {(r.get("boot") or {}).get("note") for r in rows} - {None}
        for note in sorted(notes):
            out.print(f"after a reboot: {note}")


@cli.command("status")
@step_options(StatusConfig)
def status_cmd(config_file, as_json, **flags):
    """One row per board (--hosts FLEET.yaml, or --host): the version it serves (run, artifact, digest, quant,
    adapters), the server and its /health, the last check on the board and when, decode tok/s, free RAM and
    disk. Boards that cannot be reached are rows too. Changes nothing."""
    from .devices.status import status

    rows = status(load_config(StatusConfig, config_file, flags))
    if as_json:
        click.echo(json_text(rows, indent=None))
        return
    table = Table(title=f"{len(rows)} boards")
    for col in ("board", "version", "quant", "adapters", "server", "health", "last check", "tok/s", "free RAM",
                "free disk"):
        table.add_column(col)
    for r in rows:
        if r["error"]:
            table.add_row(r["board"], f"UNREACHABLE: {r['error'][:70]}", *[""] * 8)
            continue
        check = ("" if r["check_passed"] is None else ("pass " if r["check_passed"] else "FAIL ") + (r["checked"] or ""))
        table.add_row(r["board"], r["version"] or "(none)", r["quant"] or "", str(len(r["adapters"] or []) or ""),
                      r["server"] or "", r["health"] or "", check,
                      "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}",
                      _fmt_bytes(r["mem_available_bytes"]) if r["mem_available_bytes"] else "",
                      _fmt_bytes(r["disk_free_bytes"]) if r["disk_free_bytes"] else "")
    out.print(table)


@cli.command("smoke")
@_RUN_ARGUMENT
@step_options(SmokeConfig)
def smoke_cmd(run_arg, config_file, as_json, **flags):
    """Run the GGUF on the board (--host), here (--local) or under qemu (--emulate): answer, tokens/s, perplexity.

    The board's perplexity on the run's ids must be within 2% of the host's for the same GGUF (exit 3 if not).
    --adapters RUN,RUN checks every adapter the board serves (deploy --adapters --serve): perplexity with the
    adapter vs the host's fused GGUF, the task answered through /v1/chat/completions, switching latency, memory.
    """
    from .devices.smoke import smoke

    config = load_config(SmokeConfig, config_file, {**flags, "run": _run_folder(run_arg, flags["run"], False)})
    if not config.adapters:
        _run_folder(config.run, None)
    if config.hosts:
        return _fleet(config, smoke, as_json)
    result = smoke(config)
    if as_json:
        click.echo(json_text(result.entries or result.entry, indent=None))
        return
    if result.entries:
        _print_served(result.entries)
        return
    e = result.entry
    m = e["metrics"]
    out.print(ledger_table({"steps": [e]}, f"smoke on {e['inputs']['mode']} {e['inputs']['device']}"))
    frac = m["decode_fraction_of_bound"]
    out.print(f"answer: {m['generation']['answer']!r}; prompt {m['bench']['pp_tokens_per_s']:.1f} tok/s, decode "
              f"{m['bench']['tg_tokens_per_s']:.1f} tok/s" + (f" ({100 * frac:.0f}% of the bandwidth bound)" if frac else ""))


def _print_served(entries: list[dict]) -> None:
    table = Table(title=f"served adapters on {entries[0]['inputs']['host']}:{entries[0]['inputs']['port']}")
    for col in ("id", "adapter", "ppl board", "ppl host (fused)", "Δ", "exact board", "exact host", "same answers",
                "tok/s"):
        table.add_column(col)
    for s in served_rows(entries):
        a = s["answered"]
        table.add_row(str(s["id"]), s["adapter"], f"{s['ppl']:.4f}", f"{s['host_ppl']:.4f}",
                      f"{100 * (s['ppl'] / s['host_ppl'] - 1):+.2f}%",
                      f"{100 * s['exact_match']:.0f}%" if a else "", f"{100 * s['host_exact_match']:.0f}%" if a else "",
                      f"{s['identical_to_host']}/{s['items']}" if a else "",
                      f"{s['tokens_per_s']:.1f}" if s["tokens_per_s"] else "")
    out.print(table)
    sw, mem = entries[0]["metrics"]["switching"], entries[0]["metrics"]["memory"]
    out.print(f"switching adapters: {sw['after_other_adapter_ms']:.0f} ms after another adapter's request vs "
              f"{sw['after_same_adapter_ms']:.0f} ms after the same one's ({sw['switch_cost_ms']:+.0f} ms)")
    if "ratio" in mem:
        out.print(f"memory: {mem['server_with_adapters_rss_bytes'] / 2**20:.0f} MiB for one server with "
                  f"{mem['adapters']} adapters vs {mem['separate_servers_rss_bytes'] / 2**20:.0f} MiB for {mem['adapters']} "
                  f"one-model servers ({100 * mem['ratio']:.0f}%)")


# ------------------------------------------------------------------------------------------------ compare
@cli.command("compare")
@step_options(CompareConfig, what="the comparison")
def compare_cmd(config_file, as_json, **flags):
    """Train each PEFT method on the same data, steps and seed, merge, export GGUF F16 and --quant, and print one
    table: trainable params, adapter size, train time, peak RAM, held-out perplexity and exact answers for the
    merged model and each quant, forgetting vs the base. RUN/compare.png has the plot; `edgeft report RUN`
    shows the table.
    """
    from .compare import compare

    result = compare(load_config(CompareConfig, config_file, flags))
    if as_json:
        click.echo(json_text(result.entry, indent=None))
        return result.raise_failure()
    headers, rows = methods_columns(result.entry["metrics"]["rows"])
    table = Table(title=f"PEFT methods on {result.entry['inputs']['data'] or result.entry['inputs']['pipeline']} "
                        f"({result.run})")
    for h in headers:
        table.add_column(h)
    for r in rows:
        table.add_row(*r[:len(headers)])
    out.print(table)
    for r in result.entry["metrics"]["rows"]:
        if r["error"]:
            out.print(f"{r['method']}: {r['error']}")
    out.print(f"plot: {Run(result.run).compare_plot}")
    result.raise_failure()


# -------------------------------------------------------------------------------------------- run, report
@cli.command("run")
@click.argument("pipeline", metavar="PIPELINE.yaml|demo")
@click.option("--run", "run_dir", default="", help="run folder (default: the file's `run:`)")
@click.option("--from", "from_step", default="", help=f"resume: skip steps before this one ({'|'.join(STEPS)})")
def run_cmd(pipeline, run_dir, from_step):
    """Run the chain train → merge → export → smoke from a pipeline file ('demo': the shipped example).

    Each step writes its ledger entry; a failed gate stops the chain with exit 3. --from STEP reuses the
    earlier steps' artifacts after checking their sha256 against the ledger. Ends with the ledger and the
    report (report.html, report.png).
    """
    from .pipeline import load_pipeline, run_pipeline
    from .report import report

    run = run_pipeline(load_pipeline(pipeline), run_dir, from_step)
    page, png = report(run.path)
    out.print(ledger_table(run.manifest(), f"ledger of {run.path}"))
    out.print(f"report: {page} and {png}")


@cli.command("report")
@_RUN_ARGUMENT
@_RUN_OPTION
def report_cmd(run_arg, run_flag):
    """Write RUN/report.html (self-contained) and RUN/report.png from the run's ledger."""
    from .report import report

    run_dir = _run_folder(run_arg, run_flag)
    page, png = report(run_dir)
    out.print(ledger_table(Run(run_dir).manifest(), f"ledger of {run_dir}"))
    out.print(f"report: {page} and {png}")


def main():
    cli(prog_name="edgeft")


if __name__ == "__main__":
    sys.exit(main())
