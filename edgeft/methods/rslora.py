"""rsLoRA: LoRA scaled by alpha / sqrt(r) (Kalajdzievski), so that higher ranks keep learning; the update is a
plain LoRA product, which llama.cpp's adapter GGUF holds (its scale folded into alpha)."""

from __future__ import annotations

from .lora import LoRA
from .registry import register


@register
class RsLoRA(LoRA):
    name = "rslora"
    order = 1
    summary = "LoRA scaled by alpha/sqrt(r)"
    lr = 2e-4  # its paper keeps LoRA's settings
    # at rank 16 its scale is 4x LoRA's: at LoRA's 1e-3 it forgot 16.3% on the demo; 2.5e-4 passed every gate
    compare_lr = 2.5e-4
    adapter_gguf = True

    def matches(self, config: dict) -> bool:
        return config.get("peft_type", "LORA") == "LORA" and bool(config.get("use_rslora")) and not config.get("use_dora")

    def lora_switches(self) -> dict:
        return {"use_rslora": True}
