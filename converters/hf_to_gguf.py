"""Hugging Face safetensors -> GGUF, written on the `gguf` package (GGUFWriter, constants, tensor-name maps).

Streaming: the tensor table is built from the safetensors headers alone, the GGUF header and tensor infos are
written first, then each tensor is read with positioned reads, transformed and written in row chunks (~32 MB of
float32 at a time), so peak memory is about one chunk plus the process and the vocabulary, flat in model size.
Tensors whose rows are reordered (q/k of llama-style RoPE) are read whole; they are hidden x hidden at most.

Optionally fuses LoRA deltas while converting (W + scale * B @ A per tensor, per row chunk): the result equals
merge-then-convert tensor for tensor, without a merged 16-bit copy on disk.

What differs between architectures lives in `families` (one class per family); this module only moves bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .families import ConversionError, family_for, families, permute_qk, supported
from .gguf_vocab import VocabError

__all__ = ["convert", "ConvertResult", "ConversionError", "VocabError", "families", "family_for", "permute_qk",
           "supported", "read_safetensors_index", "read_tensor", "OUTTYPES"]

OUTTYPES = ("f32", "f16", "bf16")
try:
    from ml_dtypes import bfloat16 as _BFLOAT16
except ImportError:  # then BF16 is widened through float32 (same values, slower)
    _BFLOAT16 = None
CHUNK_ELEMENTS = 8 * 1024 * 1024  # float32 working set per chunk: 32 MB


def __getattr__(name: str):
    # `SUPPORTED` (HF arch -> GGUF arch) is kept for callers that imported it; it follows the registry.
    if name == "SUPPORTED":
        return supported()
    raise AttributeError(name)


@dataclass
class SourceTensor:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def read_rows(src: SourceTensor, fh, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of a tensor in its stored dtype (BF16 as raw uint16), with a plain positioned read: no
    mmap, so the file's pages never count as our memory, and no torch."""
    if src.dtype not in _NUMPY:
        raise ConversionError(f"{src.file}: tensor {src.name} has dtype {src.dtype}; only F32/F16/BF16 are supported")
    dtype = np.dtype(_NUMPY[src.dtype])
    shape = src.shape or (1,)
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    stop = shape[0] if stop is None else stop
    count = (stop - start) * row
    fh.seek(src.offset + start * row * dtype.itemsize)
    data = np.fromfile(fh, dtype=dtype, count=count)
    if data.size != count:
        raise ConversionError(f"{src.file}: tensor {src.name} is cut short; copy or save the model again")
    return data.reshape((stop - start, *shape[1:]) if src.shape else ())


def as_float(data: np.ndarray, dtype: str) -> np.ndarray:
    """Widen to float32 (BF16 by shifting its 16 bits into the high half of a float32: exact)."""
    if dtype == "BF16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32, copy=False)


def read_tensor(src: SourceTensor, fh) -> np.ndarray:
    """One whole tensor as float32."""
    return as_float(read_rows(src, fh), src.dtype)


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
        if not isinstance(header, dict):
            raise ConversionError(f"{f}: damaged safetensors header (not a table of tensors); copy or save it again")
        end, ranges = 0, []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop, shape = _tensor_entry(f, name, info)
            end = max(end, stop)
            ranges.append((start, stop, name))
            out.append(SourceTensor(name, f, shape, info["dtype"], 8 + header_len + start, stop - start))
        # Two tensors sharing bytes would each be read as the other's weights; the format forbids it.
        ranges.sort()
        for (_, stop_a, a), (start_b, _, b) in zip(ranges, ranges[1:]):
            if start_b < stop_a:
                raise ConversionError(f"{f}: tensors {a} and {b} overlap in the file (damaged or crafted header); "
                                      f"save the model again with safe_serialization=True")
        if 8 + header_len + end > size:
            raise ConversionError(f"{f}: truncated safetensors file (needs {8 + header_len + end} bytes, has {size}); "
                                  f"copy or save it again")
    return out


