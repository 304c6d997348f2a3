"""`edgeft merge`: a LoRA adapter folded into an unquantized 16-bit base, checked against its training base.

Merging into a 4-bit base rounds the delta away (peft warns about it), so edgeft never does. The base is
streamed tensor by tensor from its safetensors files, W' = W + scale * B @ A is computed in float32 and
cast to the output dtype, and shards are written as they fill: peak RAM stays near one shard plus one
tensor, not two copies of the model.

Which base to merge into is measured, not guessed. A QLoRA adapter was trained against the NF4-rounded
base, so it may only work on top of that rounding (measured on the default model: merged into the
original weights it lost the trained format). `--into`:
  original     the base weights as they are;
  dequantized  every Linear weight first rounded through NF4 exactly as bitsandbytes did in training;
  auto         (default) for an adapter trained on a quantized base: both, scored on the task's held-out
               split (exact answers, then eval loss) and on the held-out text; the better by task metric
               is kept and both rows go to the ledger with the reason. Else: original.
"""

from __future__ import annotations

import gc
import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .adapter import Adapter, base_weights, check_adapter_fits, find_adapter
from .atomic import atomic_dir, write_json
from .config import accepts_old_names, to_dict
from .errors import EdgeftError
from .gates import Gate, check, parse_gates
from .heldout import HeldOutOptions
from .ledger import artifact, read_peak_rss_mb
from .locks import writing_files
from .models import add_adapter, copy_tokenizer, load_for_scoring, load_tokenizer, resolve_model, stored_dtype
from .progress import bar
from .reuse import find_measurement, measurement_key, torch_weights
from .run import MERGE, MERGE_CHOICE, TOKENS_FILE, Run, default_run_dir
from .scoring import Comparison, PerplexityResult, measure
from .task import TaskScore, TaskSet, build_task_set, read_task_set, score_torch, store_task_set

DTYPES = ("float16", "bfloat16", "float32")


@accepts_old_names
@dataclass
class MergeConfig(HeldOutOptions):
    ALIASES: ClassVar[dict[str, str]] = {"base": "model"}  # one vocabulary across commands (README "Flags")

    adapter: str = field(default="", metadata={"help": "run folder from `edgeft train`, or a PEFT adapter folder"})
    model: str = field(default="", metadata={"help": "base model (default: the one recorded with the adapter)"})
    dtype: str = field(default="float16", metadata={"help": "float16|bfloat16|float32 for the merged weights"})
    into: str = field(default="auto", metadata={"help": "original|dequantized|auto (see `edgeft merge --help`)"})
    force: bool = field(default=False, metadata={"help": "merge even if the base fingerprint differs (recorded)"})
    run: str = field(default="", metadata={"help": "run folder for the ledger (default: the adapter's run)"})
    out: str = field(default="", metadata={"help": "output folder (default: RUN/merged)"})
    shard_mb: float = field(default=2000, metadata={"help": "max safetensors shard size in MB"})
    max_drift: str = field(default="0.01", metadata={
        "help": "gate: max relative perplexity change merged vs unmerged base+adapter: one number, or per --into "
                "('original=0.01,dequantized=0.02'), the syntax of every gate flag"})
    eval_generate: int = field(default=20, metadata={"help": "held-out prompts answered greedily (auto choice)"})


@dataclass
class MergeResult:
    run: Path
    merged: Path
    into: str
    entries: list[dict]


def quantized_linear_weights(base_path: Path) -> set[str]:
    """Weights bitsandbytes quantizes when the base is loaded in 4/8 bit: every nn.Linear but the output head.
    Found on an empty (meta-device) model built from the config, so nothing is loaded."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path))
    head = model.get_output_embeddings()
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head}


def nf4_roundtrip(weight, compute_dtype: str):
    """The weight as the 4-bit training base saw it: quantized to NF4 (block 64, double quant) from the
    compute dtype, then dequantized; bit-identical to what bitsandbytes' Linear4bit multiplies with."""
    import bitsandbytes.functional as bnbf
    import torch

    # On the GPU when there is one: QLoRA trains there, and the round trip must be the CUDA kernels'.
    w = weight.to(_device(), getattr(torch, compute_dtype))
    q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(q, state).float().to(weight.device)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_for_scoring(path: Path, dtype: str | None = None):
    """A model for the perplexity and task checks, on the GPU when there is one: held at its stored 16 bits,
    computing in float32 (models.load_for_scoring), so the gates see float32 scores at half the memory."""
    return load_for_scoring(path, dtype).to(_device())


