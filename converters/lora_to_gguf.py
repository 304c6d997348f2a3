"""A PEFT LoRA adapter -> a GGUF adapter that llama.cpp applies at load time (`--lora`, `lora_path=`).

Tensors are named after the base tensor they modify plus `.lora_a` / `.lora_b`, in PEFT's orientation
(A: [r, in], B: [out, r]). The family (families.py) decides names and row transforms: where the base GGUF's q/k rows
are permuted (llama-style RoPE), B's rows are permuted the same way and A is untouched; fused projections (Phi-3's
qkv_proj and gate_up_proj) are adapted as the fused tensors they are in both files. llama.cpp scales by
adapter.lora.alpha / r, so alpha is written as scale * r (this also covers rsLoRA and per-module alphas when they
agree).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .families import ConversionError, family_for, permute_qk
from .families import supported as _supported


def __getattr__(name: str):
    if name == "SUPPORTED":  # kept for old importers; follows the registry
        return _supported()
    raise AttributeError(name)


def convert_lora(loras: dict, base_dir: Path, out_path: Path) -> int:
    """Write `loras` (base weight name -> Lora) for the HF base in `base_dir`. Returns tensors written."""
    import gguf

    fam = family_for(Path(base_dir))
    name_map = fam.tensor_names()
    ranks = {lora.a.shape[0] for lora in loras.values()}
    alphas = {round(lora.scale * lora.a.shape[0], 6) for lora in loras.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ConversionError("the adapter uses several ranks or alphas; llama.cpp's GGUF adapter has one alpha")

    writer = gguf.GGUFWriter(out_path, fam.gguf_arch_name())
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alphas.pop()))
    for name, lora in loras.items():
        target = None if fam.skip(name) else name_map.get_name(name, try_suffixes=(".weight",))
        if target is None:
            raise ConversionError(f"adapter tensor {name} has no GGUF name for {fam.hf_arch}")
        if fam.value_shift(name):
            raise ConversionError(f"adapter tensor {name} adapts a norm; llama.cpp's LoRA applies to matrices only")
        b = lora.b.float().numpy()
        n_head = fam.row_permutation(name)
        if n_head:
            b = permute_qk(b, n_head)
        writer.add_tensor(f"{target}.lora_a", np.ascontiguousarray(lora.a.float().numpy().astype(np.float16)))
        writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b.astype(np.float16)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return 2 * len(loras)
