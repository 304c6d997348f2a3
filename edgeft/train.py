"""`edgeft train`: LoRA / QLoRA supervised fine-tuning, with perplexity before and after in the ledger.

The recipe users expect from PEFT/TRL (LoRA r=16, alpha=32, dropout 0.05; QLoRA = NF4 base with double
quantization and bf16 compute on CUDA; cosine schedule with warmup; adapter saved alone in PEFT format),
run by a training loop of our own rather than TRL's SFTTrainer, because:
- resume must give the *same* adapter as an uninterrupted run: we checkpoint adapter, optimizer and
  scheduler state at step boundaries only (Ctrl-C finishes the step it lands in), and the data order and
  dropout masks are pure functions of (seed, step), so resuming is exact;
- the loss is normalised by the labelled tokens of a whole optimizer step (prompt and padding are -100),
  whatever the micro-batching, and batches are grouped by length so CPU time is not spent on padding;
- measuring "before" on a 4-bit base before training silently zeroes LoRA gradients on AVX512-BF16 CPUs
  (see DEVELOPERS.md). We never run the base before training: "before" is measured afterwards with the
  adapter disabled (`disable_adapter()`), on exactly the weights the adapter was trained against.
bench/train_throughput.py compares this loop with a plain PEFT+TRL script on the same data.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from .adapter import ADAPTER_META, ADAPTER_WEIGHTS, name_base_on_hub
from .atomic import atomic_dir, write_json
from .checkpoint import load_state, save_state
from .config import accepts_old_names, current_names, to_dict
from .dataset import Example, column_map, data_file, load_examples, split
from .errors import EdgeftError, first_line
from .gates import Gate, check, parse_gates
from .heldout import HeldOutOptions
from .inputs import read_json
from .ledger import artifact
from .models import DEFAULT_BASE, fingerprint, hub_id, load_model, load_tokenizer, resolve_model
from .progress import bar, console
from .reuse import KEY, measurement_key, torch_weights
from .run import ADAPTER_DIR, CHECKPOINTS, TOKENS_FILE, TRAIN, TRAIN_CONFIG, Run, default_run_dir
from .scoring import Comparison, measure
from .trainlog import TrainLog, check_report_to

ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")

# The config keys that must be equal for a resumed run to continue the same training.
_RESUME_KEYS = ("model", "data", "eval_data", "eval_split", "base_quant", "method", "lora_r", "lora_alpha", "lora_dropout",
                "target_modules", "max_seq_len", "batch_size", "grad_accum", "lr", "warmup_ratio", "weight_decay",
                "epochs", "max_steps", "seed", "gradient_checkpointing", "packing", "attn", "columns", "shard")


@accepts_old_names
@dataclass
class TrainConfig(HeldOutOptions):
    # One vocabulary across commands (README "Flags"): the old spellings work for one release, with a note.
    ALIASES: ClassVar[dict[str, str]] = {"base": "model", "quant": "base_quant"}

    data: str = field(default="", metadata={
        "help": "training data: JSONL, .json, .csv or .parquet ('demo' or 'dates' = a shipped task's set)"})
    model: str = field(default=DEFAULT_BASE, metadata={"help": "base model: name, HF folder or hub id"})
    run: str = field(default="", metadata={"help": "run folder (default: runs/train-TIMESTAMP)"})
    eval_data: str = field(default="", metadata={"help": "held-out task file, as --data (else split from --data)"})
    columns: dict[str, str] = field(default_factory=dict, metadata={
        "metavar": "FIELD=COLUMN,...",
        "help": "the data's own column names for edgeft's fields, e.g. prompt=question,completion=answer (config file: "
                "columns: {prompt: question, completion: answer})"})
    eval_split: float = field(default=0.1, metadata={"help": "fraction of --data held out for task eval"})
    base_quant: str = field(default="auto", metadata={
        "help": "the base while training: auto|4bit|8bit|none (auto: 4bit NF4 on CUDA, none on CPU)"})
    method: str = field(default="lora", metadata={
        "help": "lora|rslora|dora|ia3 (peft's; rslora scales by alpha/sqrt(r); ia3 learns scales on k, v and the MLP "
                "down projection)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: list[str] = field(default_factory=list, metadata={
        "help": "comma-separated module names (default: every attention and MLP projection)"})
    max_seq_len: int = field(default=1024, metadata={"help": "longer rows are truncated (or refused with --strict)"})
    strict: bool = field(default=False, metadata={"help": "refuse rows longer than --max-seq-len"})
    batch_size: int = field(default=8, metadata={"help": "rows per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=0.0, metadata={
        "help": "peak learning rate (0: the method's: 2e-4 for lora, rslora and dora, 3e-3 for ia3)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "fraction of steps of linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    epochs: int = field(default=1, metadata={"help": "passes over the data (when --max-steps is 0)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (0: from --epochs)"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (0: only on Ctrl-C)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from the run's last checkpoint"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order and dropout"})
    gradient_checkpointing: str = field(default="auto", metadata={
        "help": "auto|on|off (auto: on; off trades ~1.7x the activation memory for ~10% speed on CPU)"})
    packing: str = field(default="auto", metadata={
        "help": "auto|on|off: each micro-batch as one row without padding, attention kept inside each example"})
    attn: str = field(default="auto", metadata={
        "help": "attention implementation: auto|sdpa|eager|flash_attention_2|flex_attention"})
    compile: bool = field(default=False, metadata={"help": "torch.compile each decoder layer (slow first steps)"})
    shard: bool = field(default=False, metadata={
        "help": "split the 16-bit base and the adapter across the launched processes (FSDP2) instead of a whole "
                "copy in each: for a base that does not fit one device"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    max_ppl_rise: str = field(default="0.1", metadata={
        "help": "forgetting gate: max held-out perplexity rise of the adapter vs the base, as in export: one "
                "number ('0.1') or per artifact ('adapter=0.1')"})
    eval_generate: int = field(default=20, metadata={"help": "held-out prompts answered greedily for exact match"})
    report_to: list[str] = field(default_factory=list, metadata={
        "help": "also log the training metrics to: tensorboard (RUN/tensorboard/) or none; RUN/train_log.csv is "
                "always written"})
    log_every: int = field(default=0, metadata={
        "help": "when stderr is not a terminal, a progress line every N steps (0: about ten per run, and at least "
                "every 30 s)"})


@dataclass
class TrainResult:
    run: Path
    adapter: Path
    entry: dict | None  # None in the other processes of a data-parallel run


class TrainingInterrupted(EdgeftError):
    exit_code = 130


def data_path(c: TrainConfig) -> Path:
    return data_file(c.data)


def split_examples(c: TrainConfig, tokenizer) -> tuple[list[Example], list[Example], int]:
    """(training examples, held-out task examples, rows truncated): --eval-data, else a seeded split."""
    examples, truncated = load_examples(data_path(c), tokenizer, c.max_seq_len, c.strict, c.columns)
    if c.eval_data:
        return examples, load_examples(c.eval_data, tokenizer, c.max_seq_len, c.strict, c.columns)[0], truncated
    return (*split(examples, c.eval_split, c.seed), truncated)


def read_train_config(run_dir: Path) -> TrainConfig | None:
    """How the run's adapter was trained (RUN/train_config.json), or None for a run without training."""
    import dataclasses

    from .config import load_config

    path = Path(run_dir) / TRAIN_CONFIG
    if not path.is_file():
        return None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = current_names(TrainConfig, read_json(path, "it records how the run was trained; restore it or train again"))
    try:
        return load_config(TrainConfig, None, {k: v for k, v in saved.items() if k in known})
    except EdgeftError as e:
        raise EdgeftError(f"{path}: {e}") from None