# bytes per element of each safetensors dtype
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _tensor_entry(f: Path, name: str, info) -> tuple[int, int, tuple[int, ...]]:
    """(start, stop, shape) of one header entry, checked: its byte range is the size its dtype and shape need."""
    bad = f"{f}: tensor {name!r} has a damaged header entry"
    fix = "copy or save the model again"
    if not isinstance(info, dict):
        raise ConversionError(f"{bad} (not a table); {fix}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _ST_BYTES:
        raise ConversionError(f"{bad} (dtype {dtype!r}); {fix}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ConversionError(f"{bad} (shape {shape!r}); {fix}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise ConversionError(f"{bad} (data_offsets {offsets!r}); {fix}")
    need = math.prod(shape) * _ST_BYTES[dtype]
    if offsets[1] - offsets[0] != need:
        raise ConversionError(f"{bad} (holds {offsets[1] - offsets[0]} bytes, its {dtype} shape {shape} needs {need}); "
                              f"{fix}")
    return offsets[0], offsets[1], tuple(shape)


def llama3_rope_freqs(config: dict, head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """Kept for callers of the old module: see families.llama3_rope_factors."""
    from .families import llama3_rope_factors

    return llama3_rope_factors(scaling, head_dim, theta)


@dataclass
class ConvertResult:
    path: Path
    arch: str
    tensors: int
    outtype: str
    fused_loras: int


@dataclass
class _Planned:
    name: str  # GGUF name
    src: SourceTensor | np.ndarray
    qtype: object  # gguf.GGMLQuantizationType
    permute: int | None
    shift: float
    hf_name: str | None


def _write_metadata(writer, model_dir: Path, name: str | None) -> None:
    """general.* as llama.cpp writes them: gguf's Metadata (model card, folder-name heuristics) and the size label
    from the parameter count of the tensors already announced to the writer."""
    import gguf

    total, shared, expert, count = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_dir, name, total)
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    meta.set_gguf_meta_model(writer)


def convert(model_dir: Path, out_path: Path, outtype: str = "f16", loras: dict | None = None,
            progress: Callable[[int, int], None] | None = None, name: str | None = None) -> ConvertResult:
    """Write `model_dir` (an HF folder) as a GGUF at `out_path`. The caller makes the write atomic."""
    import gguf

    model_dir = Path(model_dir)
    if outtype not in OUTTYPES:
        raise ConversionError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    fam = family_for(model_dir)
    sources = read_safetensors_index(model_dir)
    loras = loras or {}
    names = fam.tensor_names()
    matrix_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                   "bf16": gguf.GGMLQuantizationType.BF16}[outtype]

    # The tensor table: GGUF name, source, transforms, output type. Computed tensors (rope factors) come first, as
    # llama.cpp writes them.
    plan: list[_Planned] = [_Planned(n, a, gguf.GGMLQuantizationType.F32, None, 0.0, None)
                            for n, a in fam.extra_tensors().items()]
    for src in sources:
        if fam.skip(src.name):
            continue
        gguf_name = names.get_name(src.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConversionError(f"{src.file}: tensor {src.name} has no GGUF name for {fam.hf_arch}; the checkpoint "
                                  f"has parts this converter does not know")
        # llama.cpp keeps 1-D tensors, norms and biases in F32; matrices take the output type.
        is_matrix = len(src.shape) >= 2 and gguf_name.endswith(".weight") and not gguf_name.endswith("_norm.weight")
        qtype = matrix_type if is_matrix else gguf.GGMLQuantizationType.F32
        plan.append(_Planned(gguf_name, src, qtype, fam.row_permutation(src.name), fam.value_shift(src.name),
                             src.name))

    writer = gguf.GGUFWriter(None, fam.gguf_arch_name())
    for p in plan:
        shape = p.src.shape
        block, type_size = gguf.GGML_QUANT_SIZES[p.qtype]
        writer.add_tensor_info(p.name, shape, np.dtype(np.float32), int(np.prod(shape)) // block * type_size,
                               raw_dtype=p.qtype)
    writer.add_type(gguf.GGUFType.MODEL)
    _write_metadata(writer, model_dir, name)
    fam.write_hparams(writer)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    fam.write_vocab(writer)

    writer.write_header_to_file(out_path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    align = writer.data_alignment
    used = 0
    handles: dict[Path, object] = {}
    try:
        for i, p in enumerate(plan):
            fout.write(b"\0" * (-fout.tell() % align))
            if isinstance(p.src, SourceTensor):
                if p.src.file not in handles:
                    handles[p.src.file] = open(p.src.file, "rb")
                lora = loras.get(p.src.name)
                used += lora is not None
                written = _stream_tensor(fout, p, handles[p.src.file], lora)
            else:
                written = _write_chunk(fout, p.src.astype(np.float32), p.qtype)
            fout.write(b"\0" * (-written % align))
            if progress:
                progress(i + 1, len(plan))
        fout.flush()
    finally:
        writer.close()
        for fh in handles.values():
            fh.close()
    if used != len(loras):
        missing = sorted(set(loras) - {p.hf_name for p in plan})
        raise ConversionError(f"adapter targets {len(missing)} tensor(s) not in {model_dir} (e.g. {missing[:1]})")
    return ConvertResult(path=out_path, arch=fam.gguf_arch_name(), tensors=len(plan), outtype=outtype,
                         fused_loras=used)


def _stream_tensor(fout, p: _Planned, fh, lora) -> int:
    """Read, transform and write one tensor, in row chunks unless its rows are permuted. Returns bytes written."""
    import gguf

    src = p.src
    rows = src.shape[0] if src.shape else 1
    row_elems = int(np.prod(src.shape[1:], dtype=np.int64)) if len(src.shape) > 1 else 1
    step = rows if p.permute else max(1, CHUNK_ELEMENTS // max(row_elems, 1))
    # Copy bytes straight through when nothing changes them (same dtype in and out, no transform).
    passthrough = (lora is None and not p.permute and not p.shift
                   and ((src.dtype == "F32" and p.qtype == gguf.GGMLQuantizationType.F32)
                        or (src.dtype == "F16" and p.qtype == gguf.GGMLQuantizationType.F16)
                        or (src.dtype == "BF16" and p.qtype == gguf.GGMLQuantizationType.BF16)))
    # BF16 -> F16 in one cast (exact value, one rounding: what widening to float32 first gives, at a quarter of
    # the memory traffic), where ml_dtypes (an onnx dependency) is there; permuting rows commutes with it.
    direct = (_BFLOAT16 is not None and src.dtype == "BF16" and p.qtype == gguf.GGMLQuantizationType.F16
              and lora is None and not p.shift)
    written = 0
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        raw = read_rows(src, fh, start, stop) if src.shape else read_rows(src, fh)
        if passthrough:
            fout.write(memoryview(np.ascontiguousarray(raw)).cast("B"))
            written += raw.nbytes
            continue
        if direct:
            data = raw.view(_BFLOAT16).astype(np.float16)
            if p.permute:
                data = permute_qk(data, p.permute)
            written += _write_chunk(fout, data, p.qtype)
            continue
        if src.dtype == "F16" and lora is None:
            # llama.cpp keeps F16 sources in float16 through its transforms (the +1 of Gemma's norms rounds there).
            data = raw.copy() if p.shift else raw
            if p.shift:
                data += np.float16(p.shift)
        else:
            data = as_float(raw, src.dtype)
            if lora is not None:  # the adapter's update of these rows (LoRA, DoRA or IA³; edgeft.adapter)
                import torch

                data = lora.apply(torch.from_numpy(np.ascontiguousarray(data)), slice(start, stop)).numpy()
            if p.shift:
                data = data + np.float32(p.shift)
        if p.permute:
            data = permute_qk(data, p.permute)
        written += _write_chunk(fout, data, p.qtype)
    return written


def _write_chunk(fout, data: np.ndarray, qtype) -> int:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        out = data.astype(np.float32, copy=False)
    elif qtype == gguf.GGMLQuantizationType.F16:
        out = data.astype(np.float16, copy=False)
    else:
        out = gguf.quants.quantize(data.astype(np.float32, copy=False), qtype)
    out = np.ascontiguousarray(out)
    fout.write(memoryview(out).cast("B"))
    return out.nbytes


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
