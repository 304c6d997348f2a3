"""`edgeft export --format gguf`: our converter (or llama.cpp's: --converter), llama.cpp quantization, and a ledger
entry per artifact.

For every GGUF written, in the ledger:
  - tokenizer parity: llama.cpp's tokenization of the held-out text equals the HF token ids (else error:
    the tokenizer metadata is wrong and every later number would compare different tokens);
  - perplexity with llama.cpp on the run's token ids, same windows as `edgeft eval`; the unquantized GGUF
    must match the HF model within 0.1% (else the conversion is wrong);
  - for each quant: perplexity change vs the unquantized GGUF, mean KL divergence and top-1 agreement vs it,
    computed window by window (all models loaded at once, the reference logits computed once per window);
  - a gate on the perplexity rise per quant; a failing artifact is marked failed and the command exits 3;
  - a short greedy answer to the fixed chat prompt;
  - for each quant, the tensor types llama.cpp stored (read back), and a note when a k-quant fell back to others.
With --quant auto --budget SIZE also a per-tensor recipe ('mixed', export/mixed.py) chosen for the budget from
the run's data, compared in its entry with stock Q4_K_M (same imatrix and none) and the stock recipe nearest in
bytes, all measured on the same ids; the auto choice then takes, within the budget, the least of the loss the
recipe minimizes (held-out KL + the probes' task weight × task-answer KL; KL alone for a run with no task).
GGUFs are named after the base and the run (smollm2-135m-demo-Q4_K_M.gguf), general.name too.
Next to each GGUF an Ollama Modelfile, so `ollama create NAME -f FILE.Modelfile` works.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from contextlib import ExitStack
from pathlib import Path

from .. import methods
from ..atomic import atomic_file
from ..config import to_dict
from ..errors import EdgeftError, GateFailed
from ..gates import GGUF_GATE_OTHER, GGUF_GATES, HF_MATCH, LORA_MATCH, Gate, check, parse_gates, passed
from ..heldout import read_text
from ..ledger import artifact
from ..llamacpp import QUANT_TYPES, LlamaCpp, quantize, reference_tree, stock_size
from ..locks import writing_files
from ..models import EMBEDDED_MODELS, hub_id, load_model
from ..noise import quiet_llama_cpp_log
from ..progress import activity, bar, console
from ..prompt import answer_ok, prompt_ids, prompt_text
from ..run import EXPORT_GGUF, EXPORT_GGUF_CHOICE, EXPORT_GGUF_LORA, MERGE, TOKENS_FILE, Run
from ..scoring import Comparison, compare, score
from .config import ExportResult, GGUFExportConfig
from .checks import record_quant_task, record_reference_task, task_gate_limits
from .mixed import Budget, parse_budget
from .modelfile import write_modelfile
from .source import Source, hf_reference, load_inputs, resolve_source

UNQUANTIZED = ("f16", "bf16", "f32")
AUTO_CANDIDATES = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
MIXED = "mixed"  # --quant auto --budget: the per-tensor recipe (export/mixed.py); gated under this name


def _answer_fn(model: LlamaCpp):
    return lambda prompt, max_new: model.generate(prompt, max_new)[0]


def sample_answer(model: LlamaCpp, tokenizer, max_tokens: int) -> dict:
    ids, stopped = model.generate(prompt_ids(tokenizer), max_tokens)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return {"prompt": prompt_text(), "answer": text, "stopped_at_eos": stopped, "tokens": len(ids),
            "ok": answer_ok(text)}


def _quants(c: GGUFExportConfig, budget: Budget | None = None) -> tuple[list[str], str, bool]:
    """(quants to make, the unquantized reference type, --quant auto?), checked. With --budget, auto makes the
    mixed recipe and, to compare it with, stock Q4_K_M (and the stock recipe a budget names); the stock recipe
    nearest the budget in bytes is added once the unquantized GGUF exists to size them."""
    quants = [q.lower() for q in c.quant] or ["f16", "q8_0", "q4_k_m"]
    auto = "auto" in quants
    if budget is not None and not auto:
        raise EdgeftError("--budget chooses a per-tensor recipe: it goes with --quant auto")
    if auto and budget is not None:
        if budget.kind == "device" and not c.device:
            raise EdgeftError("--budget device needs --device PROFILE (the board whose RAM the GGUF must fit)")
        stock = list(dict.fromkeys(["q4_k_m", *([budget.value] if budget.kind == "stock" else [])]))
        quants = [q for q in quants if q != "auto"]
        quants += [q for q in stock if q not in quants] + [MIXED]
    elif auto:
        if not c.device:
            raise EdgeftError("--quant auto needs --device PROFILE (the board whose RAM the choice must fit)")
        quants = [q for q in quants if q != "auto"] + [q for q in AUTO_CANDIDATES if q not in quants]
    unq = [q for q in quants if q in UNQUANTIZED]
    if len(unq) > 1:
        raise EdgeftError(f"--quant {','.join(c.quant)}: give at most one of f16, bf16, f32 (the reference)")
    bad = [q for q in quants if q not in UNQUANTIZED and q not in QUANT_TYPES and not (q == MIXED and budget)]
    if bad:
        raise EdgeftError(f"--quant {bad[0]}: unknown; use f16, bf16, f32, {', '.join(QUANT_TYPES)}")
    return quants, (unq[0] if unq else "f16"), auto


def export_gguf(config: GGUFExportConfig) -> ExportResult:
    with ExitStack() as held:  # the locks of the files this export writes, held to its end
        return _export_gguf(config, held)


def _export_gguf(config: GGUFExportConfig, held: ExitStack) -> ExportResult:
    c = config
    budget = parse_budget(c.budget) if c.budget else None
    quants, reference_type, auto = _quants(c, budget)
    profile = None
    if c.device:
        from ..devices import get as get_profile

        profile = get_profile(c.device)
    made = [q for q in quants if q not in UNQUANTIZED]
    # with --budget the stock recipe nearest the budget joins later: any stock name may carry a gate
    gated = made + ([q for q in QUANT_TYPES if q not in made] if budget else [])
    gates = parse_gates(c.max_ppl_rise, GGUF_GATES, gated, GGUF_GATE_OTHER)
    task_limits = task_gate_limits(c, gated)
    source = resolve_source(c)
    run, label = source.run, source.label
    out_dir = Path(c.out) if c.out else run.export_dir("gguf")
    stem = artifact_stem(source)
    paths = {q: out_dir / f"{stem}-{q.upper()}.gguf" for q in [reference_type, *made]}
    if c.adapter_only:
        if source.adapter is None:
            raise EdgeftError("--adapter-only needs --adapter (the LoRA to write as a GGUF adapter)")
        if not methods.get(source.adapter.method).adapter_gguf:
            carried = [m for m in methods.names() if methods.get(m).adapter_gguf]
            raise EdgeftError(f"--adapter-only: llama.cpp's adapter GGUF holds LoRA only, and {c.adapter} is a "
                              f"{source.adapter.method} adapter; export it fused (drop --adapter-only) or train with "
                              f"--method {' or '.join(carried)} to serve it as an adapter")
        paths["lora"] = out_dir / f"{stem}-LoRA-F16.gguf"
        paths["base"] = out_dir / f"{source.path.name}-base-{reference_type.upper()}.gguf"
        paths.update({f"base-{q}": out_dir / f"{source.path.name}-base-{q.upper()}.gguf" for q in made})
    converter = pick_converter(c, source)  # before anything is loaded or written
    writing_files(held, run.path, paths.values(), "export")
    if budget and not c.imatrix and converter == "ours":
        from ..train import read_train_config

        if read_train_config(run.path) is not None:  # the run trained: its rows calibrate the choice
            c = dataclasses.replace(c, imatrix="train")
    tokenizer, tokens, task = load_inputs(c, source, paths.values())
    n_ctx = max(c.window, task.longest if task else 0)  # the longest task example must fit one context

    from ..converters.compare import llamacpp_convert
    from ..converters.gguf_vocab import VocabError
    from ..converters.hf_to_gguf import ConversionError, convert

    entries: list[dict] = []
    inputs = source.inputs(TOKENS_FILE)
    ref_path = paths[reference_type]

    # 1. the unquantized GGUF: converted, tokenizer parity, llama.cpp vs HF perplexity, a sample answer
    with run.record(EXPORT_GGUF, to_dict(c), {**inputs, "quant": reference_type}) as entry:
        with atomic_file(ref_path) as tmp, bar(f"convert → {ref_path.name}") as update:
            try:
                if converter == "llamacpp":
                    convert_metrics = llamacpp_convert(reference_tree(), source.path, tmp, reference_type)
                else:
                    result = convert(source.path, tmp, reference_type, loras=source.loras, progress=update, name=stem)
                    convert_metrics = {"converter": "edgeft", "arch": result.arch, "tensors": result.tensors,
                                       "fused_loras": result.fused_loras}
            except (ConversionError, VocabError) as e:
                raise EdgeftError(str(e)) from None
        entry["outputs"].append(artifact(ref_path, run.path))
        entry["metrics"]["convert"] = convert_metrics
        # The HF reference first: its model is freed before llama.cpp maps the GGUF, so the two never
        # share the memory (at 3B each is 6.4 GB).
        hf = hf_reference(source, tokens, task, tokenizer, c.window, c.stride, c.task_answers)
        ref = LlamaCpp(ref_path, n_ctx=n_ctx, threads=c.threads, trusted=True)
        parity = tokenizer_parity(ref, tokens)
        entry["metrics"]["tokenizer_parity"] = parity
        if not parity["equal"]:
            raise EdgeftError(f"{ref_path.name}: llama.cpp tokenizes the held-out text differently from HF (first "
                              f"difference at token {parity['first_difference']}); the tokenizer metadata is wrong")
        # llama.cpp (llama-perplexity, every prompt, edgeft-board) adds the BOS the GGUF's add_bos_token says;
        # our scoring adds the HF tokenizer's. They must be one BOS, or the GGUF is prompted unlike its scoring.
        parity["bos"] = {"hf": tokens.bos, "gguf": ref.bos}
        if ref.bos != tokens.bos:
            raise EdgeftError(f"{ref_path.name}: llama.cpp adds BOS {ref.bos} where the HF tokenizer adds "
                              f"{tokens.bos} (None: no BOS); the tokenizer metadata (add_bos_token) is wrong")
        with bar(f"llama.cpp perplexity {ref_path.name}") as update:

            got = score(tokens.ids, ref.logits, window=c.window, stride=c.stride, backend="llama.cpp",
                        progress=update, bos=tokens.bos)
        vs_hf = Comparison(measured=got, reference=hf.ppl)
        ref_label = f"GGUF {reference_type.upper()} ({label})"
        vs_hf.record(entry, ref_label, f"HF {label}", "hf", tokens.source, source=hf.how)
        entry["metrics"]["sample"] = sample_answer(ref, tokenizer, c.generate_tokens)
        ref_task = record_reference_task(entry, task, ref, _answer_fn(ref), tokenizer, "llama.cpp", c, ref_label,
                                         hf.task) if task else None
        write_modelfile(ref_path, tokenizer)
        entries.append(entry)
        check(entry, Gate("GGUF vs HF perplexity", vs_hf.change, HF_MATCH,
                          f"{reference_type.upper()} GGUF perplexity {got.ppl:.4f} is {100 * vs_hf.change:+.3f}% from "
                          f"HF {hf.ppl.ppl:.4f} (limit {100 * HF_MATCH:.1f}%): the conversion is wrong",
                          absolute=True))

    table = _imatrix(c, run, source, tokenizer) if c.imatrix else None

    if budget is not None:  # the stock recipe nearest the budget in bytes, to compare the mixed one with
        budget_bytes = _budget_bytes(budget, c, profile, source.path, ref_path, paths, table)
        nearest = nearest_stock(ref_path, budget_bytes, table)
        if nearest not in made:
            made.insert(made.index(MIXED), nearest)
            paths[nearest] = out_dir / f"{stem}-{nearest.upper()}.gguf"
            writing_files(held, run.path, [paths[nearest]], "export")
            if paths[nearest].exists() and not c.overwrite:
                raise EdgeftError(f"{paths[nearest]}: already exists; pass --overwrite to replace it, or another --out")

    def measure(q: str, write, extra=None) -> None:
        """Quantize (write(tmp)), then compare with the reference GGUF window by window, task too, gated."""
        with run.record(EXPORT_GGUF, to_dict(c), {**inputs, "quant": q, "from": ref_path.name}) as entry:
            with atomic_file(paths[q]) as tmp:
                quiet_llama_cpp_log()  # the per-tensor fallback lines: the entry counts them instead
                write(Path(tmp), entry)
            entry["outputs"].append(artifact(paths[q], run.path))
            record_tensor_types(entry, paths[q], q)
            model = LlamaCpp(paths[q], n_ctx=n_ctx, threads=c.threads, trusted=True)
            with bar(f"llama.cpp {paths[q].name} vs {ref_path.name}") as update:
                cmp = compare(ref, model, tokens.ids, c.window, c.stride, progress=update,
                              backends=("llama.cpp", "llama.cpp"), bos=tokens.bos)
            cmp.record(entry, f"GGUF {q.upper()} ({label})", f"GGUF {reference_type.upper()}", reference_type,
                       tokens.source)
            entry["metrics"].update({"ppl_rise": round(cmp.change, 6),
                                     "imatrix": {"source": c.imatrix, "tensors": len(table)} if table else None,
                                     "sample": sample_answer(model, tokenizer, c.generate_tokens)})
            task_gates = record_quant_task(entry, task, ref, model, _answer_fn(model), tokenizer, "llama.cpp", c,
                                           f"GGUF {q.upper()} ({label})", ref_task, reference_type, hf.task, q,
                                           task_limits) if task else []
            model.close()
            if extra:
                extra(entry)
            write_modelfile(paths[q], tokenizer)
            entries.append(entry)
            check(entry, Gate(f"perplexity rise vs {reference_type}", cmp.change, gates[q],
                              f"{q.upper()}: perplexity rose {100 * cmp.change:.1f}% vs {reference_type.upper()} "
                              f"(limit {100 * gates[q]:.0f}%)"), *task_gates)

    def stock(q: str):
        def write(tmp: Path, entry: dict) -> None:
            with activity(f"quantize {ref_path.name} → {q}"):
                quantize(ref_path, tmp, q, c.threads, imatrix=table)
        return write

    # 2. each quant: quantized by llama.cpp, compared with the reference GGUF window by window, gated.
    # A failing quant is recorded and the others are still measured; the command fails at the end.
    failures: list[str] = []
    for q in made:
        try:
            if q == MIXED:
                if budget.kind == "stock" and paths[str(budget.value)].is_file():
                    budget_bytes = paths[str(budget.value)].stat().st_size  # the stock file itself, now made
                write, extra = mixed_writer(c, budget, budget_bytes, ref_path, ref, tokens, task, table, out_dir,
                                            entries, paths, n_ctx, tokenizer, label, reference_type, ref_task)
                measure(q, write, extra)
            else:
                measure(q, stock(q))
        except GateFailed as e:
            failures.append(str(e))

    artifacts = {q: paths[q] for q in paths if q != "lora" and not q.startswith("base")}
    if auto:  # the choice decides: a failed quant that was not needed does not fail the command
        choice, failure = choose_for_device(run, c, profile, source.path, entries,
                                            budget_bytes if budget is not None else None)
        entries.append(choice)
        failures = [failure] if failure else []
    if c.adapter_only:
        entries.append(adapter_only(c, source, paths, ref, tokens, inputs, made, gates))
        artifacts.update({k: v for k, v in paths.items() if k == "lora" or k.startswith("base")})
    ref.close()
    if failures:
        raise GateFailed("; ".join(failures))
    return ExportResult(run=run.path, artifacts=artifacts, entries=entries)


def model_name(name: str) -> str:
    """A model given as a name, hub id or folder, named shortly: the embedded name, the hub repository's name,
    else the folder's."""
    if name in EMBEDDED_MODELS:
        return name
    hub = hub_id(name)
    return hub.rsplit("/", 1)[-1] if hub else Path(name).expanduser().resolve().name


