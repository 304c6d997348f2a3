"""A PEFT LoRA adapter -> a GGUF adapter that llama.cpp applies at load time (`--lora`, `lora_path=`).

Tensors are named after the base tensor they modify plus `.lora_a` / `.lora_b`, in PEFT's orientation
(A: [r, in], B: [out, r]). Because the llama arch's q/k rows are permuted in the base GGUF
(hf_to_gguf.permute_qk), B's rows are permuted the same way; A is untouched. llama.cpp scales by
adapter.lora.alpha / r, so alpha is written as scale * r (this also covers rsLoRA and per-module alphas
when they agree).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .hf_to_gguf import SUPPORTED, ConversionError, permute_qk


def convert_lora(loras: dict, base_dir: Path, out_path: Path) -> int:
    """Write `loras` (base weight name -> Lora) for the HF base in `base_dir`. Returns tensors written."""
    import gguf

    config = json.loads((base_dir / "config.json").read_text())
    hf_arch = (config.get("architectures") or ["?"])[0]
    if hf_arch not in SUPPORTED:
        raise ConversionError(f"{base_dir}: architecture {hf_arch} is not supported; supported: {', '.join(SUPPORTED)}")
    arch = SUPPORTED[hf_arch]
    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    name_map = gguf.get_tensor_name_map(model_arch, config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads", n_head)
    ranks = {lora.a.shape[0] for lora in loras.values()}
    alphas = {round(lora.scale * lora.a.shape[0], 6) for lora in loras.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ConversionError("the adapter uses several ranks or alphas; llama.cpp's GGUF adapter has one alpha")

    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[model_arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alphas.pop()))
    for name, lora in loras.items():
        target = name_map.get_name(name, try_suffixes=(".weight",))
        if target is None:
            raise ConversionError(f"adapter tensor {name} has no GGUF name for {hf_arch}")
        b = lora.b.float().numpy()
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            b = permute_qk(b, n_head)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            b = permute_qk(b, n_head_kv)
        writer.add_tensor(f"{target}.lora_a", np.ascontiguousarray(lora.a.float().numpy().astype(np.float16)))
        writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b.astype(np.float16)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return 2 * len(loras)
