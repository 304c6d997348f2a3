"""edgeft train vs PEFT + TRL SFTTrainer, a fair race: tokens/s and peak memory, repeated, with the spread.

Each side is given its best settings for the same work:
- the same rows: edgeft's training split (edgeft.dataset.split, same --eval-split and --seed; TRL would otherwise
  train on the whole file) tokenized by edgeft (--trl-data ids, the default: TRL gets the very input_ids and
  labels edgeft trains on) or rendered by TRL's own chat-template code (--trl-data rows);
- no padding on either side: edgeft packs each micro-batch into one row; TRL runs `padding_free=True` (trl 1.16:
  its collator flattens the batch into one row with position ids restarting per example, the same thing).
  A TRL side without it (`trl:padding_free=false`) pads, and its padding is not counted as tokens;
- the same precision: base loaded alike (--base-quant: NF4 + double quant, or none), the same compute dtype
  (--compute-dtype; autocast on both sides), and float32 LoRA weights on both. TRL 1.16's SFTTrainer casts the
  LoRA weights of a quantized model to bf16 in its __init__ (sft_trainer.py, "QLoRA ... converted to bf16"); this
  bench casts them back to float32 before training (--trl-lora-dtype fp32, the default), which is the TRL side
  changed; --trl-lora-dtype bf16 keeps TRL's cast, as a tutorial gets it. The dtype each side trained is read
  back and recorded (TRL: its parameters; edgeft: the saved adapter's tensors);
- the same LoRA (r 16, alpha 32, dropout 0.05, --targets), batch, steps, schedule (cosine, 5% warmup), learning
  rate, max grad norm 1, gradient checkpointing (non-reentrant) and --attn;
- no extra work in the timed steps: TRL logs only past the last step (logging_steps > steps), report_to none, no
  eval, no saving. TRL still computes its per-step entropy and token accuracy (in compute_loss, with a device sync
  each): that is part of TRL. edgeft's held-out evaluation runs after the timed steps.

Each run is its own process. The sides alternate (A B A B ...), --repeats times each; the table gives the median
and the spread (min-max) of tokens/s and peak memory per side, and the ratios edgeft/TRL of the medians.
Tokens/s counts the tokens of the training rows (no padding) over the steps after --warmup, with a device sync
at each step's end on both sides; peak memory is torch.cuda.max_memory_allocated (and _reserved) at the end of
the training steps on a GPU (weights included), else the process's peak RSS. edgeft's own ledger figures
(tokens_per_s, peak_gpu_mb_training_allocated/_reserved, hardware.packing_attention) are recorded next to them
where this version of edgeft writes them.

    python bench/train_throughput.py                                      # the embedded default model
    python bench/train_throughput.py --shape llama-3.2-1b,llama-3.2-3b --base-quant 4bit --json race.json
    python bench/train_throughput.py --repeats 5 --sides trl edgeft edgeft:packing=off

A side named `edgeft:key=value,...` is edgeft train with those TrainConfig fields changed; `trl:key=value,...`
changes SFTConfig fields (e.g. trl:padding_free=false to pad). --json is rewritten after every run, so a run cut
short (--deadline-s, a killed process) leaves what was measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run from a checkout without installing; an installed edgeft or one on PYTHONPATH (gpu_check's, which maps
# edgeft.converters as the install does) comes first.
if importlib.util.find_spec("edgeft") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QKVO = "q_proj,k_proj,v_proj,o_proj"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# ------------------------------------------------------------------------------------------- measuring
class Meter:
    """Per-step (seconds, tokens) marks; tokens/s after the warm-up steps and the peak memory."""

    def __init__(self, warmup: int):
        self.warmup, self.marks, self.start = warmup, [], time.perf_counter()

    def mark(self, tokens: int) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels are done: both sides pay this once per step
        self.marks.append((time.perf_counter() - self.start, tokens))

    def result(self) -> dict:
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            peak, reserved = torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20
        else:
            peak, reserved = float("nan"), None
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
        w = min(self.warmup, len(self.marks) - 1)
        (t0, n0), (t1, n1) = (self.marks[w - 1] if w else (0.0, 0)), self.marks[-1]
        return {"steps": len(self.marks), "tokens": n1, "seconds": round(t1, 2), "steady_steps": len(self.marks) - w,
                "steady_tokens": n1 - n0, "tokens_per_s": round((n1 - n0) / (t1 - t0), 1) if t1 > t0 else None,
                "first_step_s": round(self.marks[0][0], 2), "peak_mb": round(peak, 1),
                "peak_reserved_mb": round(reserved, 1) if reserved is not None else None,
                "memory": "cuda max_memory_allocated" if cuda else "peak RSS"}


def resolve_quant(spec: str) -> str:
    """edgeft's --base-quant auto: 4-bit NF4 on CUDA, none on CPU (resolved here so that both sides agree)."""
    import torch

    return spec if spec != "auto" else ("4bit" if torch.cuda.is_available() else "none")