def _validate(c: TrainConfig) -> None:
    if not c.data:
        raise EdgeftError("--data is required: a JSONL, JSON, CSV or Parquet file of chat (messages, ShareGPT), "
                          "Alpaca, prompt/completion or text rows (or 'demo' or 'dates' for a shipped task's set)")
    c.columns = column_map(c.columns)  # --columns arrives as text; the config and the ledger keep the mapping
    if c.base_quant not in ("auto", "4bit", "8bit", "none"):
        raise EdgeftError(f"--base-quant {c.base_quant}: use auto, 4bit, 8bit or none")
    rise_limit(c)
    check_report_to(c.report_to)
    if c.log_every < 0:
        raise EdgeftError(f"--log-every {c.log_every}: must be >= 0")
    for name in ("gradient_checkpointing", "packing"):
        if getattr(c, name) not in ("auto", "on", "off"):
            raise EdgeftError(f"--{name.replace('_', '-')} {getattr(c, name)}: use auto, on or off")
    if c.attn not in ATTENTION:
        raise EdgeftError(f"--attn {c.attn}: use one of {', '.join(ATTENTION)}")
    check_method(c.method)
    for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_seq_len", "epochs"):
        if getattr(c, name) < 1:
            raise EdgeftError(f"--{name.replace('_', '-')} {getattr(c, name)}: must be at least 1")
    if c.max_steps < 0 or c.save_every < 0 or c.lr < 0 or not 0 <= c.lora_dropout < 1:
        raise EdgeftError("--max-steps and --save-every must be >= 0, --lr > 0 (or 0 for the method's), "
                          "--lora-dropout in [0, 1)")
    c.lr = c.lr or METHOD_LR[c.method]  # the ledger and a resumed run see the rate that was used
    c.check_heldout()