def artifact_stem(source: Source) -> str:
    """The GGUF files' name (and their general.name): a model the run made, after its base and the run
    (`smollm2-135m-demo-Q4_K_M.gguf`, `...-demo-fused-...` for base + adapter fused while converting); a model
    exported as it is (--model), after itself."""
    run = source.run.path.name
    if source.adapter is not None:
        name = f"{model_name(source.adapter.base or source.path.name)}-{run}-fused"
    elif source.path == source.run.merged:
        merge = source.run.last(MERGE)
        base = (merge or {}).get("inputs", {}).get("base")
        name = f"{model_name(base) if isinstance(base, str) and base else 'merged'}-{run}"
    else:
        name = model_name(source.label)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "model"


# A k-quant packs rows in blocks of 256 values; llama.cpp stores a tensor whose rows are not a multiple of that
# in another type (q4_K -> q5_0, q6_K -> q8_0, ...), so a "Q4_K_M" of a hidden-576 model is mostly not Q4_K.
K_BLOCK = 256


def record_tensor_types(entry: dict, path: Path, quant: str) -> None:
    """Count the GGUF's tensor types (read back with gguf-py) into metrics.tensor_types, and say in the entry's
    note how many tensors llama.cpp stored in a fallback type instead of the k-quant asked for."""
    from collections import Counter

    from gguf import GGUFReader

    reader = GGUFReader(path)
    types = Counter(t.tensor_type.name.lower() for t in reader.tensors)
    entry["metrics"]["tensor_types"] = dict(sorted(types.items(), key=lambda kv: -kv[1]))
    if "_k" not in quant:
        return
    fallback = [t for t in reader.tensors if len(t.shape) >= 2 and int(t.shape[0]) % K_BLOCK
                and not t.tensor_type.name.lower().endswith(("_k", "f32", "f16", "bf16"))]
    if not fallback:
        return
    widths = sorted({int(t.shape[0]) for t in fallback})
    hidden = next((int(f.contents()) for k, f in reader.fields.items() if k.endswith(".embedding_length")), None)
    what = f"hidden {hidden}" if widths == [hidden] else f"rows of {', '.join(map(str, widths))}"
    stored = "/".join(sorted({t.tensor_type.name.lower() for t in fallback}))
    entry["note"] = (f"{quant.upper()}: {len(fallback)} of {len(reader.tensors)} tensors are {stored} "
                     f"({what} not a multiple of {K_BLOCK})")


