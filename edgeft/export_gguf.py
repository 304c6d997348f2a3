"""`edgeft export --format gguf`: our converter, llama.cpp quantization, and a ledger entry per artifact.

For every GGUF written, in the ledger:
  - tokenizer parity: llama.cpp's tokenization of the held-out text equals the HF token ids (else error:
    the tokenizer metadata is wrong and every later number would compare different tokens);
  - perplexity with llama.cpp on the run's token ids, same windows as `edgeft eval`; the unquantized GGUF
    must match the HF model within 0.1% (else the conversion is wrong);
  - for each quant: perplexity change vs the unquantized GGUF, mean KL divergence and top-1 agreement vs it,
    computed window by window (all models loaded at once, the reference logits computed once per window);
  - a gate on the perplexity rise per quant; a failing artifact is marked failed and the command exits 3;
  - a short greedy answer to a fixed chat prompt.
Next to each GGUF an Ollama Modelfile, so `ollama create NAME -f FILE.Modelfile` works.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .adapter import find_adapter
from .atomic import atomic_file
from .config import to_dict
from .errors import EdgeftError, GateFailed
from .evaluate import check_windows, measure, perplexity_entry
from .heldout import TOKENS_FILE, eval_tokens, read_text
from .ledger import Run, artifact
from .llamacpp import QUANT_TYPES, LlamaCpp, quantize
from .models import load_model, load_tokenizer, resolve_model
from .perplexity import compare, score
from .progress import bar, console

# Gates: the largest held-out perplexity rise vs the unquantized GGUF. Measured on the 135M default model
# (its weights were already 4-bit before we got them): Q8_0 +0.1%, Q4_K_M +4.3% (llama.cpp's own chunks).
# 8-bit should be nearly lossless, so 2% flags a broken quantization, not noise; 4/5-bit rounding costs a
# small model several percent, so 15% passes honest results and stops the broken ones (Q2/Q3 often are).
DEFAULT_GATES = {"q8_0": 0.02, "q6_k": 0.05, "q5_k_m": 0.08, "q5_0": 0.08, "q4_k_m": 0.15, "q4_k_s": 0.15,
                 "q4_0": 0.15, "q3_k_m": 0.30}
UNQUANTIZED = ("f16", "bf16", "f32")
HF_MATCH = 0.001  # the unquantized GGUF must score within 0.1% of the HF model
CHAT_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
AUTO_CANDIDATES = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]


@dataclass
class ExportConfig:
    format: str = field(default="gguf", metadata={"help": "gguf|onnx"})
    model: str = field(default="", metadata={"help": "model folder/name (default: RUN/merged)"})
    adapter: str = field(default="", metadata={"help": "fuse this adapter (run or folder) while converting"})
    run: str = field(default="", metadata={"help": "run folder (ledger, eval tokens, outputs in RUN/gguf)"})
    quant: list[str] = field(default_factory=list, metadata={
        "help": "comma list; gguf: f16|bf16|f32 + q8_0,q6_k,q5_k_m,q4_k_m,q4_0,.. or auto (default f16,q8_0,q4_k_m); "
                "onnx: fp32,int8,int4 (default all three)"})
    max_ppl_rise: str = field(default="", metadata={
        "help": "gate per quant, e.g. 'q8_0=0.02,q4_k_m=0.15' or one number for all (defaults in docs)"})
    adapter_only: bool = field(default=False, metadata={"help": "also write the LoRA as a GGUF adapter"})
    overwrite: bool = field(default=False, metadata={"help": "replace GGUF files that already exist"})
    out: str = field(default="", metadata={"help": "output folder (default: RUN/gguf)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for llama.cpp (0: all cores)"})
    text: str = field(default="pydoc", metadata={"help": "held-out text if the run has no eval tokens yet"})
    eval_budget: int = field(default=8192, metadata={"help": "tokens of held-out text if the run has none"})
    window: int = field(default=512, metadata={"help": "perplexity window"})
    stride: int = field(default=512, metadata={"help": "perplexity stride"})
    generate_tokens: int = field(default=48, metadata={"help": "tokens of the greedy sample answer"})
    device: str = field(default="", metadata={"help": "board profile: with --quant auto, pick for it (see `edgeft devices`)"})
    device_ram_gb: float = field(default=0.0, metadata={"help": "the board's RAM if not the profile's smallest"})
    context: int = field(default=2048, metadata={"help": "context the board will run with (KV cache in the RAM fit)"})
    imatrix: str = field(default="", metadata={
        "help": "gguf: guide quantization with an importance matrix from 'train' (the run's training data) or "
                "a text FILE (never the held-out text)"})
    imatrix_tokens: int = field(default=8192, metadata={"help": "gguf: calibration tokens for --imatrix"})
    block_size: int = field(default=32, metadata={"help": "onnx: weights per quantization block (MatMulNBits)"})
    symmetric: bool = field(default=True, metadata={"help": "onnx: symmetric weight quantization"})
    accuracy_level: int = field(default=4, metadata={"help": "onnx: MatMulNBits accuracy level (4: int8 compute)"})
    keep_lm_head: bool = field(default=False, metadata={"help": "onnx: leave the output head in fp32"})


@dataclass
class ExportResult:
    run: Path
    artifacts: dict[str, Path]
    entries: list[dict]


def parse_gates(spec: str, quants: list[str]) -> dict[str, float]:
    gates = {q: DEFAULT_GATES.get(q, 0.15) for q in quants if q not in UNQUANTIZED}
    if not spec:
        return gates
    if re.fullmatch(r"[0-9.]+", spec.strip()):
        return {q: float(spec) for q in gates}
    for part in spec.split(","):
        q, _, v = part.partition("=")
        if q.strip() not in gates:
            raise EdgeftError(f"--max-ppl-rise {spec}: '{q.strip()}' is not among the quants being made "
                              f"({', '.join(gates) or 'none'})")
        try:
            gates[q.strip()] = float(v)
        except ValueError:
            raise EdgeftError(f"--max-ppl-rise {spec}: '{v}' is not a number") from None
    return gates


def modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile: the GGUF, its chat template in Ollama's Go template syntax, its stop tokens.
    Only templates edgeft recognises (ChatML, Llama 3) are translated; others keep Ollama's default."""
    template = tokenizer.chat_template or ""
    lines = [f"FROM ./{gguf_name}"]
    if "<|im_start|>" in template:
        system = re.search(r"<\|im_start\|>system\\n(.*?)<\|im_end\|>", template)
        lines += ['TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                  '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                  '<|im_start|>assistant\n"""']
        if system:
            lines.append(f'SYSTEM """{system.group(1)}"""')
        stops = ["<|im_end|>", "<|im_start|>"]
    elif "<|start_header_id|>" in template:
        lines += ['TEMPLATE """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                  '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"""']
        stops = ["<|eot_id|>", "<|end_of_text|>"]
    else:
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0.2")
    return "\n".join(lines) + "\n"


def prompt_ids(tokenizer) -> list[int]:
    """The fixed chat prompt rendered with the model's template: asked of every artifact and every board."""
    return list(tokenizer.apply_chat_template(CHAT_PROMPT, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def sample_answer(model: LlamaCpp, tokenizer, max_tokens: int) -> dict:
    ids, stopped = model.generate(prompt_ids(tokenizer), max_tokens)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return {"prompt": CHAT_PROMPT[-1]["content"], "answer": text, "stopped_at_eos": stopped, "tokens": len(ids),
            "ok": bool(text.strip()) and "\ufffd" not in text}


def export_inputs(c: ExportConfig):
    """What both exporters start from: (run, HF folder, LoRA factors to fuse, label, adapter or None).
    The run is --run, else the adapter's run, else runs/export."""
    if c.text not in ("", "pydoc"):
        read_text(c.text)
    run = Run(c.run or (Path(c.adapter) if c.adapter and (Path(c.adapter) / "manifest.json").is_file()
                        else Path("runs") / "export"))
    return (run, *_source(c, run))


def _source(c: ExportConfig, run: Run):
    """(HF folder to convert, LoRA factors to fuse or {}, label, adapter or None)."""
    if c.adapter:
        adapter = find_adapter(c.adapter)
        base = resolve_model(c.model or adapter.base, what="--model")
        from .merge import _base_weights, check_adapter_fits

        if adapter.trained_quant == "4bit":
            console.print("[yellow]note: the adapter was trained on a 4-bit base; it is fused into the original "
                          "weights (like `merge --into original`); run `edgeft merge` to measure both ways")
        check_adapter_fits(adapter, base, _base_weights(base), force=False)
        return base, adapter.loras, f"{base.name}+adapter (fused)", adapter
    if c.model:
        path = resolve_model(c.model, what="--model")
        return path, {}, c.model, None
    merged = run.path / "merged"
    if (merged / "config.json").is_file():
        return merged, {}, "merged", None
    raise EdgeftError(f"--model is required (no {merged} to export); pass a model folder/name, or --adapter")


def _hf_reference_ppl(run: Run, path: Path, tokens, c: ExportConfig) -> tuple[float, str]:
    """The HF perplexity of the converted model on the run's ids: reused from the ledger when a step
    already measured exactly this folder, else measured now."""
    for entry in reversed(run.steps()):
        for out in entry.get("outputs", []):
            if entry["status"] == "ok" and (run.path / out["path"]).resolve() == path.resolve() and \
                    (entry.get("perplexity") or {}).get("window") == c.window:
                return entry["perplexity"]["ppl"], f"ledger ({entry['step']})"
    model = load_model(path, "float32").eval()
    return measure(model, tokens, c.window, c.stride, path.name).ppl, "measured now (torch)"


def export_gguf(config: ExportConfig) -> ExportResult:
    c = config
    check_windows(c.eval_budget, c.window, c.stride)
    quants = [q.lower() for q in c.quant] or ["f16", "q8_0", "q4_k_m"]
    auto = "auto" in quants
    if auto:
        if not c.device:
            raise EdgeftError("--quant auto needs --device PROFILE (the board whose RAM the choice must fit)")
        quants = [q for q in quants if q != "auto"] + [q for q in AUTO_CANDIDATES if q not in quants]
    profile = None
    if c.device:
        from .devices import get as get_profile

        profile = get_profile(c.device)
    unq = [q for q in quants if q in UNQUANTIZED]
    if len(unq) > 1:
        raise EdgeftError(f"--quant {','.join(c.quant)}: give at most one of f16, bf16, f32 (the reference)")
    bad = [q for q in quants if q not in UNQUANTIZED and q not in QUANT_TYPES]
    if bad:
        raise EdgeftError(f"--quant {bad[0]}: unknown; use f16, bf16, f32, {', '.join(QUANT_TYPES)}")
    reference_type = unq[0] if unq else "f16"
    gates = parse_gates(c.max_ppl_rise, quants)
    run, source, loras, label, adapter = export_inputs(c)
    out_dir = Path(c.out) if c.out else run.path / "gguf"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", label.replace("+adapter (fused)", "-fused")).strip("-")
    paths = {q: out_dir / f"{stem}-{q.upper()}.gguf" for q in [reference_type, *[q for q in quants if q not in UNQUANTIZED]]}
    if c.adapter_only:
        if adapter is None:
            raise EdgeftError("--adapter-only needs --adapter (the LoRA to write as a GGUF adapter)")
        paths["lora"] = out_dir / f"{stem}-LoRA-F16.gguf"
        paths["base"] = out_dir / f"{source.name}-base-{reference_type.upper()}.gguf"
    existing = [p for p in paths.values() if p.exists()]
    if existing and not c.overwrite:
        raise EdgeftError(f"{existing[0]}: already exists; pass --overwrite to replace it, or another --out")
    tokenizer = load_tokenizer(source)
    tokens = eval_tokens(tokenizer, c.text, c.eval_budget, run.path)

    from .converters.hf_to_gguf import ConversionError, convert
    from .converters.gguf_vocab import VocabError

    entries: list[dict] = []
    inputs = {"source": str(source), "label": label, "fused_adapter": str(adapter.path) if adapter else None,
              "eval_tokens": TOKENS_FILE}
    ref_path = paths[reference_type]

    # 1. the unquantized GGUF: converted, tokenizer parity, llama.cpp vs HF perplexity, a sample answer
    with run.step("export-gguf", to_dict(c), {**inputs, "quant": reference_type}) as entry:
        with atomic_file(ref_path) as tmp, bar(f"convert → {ref_path.name}") as update:
            try:
                result = convert(source, tmp, reference_type, loras=loras, progress=update, name=label)
            except (ConversionError, VocabError) as e:
                raise EdgeftError(str(e)) from None
        entry["outputs"].append(artifact(ref_path, run.path))
        entry["metrics"]["convert"] = {"arch": result.arch, "tensors": result.tensors,
                                       "fused_loras": result.fused_loras}
        ref = LlamaCpp(ref_path, n_ctx=c.window, threads=c.threads)
        parity = tokenizer_parity(ref, tokenizer, tokens)
        entry["metrics"]["tokenizer_parity"] = parity
        if not parity["equal"]:
            raise EdgeftError(f"{ref_path.name}: llama.cpp tokenizes the held-out text differently from HF (first "
                              f"difference at token {parity['first_difference']}); the tokenizer metadata is wrong")
        with bar(f"llama.cpp perplexity {ref_path.name}") as update:
            got = score(tokens.ids, ref.logits, window=c.window, stride=c.stride, backend="llama.cpp",
                        progress=update)
        hf_ppl, hf_src = (_fused_reference_ppl(source, adapter, tokens, c) if loras
                          else _hf_reference_ppl(run, source, tokens, c))
        drift = got.ppl / hf_ppl - 1
        entry["perplexity"] = perplexity_entry(got, f"GGUF {reference_type.upper()} ({label})", tokens)
        entry["reference"] = {"ppl": hf_ppl, "model": f"HF {label}", "label": "hf", "source": hf_src}
        entry["metrics"]["sample"] = sample_answer(ref, tokenizer, c.generate_tokens)
        entry["gate"] = {"metric": "GGUF vs HF perplexity", "max": HF_MATCH, "value": round(abs(drift), 6),
                         "passed": abs(drift) <= HF_MATCH}
        write_modelfile(ref_path, tokenizer)
        entries.append(entry)
        if abs(drift) > HF_MATCH:
            raise GateFailed(f"{reference_type.upper()} GGUF perplexity {got.ppl:.4f} is {100 * drift:+.3f}% from "
                             f"HF {hf_ppl:.4f} (limit {100 * HF_MATCH:.1f}%): the conversion is wrong")

    table = None
    if c.imatrix:
        table = _imatrix(c, run, source, loras, adapter, tokenizer)

    # 2. each quant: quantized by llama.cpp, compared with the reference GGUF window by window, gated.
    # A failing quant is recorded and the others are still measured; the command fails at the end.
    failures: list[str] = []
    for q in [q for q in quants if q not in UNQUANTIZED]:
        try:
            with run.step("export-gguf", to_dict(c), {**inputs, "quant": q, "from": ref_path.name}) as entry:
                with atomic_file(paths[q]) as tmp, console.status(f"quantize {ref_path.name} → {q}"):
                    quantize(ref_path, tmp, q, c.threads, imatrix=table)
                entry["outputs"].append(artifact(paths[q], run.path))
                model = LlamaCpp(paths[q], n_ctx=c.window, threads=c.threads)
                with bar(f"llama.cpp {paths[q].name} vs {ref_path.name}") as update:
                    cmp = compare(ref, model, tokens.ids, c.window, c.stride, progress=update)
                rise = cmp["ppl"] / cmp["ppl_ref"] - 1
                entry["perplexity"] = {"ppl": cmp["ppl"], "tokens": cmp["tokens"], "windows": cmp["windows"],
                                       "window": c.window, "stride": c.stride, "backend": "llama.cpp",
                                       "model": f"GGUF {q.upper()} ({label})", "text": tokens.source}
                entry["reference"] = {"ppl": cmp["ppl_ref"], "model": f"GGUF {reference_type.upper()}",
                                      "label": reference_type}
                entry["metrics"].update({"ppl_rise": round(rise, 6), "kl_mean": cmp["kl_mean"],
                                         "top1_agreement": cmp["top1_agreement"],
                                         "imatrix": {"source": c.imatrix, "tensors": len(table)} if table else None,
                                         "sample": sample_answer(model, tokenizer, c.generate_tokens)})
                model.close()
                entry["gate"] = {"metric": f"perplexity rise vs {reference_type}", "max": gates[q],
                                 "value": round(rise, 6), "passed": rise <= gates[q]}
                write_modelfile(paths[q], tokenizer)
                entries.append(entry)
                if rise > gates[q]:
                    raise GateFailed(f"{q.upper()}: perplexity rose {100 * rise:.1f}% vs {reference_type.upper()} "
                                     f"(limit {100 * gates[q]:.0f}%)")
        except GateFailed as e:
            failures.append(str(e))

    artifacts = {q: paths[q] for q in paths if q not in ("lora", "base")}
    if auto:
        choice = choose_for_device(run, c, profile, source, entries)
        entries.append(choice)
        failures = [] if choice["status"] == "ok" else [choice["reason"]]
    if c.adapter_only:
        entries.append(adapter_only(c, run, adapter, source, paths, ref, tokens, inputs))
        artifacts.update(lora=paths["lora"], base=paths["base"])
    ref.close()
    if failures:
        raise GateFailed("; ".join(failures))
    return ExportResult(run=run.path, artifacts=artifacts, entries=entries)


def choose_for_device(run: Run, c: ExportConfig, profile, source: Path, entries: list[dict]) -> dict:
    """--quant auto: the smallest quantized GGUF that passed its gate and fits the board's RAM (model + KV
    cache for --context + runtime), recorded as its own ledger entry with the reason."""
    from .devices import fits, memory_need

    config = json.loads((source / "config.json").read_text())
    ram = int(c.device_ram_gb * 2**30) if c.device_ram_gb else None
    usable = fits(profile, 0, ram)[1]
    rows = []
    for e in entries:
        q = e["inputs"]["quant"]
        if q in UNQUANTIZED or not e.get("outputs"):
            continue
        size = e["outputs"][0]["bytes"]
        need = memory_need(size, config, c.context)
        ok_fit = fits(profile, need, ram)[0]
        rows.append({"quant": q, "bytes": size, "need_bytes": need, "fits": ok_fit,
                     "gate_passed": bool((e.get("gate") or {}).get("passed")), "ppl": e["perplexity"]["ppl"]})
    good = sorted((r for r in rows if r["fits"] and r["gate_passed"]), key=lambda r: r["bytes"])
    entry = {"step": "export-gguf-choice", "status": "ok" if good else "failed", "started": entries[-1]["started"],
             "inputs": {"device": profile.name, "context": c.context, "usable_ram_bytes": usable},
             "outputs": [], "perplexity": None, "metrics": {"candidates": rows}, "config": to_dict(c), "wall_s": 0.0}
    if good:
        best = good[0]
        entry["metrics"]["chosen"] = best["quant"]
        entry["outputs"] = [e["outputs"][0] for e in entries if e["inputs"]["quant"] == best["quant"]]
        entry["note"] = (f"{best['quant'].upper()} for {profile.name}: smallest that passed its gate and fits "
                         f"({best['need_bytes'] / 2**20:.0f} of {usable / 2**20:.0f} MiB usable)")
    else:
        entry["reason"] = (f"no quant both passed its gate and fits {profile.name} "
                           f"({usable / 2**20:.0f} MiB usable at context {c.context})")
    run.append(entry)
    return entry


def _imatrix(c: ExportConfig, run: Run, source: Path, loras: dict, adapter, tokenizer) -> dict:
    """The importance matrix of the model being exported (adapter fused when there is one)."""
    from .imatrix import calibration_ids, compute

    import gguf

    config = json.loads((source / "config.json").read_text())
    from .converters.hf_to_gguf import SUPPORTED

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[SUPPORTED[config["architectures"][0]]]
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    chunks = calibration_ids(c.imatrix, run.path, tokenizer, c.imatrix_tokens)
    model = load_model(source, "float32")
    if loras:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter.path).merge_and_unload()
    with console.status(f"importance matrix from {c.imatrix} ({sum(map(len, chunks))} tokens)"):
        return compute(model.eval(), chunks, lambda n: names.get_name(n, try_suffixes=(".weight",)))


def tokenizer_parity(model: LlamaCpp, tokenizer, tokens) -> dict:
    """llama.cpp's tokenization of the run's held-out text vs the run's HF ids. The ids are the first N
    tokens of a prefix of the text cut far beyond them, so a prefix of the same size is compared."""
    import hashlib

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


def write_modelfile(gguf_path: Path, tokenizer) -> None:
    with atomic_file(gguf_path.with_suffix(".Modelfile")) as tmp:
        tmp.write_text(modelfile(gguf_path.name, tokenizer))


def _fused_reference_ppl(base: Path, adapter, tokens, c: ExportConfig) -> tuple[float, str]:
    """HF perplexity of base + adapter (PEFT, unmerged, float32): what the fused GGUF must match."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, "float32"), adapter.path).eval()
    return measure(model, tokens, c.window, c.stride, "base+adapter (HF)").ppl, "measured now (torch, PEFT)"


LORA_MATCH = 0.005  # base GGUF + GGUF adapter must score within 0.5% of the fused GGUF


def adapter_only(c: ExportConfig, run: Run, adapter, base: Path, paths: dict, fused: LlamaCpp, tokens,
                 inputs: dict) -> dict:
    """The LoRA as a GGUF adapter plus the base GGUF it applies to, checked against the fused GGUF."""
    from .converters.lora_to_gguf import convert_lora
    from .converters.hf_to_gguf import convert

    with run.step("export-gguf-lora", to_dict(c), {**inputs, "quant": "lora"}) as entry:
        with atomic_file(paths["lora"]) as tmp:
            entry["metrics"]["lora_tensors"] = convert_lora(adapter.loras, base, tmp)
        with atomic_file(paths["base"]) as tmp, bar(f"convert → {paths['base'].name}") as update:
            convert(base, tmp, paths["base"].name.rsplit("-", 1)[-1].split(".")[0].lower(), progress=update,
                    name=base.name)
        entry["outputs"] += [artifact(paths["lora"], run.path), artifact(paths["base"], run.path)]
        applied = LlamaCpp(paths["base"], n_ctx=c.window, threads=c.threads, lora=paths["lora"])
        with bar("llama.cpp base + LoRA GGUF vs fused") as update:
            cmp = compare(fused, applied, tokens.ids, c.window, c.stride, progress=update)
        applied.close()
        diff = cmp["ppl"] / cmp["ppl_ref"] - 1
        entry["perplexity"] = {"ppl": cmp["ppl"], "tokens": cmp["tokens"], "windows": cmp["windows"],
                               "window": c.window, "stride": c.stride, "backend": "llama.cpp",
                               "model": "base GGUF + LoRA GGUF", "text": tokens.source}
        entry["reference"] = {"ppl": cmp["ppl_ref"], "model": "fused GGUF", "label": "fused"}
        entry["metrics"].update({"kl_mean": cmp["kl_mean"], "top1_agreement": cmp["top1_agreement"]})
        entry["gate"] = {"metric": "adapter GGUF vs fused GGUF perplexity", "max": LORA_MATCH,
                         "value": round(abs(diff), 6), "passed": abs(diff) <= LORA_MATCH}
        if abs(diff) > LORA_MATCH:
            raise GateFailed(f"base + LoRA GGUF perplexity {cmp['ppl']:.4f} differs {100 * diff:+.2f}% from the "
                             f"fused GGUF {cmp['ppl_ref']:.4f} (limit 0.5%)")
    return entry