def rise_limit(c: TrainConfig) -> float:
    """--max-ppl-rise in the syntax every gate flag shares (gates.parse_gates); train makes one artifact."""
    return parse_gates(c.max_ppl_rise, {"adapter": 0.10}, ["adapter"])["adapter"]


# ------------------------------------------------------------------------------------------ the model
def find_projections(model) -> list[str]:
    """Leaf names of the Linear layers LoRA can target (bitsandbytes' Linear4bit/8bitLt subclass Linear);
    the output head is left out."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name and not name.endswith("lm_head")}
    return sorted(names)


def _resolve_targets(model, wanted: list[str]) -> list[str]:
    valid = find_projections(model)
    if not wanted:
        return valid
    bad = [w for w in wanted if w not in valid]
    if bad:
        raise EdgeftError(f"--target-modules: {', '.join(bad)} not found in the model; valid names: {', '.join(valid)}")
    return list(wanted)


def hardware(c: TrainConfig, acc=None) -> dict:
    import torch

    cuda = torch.cuda.is_available() if acc is None else acc.device.type == "cuda"
    # auto: QLoRA on CUDA, unless the base is sharded (FSDP splits 16-bit weights; each process would hold the
    # whole 4-bit base anyway)
    quant = c.base_quant if c.base_quant != "auto" else ("4bit" if cuda and not c.shard else "none")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    # On by default: measured on the demo set (bench/train_throughput.py), it costs ~10% of the speed and
    # saves ~40% of peak RSS on CPU, and GPU memory is what limits batch size there.
    ckpt = c.gradient_checkpointing != "off"
    return {"device": "cuda" if cuda else "cpu", "quant": quant, "compute_dtype": "bfloat16" if bf16 else "float32",
            "gradient_checkpointing": ckpt, "packing": c.packing != "off", "attn": c.attn, "compile": c.compile,
            "shard": c.shard,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "device_index": (acc.local_process_index if acc is not None else 0) if cuda else None}


# IA³'s targets as its paper and peft's defaults have them: the keys and values (Phi-3's fused qkv) and the MLP's
# down projection, which IA³ scales on its input side (a "feedforward" module).
IA3_TARGETS = ("k_proj", "v_proj", "qkv_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)
# Each method's default learning rate: LoRA's usual 2e-4 for the LoRA family (rsLoRA's and DoRA's papers keep
# LoRA's settings); IA³ learns a scale per channel starting from 1 and is trained at 3e-3 in its paper (T-Few).
METHOD_LR = {"lora": 2e-4, "rslora": 2e-4, "dora": 2e-4, "ia3": 3e-3}
NOT_DEPLOYABLE = {"prompt": "prompt tuning", "prefix": "prefix tuning", "p_tuning": "p-tuning"}


def check_method(method: str) -> str:
    from .adapter import METHODS

    if method in NOT_DEPLOYABLE:
        raise EdgeftError(f"--method {method}: {NOT_DEPLOYABLE[method]} adds virtual tokens that no GGUF or ONNX runtime "
                          f"carries, so it cannot reach a board; use lora, rslora, dora or ia3")
    if method not in METHODS:
        raise EdgeftError(f"--method {method}: unknown; use {', '.join(METHODS)}")
    return method


def method_targets(method: str, projections: list[str]) -> list[str]:
    """The default targets of a method: every projection for the LoRA family, IA3_TARGETS for IA³."""
    return [p for p in projections if p in IA3_TARGETS] if method == "ia3" else []


def peft_config(c: TrainConfig, targets: list[str]):
    from peft import IA3Config, LoraConfig

    if c.method == "ia3":
        return IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if t in IA3_FEEDFORWARD],
                         task_type="CAUSAL_LM")
    # DoRA and rsLoRA are LoRA with one switch each, with LoRA's defaults (as their papers compare them).
    return LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM", use_dora=c.method == "dora", use_rslora=c.method == "rslora")


def build_model(base_path: Path, c: TrainConfig, hw: dict):
    """The base (quantized or not) with a fresh LoRA adapter on it, ready to train."""
    import torch
    from peft import get_peft_model
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, hw["compute_dtype"])
    kwargs = {}
    if hw["quant"] == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=dtype)
    elif hw["quant"] == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if hw["device"] == "cuda" and not hw["shard"]:
        # This process's GPU under data parallelism. Sharded, the base is read into CPU memory and fully_shard
        # moves each process's shard to its GPU: the whole base never has to fit one.
        kwargs["device_map"] = {"": hw["device_index"]}
    if hw["attn"] != "auto":
        kwargs["attn_implementation"] = hw["attn"]
    model = load_model(base_path, hw["compute_dtype"], **kwargs)
    targets = _resolve_targets(model, c.target_modules or method_targets(c.method, find_projections(model)))
    # Not peft's prepare_model_for_kbit_training: it casts every weight that is not quantized to float32
    # (Llama 3.2 1B's embedding alone becomes 1 GB). bf16 autocast in the loop gives the stability it is
    # for; the norms already compute in float32 inside.
    model.requires_grad_(False)
    if hw["gradient_checkpointing"]:
        if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers 5 name; the old warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    torch.manual_seed(c.seed)  # LoRA A init
    model = get_peft_model(model, peft_config(c, targets))
    if hw["compile"]:
        # Regional compilation: the decoder layers are identical, so one compiled graph serves them all and
        # compiling takes seconds, where the whole model would take minutes and break on the loss code.
        for module in decoder_layers(model):
            module.compile(dynamic=True)
    return model, targets


def decoder_layers(model) -> list:
    """The model's repeated blocks (transformers names their classes in _no_split_modules)."""
    layer_types = set(getattr(model.get_base_model(), "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in layer_types]


def shard(model, acc) -> None:
    """FSDP2 (torch's fully_shard) over the launched processes: each decoder layer is one unit, gathered for its
    forward and backward and split again after; the HF model itself is the outer unit, so that generate (which
    calls it, not peft's wrapper) gathers the embeddings and the head too. Gradients are averaged across the
    processes as DDP averages them, so the loop's scaling stays the same."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    for module in decoder_layers(model):
        fully_shard(module, mesh=mesh)
    fully_shard(model.get_base_model(), mesh=mesh)


def _full_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """A sharded model's trainable weights by parameter name, whole (the frozen base is not gathered), and the
    optimizer's state, whole on the main process. Every process must call it: gathering is collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = {name: p.full_tensor().cpu() for name, p in model.named_parameters() if p.requires_grad}
    if optimizer is None:
        return weights, None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


# --------------------------------------------------------------------------------------------- the data
def batch_plan(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of example indices for one epoch: shuffled by (seed, epoch), then grouped by length
    within mega-batches of 16 batches so that little compute goes to padding, then the batches shuffled."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    mega = batch_size * 16
    batches = []
    for i in range(0, len(order), mega):
        group = sorted(order[i:i + mega], key=lambda j: len(examples[j].input_ids), reverse=True)
        batches += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


# ------------------------------------------------------------------------------------------ checkpoints
def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if p.is_dir())


def _save_checkpoint(run_dir: Path, step: int, adapter: dict, optimizer: dict, scheduler, state: dict,
                     keep: int) -> None:
    """Adapter, optimizer and schedule: all a resumed run needs, since the data order and the dropout
    masks are functions of (seed, step, rank) (see step_seed). Written by the main process only: under data
    parallelism every rank holds the same adapter and optimizer state; sharded, the main process holds them
    gathered (_full_state, keyed by parameter name). Tensors go to safetensors and the rest to JSON
    (edgeft.checkpoint): loading a checkpoint can never run code."""
    save_state(run_dir / CHECKPOINTS / f"step-{step:06d}", {
        "step": step, "adapter": adapter, "optimizer": optimizer, "scheduler": scheduler.state_dict(), **state})
    for old in _checkpoints(run_dir)[:-max(keep, 1)]:
        shutil.rmtree(old)


def _load_checkpoint(path: Path, model, optimizer, scheduler, sharded: bool) -> dict:
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    blob = load_state(path)
    fix = "it is not from this training; resume from another checkpoint or start without --resume"
    kinds = {"step": int, "adapter": dict, "optimizer": dict, "scheduler": dict, "curve": list, "seen_tokens": int,
             "train_seconds": (int, float)}
    bad = [k for k, kind in kinds.items() if not isinstance(blob.get(k), kind)]
    if bad:
        raise EdgeftError(f"{path}: {', '.join(bad)} missing or of the wrong kind; {fix}")
    adapter = blob["adapter"]
    tensors = all(isinstance(v, torch.Tensor) for v in adapter.values())
    names = {n for n, p in model.named_parameters() if p.requires_grad} if sharded else get_peft_model_state_dict(model)
    if set(adapter) != set(names) or not tensors:
        raise EdgeftError(f"{path}: its adapter tensors do not match the model's LoRA modules; {fix}")
    try:
        if sharded:  # every process reads the whole state and keeps its own shard of it
            whole = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(model, adapter, options=whole)
            set_optimizer_state_dict(model, optimizer, blob["optimizer"], options=whole)
        else:
            set_peft_model_state_dict(model, adapter)
            optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise EdgeftError(f"{path}: cannot restore the training state ({first_line(e)}); {fix}") from None
    return blob


def _check_resumable(run: Run, c: TrainConfig, world_size: int) -> Path:
    found = _checkpoints(run.path)
    if not found:
        pickled = sorted((run.path / CHECKPOINTS).glob("step-*.pt"))
        if pickled:
            raise EdgeftError(f"--resume: {pickled[-1]} is an old pickle checkpoint, which runs code when loaded; "
                              f"edgeft no longer reads them: start without --resume")
        raise EdgeftError(f"--resume: no checkpoint in {run.path / CHECKPOINTS}; start without --resume")
    saved = run.path / TRAIN_CONFIG
    if saved.is_file():
        before = current_names(TrainConfig, read_json(saved, "delete it to resume without the settings check, or "
                                                             "use a new --run"))
        now = {**to_dict(c), "world_size": world_size}
        # What a run saved before a setting existed is that setting's default.
        unsaved = {"world_size": 1, "columns": {}, "shard": False}
        changed = [k for k in (*_RESUME_KEYS, "world_size") if before.get(k, unsaved.get(k)) != now.get(k)]
        if changed:
            raise EdgeftError(f"--resume: {', '.join(changed)} differ from the interrupted run "
                              f"({saved}); resume with the same settings or use a new --run")
    return found[-1]


class StopAtStepBoundary:
    """Ctrl-C during training: the first asks the loop to stop after the optimizer step it is in (the loop
    saves a checkpoint there, so resuming gives exactly the adapter an uninterrupted run would); a second
    raises KeyboardInterrupt at once, saving nothing. A KeyboardInterrupt anywhere else in a step would
    leave a state that is half one step and half the next (parameters updated, schedule not yet), which a
    checkpoint must never record. Installed only in the main thread (Python delivers signals there)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        console.print("[yellow]Ctrl-C: stopping at the end of this step, where a checkpoint is saved (Ctrl-C again: "
                      "stop at once, saving nothing of this step)")

    def __enter__(self) -> "StopAtStepBoundary":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one optimizer step on one process (LoRA dropout): a pure function, so that a resumed
    run draws the same masks as an uninterrupted one without saving any RNG state."""
    return (seed * 1_000_003 + step) * 1_009 + rank


# ---------------------------------------------------------------------------------------------- train
def train(config: TrainConfig, on_step: Callable[[int, float, int], None] | None = None) -> TrainResult:
    """Fine-tune a LoRA adapter on `config.data`, write it to RUN/adapter and a ledger entry.

    Data-parallel when started by a launcher (`accelerate launch --num_processes N -m edgeft train ...`,
    `torchrun`): `batch_size` rows per process, so a step trains on batch_size x processes x grad_accum
    rows; the main process alone writes the adapter, checkpoints and the ledger, and evaluates.

    `on_step(step, loss, tokens)` is called after every optimizer step, `tokens` counting every token
    trained on so far by all processes (logging hooks, benchmarks, tests)."""
    import torch
    from accelerate import Accelerator

    from .batches import SummedLoss, collate, pack
    from .task import build_task_set, score_torch, store_task_set

    c = config
    _validate(c)
    c = c.checked("eval_generate")
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if acc.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        # Sharding is edgeft's own --shard (FSDP2), whose gathering, saving and evaluation the loop knows about.
        raise EdgeftError(f"edgeft train shards with --shard, not through accelerate's {acc.distributed_type.value} "
                          f"settings; launch plain processes (accelerate launch --multi_gpu --num_processes N -m "
                          f"edgeft train ... --shard)")
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    if c.shard and world == 1:
        raise EdgeftError("--shard splits the model across processes, and this is one; launch several (accelerate "
                          "launch --multi_gpu --num_processes N -m edgeft train ... --shard) or drop --shard")
    if c.shard and (c.base_quant in ("4bit", "8bit") or c.compile):
        raise EdgeftError(f"--shard splits a 16-bit base; it does not combine with "
                          f"{'--compile' if c.compile else '--base-quant ' + c.base_quant} (drop one of them)")
    base_path = resolve_model(c.model, what="--model")
    tokenizer = load_tokenizer(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels mask padding, so sharing EOS costs nothing
    train_set, eval_set, truncated = split_examples(c, tokenizer)
    run = Run(c.run or default_run_dir("train"))
    resume_from = _check_resumable(run, c, world) if c.resume else None
    hw = hardware(c, acc)
    if c.threads:
        torch.set_num_threads(c.threads)
    rows_per_step = c.batch_size * world * c.grad_accum
    task = build_task_set(tokenizer, eval_set, c.eval_data or f"held-out split of {c.data} "
                                                        f"({c.eval_split:.0%}, seed {c.seed})")
    if main:
        tokens = c.heldout_tokens(tokenizer, run.path)
        if task:
            store_task_set(run.path, task)
        console.print(f"train: {len(train_set)} rows ({truncated} truncated to {c.max_seq_len} tokens), "
                      f"{len(eval_set)} held out; {hw['device']}"
                      f"{f' x {world} processes' if world > 1 else ''}, quant {hw['quant']}, compute "
                      f"{hw['compute_dtype']}, {rows_per_step} rows per step, gradient checkpointing "
                      f"{'on' if hw['gradient_checkpointing'] else 'off'}, packing {'on' if hw['packing'] else 'off'}")
        write_json(run.path / TRAIN_CONFIG, {**to_dict(c), "world_size": world})
    if c.shard:  # every process evaluates a sharded model, on the ids the main process has just stored
        acc.wait_for_everyone()
        if not main:
            tokens = c.heldout_tokens(tokenizer, run.path)

    inputs = {"base": c.model, "base_path": str(base_path), "data": str(data_path(c)),
              "rows": len(train_set) + (0 if c.eval_data else len(eval_set)),
              "train_rows": len(train_set), "eval_rows": len(eval_set), "truncated_rows": truncated,
              "eval_tokens": TOKENS_FILE, "resumed_from": resume_from.name if resume_from else None}
    # Only the main process keeps the ledger; the others fill a throwaway entry.
    ledger_step = run.record(TRAIN, to_dict(c), inputs) if main else contextlib.nullcontext(
        {"metrics": {}, "outputs": []})
    with ledger_step as entry:
        entry["metrics"]["hardware"] = hw
        torch.manual_seed(c.seed)
        model, targets = build_model(base_path, c, hw)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        device = acc.device
        if hw["shard"]:
            shard(model, acc)
            objective = SummedLoss(model)
        else:
            # The loss as a module, so that a data-parallel wrapper sees the whole forward (DDP synchronises
            # gradients only for what runs through its own forward). One process: the module itself.
            objective = acc.prepare_model(SummedLoss(model), device_placement=False)

        global_batch = c.batch_size * world
        per_epoch = math.ceil(len(train_set) / global_batch)
        steps = c.max_steps or math.ceil(c.epochs * per_epoch / c.grad_accum)
        trainable_params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable_params, lr=c.lr, weight_decay=c.weight_decay,
                                      fused=device.type == "cuda")
        if hw["compute_dtype"] == "bfloat16":  # LoRA weights stay float32 (the optimizer's master copy)
            autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
        else:
            autocast = contextlib.nullcontext
        from transformers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(c.warmup_ratio * steps), steps)
        start_step, curve, seen_tokens, train_seconds = 0, [], 0, 0.0
        if resume_from is not None:
            blob = _load_checkpoint(resume_from, model, optimizer, scheduler, hw["shard"])
            start_step, curve = blob["step"], blob["curve"]
            seen_tokens, train_seconds = blob["seen_tokens"], blob["train_seconds"]
            if main:
                console.print(f"resuming from {resume_from.name} (step {start_step}/{steps})")

        def checkpoint(at: int) -> None:
            if hw["shard"]:
                adapter, optimizer_state = _full_state(model, optimizer)  # every process takes part
            elif main:
                from peft import get_peft_model_state_dict

                adapter, optimizer_state = get_peft_model_state_dict(model), optimizer.state_dict()
            if main:
                _save_checkpoint(run.path, at, adapter, optimizer_state, scheduler,
                                 {"curve": curve, "seen_tokens": seen_tokens, "train_seconds": train_seconds,
                                  "world_size": world}, c.keep_checkpoints)

        plans: dict[int, list[list[int]]] = {}
        model.train()
        step = start_step
        saved_at = start_step
        try:
            with bar("train", steps, enabled=main, every=c.log_every or None, unit="step", start=step) as update, \
                    StopAtStepBoundary() as ctrl_c, \
                    TrainLog(run.path, start_step, c.report_to) if main else contextlib.nullcontext() as log:
                update(step, steps)
                while step < steps:
                    t0 = time.perf_counter()
                    torch.manual_seed(step_seed(c.seed, step, rank))
                    micro = []  # this step's global micro-batches: the same plan on every process
                    for k in range(c.grad_accum):
                        m = step * c.grad_accum + k  # global micro-batch index: the data order is fixed
                        epoch, pos = divmod(m, per_epoch)
                        if epoch not in plans:
                            plans[epoch] = batch_plan(train_set, global_batch, c.seed, epoch)
                        micro.append([train_set[j] for j in plans[epoch][pos]])
                    n_labels = sum(e.n_trained for b in micro for e in b)  # of the whole step, all processes
                    step_loss = torch.zeros((), device=device)
                    for k, global_rows in enumerate(micro):
                        rows = global_rows[rank::world]
                        if not rows:  # the epoch's last batch can be smaller than the number of processes
                            rows = global_rows[:1]
                            weight = 0.0
                        else:
                            weight = 1.0
                        if hw["packing"]:
                            batch = pack(rows, device)
                        else:
                            batch = collate(rows, tokenizer.pad_token_id, device)
                        sync = acc.no_sync(objective) if k < len(micro) - 1 else contextlib.nullcontext()
                        with sync:
                            with autocast():
                                loss = objective(batch) * weight
                            # DDP averages gradients over processes; scaling by their number makes the
                            # result the gradient of (all processes' summed loss) / (the step's labels).
                            acc.backward(loss * (world / n_labels))
                        step_loss += loss.detach()
                    seen_tokens += sum(len(e.input_ids) for b in micro for e in b)
                    torch.nn.utils.clip_grad_norm_(trainable_params, 1.0)
                    lr = scheduler.get_last_lr()[0]  # this step's, before the schedule moves on
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    stop = ctrl_c.requested
                    if world > 1:  # one collective per step carries the loss and whether any process stops
                        both = acc.reduce(torch.stack([step_loss, torch.tensor(float(stop), device=device)]), "sum")
                        step_loss, stop = both[0], bool(both[1] > 0)
                    curve.append(round(float(step_loss) / n_labels, 5))  # the step's one wait for the device
                    train_seconds += time.perf_counter() - t0
                    update(step, steps, f"loss {curve[-1]:.4f}  lr {lr:.2e}  {seen_tokens / train_seconds:,.0f} tok/s")
                    if log:
                        log.log(step, curve[-1], lr, seen_tokens, train_seconds)
                    if on_step:
                        on_step(step, curve[-1], seen_tokens)
                    if (stop or c.save_every and step % c.save_every == 0) and step < steps:
                        checkpoint(step)
                        saved_at = step
                    if stop and step < steps:
                        raise TrainingInterrupted(
                            f"interrupted at step {step}/{steps}; checkpoint saved in {run.path / CHECKPOINTS}; "
                            f"continue with --resume --run {run.path}")
        except KeyboardInterrupt:
            # A second Ctrl-C: it landed anywhere in a step, so this state is not saved.
            raise TrainingInterrupted(
                f"aborted during step {step + 1}/{steps} by a second Ctrl-C; nothing saved for it"
                + (f"; continue from step {saved_at} with --resume --run {run.path}" if saved_at else "")) from None
        peak_gpu = round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None
        acc.wait_for_everyone()
        adapter_dir = run.path / ADAPTER_DIR
        # Sharded, the adapter is whole only once gathered, and every forward of the evaluation needs every
        # process: they all take part, and the main process alone writes.
        whole = _full_state(model)[0] if hw["shard"] else None
        if not main and not hw["shard"]:
            return TrainResult(run=run.path, adapter=adapter_dir, entry=None)

        if main:
            base_fingerprint = fingerprint(base_path)
            with atomic_dir(adapter_dir) as tmp:
                model.save_pretrained(tmp, state_dict=whole)
                tokenizer.save_pretrained(tmp)
                base_hub_id = hub_id(c.model) or hub_id(base_path)
                if base_hub_id:
                    name_base_on_hub(tmp, base_hub_id)
                write_json(tmp / ADAPTER_META, {
                    "base": c.model, "base_path": str(base_path), "base_hub_id": base_hub_id,
                    "base_fingerprint": base_fingerprint,
                    "quant": hw["quant"], "compute_dtype": hw["compute_dtype"], "device": hw["device"],
                    "method": c.method, "target_modules": targets, "lora_r": c.lora_r, "lora_alpha": c.lora_alpha,
                    "steps": steps,
                    "seed": c.seed,
                })
            entry["outputs"].append(artifact(adapter_dir, run.path))

        # After training only (see the module docstring): the adapter's effect, then the base without it.
        model.eval()
        label = f"{c.model}+adapter"
        after_ppl = measure(model, tokens.ids, c.window, c.stride, label)
        after = score_torch(model, task, tokenizer, label, c.eval_generate) if task else None
        with model.disable_adapter():
            base_label = c.model if hw["quant"] == "none" else f"{c.model} ({hw['quant']})"
            before_ppl = measure(model, tokens.ids, c.window, c.stride, base_label)
            before = score_torch(model, task, tokenizer, base_label, c.eval_generate) if task else None
        if not main:
            return TrainResult(run=run.path, adapter=adapter_dir, entry=None)
        # What "after" measured, so that a later step measuring the same (merge: the unmerged base + adapter)
        # takes these numbers from the ledger (reuse.py).
        weights = torch_weights(base_fingerprint, entry["outputs"][-1]["sha256"], hw["quant"], hw["compute_dtype"],
                                hw["device"], c.attn, c.compile)
        entry[KEY] = measurement_key(weights, tokens.ids, c.window, c.stride, task, c.eval_generate)

        forgetting = Comparison(measured=after_ppl, reference=before_ppl)
        forgetting.record(entry, label, base_label, "base", tokens.source)
        if task:
            after.record(entry, label, task.source, before.entry(base_label, task.source), "base")
        tokens_per_s = round(seen_tokens / train_seconds, 1) if train_seconds else None
        entry["metrics"].update({
            "method": c.method, "target_modules": targets, "trainable_params": trainable, "total_params": total,
            # the weights alone (the adapter folder also holds the tokenizer)
            "adapter_bytes": (adapter_dir / ADAPTER_WEIGHTS).stat().st_size,
            "trainable_pct": round(100 * trainable / total, 3), "steps": steps,
            "train_loss_first": curve[0] if curve else None, "train_loss_last": curve[-1] if curve else None,
            "loss_curve": curve, "eval_loss_before": before.loss if task else None,
            "eval_loss_after": after.loss if task else None,
            "exact_match_before": before.exact_match if task else None,
            "exact_match_after": after.exact_match if task else None,
            "exact_match_n": after.answered if task else 0,
            "exact_match_samples": after.samples if task else [],
            "world_size": world, "rows_per_step": rows_per_step,
            "train_tokens": seen_tokens, "train_seconds": round(train_seconds, 2),
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": round(tokens_per_s / world, 1) if tokens_per_s else None,
            "peak_gpu_mb_training": peak_gpu,  # main process, before the evaluation; peak_gpu_mb: whole step
        })
        rise = forgetting.change
        limit = rise_limit(c)
        check(entry, Gate("held-out perplexity rise", rise, limit,
                          f"held-out perplexity rose {100 * rise:.1f}% ({before_ppl.ppl:.4f} -> {after_ppl.ppl:.4f}), "
                          f"more than --max-ppl-rise {100 * limit:.0f}%; the adapter is kept in {adapter_dir}"))
    return TrainResult(run=run.path, adapter=adapter_dir, entry=entry)