CONVERTERS = ("auto", "ours", "llamacpp")


def pick_converter(c: GGUFExportConfig, source: Source) -> str:
    """--converter resolved to 'ours' or 'llamacpp' for this model, or refused in one line before anything is
    written. auto: ours when our registry has the architecture, else (with a notice) llama.cpp's
    convert_hf_to_gguf.py, when the vendored source of the installed binding registers it."""
    from ..converters.compare import llamacpp_architecture, llamacpp_architectures
    from ..converters.families import ConversionError, read_config, supported
    from ..llamacpp import binding_version, vendored_source

    if c.converter not in CONVERTERS:
        raise EdgeftError(f"--converter {c.converter}: use {', '.join(CONVERTERS)}")
    try:
        config = read_config(source.path)
    except ConversionError as e:
        raise EdgeftError(str(e)) from None
    config_file, hf_arch = source.path / "config.json", (config.get("architectures") or ["?"])[0]
    arch = llamacpp_architecture(config)  # what llama.cpp's script looks up (a text_config's own, if any)
    ours = hf_arch in supported()
    if c.converter == "ours" and not ours:
        raise EdgeftError(f"{config_file}: architecture {hf_arch} is not supported by edgeft's converter (it has "
                          f"{', '.join(sorted(supported()))}); --converter auto or llamacpp uses llama.cpp's")
    if c.converter == "ours" or (c.converter == "auto" and ours):
        return "ours"
    theirs = f"llama.cpp's convert_hf_to_gguf.py (llama-cpp-python {binding_version()})"
    if arch not in llamacpp_architectures(vendored_source()):
        if ours:
            raise EdgeftError(f"{config_file}: architecture {arch} is not supported by {theirs}; use --converter "
                              f"ours or auto")
        raise EdgeftError(f"{config_file}: architecture {arch} is supported neither by edgeft's converter nor by "
                          f"{theirs}; export a model of an architecture one of them converts")
    # llama.cpp's script converts a plain HF folder: nothing to fuse an adapter with; the importance matrix names
    # tensors through our families, so it needs an architecture ours has.
    why = "--converter llamacpp" if c.converter == "llamacpp" else f"{hf_arch} (not in edgeft's converter)"
    if source.adapter is not None:
        raise EdgeftError(f"--adapter{' --adapter-only' if c.adapter_only else ''} with {why}: llama.cpp's converter "
                          f"cannot fuse or write an adapter; run `edgeft merge --adapter {c.adapter}` first and "
                          f"export the merged model")
    if c.imatrix and not ours:
        raise EdgeftError(f"--imatrix with {why}: the importance matrix is named through edgeft's converter; "
                          f"export without --imatrix")
    if c.converter == "auto":
        console.print(f"[yellow]note: edgeft's converter has no {hf_arch}; converting with {theirs}[/yellow]",
                      soft_wrap=True)
    return "llamacpp"


