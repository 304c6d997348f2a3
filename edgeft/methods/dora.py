"""DoRA: m ⊙ (W + s·B·A) / ‖W + s·B·A‖ (Liu et al.), the norm per output row and m a learned magnitude. The
normalisation depends on W, so llama.cpp's adapter GGUF (which adds s·B·A at run time) cannot hold it: it is
exported fused."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import EdgeftError
from .lora import LoRA
from .registry import register

if TYPE_CHECKING:
    import torch


@register
class DoRA(LoRA):
    name = "dora"
    order = 2
    summary = "LoRA plus a learned magnitude per output row"
    lr = 2e-4  # its paper keeps LoRA's settings
    compare_lr = 1e-3
    adapter_gguf = False

    def matches(self, config: dict) -> bool:
        return config.get("peft_type", "LORA") == "LORA" and bool(config.get("use_dora"))

    def lora_switches(self) -> dict:
        return {"use_dora": True}

    def magnitude(self, tensors: dict, module: str, rows: int, arg) -> "torch.Tensor":
        # peft names it with or without a .weight suffix across versions
        found = next((tensors[k] for k in (f"{module}.lora_magnitude_vector", f"{module}.lora_magnitude_vector.weight")
                      if k in tensors), None)
        if found is None or found.shape != (rows,):
            raise EdgeftError(f"--adapter {arg}: a DoRA adapter without a magnitude vector of {rows} for {module}; "
                              f"the adapter is damaged")
        return found