def resolve_compute(spec: str) -> str:
    """The autocast dtype both sides train with: edgeft's --compute-dtype auto is bf16 on CUDA capability >= 8.0,
    fp16 (with loss scaling) below, float32 on CPU."""
    import torch

    if not torch.cuda.is_available():
        return "fp32"
    if spec != "auto":
        return spec
    return "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"


def train_split(s: dict, tokenizer):
    """edgeft's training examples for these settings: the same load, truncation and seeded split as its train."""
    from edgeft.dataset import data_file, load_examples, split

    examples, truncated = load_examples(data_file(s["data"]), tokenizer, s["max_seq_len"], False)
    train, held = split(examples, s["eval_split"], s["seed"])
    return train, held, truncated


def coerce(value: str, default):
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "on", "yes")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return type(default)(value)
    if isinstance(default, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


# ------------------------------------------------------------------------------------------------- TRL
def run_trl(s: dict, base: Path, out: Path, overrides: dict) -> dict:
    """PEFT + TRL SFTTrainer with its best settings for this work (see the module docstring)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from edgeft.dataset import as_messages

    meter = Meter(s["warmup"])  # from here, as edgeft's starts before it loads the model
    cuda = torch.cuda.is_available()
    quant, compute = resolve_quant(s["base_quant"]), resolve_compute(s["compute_dtype"])
    dtype = getattr(torch, DTYPES[compute])
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as edgeft does; labels mask padding either way
    kwargs = {"dtype": dtype}
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=dtype)
    elif quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if cuda:
        kwargs["device_map"] = {"": 0}
    if s["attn"] != "auto":
        kwargs["attn_implementation"] = s["attn"]
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    train, _, _ = train_split(s, tokenizer)
    if s["trl_data"] == "ids":
        dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in train], "labels": [e.labels for e in train]})
    else:  # the same rows, rendered by TRL (conversational prompt/completion, loss on the completion)
        chats = [as_messages(e.row) for e in train]
        dataset = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in chats])

    config = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
    settings = dict(
        output_dir=str(out), max_steps=s["steps"], per_device_train_batch_size=s["batch_size"],
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=math.ceil(0.05 * s["steps"]), weight_decay=0.0,
        max_grad_norm=1.0, seed=s["seed"], data_seed=s["seed"],
        # padding_free needs max_length None (trl refuses it otherwise: nothing would enforce it); the rows are
        # already cut to --max-seq-len by edgeft's load (ids), or are short chat rows (rows)
        padding_free=True, max_length=None,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=s["steps"] + 1, logging_strategy="steps", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, bf16=compute == "bf16", fp16=compute == "fp16", use_cpu=not cuda,
        dataloader_num_workers=0)
    for key, value in overrides.items():
        if key not in config:
            raise SystemExit(f"trl:{key}: not an SFTConfig field")
        settings[key] = coerce(value, config[key] if config[key] is not dataclasses.MISSING else None)
    if (not settings["padding_free"] or settings.get("packing")) and settings.get("max_length") is None:
        settings["max_length"] = s["max_seq_len"]  # padding or packing: trl needs (and enforces) a length
    args = SFTConfig(**settings)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=s["targets"].split(","), bias="none",
                      task_type="CAUSAL_LM")
    counted = {"tokens": 0}

    class Counting(SFTTrainer):
        """Counts each micro-batch's row tokens (padding excluded) as it is trained; nothing else changes."""

        def training_step(self, model, inputs, *rest, **kw):
            if "attention_mask" in inputs:
                counted["tokens"] += int(inputs["attention_mask"].sum())
            else:  # padding-free: one row, all of it tokens of the examples
                counted["tokens"] += inputs["input_ids"].numel()
            return super().training_step(model, inputs, *rest, **kw)

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            meter.mark(counted["tokens"])
            if state.global_step == s["steps"]:
                result.update(meter.result())

    result: dict = {}
    trainer = Counting(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                       callbacks=[Marks()])
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    cast_by_trl = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
    if s["trl_lora_dtype"] == "fp32":
        for p in trainable:  # undo TRL's bf16 cast of a quantized model's LoRA weights: float32 master weights
            if p.dtype != torch.float32:
                p.data = p.data.float()
    lora_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
    trainer.train()
    return {**result, "rows": len(train), "quant": quant, "compute_dtype": compute,
            "lora_dtype": lora_dtypes, "lora_dtype_after_trl_init": cast_by_trl,
            "gradient_checkpointing": args.gradient_checkpointing, "padding_free": trainer.padding_free,
            "packing": args.packing, "attn": getattr(model.config, "_attn_implementation", None),
            "settings": {k: settings[k] for k in overrides}}


# ---------------------------------------------------------------------------------------------- edgeft
LEDGER_KEYS = ("tokens_per_s", "tokens_per_s_warmup_steps", "peak_gpu_mb_training", "peak_gpu_mb_training_allocated",
               "peak_gpu_mb_training_reserved", "train_tokens", "train_seconds")


def run_edgeft(s: dict, base: Path, out: Path, overrides: dict) -> dict:
    from safetensors import safe_open

    from edgeft.config import to_dict
    from edgeft.train import TrainConfig, train

    meter = Meter(s["warmup"])
    result = {}

    def at_step(step, loss, tokens):
        meter.mark(tokens)
        if step == s["steps"]:  # the end of training, before the after-training evaluation
            result.update(meter.result())

    quant, compute = resolve_quant(s["base_quant"]), resolve_compute(s["compute_dtype"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(model=str(base), data=s["data"], run=str(out), max_steps=s["steps"], batch_size=s["batch_size"],
                      lr=2e-4, save_every=0, eval_budget=512, eval_generate=0, max_ppl_rise="1e9",
                      max_seq_len=s["max_seq_len"], target_modules=s["targets"].split(","), base_quant=quant,
                      eval_split=s["eval_split"], seed=s["seed"], attn=s["attn"])
    if "compute_dtype" in fields:  # edgeft versions with --compute-dtype: the same dtype as the TRL side
        cfg.compute_dtype = compute
    for key, value in overrides.items():
        if key not in fields:
            raise SystemExit(f"edgeft:{key}: not a TrainConfig field")
        setattr(cfg, key, coerce(value, getattr(cfg, key)))
    meter.start = time.perf_counter()
    res = train(cfg, on_step=at_step)
    m = res.entry["metrics"]
    hw = m["hardware"]
    with safe_open(str(res.adapter / "adapter_model.safetensors"), "pt") as f:
        lora_dtypes = sorted({str(f.get_slice(k).get_dtype()).lower().replace("f32", "float32")
                              .replace("bf16", "bfloat16").replace("f16", "float16") for k in f.keys()})
    return {**result, "rows": m.get("train_rows") or res.entry["inputs"].get("train_rows"), "quant": hw["quant"],
            "compute_dtype": {v: k for k, v in DTYPES.items()}.get(hw["compute_dtype"], hw["compute_dtype"]),
            "compute_dtype_why": hw.get("compute_dtype_why"),
            "lora_dtype": lora_dtypes, "gradient_checkpointing": hw["gradient_checkpointing"],
            "packing": hw["packing"], "packing_attention": hw.get("packing_attention"), "attn": hw["attn"],
            "ledger": {k: m[k] for k in LEDGER_KEYS if k in m},
            "settings": {k: v for k, v in to_dict(cfg).items() if k in overrides}}


# --------------------------------------------------------------------------------------------- the race
def parse_side(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    if name not in ("trl", "edgeft"):
        sys.exit(f"--sides: {spec}: a side is trl or edgeft, optionally followed by :key=value,...")
    return name, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def resolve_base(a, shape: str | None) -> Path:
    from edgeft.models import resolve_model

    if not shape:
        return resolve_model(a.base)
    from edgeft.models import edgeft_home
    from edgeft.shapes import build_checkpoint

    tokenizer = a.tokenizer or resolve_model("smollm2-135m")
    return build_checkpoint(shape, tokenizer, Path(a.models_dir or edgeft_home() / "shapes") / shape)


def settings_of(a) -> dict:
    return {k: getattr(a, k) for k in ("steps", "warmup", "batch_size", "max_seq_len", "targets", "base_quant",
                                        "compute_dtype", "trl_lora_dtype", "trl_data", "attn", "data", "eval_split",
                                        "seed")}


def run_one(a, side: str, base: Path, timeout: float | None) -> dict:
    """One side once, in its own process (its peak memory is its own); the RESULT line it prints, or why not."""
    cmd = [sys.executable, __file__, "--child", json.dumps({"side": side, "base": str(base), **settings_of(a)})]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    except subprocess.TimeoutExpired:
        return {"failed": [f"timed out after {timeout:.0f} s"], "wall_s": round(time.perf_counter() - t0, 1)}
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        print(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", file=sys.stderr, flush=True)
        return {"failed": proc.stderr.strip().splitlines()[-1:] or ["no output"], "exit": proc.returncode,
                "wall_s": round(time.perf_counter() - t0, 1)}
    return {**json.loads(line[-1][7:]), "wall_s": round(time.perf_counter() - t0, 1)}


def spread(values: list) -> dict | None:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not values:
        return None
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1),
            "n": len(values)}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per side: median and min-max of tokens/s and peak memory over its successful repeats; ratios to TRL."""
    sides = {}
    for side, rs in runs.items():
        ok = [r for r in rs if "failed" not in r]
        sides[side] = {"ok": len(ok), "failed": len(rs) - len(ok),
                       "tokens_per_s": spread([r.get("tokens_per_s") for r in ok]),
                       "peak_mb": spread([r.get("peak_mb") for r in ok]),
                       "peak_reserved_mb": spread([r.get("peak_reserved_mb") for r in ok]),
                       "first_step_s": spread([r.get("first_step_s") for r in ok])}
    ref = next((v for k, v in sides.items() if parse_side(k)[0] == "trl" and v["tokens_per_s"]), None)
    ratios = {}
    for side, v in sides.items():
        if ref is None or parse_side(side)[0] == "trl" or not v["tokens_per_s"]:
            continue
        ratios[side] = {"tokens_per_s": round(v["tokens_per_s"]["median"] / ref["tokens_per_s"]["median"], 3),
                        "peak_mb": round(v["peak_mb"]["median"] / ref["peak_mb"]["median"], 3)
                        if v["peak_mb"] and ref["peak_mb"] else None}
    return {"sides": sides, "ratios_vs_trl": ratios}


def measure_shape(a, shape: str | None, sides: list[str], save, deadline: float | None) -> dict:
    """Every side on one base, alternating (A B A B ...), --repeats times each; returns the blob (also saved after
    every run through `save`)."""
    import torch

    base = resolve_base(a, shape)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    blob = {"base": str(base), "shape": shape, "device": device, "repeats": a.repeats, "order": [],
            "settings": settings_of(a), "runs": {side: [] for side in sides}, "complete": False}
    longest = 0.0
    for rep in range(a.repeats):
        for side in sides:
            left = deadline - time.time() if deadline else None
            if left is not None and left < max(longest, 5):
                blob["stopped"] = f"deadline: {left:.0f} s left, a run takes up to {longest:.0f} s"
                print(f"stopping: {blob['stopped']}", file=sys.stderr, flush=True)
                blob.update(summarise(blob["runs"]))
                save(blob)
                report(blob)
                return blob
            print(f"[{rep + 1}/{a.repeats}] {side} ({a.steps} steps, batch {a.batch_size}) on {base} ...",
                  file=sys.stderr, flush=True)
            r = run_one(a, side, base, left)
            longest = max(longest, r.get("wall_s", 0))
            blob["runs"][side].append(r)
            blob["order"].append(side)
            blob.update(summarise(blob["runs"]))
            save(blob)
    blob["complete"] = True
    save(blob)
    report(blob)
    return blob


def report(blob: dict) -> None:
    s = blob["settings"]
    print(f"\n{Path(blob['base']).name}: {s['steps']} steps, batch {s['batch_size']}, LoRA r16 on {s['targets']}, "
          f"base {s['base_quant']}, compute {s['compute_dtype']}; tokens/s over steps {s['warmup'] + 1}-{s['steps']}; "
          f"{blob['repeats']} runs per side, alternating; device {blob['device']}")
    mem = next((r["memory"] for rs in blob["runs"].values() for r in rs if "memory" in r), "")
    print(f"{'side':40}{'tok/s median':>14}{'(min-max)':>18}{'peak MB':>10}{'(min-max)':>18}   vs TRL tok/s  memory"
          f"  ({mem})")
    for side, v in blob["sides"].items():
        if not v["tokens_per_s"]:
            first = next((r["failed"][0] for r in blob["runs"][side] if "failed" in r), "no run")
            print(f"{side:40}  failed: {first[:100]}")
            continue
        t, p = v["tokens_per_s"], v["peak_mb"]
        ratio = blob["ratios_vs_trl"].get(side)
        lo_hi = lambda x: f"({x['min']:.0f}-{x['max']:.0f})"  # noqa: E731
        print(f"{side:40}{t['median']:>14.0f}{lo_hi(t):>18}{p['median']:>10.0f}{lo_hi(p):>18}   "
              + (f"{ratio['tokens_per_s']:10.2f}x " if ratio else "")
              + (f"{ratio['peak_mb']:6.2f}x" if ratio and ratio["peak_mb"] else ""))
    print("RESULTS " + json.dumps({k: blob[k] for k in ("shape", "device", "sides", "ratios_vs_trl")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m", help="model name or HF folder (ignored with --shape)")
    ap.add_argument("--shape", help="build a random-weight checkpoint of a published shape (edgeft.shapes); "
                                    "several, comma-separated, are measured one after the other")
    ap.add_argument("--tokenizer", help="tokenizer folder for --shape (default: the default model's)")
    ap.add_argument("--models-dir", help="where --shape checkpoints are kept (default: $EDGEFT_HOME/shapes)")
    ap.add_argument("--data", default="demo", help="training data, as edgeft train --data (default: demo)")
    ap.add_argument("--eval-split", type=float, default=0.1, help="held out from --data by both sides (edgeft's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--targets", default=QKVO, help="LoRA target modules, comma-separated")
    ap.add_argument("--base-quant", default="auto", choices=("auto", "4bit", "8bit", "none"),
                    help="both sides' base (auto: 4bit NF4 on CUDA, none on CPU, as edgeft's)")
    ap.add_argument("--compute-dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                    help="both sides' autocast dtype (auto: bf16 on CUDA capability >= 8.0, fp16 below, fp32 on CPU)")
    ap.add_argument("--trl-lora-dtype", default="fp32", choices=("fp32", "bf16"),
                    help="fp32: undo TRL's bf16 cast of a quantized model's LoRA weights (as edgeft keeps them); "
                         "bf16: leave it, as a tutorial runs")
    ap.add_argument("--trl-data", default="ids", choices=("ids", "rows"),
                    help="ids: TRL trains on edgeft's tokenized split (same tokens); rows: the split's rows, "
                         "rendered by TRL")
    ap.add_argument("--attn", default="auto", help="attention implementation for both sides (auto: transformers')")
    ap.add_argument("--sides", nargs="+", default=["trl", "edgeft"], help="trl, edgeft, SIDE:key=value,...")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side, alternating sides (at least 1)")
    ap.add_argument("--deadline-s", type=float, help="start no run after this many seconds (the JSON says so)")
    ap.add_argument("--json", help="write the results here too (rewritten after every run)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one side, in this process
    a = ap.parse_args()
    if a.child:
        s = json.loads(a.child)
        name, overrides = parse_side(s["side"])
        with tempfile.TemporaryDirectory() as tmp:
            fn = run_trl if name == "trl" else run_edgeft
            print("RESULT " + json.dumps(fn(s, Path(s["base"]), Path(tmp) / "out", overrides)), flush=True)
        return
    if a.repeats < 1:
        sys.exit("--repeats: at least 1")
    for side in a.sides:
        parse_side(side)
    deadline = time.time() + a.deadline_s if a.deadline_s else None
    shapes = a.shape.split(",") if a.shape else [None]
    blobs: list[dict] = []

    def save(blob: dict) -> None:
        if a.json:
            every = [*blobs, blob]
            Path(a.json).write_text(json.dumps(every[0] if len(shapes) == 1 else every, indent=1) + "\n")

    for shape in shapes:
        blobs.append(measure_shape(a, shape, a.sides, save, deadline))
    if a.json:
        Path(a.json).write_text(json.dumps(blobs[0] if len(blobs) == 1 else blobs, indent=1) + "\n")


if __name__ == "__main__":
    main()