def choose_for_device(run: Run, c: GGUFExportConfig, profile, source: Path, entries: list[dict],
                      budget_bytes: int | None = None) -> tuple[dict, str | None]:
    """--quant auto: the smallest quantized GGUF that passed its gate and fits the board's RAM (model + KV
    cache for --context + runtime), recorded as its own ledger entry with the reason. With --budget: of those
    within the budget's bytes (and the board's RAM, when --device is given), the one with the least budget_loss
    (mean KL vs the unquantized GGUF alone when the run has no task). Returns the entry and why no quant qualified
    (None when one did)."""
    from ..devices import fits, memory_need

    config = json.loads((source / "config.json").read_text())
    ram = int(c.device_ram_gb * 2**30) if c.device_ram_gb else None
    usable = fits(profile, 0, ram)[1] if profile else None
    rows = []
    for e in entries:
        q = e["inputs"]["quant"]
        if q in UNQUANTIZED or not e.get("outputs"):
            continue
        size = e["outputs"][0]["bytes"]
        need = memory_need(size, config, c.context)
        fit = (profile is None or fits(profile, need, ram)[0]) and (budget_bytes is None or size <= budget_bytes)
        rows.append({"quant": q, "bytes": size, "need_bytes": need, "fits": fit, "kl_mean": e["metrics"].get("kl_mean"),
                     "gate_passed": e["status"] == "ok" and passed(e),
                     # which kind held it back: the first gate is the general one, the rest the task's
                     "general_gate_passed": bool(e.get("gates")) and e["gates"][0]["passed"],
                     "task_gates_passed": all(g["passed"] for g in (e.get("gates") or [])[1:]),
                     "ppl": e["perplexity"]["ppl"],
                     "task_ppl": (e.get("task") or {}).get("ppl"),
                     "exact_match": (e.get("task") or {}).get("exact_match"),
                     "task_kl_mean": (e.get("task") or {}).get("kl_mean")})
    weight = task_weight_of(entries) if budget_bytes is not None else None
    if weight is not None:
        for r in rows:
            r["loss"] = budget_loss(r, weight)
    key = (lambda r: (r["loss"], r["bytes"])) if weight is not None else \
        (lambda r: (r["kl_mean"], r["bytes"])) if budget_bytes is not None else (lambda r: r["bytes"])
    good = sorted((r for r in rows if r["fits"] and r["gate_passed"]), key=key)
    board = profile.name if profile else None
    inputs = {"device": board, "context": c.context, "usable_ram_bytes": usable, "budget": c.budget or None,
              "budget_bytes": budget_bytes}
    within = " and ".join(([f"fits {board} ({usable / 2**20:.0f} MiB usable at context {c.context})"] if profile
                           else []) + ([f"is within the budget ({budget_bytes / 2**20:.2f} MiB)"]
                                       if budget_bytes is not None else []))
    entry: dict = {}
    try:
        with run.record(EXPORT_GGUF_CHOICE, to_dict(c), inputs) as entry:
            entry["metrics"]["candidates"] = rows
            if not good:
                raise GateFailed(f"no quant both passed its gates (general and task) and {within}")
            best = good[0]
            entry["metrics"]["chosen"] = best["quant"]
            entry["outputs"] = [e["outputs"][0] for e in entries if e["inputs"]["quant"] == best["quant"]]
            why = ("smallest" if budget_bytes is None else "least KL vs the unquantized GGUF of those" if weight is None
                   else f"least loss (held-out KL + {weight:g} × task-answer KL vs the unquantized GGUF, what the "
                        f"mixed recipe minimizes) of those")
            entry["note"] = f"{best['quant'].upper()}: {why} that passed its gates and {within}"
    except GateFailed as e:
        return entry, str(e)
    return entry, None