# ------------------------------------------------------------------------------------------- the merge
def write_merged(base_path: Path, adapter: Adapter, weights: dict, out: Path, dtype: str, into: str,
                 shard_mb: float) -> None:
    """Stream base + deltas into `out` (written under a temp name, renamed when complete)."""
    import torch
    from safetensors import safe_open

    target = getattr(torch, dtype)
    rounded = quantized_linear_weights(base_path) if into == "dequantized" else set()
    compute = (adapter.meta or {}).get("compute_dtype", "float32")
    by_file: dict[Path, list[str]] = {}
    for name, (f, _) in weights.items():
        by_file.setdefault(f, []).append(name)
    with atomic_dir(out) as tmp, bar(f"merge into {into} ({dtype})", len(weights)) as update:
        shards = ShardWriter(tmp, int(shard_mb * 1_000_000))
        for f, names in by_file.items():
            with safe_open(f, framework="pt") as st:
                for name in names:
                    t = st.get_tensor(name)
                    if name in rounded or name in adapter.loras:
                        t = t.float()
                        if name in rounded:
                            t = nf4_roundtrip(t, compute)
                        if name in adapter.loras:
                            t = adapter.loras[name].apply(t)
                    shards.add(name, t.to(target) if t.is_floating_point() else t)
                    update(shards.count)
        shards.close()
        config = json.loads((base_path / "config.json").read_text())
        config.pop("quantization_config", None)
        config["dtype"] = dtype
        write_json(tmp / "config.json", config)
        if (base_path / "generation_config.json").is_file():
            shutil.copy(base_path / "generation_config.json", tmp / "generation_config.json")
        copy_tokenizer(adapter.path if (adapter.path / "tokenizer_config.json").is_file() else base_path, tmp)


