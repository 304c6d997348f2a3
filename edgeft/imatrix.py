"""Importance matrix for llama.cpp quantization, computed with torch on the model being exported.

llama.cpp's imatrix is, per weight matrix, the mean of the squared input activation of each input column
over a calibration text; quantization then spends its precision where inputs are large. We collect it
with forward hooks on every Linear layer (the output head too when it is not tied), name each entry after
the GGUF tensor it belongs to, and hand the table to llama_model_quantize through its `imatrix` field.

Calibration is the training data (`--imatrix train`) or a text file, never the held-out text: tuning the
quantization to the text we then measure on would flatter every number in the ledger.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import EdgeftError


def calibration_ids(spec: str, tokenizer, budget: int, training_rows: Callable[[], list[list[int]]]
                    ) -> list[list[int]]:
    """Chunks of token ids to run: the run's training rows ('train', read by `training_rows`: the training
    record is train's, which this module, imported by llama.cpp's quantize, does not import) or a UTF-8 text
    file."""
    if spec == "train":
        chunks = training_rows()
    else:
        path = Path(spec)
        if not path.is_file():
            raise EdgeftError(f"--imatrix {spec}: no such file; use 'train' or a UTF-8 text file")
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        chunks = [ids[i:i + 512] for i in range(0, len(ids), 512)]
    out, total = [], 0
    for chunk in chunks:
        if total >= budget:
            break
        out.append(chunk[: budget - total])
        total += len(out[-1])
    if total < 16:
        raise EdgeftError(f"--imatrix {spec}: only {total} tokens of calibration text; give more")
    return out


def compute(model, chunks: list[list[int]], gguf_name) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean squared input activation per input column."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    head = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (module is head and tied):
            continue
        target = gguf_name(f"{name}.weight")
        if target is None:
            continue

        def hook(mod, args, target=target):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[target] = sums.get(target, 0) + (x * x).sum(0)
            counts[target] = counts.get(target, 0) + x.shape[0]
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: (v / counts[k]).numpy().astype(np.float32) for k, v in sums.items()}


def as_ctypes(table: dict[str, np.ndarray]):
    """The table as llama.cpp's null-terminated array of llama_model_imatrix_data; keep the returned
    `keep` alive until quantization is done (it owns the buffers the array points into)."""
    import llama_cpp

    arr = (llama_cpp.llama_model_imatrix_data * (len(table) + 1))()
    keep = [arr]
    for i, (name, values) in enumerate(table.items()):
        values = np.ascontiguousarray(values, dtype=np.float32)
        encoded = name.encode()
        keep += [values, encoded]
        arr[i].name = encoded
        arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = values.size
    return arr, keep