def task_weight_of(entries: list[dict]) -> float | None:
    """The task weight the mixed recipe's probes set (export/mixed.weigh_task), when this export made one and
    the run has a task; None otherwise."""
    for e in entries:
        if e["inputs"]["quant"] == MIXED and e.get("task"):
            return (e["metrics"].get("mixed") or {}).get("probe", {}).get("task_weight")
    return None


def budget_loss(row: dict, weight: float) -> float:
    """What --budget ranks the candidates by: the loss the mixed recipe was chosen to minimize, measured on every
    candidate alike. Held-out KL alone preferred, on the demo fine-tune, a mixed file whose task-answer KL was 7.9×
    stock Q4_K_M's (its held-out KL 0.16×)."""
    return row["kl_mean"] + weight * (row["task_kl_mean"] or 0.0)


def _budget_bytes(budget: Budget, c: GGUFExportConfig, profile, source: Path, ref_path: Path, paths: dict,
                  table: dict | None) -> int:
    """--budget in bytes of the whole GGUF. A stock recipe's size is its dry run's here (0.01 MiB), to pick the
    nearest stock recipe; the file's own once it is made, for the mixed recipe and the choice."""
    from gguf import GGUFReader

    if budget.kind == "bytes":
        return int(budget.value)
    if budget.kind == "stock":
        return stock_size(ref_path, str(budget.value), table)
    if budget.kind == "bpw":  # bits per weight of the tensors, as llama.cpp counts them; the header on top
        reader = GGUFReader(ref_path)
        header = ref_path.stat().st_size - sum(int(t.n_bytes) for t in reader.tensors)
        return int(header + budget.value * sum(int(t.n_elements) for t in reader.tensors) / 8)
    from ..devices import fits, memory_need

    config = json.loads((source / "config.json").read_text())
    usable = fits(profile, 0, int(c.device_ram_gb * 2**30) if c.device_ram_gb else None)[1]
    left = usable - memory_need(0, config, c.context)
    if left <= 0:
        raise EdgeftError(f"--budget device: {profile.name} has {usable / 2**20:.0f} MiB usable, and the KV cache "
                          f"for --context {c.context} and the runtime take it all; lower --context")
    return left


