"""LoRA: W + s·B·A, s = alpha / r (Hu et al.). The family's reading of A, B and the per-module patterns lives
here; rsLoRA and DoRA change one thing each."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import EdgeftError
from .registry import Method, register

if TYPE_CHECKING:
    import torch


@dataclass
class Lora:
    a: "torch.Tensor"  # [r, in]
    b: "torch.Tensor"  # [out, r]
    scale: float
    magnitude: "torch.Tensor | None" = None  # DoRA: [out]

    def shape(self) -> list[int | None]:
        return [self.b.shape[0], self.a.shape[1]]

    def apply(self, w: "torch.Tensor", rows: slice = slice(None)) -> "torch.Tensor":
        """The updated float32 rows `rows` of the weight whose rows `w` holds."""
        w = w.float() + self.scale * (self.b[rows].float() @ self.a.float())
        if self.magnitude is not None:  # DoRA: each output row rescaled to its learned norm
            w = w * (self.magnitude[rows].float() / w.norm(p=2, dim=1)).unsqueeze(1)
        return w


@register
class LoRA(Method):
    name = "lora"
    order = 0
    summary = "LoRA"
    peft_type = "LORA"
    lr = 2e-4  # the usual LoRA rate (PEFT/TRL tutorials)
    compare_lr = 1e-3
    adapter_gguf = True

    def matches(self, config: dict) -> bool:
        return (config.get("peft_type", "LORA") == "LORA" and not config.get("use_dora")
                and not config.get("use_rslora"))

    def lora_switches(self) -> dict:
        """peft LoraConfig's switches for this member of the family."""
        return {}

    def peft_config(self, c, targets: list[str]):
        from peft import LoraConfig

        return LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM", **self.lora_switches())

    def check_config(self, config: dict, path) -> None:
        fix = "the adapter folder is damaged; copy it again or train again"
        for key in ("r", "lora_alpha"):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
                raise EdgeftError(f"{path}: '{key}' is {value!r}, not a positive number; {fix}")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(config.get(key) or {}, dict):
                raise EdgeftError(f"{path}: '{key}' must be an object; {fix}")

    def magnitude(self, tensors: dict, module: str, rows: int, arg) -> "torch.Tensor | None":
        return None

    def read(self, tensors: dict, config: dict, arg) -> dict[str, Lora]:
        r, alpha = config["r"], config["lora_alpha"]
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        loras: dict[str, Lora] = {}
        for key in tensors:
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            name = module.removeprefix("base_model.model.")
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in tensors:
                raise EdgeftError(f"--adapter {arg}: {key} has no matching lora_B tensor; the adapter is damaged")
            short = module.rsplit(".", 1)[-1]
            mr = next((v for k, v in rank_pattern.items() if module.endswith(k)), r)
            ma = next((v for k, v in alpha_pattern.items() if module.endswith(k)), alpha)
            a, b = tensors[key], tensors[b_key]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise EdgeftError(f"--adapter {arg}: {key} is {list(a.shape)} and its lora_B {list(b.shape)}; they "
                                  f"do not multiply, the adapter is damaged")
            if config.get("fan_in_fan_out"):
                raise EdgeftError(f"--adapter {arg}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported; "
                                  f"module {short}")
            # rsLoRA's scaling is a switch of the saved config (DoRA may carry it too)
            scale = ma / math.sqrt(mr) if config.get("use_rslora") else ma / mr
            loras[f"{name}.weight"] = Lora(a=a, b=b, scale=scale,
                                           magnitude=self.magnitude(tensors, module, b.shape[0], arg))
        if not loras:
            raise EdgeftError(f"--adapter {arg}: no LoRA tensors in its adapter_model.safetensors")
        return loras
