"""Hugging Face safetensors -> GGUF, written on the `gguf` package (GGUFWriter, constants, tensor-name maps).

Streaming: the tensor table is built from the safetensors headers alone, the GGUF header and tensor infos
are written first, then each tensor is read (mmap), transformed and written before the next is touched,
so peak RAM is about one tensor, not the model.

Optionally fuses a LoRA adapter while converting (W + scale * B @ A per tensor): the result equals
merge-then-convert tensor for tensor, without a merged 16-bit copy on disk.

Supported: LlamaForCausalLM (Llama 2/3.x, SmolLM, TinyLlama), MistralForCausalLM, Qwen2ForCausalLM (q/k/v
biases). llama.cpp's llama architecture applies RoPE to q/k rows in interleaved order, so q_proj and
k_proj rows are permuted from HF's half-split order; Qwen2 uses NEOX RoPE and needs none.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .gguf_vocab import add_vocab

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
OUTTYPES = ("f32", "f16", "bf16")


class ConversionError(ValueError):
    """Input the converter refuses; the message is one line naming the file and the fix."""


@dataclass
class SourceTensor:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def read_tensor(src: SourceTensor, fh) -> np.ndarray:
    """One tensor as float32, read with a plain positioned read: no mmap, so the file's pages never count
    as our memory, and no torch needed (BF16 is widened by shifting its 16 bits into a float32)."""
    if src.dtype not in _NUMPY:
        raise ConversionError(f"{src.file}: tensor {src.name} has dtype {src.dtype}; only F32/F16/BF16 are supported")
    fh.seek(src.offset)
    data = np.fromfile(fh, dtype=_NUMPY[src.dtype], count=src.nbytes // np.dtype(_NUMPY[src.dtype]).itemsize)
    if src.dtype == "BF16":
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32, copy=False).reshape(src.shape)


def read_safetensors_index(model_dir: Path) -> list[SourceTensor]:
    """Every tensor's name, shape and dtype from the headers; a truncated or damaged file is refused here,
    before anything is written."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{model_dir}: no .safetensors files; save the model with safe_serialization=True")
    out = []
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ConversionError(f"{f}: truncated safetensors file ({size} bytes); copy or save it again")
            (header_len,) = struct.unpack("<Q", raw)
            if 8 + header_len > size:
                raise ConversionError(f"{f}: truncated safetensors file (header says {header_len} bytes, file has "
                                      f"{size}); copy or save it again")
            try:
                header = json.loads(fh.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConversionError(f"{f}: damaged safetensors header; copy or save it again") from None
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            end = max(end, stop)
            out.append(SourceTensor(name, f, tuple(info["shape"]), info["dtype"], 8 + header_len + start,
                                    stop - start))
        if 8 + header_len + end > size:
            raise ConversionError(f"{f}: truncated safetensors file (needs {8 + header_len + end} bytes, has {size}); "
                                  f"copy or save it again")
    return out


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary dims as [first half; second half]; llama.cpp's llama arch rotates
    adjacent pairs. Reorder rows (dim 0) per head from half-split to interleaved."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(config: dict) -> tuple[float, dict]:
    """(theta, scaling) from either transformers 5's rope_parameters or the older rope_theta/rope_scaling."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = dict(config.get("rope_scaling") or {})
    if params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling:
        scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), (scaling if scaling.get("rope_type") not in (None, "default") else {})


def llama3_rope_freqs(config: dict, head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """Llama 3.1+ scales RoPE frequencies by wavelength band; llama.cpp reads the factors from a
    `rope_freqs` tensor (one factor per rotary pair)."""
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (theta ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@dataclass
class ConvertResult:
    path: Path
    arch: str
    tensors: int
    outtype: str
    fused_loras: int


def convert(model_dir: Path, out_path: Path, outtype: str = "f16", loras: dict | None = None,
            progress: Callable[[int, int], None] | None = None, name: str | None = None) -> ConvertResult:
    """Write `model_dir` (an HF folder) as a GGUF at `out_path`. The caller makes the write atomic."""
    import gguf

    if outtype not in OUTTYPES:
        raise ConversionError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{model_dir}: no config.json; pass a Hugging Face model folder")
    config = json.loads(config_file.read_text())
    hf_arch = (config.get("architectures") or ["?"])[0]
    if hf_arch not in SUPPORTED:
        raise ConversionError(f"{model_dir}: architecture {hf_arch} is not supported; supported: "
                              f"{', '.join(SUPPORTED)}")
    arch = SUPPORTED[hf_arch]
    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    sources = read_safetensors_index(model_dir)
    loras = loras or {}

    n_layer = config["num_hidden_layers"]
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads", n_head)
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    tied = config.get("tie_word_embeddings", False)
    theta, scaling = _rope(config)
    name_map = gguf.get_tensor_name_map(model_arch, n_layer)

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[model_arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or model_dir.name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    extra: dict[str, np.ndarray] = {}
    rope_type = scaling.get("rope_type")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif rope_type == "llama3":
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_freqs(config, head_dim,
                                                                                               theta, scaling)
    elif rope_type:
        raise ConversionError(f"{config_file}: rope scaling '{rope_type}' is not supported; supported: linear, "
                              f"yarn, llama3")

    vocab_size = add_vocab(writer, model_dir, config.get("vocab_size"))
    writer.add_vocab_size(vocab_size)

    # The tensor table: GGUF name, source, how to transform, output dtype.
    plan = []
    for src in sources:
        if src.name.endswith("rotary_emb.inv_freq") or (tied and src.name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / shared with token_embd when tied
        gguf_name = name_map.get_name(src.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConversionError(f"{src.file}: tensor {src.name} has no GGUF name for {hf_arch}; the checkpoint "
                                  f"has parts this converter does not know")
        is_matrix = len(src.shape) == 2 and not gguf_name.endswith("_norm.weight")
        qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                 "bf16": gguf.GGMLQuantizationType.BF16}[outtype] if is_matrix else gguf.GGMLQuantizationType.F32
        permute = None
        if arch == "llama" and src.name.endswith("self_attn.q_proj.weight"):
            permute = n_head
        elif arch == "llama" and src.name.endswith("self_attn.k_proj.weight"):
            permute = n_head_kv
        plan.append((gguf_name, src, qtype, permute))
    for gguf_name, data in extra.items():
        plan.append((gguf_name, data, gguf.GGMLQuantizationType.F32, None))

    def nbytes(shape, qtype) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        return int(np.prod(shape)) // block * type_size

    for gguf_name, src, qtype, _ in plan:
        shape = src.shape if isinstance(src, SourceTensor) else src.shape
        dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else (
            np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.uint8)
        writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), nbytes(shape, qtype),
                               raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.BF16 else None)

    writer.write_header_to_file(out_path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    used = 0
    handles: dict[Path, object] = {}
    try:
        for i, (gguf_name, src, qtype, permute) in enumerate(plan):
            if isinstance(src, SourceTensor):
                if src.file not in handles:
                    handles[src.file] = open(src.file, "rb")
                data = read_tensor(src, handles[src.file])
                lora = loras.get(src.name)
                if lora is not None:
                    data = data + lora.delta().numpy()
                    used += 1
                if permute:
                    data = permute_qk(data, permute)
            else:
                data = src
            if qtype == gguf.GGMLQuantizationType.F32:
                data = data.astype(np.float32)
            elif qtype == gguf.GGMLQuantizationType.F16:
                data = data.astype(np.float16)
            else:
                data = gguf.quants.quantize(data.astype(np.float32), qtype)
            writer.write_tensor_data(np.ascontiguousarray(data))
            if progress:
                progress(i + 1, len(plan))
    finally:
        writer.close()
        for fh in handles.values():
            fh.close()
    if used != len(loras):
        missing = sorted(set(loras) - {p[1].name for p in plan if isinstance(p[1], SourceTensor)})
        raise ConversionError(f"adapter targets {len(missing)} tensor(s) not in {model_dir} (e.g. {missing[:1]})")
    return ConvertResult(path=out_path, arch=arch, tensors=len(plan), outtype=outtype, fused_loras=used)


def main(argv: list[str] | None = None) -> int:
    """python -m edgeft.converters.hf_to_gguf MODEL_DIR OUT.gguf [--outtype f16]: the bare converter
    (no validation; `edgeft export` is the checked path)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--outtype", default="f16", choices=OUTTYPES)
    a = ap.parse_args(argv)
    try:
        result = convert(a.model_dir, a.out, a.outtype)
    except ValueError as e:  # ConversionError and VocabError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result.path} ({result.tensors} tensors, {result.arch}, {result.outtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