def nearest_stock(ref_path: Path, budget_bytes: int, table: dict | None) -> str:
    """The stock recipe (other than Q4_K_M, always compared) whose size is nearest the budget (dry runs)."""
    sizes = {q: stock_size(ref_path, q, table) for q in QUANT_TYPES if q != "q4_k_m"}
    return min(sizes, key=lambda q: abs(sizes[q] - budget_bytes))


def mixed_writer(c: GGUFExportConfig, budget: Budget, budget_bytes: int, ref_path: Path, ref: LlamaCpp, tokens,
                 task, table: dict | None, out_dir: Path, entries: list[dict], paths: dict, n_ctx: int, tokenizer,
                 label: str, reference_type: str, ref_task: dict | None):
    """(write, extra) for the mixed GGUF's measure(): write chooses the recipe and has llama.cpp write it
    (again from the same measurements, a little smaller, if the file came out over the budget); extra records
    the recipe against what llama.cpp stored, and the stock recipes measured on the same ids."""
    from . import mixed

    state: dict = {}

    def write(tmp: Path, entry: dict) -> None:
        target = budget_bytes
        recipe = mixed.choose(ref_path, ref, target, tokens, task, c.window, c.stride, c.threads, table, out_dir,
                              bar)
        for _ in range(4):
            with activity(f"quantize {ref_path.name} → mixed recipe ({recipe.predicted_bytes / 2**20:.2f} MiB "
                          f"predicted, budget {target / 2**20:.2f} MiB)"):
                quantize(ref_path, tmp, "q8_0", c.threads, imatrix=table, types=recipe.types,
                         file_type=recipe.bulk_type())
            over = tmp.stat().st_size - target
            if over <= 0:
                break
            recipe = recipe.refit(recipe.predicted_bytes - over - 4096)
        else:
            raise EdgeftError(f"the mixed recipe's file stayed over the budget ({tmp.stat().st_size} > {target} "
                              f"bytes)")
        state["recipe"] = recipe
        entry["metrics"]["mixed"] = {
            "budget": budget.spec, "budget_bytes": target, "predicted_bytes": recipe.predicted_bytes,
            "bytes": tmp.stat().st_size, "predicted_loss": float(f"{recipe.predicted_loss:.4g}"),
            "recipe": dict(sorted(recipe.types.items())), **recipe.metrics}

    def extra(entry: dict) -> None:
        from gguf import GGUFReader

        recipe, info = state["recipe"], entry["metrics"]["mixed"]
        stored = {t.name: t.tensor_type.name.lower() for t in GGUFReader(paths[MIXED]).tensors}
        info["stored_differently"] = {n: stored.get(n) for n, ty in recipe.types.items() if stored.get(n) != ty}
        task_kl = (entry.get("task") or {}).get("kl_mean") or 0.0
        weight = info["probe"].get("task_weight", 1.0)
        info["measured_loss"] = float(f"{entry['metrics']['kl_mean'] + weight * task_kl:.4g}")
        info["loss"] = (f"held-out KL + {weight:g} × task-answer KL vs the unquantized GGUF (predicted: on the "
                        f"probe's ids)")
        rows = [_stock_row(e, e["metrics"].get("imatrix") is not None) for e in entries
                if e["inputs"]["quant"] in QUANT_TYPES and e.get("outputs")]
        if table:  # Q4_K_M without the importance matrix too: how much the matrix alone buys
            rows.append(_unguided_q4km(c, ref_path, ref, out_dir, tokens, task, tokenizer, label, reference_type,
                                       n_ctx, ref_task))
        mine = entry["metrics"]["kl_mean"]
        for r in rows:
            r["kl_ratio"] = round(mine / r["kl_mean"], 4) if r["kl_mean"] else None
        info["stock"] = rows

    return write, extra


