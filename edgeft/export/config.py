"""The export configs (one base config every format shares, one per format), the result, and reading them."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_config, read_config_file
from ..errors import EdgeftError
from ..heldout import HeldOutOptions
from ..run import EXPORT_GGUF, EXPORT_GGUF_CHOICE, EXPORT_GGUF_LORA, EXPORT_ONNX


@dataclass
class ExportConfig(HeldOutOptions):
    format: str = field(default="gguf", metadata={"help": "gguf|onnx"})
    model: str = field(default="", metadata={"help": "model folder/name (default: RUN/merged)"})
    adapter: str = field(default="", metadata={"help": "fuse this adapter (run or folder) while converting"})
    run: str = field(default="", metadata={"help": "run folder (ledger, eval tokens, outputs in RUN/FORMAT)"})
    quant: list[str] = field(default_factory=list, metadata={
        "help": "comma list; gguf: f16|bf16|f32 + q8_0,q6_k,q5_k_m,q4_k_m,q4_0,.. or auto (default f16,q8_0,q4_k_m); "
                "onnx: fp32,int8,int4 (default all three)"})
    max_ppl_rise: str = field(default="", metadata={
        "help": "gate per quant, e.g. 'q8_0=0.02,q4_k_m=0.15' or one number for all (defaults in docs)"})
    max_task_ppl_rise: str = field(default="", metadata={
        "help": "task gate per quant: max rise of the held-out answers' perplexity (same syntax)"})
    max_exact_drop: str = field(default="", metadata={
        "help": "task gate per quant: max drop of the exact-answer rate, e.g. 'q4_k_m=0.1' (same syntax)"})
    budget: str = field(default="", metadata={
        "help": "gguf, with --quant auto: the size the GGUF must fit, as bytes, kB/MB/GB/KiB/MiB/GiB, bits per "
                "weight ('4.8bpw'), a stock recipe's size ('q4_k_m') or 'device' (--device's RAM less the KV cache "
                "and runtime); a per-tensor recipe ('mixed') is chosen for it from the run's data. onnx: the size "
                "the int4 graph must fit (bytes or bits per weight); int4 or int8 is chosen per projection the "
                "same way"})
    task_answers: int = field(default=20, metadata={"help": "held-out task prompts answered per artifact"})
    overwrite: bool = field(default=False, metadata={"help": "replace artifacts that already exist"})
    out: str = field(default="", metadata={"help": "output folder (default: RUN/gguf or RUN/onnx)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for llama.cpp/onnxruntime (0: all cores)"})
    generate_tokens: int = field(default=48, metadata={"help": "tokens of the greedy sample answer"})


@dataclass
class GGUFExportConfig(ExportConfig):
    adapter_only: bool = field(default=False, metadata={"help": "gguf: also write the LoRA as a GGUF adapter"})
    device: str = field(default="", metadata={
        "help": "gguf: board profile; with --quant auto, pick for it (see `edgeft devices`)"})
    device_ram_gb: float = field(default=0.0, metadata={"help": "gguf: the board's RAM if not the profile's smallest"})
    context: int = field(default=2048, metadata={
        "help": "gguf: context the board will run with (KV cache in the RAM fit)"})
    imatrix: str = field(default="", metadata={
        "help": "gguf: guide quantization with an importance matrix from 'train' (the run's training data) or "
                "a text FILE (never the held-out text)"})
    imatrix_tokens: int = field(default=8192, metadata={"help": "gguf: calibration tokens for --imatrix"})
    converter: str = field(default="auto", metadata={
        "help": "gguf: auto|ours|llamacpp: who writes the unquantized GGUF (auto: ours, else llama.cpp's "
                "convert_hf_to_gguf.py for an architecture ours lacks); the same gates apply"})


@dataclass
class OnnxExportConfig(ExportConfig):
    block_size: int = field(default=32, metadata={"help": "onnx: weights per quantization block (MatMulNBits)"})
    symmetric: bool = field(default=True, metadata={"help": "onnx: symmetric weight quantization"})
    accuracy_level: int = field(default=4, metadata={"help": "onnx: MatMulNBits accuracy level (4: int8 compute)"})
    keep_lm_head: bool = field(default=False, metadata={"help": "onnx: leave the output head in fp32"})
    int4_algo: str = field(default="hqq", metadata={
        "help": "onnx: onnxruntime's int4 weight algorithm: hqq (data-free half-quadratic; default), k_quant, rtn, "
                "gptq (calibrated on the run's training rows)"})
    gptq_tokens: int = field(default=4096, metadata={
        "range": (16, None), "help": "onnx: tokens of the run's training rows GPTQ calibrates on"})
    int8_head: bool = field(default=True, metadata={
        "help": "onnx: with int4, quantize the output head (the embeddings' copy when tied) to int8"})
    int8_embeddings: bool = field(default=True, metadata={
        "help": "onnx: store the token embeddings as int8 blocks (GatherBlockQuantized) in the int8 and int4 "
                "graphs, not fp32"})


@dataclass(frozen=True)
class Format:
    """An export format as data: its config, the function that exports it, the ledger entries it writes."""
    config: type[ExportConfig]
    exporter: str  # "module:function" under edgeft.export, imported when it runs (it imports torch)
    ledger: tuple[str, ...]

    def __call__(self, config: ExportConfig) -> ExportResult:
        module, function = self.exporter.split(":")
        return getattr(importlib.import_module(f"edgeft.export.{module}"), function)(config)


FORMATS: dict[str, Format] = {
    "gguf": Format(GGUFExportConfig, "gguf:export_gguf", (EXPORT_GGUF, EXPORT_GGUF_CHOICE, EXPORT_GGUF_LORA)),
    "onnx": Format(OnnxExportConfig, "onnx:export_onnx", (EXPORT_ONNX,)),
}


@dataclass
class ExportResult:
    run: Path
    artifacts: dict[str, Path]
    entries: list[dict]


def load_export_config(config_file: str | Path | None = None, values: dict | None = None) -> ExportConfig:
    """The config of the format asked for (flag, else the file's `format`, else gguf); a setting of the
    other format is refused by name rather than silently ignored."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    file_values = read_config_file(config_file) if config_file else {}
    fmt = values.get("format") or file_values.get("format") or "gguf"
    if fmt not in FORMATS:
        raise EdgeftError(f"--format {fmt}: use {' or '.join(FORMATS)}")
    cls = FORMATS[fmt].config
    own = {f.name for f in dataclasses.fields(cls)}
    for key in [*values, *(k.replace("-", "_") for k in file_values)]:
        for other, other_format in FORMATS.items():
            if key not in own and key in {f.name for f in dataclasses.fields(other_format.config)}:
                raise EdgeftError(f"--{key.replace('_', '-')} is a setting of --format {other}, not {fmt}")
    return load_config(cls, config_file, values)
