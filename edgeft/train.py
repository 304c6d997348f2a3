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
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, ClassVar

from . import methods, templates
from .adapter import ADAPTER_META, ADAPTER_WEIGHTS, name_base_on_hub
from .atomic import atomic_dir, write_json
from .checkpoint import StopAtStepBoundary, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import accepts_old_names, current_names, to_dict
from .dataset import Example, column_map, data_file, load_examples, split
from .errors import EdgeftError
from .gates import Gate, check, parse_gates
from .heldout import HeldOutOptions
from .inputs import read_json
from .ledger import artifact
from .locks import writing
from .models import DEFAULT_BASE, fingerprint, hub_id, load_model, load_tokenizer, resolve_model
from .progress import bar, console
from .reuse import KEY, measurement_key, torch_weights
from .run import ADAPTER_DIR, CHECKPOINTS, TOKENS_FILE, TRAIN, TRAIN_CONFIG, Run, default_run_dir
from .scoring import Comparison, measure
from .trainlog import TrainLog, check_report_to

ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention", "edgeft_packed_sdpa")
# Steps left out of tokens/s: the first step of a process pays for CUDA init, kernel autotuning and compilation.
WARMUP_STEPS = 1

# The config keys that must be equal for a resumed run to continue the same training.
_RESUME_KEYS = ("model", "data", "eval_data", "eval_split", "base_quant", "method", "lora_r", "lora_alpha", "lora_dropout",
                "target_modules", "max_seq_len", "batch_size", "grad_accum", "lr", "warmup_ratio", "weight_decay",
                "epochs", "max_steps", "seed", "gradient_checkpointing", "packing", "attn", "columns", "shard",
                "compute_dtype", "eval_every", "select", "chat_template")
COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Families whose activations overflow float16 (Gemma's large embedding scale and residuals, as transformers' and
# Gemma's own notes say): on a GPU without native bf16, auto trains them in float32 rather than fp16.
FP16_UNSAFE = ("gemma", "gemma2", "gemma3", "gemma3_text")


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
    eval_split: float = field(default=0.1, metadata={"range": (0, "<1"), "help": "fraction of --data held out for task eval"})
    base_quant: str = field(default="auto", metadata={
        "help": "the base while training: auto|4bit|8bit|none (auto: 4bit NF4 on CUDA, none on CPU)"})
    method: str = field(default="lora", metadata={
        "help": "PEFT method: " + "; ".join(f"{m.name} ({m.summary})" for m in map(methods.get, methods.names()))})
    lora_r: int = field(default=16, metadata={"range": (1, None), "help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"range": (1, None), "help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"range": (0, "<1"), "help": "LoRA dropout"})
    target_modules: list[str] = field(default_factory=list, metadata={
        "help": "comma-separated module names (default: every attention and MLP projection)"})
    chat_template: str = field(default="", metadata={
        "metavar": "NAME|FILE",
        "help": "a chat template for a base model without one (chatml, or a Jinja file), or to replace the base's: "
                "used to render the rows, stored with the adapter, and from there in merge, export (the GGUF's "
                "tokenizer.chat_template, the Modelfile) and chat. Without any, rows are rendered plainly"})
    max_seq_len: int = field(default=1024, metadata={"range": (1, None), "help": "longer rows are truncated (or refused with --strict)"})
    strict: bool = field(default=False, metadata={"help": "refuse rows longer than --max-seq-len"})
    batch_size: int = field(default=8, metadata={"range": (1, None), "help": "rows per micro-batch"})
    grad_accum: int = field(default=1, metadata={"range": (1, None), "help": "micro-batches per optimizer step"})
    lr: float = field(default=0.0, metadata={"range": (0, None), 
        "help": "peak learning rate (0: the method's: "
                + ", ".join(f"{m} {r:g}" for m, r in methods.lr_defaults("lr").items()) + ")"})
    warmup_ratio: float = field(default=0.05, metadata={"range": (0, "<1"), "help": "fraction of steps of linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"range": (0, None), "help": "AdamW weight decay"})
    epochs: int = field(default=1, metadata={"range": (1, None), "help": "passes over the data (when --max-steps is 0)"})
    max_steps: int = field(default=0, metadata={"range": (0, None), "help": "optimizer steps (0: from --epochs)"})
    save_every: int = field(default=50, metadata={"range": (0, None), "help": "checkpoint every N steps (0: only on Ctrl-C)"})
    keep_checkpoints: int = field(default=2, metadata={"range": (1, None), "help": "how many checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from the run's last checkpoint"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order and dropout"})
    gradient_checkpointing: str = field(default="auto", metadata={
        "help": "auto|on|off (auto: on; off trades ~1.7x the activation memory for ~10% speed on CPU)"})
    packing: str = field(default="auto", metadata={
        "help": "auto|on|off: each micro-batch as one row without padding, attention kept inside each example"})
    attn: str = field(default="auto", metadata={
        "help": "attention implementation: auto|sdpa|eager|flash_attention_2|flex_attention|edgeft_packed_sdpa (auto: "
                "with packing on a GPU, flash_attention_2 where flash-attn is installed, else sdpa per example)"})
    compute_dtype: str = field(default="auto", metadata={
        "help": "auto|bf16|fp16|fp32: the frozen base's dtype and autocast (LoRA weights stay float32). auto: bf16 "
                "on a GPU with native bf16 (compute capability >= 8.0), fp16 with loss scaling on older GPUs (fp32 "
                "for Gemma, whose activations overflow fp16), fp32 on CPU"})
    deterministic: bool = field(default=False, metadata={
        "help": "on CUDA, deterministic kernels only (torch.use_deterministic_algorithms), so that a resumed run is "
                "bit-exact there too, at some speed (CPU runs always are)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile each decoder layer (slow first steps)"})
    shard: bool = field(default=False, metadata={
        "help": "split the 16-bit base and the adapter across the launched processes (FSDP2) instead of a whole "
                "copy in each: for a base that does not fit one device"})
    threads: int = field(default=0, metadata={"range": (0, 4096), "help": "CPU threads for torch (0: torch's default)"})
    max_ppl_rise: str = field(default="0.1", metadata={
        "help": "forgetting gate: max held-out perplexity rise of the adapter vs the base, as in export: one "
                "number ('0.1') or per artifact ('adapter=0.1')"})
    eval_generate: int = field(default=20, metadata={"range": (0, None), "help": "held-out prompts answered greedily for exact match"})
    eval_every: int = field(default=0, metadata={"range": (0, None), 
        "help": "every N optimizer steps (and at the last), score the held-out text (all its ids up to 4 windows, "
                "else the first quarter) and the task's perplexity; in train_log.csv, TensorBoard and the progress "
                "line (0: only after training)"})
    select: str = field(default="last", metadata={
        "help": "last|best: the adapter the run keeps: the last step's, or (with --eval-every) the evaluated step "
                "with the lowest task perplexity among those within --max-ppl-rise; best also stops early once the "
                "gate is crossed and the task has not improved for 2 evaluations"})
    report_to: list[str] = field(default_factory=list, metadata={
        "help": "also log the training metrics to: tensorboard (RUN/tensorboard/) or none; RUN/train_log.csv is "
                "always written"})
    log_every: int = field(default=0, metadata={"range": (0, None), 
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


def training_rows(run_dir: Path, tokenizer, wanted_by: str, fix: str) -> list[list[int]]:
    """The token ids of the run's training rows: what calibrates an export on the fine-tune's own data
    (`wanted_by` names the option that asked and `fix` the way out, for the error when the run trained
    nothing)."""
    trained = read_train_config(run_dir)
    if trained is None:
        raise EdgeftError(f"{wanted_by}: {run_dir} has no train_config.json (nothing was trained in this run); "
                          f"{fix}")
    return [e.input_ids for e in load_examples(data_path(trained), tokenizer, trained.max_seq_len, False,
                                               trained.columns)[0]]


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


def resolve(config: TrainConfig) -> TrainConfig:
    """The config validated, with what train decides filled in (the column mapping parsed, the method's rate where
    --lr is 0), as a new copy: the caller's config is left as given, and nothing changes it after this."""
    c = config
    if not c.data:
        raise EdgeftError("--data is required: a JSONL, JSON, CSV or Parquet file of chat (messages, ShareGPT), "
                          "Alpaca, prompt/completion or text rows (or 'demo' or 'dates' for a shipped task's set)")
    columns = column_map(c.columns)  # --columns arrives as text; the config and the ledger keep the mapping
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
    if c.compute_dtype not in ("auto", *COMPUTE_DTYPES):
        raise EdgeftError(f"--compute-dtype {c.compute_dtype}: use auto, {', '.join(COMPUTE_DTYPES)}")
    method = methods.get(c.method)
    if c.chat_template:
        templates.load(c.chat_template)  # a bad template is refused before anything loads
    for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_seq_len", "epochs"):
        if getattr(c, name) < 1:
            raise EdgeftError(f"--{name.replace('_', '-')} {getattr(c, name)}: must be at least 1")
    if c.eval_every < 0:
        raise EdgeftError(f"--eval-every {c.eval_every}: must be >= 0 (0: evaluate only after training)")
    if c.select not in ("last", "best"):
        raise EdgeftError(f"--select {c.select}: use last or best")
    if c.select == "best" and not c.eval_every:
        raise EdgeftError("--select best chooses among the steps evaluated during training; add --eval-every N")
    if c.eval_every and c.shard:
        raise EdgeftError("--eval-every does not combine with --shard yet (a sharded evaluation needs every process); "
                          "drop one of them")
    if c.max_steps < 0 or c.save_every < 0 or c.lr < 0 or not 0 <= c.lora_dropout < 1:
        raise EdgeftError("--max-steps and --save-every must be >= 0, --lr > 0 (or 0 for the method's), "
                          "--lora-dropout in [0, 1)")
    c.check_heldout()
    # the ledger and a resumed run see the rate that was used
    return dataclasses.replace(c, columns=columns, lr=c.lr or method.lr,
                               run=c.run or str(default_run_dir("train"))).checked("eval_generate")


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


def compute_dtype(choice: str, device: str, capability: tuple[int, int] | None, model_type: str) -> tuple[str, str]:
    """(torch dtype name, why) for --compute-dtype. bf16 only where the GPU has it natively: torch's
    is_bf16_supported() also says yes for emulated bf16 (T4, V100), which is slow or fails there."""
    if choice != "auto":
        dtype = COMPUTE_DTYPES[choice]
        if dtype == "bfloat16" and device == "cuda" and capability and capability < (8, 0):
            raise EdgeftError(f"--compute-dtype bf16: this GPU (compute capability {capability[0]}.{capability[1]}) "
                              f"has no native bf16; use fp16 or fp32 (or auto)")
        return dtype, "--compute-dtype " + choice
    if device != "cuda":
        return "float32", "auto: CPU"
    if capability and capability >= (8, 0):
        return "bfloat16", f"auto: native bf16 (compute capability {capability[0]}.{capability[1]})"
    if model_type in FP16_UNSAFE:
        return "float32", f"auto: no native bf16 on this GPU, and {model_type} overflows fp16"
    return "float16", "auto: no native bf16 on this GPU; fp16 with loss scaling"


def hardware(c: TrainConfig, acc=None, model_type: str = "", softcapped: bool = False) -> dict:
    import torch

    from .packed_attention import choose

    cuda = torch.cuda.is_available() if acc is None else acc.device.type == "cuda"
    index = (acc.local_process_index if acc is not None else 0) if cuda else None
    # auto: QLoRA on CUDA, unless the base is sharded (FSDP splits 16-bit weights; each process would hold the
    # whole 4-bit base anyway)
    quant = c.base_quant if c.base_quant != "auto" else ("4bit" if cuda and not c.shard else "none")
    capability = torch.cuda.get_device_capability(index) if cuda else None
    dtype, why = compute_dtype(c.compute_dtype, "cuda" if cuda else "cpu", capability, model_type)
    packing = c.packing != "off"
    attn, packing_attention = choose(c.attn, packing, "cuda" if cuda else "cpu", capability, dtype, softcapped)
    # On by default: measured on the demo set (bench/train_throughput.py), it costs ~10% of the speed and
    # saves ~40% of peak RSS on CPU, and GPU memory is what limits batch size there.
    ckpt = c.gradient_checkpointing != "off"
    return {"device": "cuda" if cuda else "cpu", "quant": quant, "compute_dtype": dtype, "compute_dtype_why": why,
            "loss_scaling": dtype == "float16", "gradient_checkpointing": ckpt, "packing": packing, "attn": attn,
            "packing_attention": packing_attention, "compile": c.compile, "shard": c.shard,
            "deterministic": bool(c.deterministic and cuda),
            "gpu": torch.cuda.get_device_name(index) if cuda else None,
            "capability": f"{capability[0]}.{capability[1]}" if capability else None, "device_index": index}


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
        if hw["attn"] == "edgeft_packed_sdpa":
            from .packed_attention import register

            register()
        kwargs["attn_implementation"] = hw["attn"]
    model = load_model(base_path, hw["compute_dtype"], **kwargs)
    method = methods.get(c.method)
    targets = _resolve_targets(model, c.target_modules or method.default_targets(find_projections(model)))
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
    model = get_peft_model(model, method.peft_config(c, targets))
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


def _resume_point(run: Run, c: TrainConfig, world_size: int) -> Path:
    saved = run.path / TRAIN_CONFIG
    before = (current_names(TrainConfig, read_json(saved, "delete it to resume without the settings check, or use a "
                                                          "new --run")) if saved.is_file() else None)
    # What a run saved before a setting existed is that setting's default.
    unsaved = {"world_size": 1, "columns": {}, "shard": False, "compute_dtype": "auto", "eval_every": 0,
               "select": "last", "chat_template": ""}
    return latest_checkpoint(run.path, saved, before, {**to_dict(c), "world_size": world_size},
                             (*_RESUME_KEYS, "world_size"), unsaved)


def deterministic_cuda() -> None:
    """Deterministic CUDA kernels: cuBLAS needs a fixed workspace for it, set before its first use; torch then
    raises on an op that has no deterministic kernel rather than drift silently. bitsandbytes' 4-bit kernels
    are outside torch's switch (README: what is bit-exact on a GPU)."""
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one optimizer step on one process (LoRA dropout): a pure function, so that a resumed
    run draws the same masks as an uninterrupted one without saving any RNG state."""
    return (seed * 1_000_003 + step) * 1_009 + rank


# ---------------------------------------------------------------------------------------------- train
@dataclass
class Setup:
    """What training needs before the model exists: the processes, the base and its tokenizer, the data split,
    the run folder, the hardware settings, the held-out ids and task set."""
    c: TrainConfig
    acc: object  # accelerate.Accelerator
    base_path: Path
    tokenizer: object
    train_set: list[Example]
    eval_set: list[Example]
    truncated: int
    run: Run
    resume_from: Path | None
    hw: dict
    task: object  # task.TaskSet or None
    tokens: object  # heldout.HeldOutTokens; None in the processes that do not evaluate

    @cached_property
    def fingerprint(self) -> dict:  # hashes every weight file: once
        return fingerprint(self.base_path)

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def main(self) -> bool:
        return self.acc.is_main_process


@dataclass
class Trainer:
    """The model being trained and what updates it."""
    model: object
    targets: list[str]
    objective: object  # SummedLoss, wrapped for data parallelism
    optimizer: object
    scheduler: object
    scaler: object  # torch.amp.GradScaler, enabled for fp16 compute
    params: list  # the trainable parameters (clipped each step)
    steps: int
    per_epoch: int  # global batches per epoch
    trainable: int
    total: int


@dataclass
class Progress:
    """What the loop has done so far; a checkpoint holds it, so a resumed run carries on from it."""
    step: int = 0
    curve: list[float] = field(default_factory=list)
    seen_tokens: int = 0
    train_seconds: float = 0.0
    # tokens/s as recorded: the steps after each process start's warm-up (WARMUP_STEPS), summed over resumes
    timed: dict = field(default_factory=lambda: {"tokens": 0, "seconds": 0.0, "warmup_steps": 0})
    started_at: int = 0  # the step this process started from
    # --eval-every: the evaluations so far, the base's quick perplexity, and for --select best the best step
    evals: list[dict] = field(default_factory=list)
    base_quick_ppl: float | None = None
    best: dict | None = None
    best_adapter: dict | None = None
    stopped_early_at: int | None = None


def train(config: TrainConfig, on_step: Callable[[int, float, int], None] | None = None) -> TrainResult:
    """Fine-tune an adapter on `config.data`, write it to RUN/adapter and a ledger entry: setup -> train -> save ->
    evaluate, each a function below.

    Data-parallel when started by a launcher (`accelerate launch --num_processes N -m edgeft train ...`,
    `torchrun`): `batch_size` rows per process, so a step trains on batch_size x processes x grad_accum
    rows; the main process alone writes the adapter, checkpoints and the ledger, and evaluates (sharded, every
    process takes part in the evaluation and the main one writes).

    `on_step(step, loss, tokens)` is called after every optimizer step, `tokens` counting every token
    trained on so far by all processes (logging hooks, benchmarks, tests)."""
    c = resolve(config)
    with contextlib.ExitStack() as held:
        return recipe(c, setup(c, held), on_step)


def recipe(c: TrainConfig, s: Setup, on_step) -> TrainResult:
    # Only the main process keeps the ledger; the others fill a throwaway entry.
    ledger = s.run.record(TRAIN, to_dict(c), ledger_inputs(s)) if s.main else contextlib.nullcontext(
        {"metrics": {}, "outputs": []})
    adapter_dir = s.run.path / ADAPTER_DIR
    with ledger as entry:
        entry["metrics"]["hardware"] = s.hw
        t, p = prepare(s)
        train_steps(s, t, p, on_step)
        peak_gpu = training_peak_gpu(s)
        selected = keep_selected(s, t, p)
        s.acc.wait_for_everyone()
        # Sharded, the adapter is whole only once gathered, and every forward of the evaluation needs every
        # process: they all take part, and the main process alone writes.
        whole = _full_state(t.model)[0] if s.hw["shard"] else None
        if not s.main and not s.hw["shard"]:
            return TrainResult(run=s.run.path, adapter=adapter_dir, entry=None)
        if s.main:
            entry["outputs"].append(save_adapter(s, t, whole, adapter_dir))
        evaluated = evaluate(s, t)
        if not s.main:
            return TrainResult(run=s.run.path, adapter=adapter_dir, entry=None)
        record(s, t, p, entry, evaluated, peak_gpu, adapter_dir, selected)
        gate(c, entry, evaluated["forgetting"], adapter_dir)
    return TrainResult(run=s.run.path, adapter=adapter_dir, entry=entry)


# ---------------------------------------------------------------------------------------------- setup
def setup(c: TrainConfig, held: contextlib.ExitStack) -> Setup:
    """Everything before the model; `held` keeps the run's adapter lock until training ends."""
    import torch
    from accelerate import Accelerator

    from .task import build_task_set, store_task_set

    acc = Accelerator(cpu=not torch.cuda.is_available())
    check_processes(c, acc)
    base_path = resolve_model(c.model, what="--model")
    tokenizer = load_tokenizer(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels mask padding, so sharing EOS costs nothing
    if c.chat_template:  # saved with the adapter's tokenizer: merge, export and chat take it from there
        tokenizer.chat_template = templates.load(c.chat_template)
    train_set, eval_set, truncated = split_examples(c, tokenizer)
    if acc.is_main_process:  # one train at a time writes a run's adapter, checkpoints, logs and train_config.json
        held.enter_context(writing(Path(c.run), ADAPTER_DIR, "train"))
    run = Run(c.run)
    resume_from = _resume_point(run, c, acc.num_processes) if c.resume else None
    config_json = read_json(base_path / "config.json", "the model folder needs its config.json")
    text_config = config_json.get("text_config") or config_json
    hw = hardware(c, acc, str(config_json.get("model_type", "")),
                  softcapped=text_config.get("attn_logit_softcapping") is not None)
    if hw["compute_dtype"] == "float16" and c.shard:
        raise EdgeftError("--shard does not combine with fp16 compute (its loss scaling is not sharded); use "
                          "--compute-dtype fp32 (or bf16 on a GPU that has it)")
    if hw["deterministic"]:
        deterministic_cuda()
    if c.eval_every and hw["quant"] == "4bit" and hw["device"] == "cpu":
        # the measured pitfall (module docstring): a forward on the 4-bit base on CPU, then training, can leave
        # LoRA-B gradients at zero without a word
        raise EdgeftError("--eval-every on a 4-bit base runs on CUDA only (on CPU an evaluation between steps can "
                          "silently stop LoRA-B from learning); drop --eval-every or train with --base-quant none")
    if c.threads:
        torch.set_num_threads(c.threads)
    task = build_task_set(tokenizer, eval_set, c.eval_data or f"held-out split of {c.data} "
                                                        f"({c.eval_split:.0%}, seed {c.seed})")
    s = Setup(c, acc, base_path, tokenizer, train_set, eval_set, truncated, run, resume_from, hw, task, None)
    if s.main:
        s.tokens = c.heldout_tokens(tokenizer, run.path)
        if task:
            store_task_set(run.path, task)
        console.print(start_line(s))
        write_json(run.path / TRAIN_CONFIG, {**to_dict(c), "world_size": s.world})
    if c.shard:  # every process evaluates a sharded model, on the ids the main process has just stored
        acc.wait_for_everyone()
        if not s.main:
            s.tokens = c.heldout_tokens(tokenizer, run.path)
    return s


def check_processes(c: TrainConfig, acc) -> None:
    if acc.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        # Sharding is edgeft's own --shard (FSDP2), whose gathering, saving and evaluation the loop knows about.
        raise EdgeftError(f"edgeft train shards with --shard, not through accelerate's {acc.distributed_type.value} "
                          f"settings; launch plain processes (accelerate launch --multi_gpu --num_processes N -m "
                          f"edgeft train ... --shard)")
    if c.shard and acc.num_processes == 1:
        raise EdgeftError("--shard splits the model across processes, and this is one; launch several (accelerate "
                          "launch --multi_gpu --num_processes N -m edgeft train ... --shard) or drop --shard")
    if c.shard and (c.base_quant in ("4bit", "8bit") or c.compile):
        raise EdgeftError(f"--shard splits a 16-bit base; it does not combine with "
                          f"{'--compile' if c.compile else '--base-quant ' + c.base_quant} (drop one of them)")


def start_line(s: Setup) -> str:
    c, hw = s.c, s.hw
    return (f"train: {len(s.train_set)} rows ({s.truncated} truncated to {c.max_seq_len} tokens), "
            f"{len(s.eval_set)} held out; {hw['device']}{f' x {s.world} processes' if s.world > 1 else ''}, quant "
            f"{hw['quant']}, compute {hw['compute_dtype']} ({hw['compute_dtype_why']}), "
            f"{c.batch_size * s.world * c.grad_accum} rows per step, gradient checkpointing "
            f"{'on' if hw['gradient_checkpointing'] else 'off'}, packing "
            f"{hw['packing_attention'] if hw['packing'] else 'off'}")


def ledger_inputs(s: Setup) -> dict:
    c = s.c
    return {"base": c.model, "base_path": str(s.base_path), "data": str(data_path(c)),
            "rows": len(s.train_set) + (0 if c.eval_data else len(s.eval_set)),
            "train_rows": len(s.train_set), "eval_rows": len(s.eval_set), "truncated_rows": s.truncated,
            "eval_tokens": TOKENS_FILE, "resumed_from": s.resume_from.name if s.resume_from else None}


def prepare(s: Setup) -> tuple[Trainer, Progress]:
    """The model with its adapter, the optimizer, schedule and loss scale, restored from a checkpoint on --resume."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from .batches import SummedLoss

    c, hw = s.c, s.hw
    torch.manual_seed(c.seed)
    model, targets = build_model(s.base_path, c, hw)
    # peft's own count: a 4-bit Params4bit holds two weights per stored byte, which numel() does not see
    trainable, total = model.get_nb_trainable_parameters()
    if hw["shard"]:
        shard(model, s.acc)
        objective = SummedLoss(model)
    else:
        # The loss as a module, so that a data-parallel wrapper sees the whole forward (DDP synchronises
        # gradients only for what runs through its own forward). One process: the module itself.
        objective = s.acc.prepare_model(SummedLoss(model), device_placement=False)
    per_epoch = math.ceil(len(s.train_set) / (c.batch_size * s.world))
    steps = c.max_steps or math.ceil(c.epochs * per_epoch / c.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay, fused=s.acc.device.type == "cuda")
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(c.warmup_ratio * steps), steps)
    # fp16 gradients underflow without loss scaling; the scale is part of a checkpoint (a resumed run scales
    # as the uninterrupted one would)
    scaler = torch.amp.GradScaler(s.acc.device.type, enabled=hw["loss_scaling"])
    t = Trainer(model, targets, objective, optimizer, scheduler, scaler, params, steps, per_epoch, trainable, total)
    p = Progress()
    if s.resume_from is not None:
        blob = load_checkpoint(s.resume_from, model, optimizer, scheduler, hw["shard"])
        p = Progress(blob["step"], blob["curve"], blob["seen_tokens"], blob["train_seconds"],
                     {**p.timed, **(blob.get("timed") or {})}, blob["step"], blob.get("evals") or [],
                     blob.get("base_quick_ppl"), blob.get("best"), blob.get("best_adapter"))
        if blob.get("scaler"):
            scaler.load_state_dict(blob["scaler"])
        if s.main:
            console.print(f"resuming from {s.resume_from.name} (step {p.step}/{steps})")
    return t, p


# ---------------------------------------------------------------------------------------------- train
def train_steps(s: Setup, t: Trainer, p: Progress, on_step) -> None:
    """Optimizer steps until t.steps, a checkpoint every --save-every steps; Ctrl-C stops at a step boundary
    with a checkpoint (checkpoint.StopAtStepBoundary)."""
    import torch

    c = s.c
    plans: dict[int, list[list[int]]] = {}
    t.model.train()
    saved_at = p.step
    if s.acc.device.type == "cuda":  # the training loop's own peak: loading and quantizing the base are not in it
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        with bar("train", t.steps, enabled=s.main, every=c.log_every or None, unit="step", start=p.step) as update, \
                StopAtStepBoundary() as ctrl_c, \
                TrainLog(s.run.path, p.step, c.report_to) if s.main else contextlib.nullcontext() as log:
            update(p.step, t.steps)
            while p.step < t.steps:
                t0 = time.perf_counter()
                loss, lr, step_tokens, stop = one_step(s, t, p.step, plans, ctrl_c)
                p.step += 1
                p.seen_tokens += step_tokens
                p.curve.append(loss)
                seconds = time.perf_counter() - t0
                p.train_seconds += seconds
                if p.step - p.started_at > WARMUP_STEPS:
                    p.timed["tokens"] += step_tokens
                    p.timed["seconds"] += seconds
                else:
                    p.timed["warmup_steps"] += 1
                looked = look(s, t, p) if c.eval_every and (p.step % c.eval_every == 0 or p.step == t.steps) else None
                update(p.step, t.steps, f"loss {loss:.4f}  lr {lr:.2e}  {p.seen_tokens / p.train_seconds:,.0f} tok/s"
                       + (f"  {looked['text']}" if looked and looked["text"] else ""))
                if log:
                    log.log(p.step, loss, lr, p.seen_tokens, p.train_seconds, looked and looked["row"])
                if on_step:
                    on_step(p.step, loss, p.seen_tokens)
                if (stop or c.save_every and p.step % c.save_every == 0) and p.step < t.steps:
                    checkpoint_now(s, t, p)
                    saved_at = p.step
                if looked and looked["stop"]:
                    p.stopped_early_at = p.step
                    break
                if stop and p.step < t.steps:
                    raise TrainingInterrupted(
                        f"interrupted at step {p.step}/{t.steps}; checkpoint saved in {s.run.path / CHECKPOINTS}; "
                        f"continue with --resume --run {s.run.path}")
    except KeyboardInterrupt:
        # A second Ctrl-C: it landed anywhere in a step, so this state is not saved.
        raise TrainingInterrupted(
            f"aborted during step {p.step + 1}/{t.steps} by a second Ctrl-C; nothing saved for it"
            + (f"; continue from step {saved_at} with --resume --run {s.run.path}" if saved_at else "")) from None


def one_step(s: Setup, t: Trainer, step: int, plans: dict, ctrl_c) -> tuple[float, float, int, bool]:
    """One optimizer step over --grad-accum micro-batches: (loss per labelled token, the step's lr, tokens trained
    on by all processes, whether any process was asked to stop)."""
    import torch

    from .batches import collate, pack

    c, acc, world, rank, device = s.c, s.acc, s.world, s.acc.process_index, s.acc.device
    torch.manual_seed(step_seed(c.seed, step, rank))
    micro = []  # this step's global micro-batches: the same plan on every process
    for k in range(c.grad_accum):
        epoch, pos = divmod(step * c.grad_accum + k, t.per_epoch)  # global micro-batch index: a fixed data order
        if epoch not in plans:
            plans[epoch] = batch_plan(s.train_set, c.batch_size * world, c.seed, epoch)
        micro.append([s.train_set[j] for j in plans[epoch][pos]])
    n_labels = sum(e.n_trained for b in micro for e in b)  # of the whole step, all processes
    autocast = (torch.autocast(device.type, dtype=getattr(torch, s.hw["compute_dtype"]))
                if s.hw["compute_dtype"] != "float32" else contextlib.nullcontext())  # LoRA weights stay float32
    step_loss = torch.zeros((), device=device)
    for k, global_rows in enumerate(micro):
        rows = global_rows[rank::world]
        # the epoch's last batch can be smaller than the number of processes: a row weighted 0 keeps them in step
        weight = 1.0 if rows else 0.0
        rows = rows or global_rows[:1]
        batch = pack(rows, device) if s.hw["packing"] else collate(rows, s.tokenizer.pad_token_id, device)
        with acc.no_sync(t.objective) if k < len(micro) - 1 else contextlib.nullcontext():
            with autocast:
                loss = t.objective(batch) * weight
            # DDP averages gradients over processes; scaling by their number makes the result the gradient of
            # (all processes' summed loss) / (the step's labels).
            acc.backward(t.scaler.scale(loss * (world / n_labels)))
        step_loss += loss.detach()
    t.scaler.unscale_(t.optimizer)  # clip the true gradients (a no-op without loss scaling)
    torch.nn.utils.clip_grad_norm_(t.params, 1.0)
    lr = t.scheduler.get_last_lr()[0]  # this step's, before the schedule moves on
    t.scaler.step(t.optimizer)  # skipped by the scaler when fp16 gradients overflowed
    t.scaler.update()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    stop = ctrl_c.requested
    if world > 1:  # one collective per step carries the loss and whether any process stops
        both = acc.reduce(torch.stack([step_loss, torch.tensor(float(stop), device=device)]), "sum")
        step_loss, stop = both[0], bool(both[1] > 0)
    tokens = sum(len(e.input_ids) for b in micro for e in b)
    return round(float(step_loss) / n_labels, 5), lr, tokens, stop  # float(): the step's one wait for the device


def quick_ids(ids: list[int], window: int) -> list[int]:
    """What --eval-every scores of the held-out ids: all of them up to 4 windows, else the first quarter."""
    return list(ids) if len(ids) <= 4 * window else list(ids[:max(4 * window, len(ids) // 4)])


def look(s: Setup, t: Trainer, p: Progress) -> dict:
    """--eval-every: the held-out text (quick_ids) and the task's perplexity now, on the main process; with
    --select best the best step within the gate so far, and whether to stop early. {"row", "text", "stop"}."""
    import torch

    row, stop = None, False
    if s.main:
        row = probe(s, t, p)
        stop = s.c.select == "best" and consider(s, t, p, row)
    if s.world > 1:  # every process stops at the same step
        stop = bool(s.acc.reduce(torch.tensor(float(stop), device=s.acc.device), "sum") > 0)
    text = row and (f"held-out {100 * row['heldout_rise']:+.1f}%"
                    + (f"  task ppl {row['task_ppl']:.3f}" if row["task_ppl"] is not None else ""))
    return {"row": row, "text": text, "stop": stop}


def probe(s: Setup, t: Trainer, p: Progress) -> dict:
    from .task import score_torch

    c, model = s.c, t.model
    ids = quick_ids(s.tokens.ids, c.window)
    model.eval()
    try:
        ppl = measure(model, ids, c.window, c.stride, f"step {p.step}").ppl
        if p.base_quick_ppl is None:
            with model.disable_adapter():
                p.base_quick_ppl = measure(model, ids, c.window, c.stride, "base").ppl
        task = score_torch(model, s.task, s.tokenizer, f"step {p.step}", answer_limit=0) if s.task else None
    finally:
        model.train()
    rise = ppl / p.base_quick_ppl - 1
    row = {"step": p.step, "heldout_ppl": round(ppl, 6), "heldout_rise": round(rise, 6),
           "task_ppl": round(task.ppl.ppl, 6) if task and task.ppl else None,
           "within_gate": bool(rise <= rise_limit(c)), "heldout_ids": len(ids)}
    p.evals.append(row)
    return row


def consider(s: Setup, t: Trainer, p: Progress, row: dict) -> bool:
    """--select best: keep this step's adapter if it is the best within the gate so far (task perplexity, else
    held-out perplexity); True to stop early: the gate is crossed now and the task has not improved for the
    last 2 evaluations."""
    from peft import get_peft_model_state_dict

    metric = row["task_ppl"] if row["task_ppl"] is not None else row["heldout_ppl"]
    if row["within_gate"] and (p.best is None or metric < p.best["metric"]):
        p.best = {"step": row["step"], "metric": metric, "heldout_rise": row["heldout_rise"]}
        p.best_adapter = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(t.model).items()}
    since = [r for r in p.evals if p.best and r["step"] > p.best["step"]]
    return not row["within_gate"] and p.best is not None and len(since) >= 2


def keep_selected(s: Setup, t: Trainer, p: Progress) -> dict:
    """The adapter the run keeps (--select) and why, for the ledger; with best, the best step's weights are put
    back into the model before it is saved and evaluated."""
    if s.c.select != "best":
        return {"rule": "last", "step": p.step, "reason": "the last step's adapter (--select last)"}
    if p.best is None:
        return {"rule": "best", "step": p.step, "reason": "no evaluated step was within the gate; the last step's "
                                                          "adapter is kept"}
    crossed = [r["step"] for r in p.evals if not r["within_gate"]]
    reason = (f"step {p.best['step']}: the lowest task perplexity ({p.best['metric']:.4f}) of the evaluated steps "
              f"within --max-ppl-rise (held-out {100 * p.best['heldout_rise']:+.1f}%)"
              + (f"; steps {', '.join(map(str, crossed))} crossed the gate" if crossed else ""))
    if p.best["step"] != p.step and s.main:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(t.model, p.best_adapter)
        console.print(f"keeping the adapter of {reason}")
    return {"rule": "best", "step": p.best["step"], "reason": reason}


def checkpoint_now(s: Setup, t: Trainer, p: Progress) -> None:
    if s.hw["shard"]:
        adapter, optimizer_state = _full_state(t.model, t.optimizer)  # every process takes part
    elif s.main:
        from peft import get_peft_model_state_dict

        adapter, optimizer_state = get_peft_model_state_dict(t.model), t.optimizer.state_dict()
    if s.main:
        save_checkpoint(s.run.path, p.step, adapter, optimizer_state, t.scheduler,
                        {"curve": p.curve, "seen_tokens": p.seen_tokens, "train_seconds": p.train_seconds,
                         "world_size": s.world, "timed": p.timed, "evals": p.evals,
                         "base_quick_ppl": p.base_quick_ppl, "best": p.best, "best_adapter": p.best_adapter,
                         "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else None},
                        s.c.keep_checkpoints)


def training_peak_gpu(s: Setup) -> dict:
    import torch

    if s.acc.device.type != "cuda":
        return {"allocated": None, "reserved": None}
    return {"allocated": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "reserved": round(torch.cuda.max_memory_reserved() / 2**20, 1)}


# ----------------------------------------------------------------------------------------------- save
def save_adapter(s: Setup, t: Trainer, whole: dict | None, adapter_dir: Path) -> dict:
    """RUN/adapter in PEFT's format with edgeft's record of its base; the ledger's artifact record of it."""
    c, hw = s.c, s.hw
    with atomic_dir(adapter_dir) as tmp:
        t.model.save_pretrained(tmp, state_dict=whole)
        s.tokenizer.save_pretrained(tmp)
        base_hub_id = hub_id(c.model) or hub_id(s.base_path)
        if base_hub_id:
            name_base_on_hub(tmp, base_hub_id)
        write_json(tmp / ADAPTER_META, {
            "base": c.model, "base_path": str(s.base_path), "base_hub_id": base_hub_id,
            "base_fingerprint": s.fingerprint,
            "quant": hw["quant"], "compute_dtype": hw["compute_dtype"], "device": hw["device"],
            "method": c.method, "target_modules": t.targets, "lora_r": c.lora_r, "lora_alpha": c.lora_alpha,
            "steps": t.steps, "seed": c.seed,
        })
    return artifact(adapter_dir, s.run.path)


# ------------------------------------------------------------------------------------------- evaluate
def evaluate(s: Setup, t: Trainer) -> dict:
    """After training only (see the module docstring): the adapter's effect, then the base without it."""
    from .task import score_torch

    c, model = s.c, t.model
    if s.hw["attn"] == "edgeft_packed_sdpa":  # evaluation and generation run as users will run the model
        model.get_base_model().set_attn_implementation("sdpa")
    model.eval()
    label = f"{c.model}+adapter"
    after_ppl = measure(model, s.tokens.ids, c.window, c.stride, label, s.tokens.bos)
    after = score_torch(model, s.task, s.tokenizer, label, c.eval_generate) if s.task else None
    with model.disable_adapter():
        base_label = c.model if s.hw["quant"] == "none" else f"{c.model} ({s.hw['quant']})"
        before_ppl = measure(model, s.tokens.ids, c.window, c.stride, base_label, s.tokens.bos)
        before = score_torch(model, s.task, s.tokenizer, base_label, c.eval_generate) if s.task else None
    return {"label": label, "base_label": base_label, "after": after, "before": before,
            "forgetting": Comparison(measured=after_ppl, reference=before_ppl)}


def record(s: Setup, t: Trainer, p: Progress, entry: dict, evaluated: dict, peak_gpu: dict, adapter_dir: Path,
           selected: dict) -> None:
    c, hw, task = s.c, s.hw, s.task
    after, before = evaluated["after"], evaluated["before"]
    # What "after" measured, so that a later step measuring the same (merge: the unmerged base + adapter)
    # takes these numbers from the ledger (reuse.py).
    weights = torch_weights(s.fingerprint, entry["outputs"][-1]["sha256"], hw["quant"],
                            hw["compute_dtype"], hw["device"], c.attn, c.compile)
    entry[KEY] = measurement_key(weights, s.tokens.ids, c.window, c.stride, task, c.eval_generate,
                                  s.tokens.bos)
    evaluated["forgetting"].record(entry, evaluated["label"], evaluated["base_label"], "base", s.tokens.source)
    if task:
        after.record(entry, evaluated["label"], task.source, before.entry(evaluated["base_label"], task.source), "base")
    if p.timed["seconds"]:
        tokens_per_s, warmup_excluded = round(p.timed["tokens"] / p.timed["seconds"], 1), p.timed["warmup_steps"]
    else:  # every step was a warm-up step: the only figure there is includes it
        tokens_per_s, warmup_excluded = (round(p.seen_tokens / p.train_seconds, 1) if p.train_seconds else None), 0
    entry["metrics"].update({
        "method": c.method, "target_modules": t.targets, "trainable_params": t.trainable, "total_params": t.total,
        # the weights alone (the adapter folder also holds the tokenizer)
        "adapter_bytes": (adapter_dir / ADAPTER_WEIGHTS).stat().st_size,
        "trainable_pct": round(100 * t.trainable / t.total, 3), "steps": t.steps,
        "train_loss_first": p.curve[0] if p.curve else None, "train_loss_last": p.curve[-1] if p.curve else None,
        "loss_curve": p.curve, "eval_loss_before": before.loss if task else None,
        "eval_loss_after": after.loss if task else None,
        "exact_match_before": before.exact_match if task else None,
        "exact_match_after": after.exact_match if task else None,
        "exact_match_n": after.answered if task else 0,
        "exact_match_samples": after.samples if task else [],
        "world_size": s.world, "rows_per_step": c.batch_size * s.world * c.grad_accum,
        "train_tokens": p.seen_tokens, "train_seconds": round(p.train_seconds, 2),
        "tokens_per_s": tokens_per_s, "tokens_per_s_warmup_steps": warmup_excluded,
        "tokens_per_s_per_device": round(tokens_per_s / s.world, 1) if tokens_per_s else None,
        # main process, the training loop alone (peak_gpu_mb: the whole step, loading and evaluation too)
        "peak_gpu_mb_training": peak_gpu["allocated"], "peak_gpu_mb_training_allocated": peak_gpu["allocated"],
        "peak_gpu_mb_training_reserved": peak_gpu["reserved"],
        # --eval-every and --select: what was looked at during training, and which step's adapter this is
        "evaluations": p.evals, "selected": selected, "stopped_early_at": p.stopped_early_at,
    })


def gate(c: TrainConfig, entry: dict, forgetting: Comparison, adapter_dir: Path) -> None:
    rise, limit = forgetting.change, rise_limit(c)
    check(entry, Gate("held-out perplexity rise", rise, limit,
                      f"held-out perplexity rose {100 * rise:.1f}% ({forgetting.reference.ppl:.4f} -> "
                      f"{forgetting.measured.ppl:.4f}), more than --max-ppl-rise {100 * limit:.0f}%; the adapter is "
                      f"kept in {adapter_dir}"))