def _stock_row(e: dict, imatrix: bool, gated: bool = True) -> dict:
    task = e.get("task") or {}
    return {"quant": e["inputs"]["quant"], "imatrix": imatrix, "bytes": e["outputs"][0]["bytes"],
            "kl_mean": e["metrics"]["kl_mean"], "top1_agreement": e["metrics"]["top1_agreement"],
            "ppl_rise": e["metrics"]["ppl_rise"], "task_ppl_change": task.get("ppl_change"),
            "task_kl_mean": task.get("kl_mean"), "exact_match": task.get("exact_match"),
            "gates_passed": (e["status"] == "ok" and passed(e)) if gated else None}


def _unguided_q4km(c: GGUFExportConfig, ref_path: Path, ref: LlamaCpp, out_dir: Path, tokens, task, tokenizer,
                   label: str, reference_type: str, n_ctx: int, ref_task: dict | None) -> dict:
    """Stock Q4_K_M quantized without the importance matrix, measured like every artifact on the same ids (its
    file is not kept and it is not gated: a comparison, not a candidate)."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".unguided-") as tmp:
        path = Path(tmp) / "q4_k_m.gguf"
        with activity(f"quantize {ref_path.name} → q4_k_m without the importance matrix (comparison)"):
            quantize(ref_path, path, "q4_k_m", c.threads)
        model = LlamaCpp(path, n_ctx=n_ctx, threads=c.threads, trusted=True)
        with bar("llama.cpp Q4_K_M (no imatrix) vs reference") as update:
            cmp = compare(ref, model, tokens.ids, c.window, c.stride, progress=update,
                          backends=("llama.cpp", "llama.cpp"), bos=tokens.bos)
        scratch: dict = {"metrics": {"kl_mean": cmp.kl_mean, "top1_agreement": cmp.top1_agreement,
                                     "ppl_rise": round(cmp.change, 6)}, "inputs": {"quant": "q4_k_m"},
                         "outputs": [{"bytes": path.stat().st_size}]}
        if task:
            record_quant_task(scratch, task, ref, model, _answer_fn(model), tokenizer, "llama.cpp", c,
                              f"GGUF Q4_K_M no imatrix ({label})", ref_task or {}, reference_type, None, "q4_k_m",
                              task_gate_limits(c, ["q4_k_m"]))
        model.close()
    return _stock_row(scratch, False, gated=False)


def _imatrix(c: GGUFExportConfig, run: Run, source: Source, tokenizer) -> dict:
    """The importance matrix of the model being exported (adapter fused when there is one), its entries
    named after the GGUF tensors by the architecture's converter family."""
    from ..converters.families import imatrix_name_map
    from ..imatrix import calibration_ids, compute

    from ..train import training_rows

    chunks = calibration_ids(c.imatrix, tokenizer, c.imatrix_tokens,
                             lambda: training_rows(run.path, tokenizer, "--imatrix train", "pass --imatrix FILE (a text)"))
    model = load_model(source.path, "float32")
    if source.loras:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter.path).merge_and_unload()
    with activity(f"importance matrix from {c.imatrix} ({sum(map(len, chunks))} tokens)"):
        return compute(model.eval(), chunks, imatrix_name_map(source.path))