class ShardWriter:
    """Collects tensors into safetensors shards of at most `limit` bytes, writing each as it fills, and
    names them the way transformers expects (model.safetensors, or model-0000i-of-0000n + index)."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.current: dict = {}
        self.size = 0
        self.count = 0
        self.parts: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.limit:
            self._write()
        self.current[name] = tensor.contiguous()
        self.size += nbytes
        self.count += 1

    def _write(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"part-{len(self.parts):05d}.safetensors"
        save_file(self.current, path, metadata={"format": "pt"})
        self.parts.append((path, list(self.current)))
        self.current, self.size = {}, 0

    def close(self) -> None:
        if self.current:
            self._write()
        if len(self.parts) == 1:
            self.parts[0][0].rename(self.folder / "model.safetensors")
            return
        index = {"metadata": {"total_size": 0}, "weight_map": {}}
        for i, (path, names) in enumerate(self.parts, 1):
            final = self.folder / f"model-{i:05d}-of-{len(self.parts):05d}.safetensors"
            path.rename(final)
            index["metadata"]["total_size"] += final.stat().st_size
            index["weight_map"].update({n: final.name for n in names})
        write_json(self.folder / "model.safetensors.index.json", index)


# -------------------------------------------------------------------------------------------- scoring
def _unmerged_model(base_path: Path, adapter: Adapter, into: str):
    """base (+ NF4 rounding for `dequantized`) with the adapter applied by PEFT, unmerged, computing in float32."""
    import torch

    compute = (adapter.meta or {}).get("compute_dtype", "float32")
    # NF4-rounded weights are values of the compute dtype: the stored 16-bit dtype holds them exactly only
    # when it is that dtype; otherwise the base is held in float32.
    exact = into == "original" or compute == stored_dtype(base_path)
    model = _load_for_scoring(base_path, None if exact else "float32")
    if into == "dequantized":
        names = quantized_linear_weights(base_path)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in names:
                    p.copy_(nf4_roundtrip(p.data, compute))
    return add_adapter(model, adapter.path)


def _score(model, tokenizer, tokens, task, c: MergeConfig, label: str) -> dict:
    ppl = measure(model, tokens.ids, c.window, c.stride, label, tokens.bos)
    scored = score_torch(model, task, tokenizer, label, c.eval_generate) if task else None
    return {"ppl": ppl, "task": scored, "eval_loss": scored.loss if scored else None,
            "exact_match": scored.exact_match if scored else None,
            "exact_match_n": scored.answered if scored else 0}


def _task_set_for_run(run_dir: Path, tokenizer) -> TaskSet | None:
    """The run's task set; for a run whose training predates task_tokens.json, rebuilt from its training
    record (the same seeded held-out split) and stored."""
    task = read_task_set(run_dir, tokenizer)
    if task is not None:
        return task
    # Here, not in task.py: the training record is train's (task.py is what train itself scores with).
    from .train import data_path, read_train_config, split_examples

    trained = read_train_config(run_dir)
    if trained is None or not (trained.eval_data or data_path(trained).is_file()):
        return None
    trained.strict = False
    held_out = split_examples(trained, tokenizer)[1]
    task = build_task_set(tokenizer, held_out, f"held-out split of {trained.data}")
    return store_task_set(run_dir, task) if task else None


def merge(config: MergeConfig) -> MergeResult:
    with ExitStack() as held:  # the merged folder's lock, held until the choice is recorded
        return _merge(config, held)


def _merge(config: MergeConfig, held: ExitStack) -> MergeResult:
    c = config
    if not c.adapter:
        raise EdgeftError("--adapter is required: a run folder from `edgeft train` or a PEFT adapter folder")
    c.check_heldout()
    if c.dtype not in DTYPES:
        raise EdgeftError(f"--dtype {c.dtype}: use float16, bfloat16 or float32 (never 4-bit: see `merge --help`)")
    if c.into not in ("auto", "original", "dequantized"):
        raise EdgeftError(f"--into {c.into}: use original, dequantized or auto")
    adapter = find_adapter(c.adapter)
    c = c.checked("eval_generate")
    base_name = c.model or adapter.base
    if not base_name:
        raise EdgeftError(f"--adapter {c.adapter}: no base recorded with it; pass --model")
    base_path = resolve_model(base_name, what="--model")
    weights = base_weights(base_path)
    fp_record = check_adapter_fits(adapter, base_path, weights, c.force)
    quantized = adapter.trained_quant in ("4bit", "8bit")
    if c.into == "auto":
        candidates = ["original", "dequantized"] if adapter.trained_quant == "4bit" else ["original"]
    else:
        candidates = [c.into]
    if "dequantized" in candidates and adapter.trained_quant == "8bit":
        raise EdgeftError("--into dequantized: only 4-bit (NF4) training is reproduced; use --into original")
    max_drift = parse_gates(c.max_drift, {}, candidates, 0.01, flag="--max-drift")

    run_dir = Path(c.run) if c.run else (adapter.run or default_run_dir(MERGE))
    run = Run(run_dir)
    out = Path(c.out) if c.out else run.merged
    writing_files(held, run.path, [out], "merge")
    tokenizer = load_tokenizer(adapter.path if (adapter.path / "tokenizer_config.json").is_file() else base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokens = c.heldout_tokens(tokenizer, run.path)
    task = _task_set_for_run(adapter.run, tokenizer) if adapter.run else None
    if task and adapter.run != run.path:
        store_task_set(run.path, task)

    entries: list[dict] = []
    scored: dict[str, dict] = {}
    inputs = {"adapter": str(adapter.path), "base": base_name, "base_path": str(base_path),
              "trained_quant": adapter.trained_quant, "eval_tokens": TOKENS_FILE,
              "task_rows": len(task.items) if task else 0}
    earlier = _earlier_unmerged(adapter, fp_record, tokens, task, c)
    for into in candidates:
        folder = out if len(candidates) == 1 else out.with_name(f"{out.name}-{into}")
        with run.record(MERGE, to_dict(c), {**inputs, "into": into}) as entry:
            entry["metrics"]["fingerprint"] = fp_record
            write_merged(base_path, adapter, weights, folder, c.dtype, into, c.shard_mb)
            entry["metrics"]["merge_peak_rss_mb"] = read_peak_rss_mb()  # the merge itself, before scoring
            if into == "original" and earlier is not None:
                ref = _reused(earlier)
                entry["reused_from"] = earlier["step"]
                entry["note"] = f"unmerged base+adapter reused from {earlier['step']} (same weights, ids, answers)"
            else:
                unmerged = _unmerged_model(base_path, adapter, into)
                ref = _score(unmerged, tokenizer, tokens, task, c, f"{base_name}+adapter unmerged ({into})")
                del unmerged
                gc.collect()  # the unmerged model's memory is free before the merged one is loaded
            merged = _load_for_scoring(folder)
            got = _score(merged, tokenizer, tokens, task, c, f"merged ({into}, {c.dtype})")
            del merged
            gc.collect()
            drift = Comparison(measured=got["ppl"], reference=ref["ppl"])
            drift.record(entry, f"merged ({into}, {c.dtype})", f"{base_name}+adapter ({into})", "unmerged",
                         tokens.source)
            if task:
                got["task"].record(entry, f"merged ({into}, {c.dtype})", task.source,
                                   ref["task"].entry(f"{base_name}+adapter ({into})", task.source), "unmerged")
            entry["metrics"].update({
                "into": into, "dtype": c.dtype, "drift_vs_unmerged": round(drift.change, 6),
                "eval_loss": got["eval_loss"], "eval_loss_unmerged": ref["eval_loss"],
                "exact_match": got["exact_match"], "exact_match_unmerged": ref["exact_match"],
                "exact_match_n": got["exact_match_n"],
            })
            entry["outputs"].append(artifact(folder, run.path))
            scored[into] = {"entry": entry, "folder": folder, **got}
            entries.append(entry)
            check(entry, Gate("perplexity drift merged vs unmerged", drift.change, max_drift[into],
                              f"merged ({into}, {c.dtype}) perplexity {got['ppl'].ppl:.4f} differs "
                              f"{100 * drift.change:+.2f}% from unmerged {ref['ppl'].ppl:.4f}, more than --max-drift "
                              f"{100 * max_drift[into]:.1f}%", absolute=True))

    chosen, reason = _choose(scored, quantized)
    if len(candidates) > 1:
        final = out
        with atomic_dir(final) as tmp:  # move the winner's files under the final name, drop the loser
            for f in scored[chosen]["folder"].iterdir():
                shutil.move(str(f), tmp / f.name)
        for s in scored.values():
            shutil.rmtree(s["folder"], ignore_errors=True)
        with run.record(MERGE_CHOICE, to_dict(c), inputs) as decision:
            decision["outputs"].append(artifact(final, run.path))
            decision["perplexity"] = scored[chosen]["entry"]["perplexity"]
            if "task" in scored[chosen]["entry"]:
                decision["task"] = scored[chosen]["entry"]["task"]
            decision["metrics"].update({
                "chosen": chosen, "reason": reason,
                "candidates": {k: {"ppl": v["ppl"].ppl, "eval_loss": v["eval_loss"],
                                   "exact_match": v["exact_match"]} for k, v in scored.items()}})
            decision["note"] = reason
        entries.append(decision)
    return MergeResult(run=run.path, merged=out, into=chosen, entries=entries)


# ------------------------------------------------------------------------------- reused measurements
def _earlier_unmerged(adapter: Adapter, fp_record: dict, tokens, task, c: MergeConfig) -> dict | None:
    """The ledger entry (train's "after") that already measured exactly the unmerged base + adapter that
    `--into original` scores: the same base and adapter files, the base held as it is and computing in
    float32 on this device, the same ids, task and number of answers (reuse.py). None: measure it."""
    if adapter.run is None or not fp_record.get("checked"):
        return None  # not from `edgeft train`: no ledger measured it
    weights = torch_weights(fp_record["actual"], artifact(adapter.path)["sha256"], "none", "float32", _device())
    return find_measurement(Run(adapter.run), measurement_key(weights, tokens.ids, c.window, c.stride, task,
                                                              c.eval_generate, tokens.bos))


def _reused(entry: dict) -> dict:
    """What `_score` returns, from a ledger entry that measured the same inputs."""
    task = TaskScore.from_entry(entry["task"]) if entry.get("task") else None
    return {"ppl": PerplexityResult.from_entry(entry["perplexity"]), "task": task,
            "eval_loss": task.loss if task else None, "exact_match": task.exact_match if task else None,
            "exact_match_n": task.answered if task else 0}


def _choose(scored: dict[str, dict], quantized: bool) -> tuple[str, str]:
    if len(scored) == 1:
        only = next(iter(scored))
        return only, f"merged into the {only} base" + (" (adapter trained on an unquantized base)" if not quantized
                                                         else "")

    def key(name):
        s = scored[name]
        em = s["exact_match"] if s["exact_match"] is not None else -1
        loss = s["eval_loss"] if s["eval_loss"] is not None else s["ppl"].ppl
        return (-em, loss)

    best = min(scored, key=key)
    other = next(k for k in scored if k != best)
    b, o = scored[best], scored[other]
    if b["exact_match"] is not None:
        why = (f"{best}: exact answers {b['exact_match']:.0%} vs {o['exact_match']:.0%}, task eval loss "
               f"{b['eval_loss']:.4f} vs {o['eval_loss']:.4f}")
    elif b["eval_loss"] is not None:
        why = f"{best}: task eval loss {b['eval_loss']:.4f} vs {o['eval_loss']:.4f}"
    else:
        why = f"{best}: held-out perplexity {b['ppl'].ppl:.4f} vs {o['ppl'].ppl:.4f} (no task split to score)"
    return best, why + f"; held-out text perplexity {b['ppl'].ppl:.4f} vs {o['ppl'].ppl:.4f}"