def tokenizer_parity(model: LlamaCpp, tokens) -> dict:
    """llama.cpp's tokenization of the run's held-out text vs the run's HF ids. The ids are the first N
    tokens of a prefix of the text cut far beyond them, so a prefix of the same size is compared."""
    body, _ = read_text(None if tokens.source.startswith("pydoc_data.topics") else tokens.source)
    if hashlib.sha256(body.encode()).hexdigest() != tokens.text_sha256:
        raise EdgeftError(f"the run's held-out text ({tokens.source}) has changed since its ids were stored; "
                          f"use a new --run")
    ids = tokens.ids
    got = model.tokenize(body[: 8 * len(ids) + 1000])[: len(ids)]
    first = next((i for i, (a, b) in enumerate(zip(got, ids)) if a != b), None)
    if first is None and len(got) != len(ids):
        first = min(len(got), len(ids))
    return {"equal": first is None, "tokens": len(ids), "first_difference": first}


def adapter_only(c: GGUFExportConfig, source: Source, paths: dict, fused: LlamaCpp, tokens, inputs: dict,
                 made: list[str], gates: dict) -> dict:
    """The LoRA as a GGUF adapter plus the base GGUF it applies to, checked against the fused GGUF; and the base
    in every quant made, each with the adapter applied checked against the fused reference under that quant's
    gate: what `deploy --adapters` serves (one quantized base, LoRAs applied per request) must be as good as
    the fused quant it stands in for."""
    from ..converters.hf_to_gguf import convert
    from ..converters.lora_to_gguf import convert_lora

    run = source.run
    with run.record(EXPORT_GGUF_LORA, to_dict(c), {**inputs, "quant": "lora"}) as entry:
        with atomic_file(paths["lora"]) as tmp:
            entry["metrics"]["lora_tensors"] = convert_lora(source.loras, source.path, tmp)
        with atomic_file(paths["base"]) as tmp, bar(f"convert → {paths['base'].name}") as update:
            convert(source.path, tmp, paths["base"].name.rsplit("-", 1)[-1].split(".")[0].lower(), progress=update,
                    name=source.path.name)
        entry["outputs"] += [artifact(paths["lora"], run.path), artifact(paths["base"], run.path)]

        def vs_fused(base: Path):  # the base GGUF with the LoRA GGUF applied at load, scored against the fused one
            applied = LlamaCpp(base, n_ctx=fused.n_ctx, threads=c.threads, lora=paths["lora"], trusted=True)
            with bar(f"llama.cpp {base.name} + LoRA vs fused") as update:
                result = compare(fused, applied, tokens.ids, c.window, c.stride, progress=update,
                                 backends=("llama.cpp", "llama.cpp"), bos=tokens.bos)
            applied.close()
            return result

        cmp = vs_fused(paths["base"])
        cmp.record(entry, "base GGUF + LoRA GGUF", "fused GGUF", "fused", tokens.source)
        checks = [Gate("adapter GGUF vs fused GGUF perplexity", cmp.change, LORA_MATCH,
                       f"base + LoRA GGUF perplexity {cmp.measured.ppl:.4f} differs {100 * cmp.change:+.2f}% from "
                       f"the fused GGUF {cmp.reference.ppl:.4f} (limit {100 * LORA_MATCH:.1f}%)", absolute=True)]
        served = entry["metrics"]["served_bases"] = {}
        for q in made:
            base_q = paths[f"base-{q}"]
            with atomic_file(base_q) as tmp, activity(f"quantize {paths['base'].name} → {q}"):
                quiet_llama_cpp_log()
                quantize(paths["base"], tmp, q, c.threads)
            entry["outputs"].append(artifact(base_q, run.path))
            q_cmp = vs_fused(base_q)
            served[q] = {"path": base_q.name, "ppl": round(q_cmp.measured.ppl, 6),
                         "fused_reference_ppl": round(q_cmp.reference.ppl, 6), "change": round(q_cmp.change, 6),
                         "gate": gates[q]}
            checks.append(Gate(f"{q.upper()} base + LoRA vs fused reference", q_cmp.change, gates[q],
                               f"{base_q.name} + LoRA: perplexity rose {100 * q_cmp.change:.1f}% vs the fused "
                               f"reference (limit {100 * gates[q]:.0f}%)"))
        check(entry, *checks)
    return entry
