"""IA³: learned vectors scaling the keys, values and the MLP's down projection (Liu et al., T-Few): per output row
for k and v (and their biases, as peft scales them), per input column for the down projection (a
"feedforward" module). llama.cpp's adapter GGUF holds only LoRA products: IA³ is exported fused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import EdgeftError
from .registry import Method, register

if TYPE_CHECKING:
    import torch

# Its paper's and peft's targets: keys and values (Phi-3's fused qkv) and the MLP's down projection.
TARGETS = ("k_proj", "v_proj", "qkv_proj", "down_proj")
FEEDFORWARD = ("down_proj",)


@dataclass
class Scale:
    """A learned vector multiplying the weight's output rows ([out, 1]), its input columns ([1, in], the
    feedforward modules), or a bias ([out])."""
    l: "torch.Tensor"

    def shape(self) -> list[int | None]:
        if self.l.dim() == 1:
            return [self.l.shape[0]]
        return [self.l.shape[0], None] if self.l.shape[1] == 1 else [None, self.l.shape[1]]

    def apply(self, w: "torch.Tensor", rows: slice = slice(None)) -> "torch.Tensor":
        l = self.l.float()
        if l.dim() == 1 or l.shape[1] == 1:  # per output row (or bias entry): only these rows' factors
            l = l.reshape(-1)[rows]
            return w.float() * (l.unsqueeze(1) if w.dim() == 2 else l)
        return w.float() * l  # per input column: the same for every row


@register
class IA3(Method):
    name = "ia3"
    order = 3
    summary = "learned scales on k, v and the MLP down projection"
    peft_type = "IA3"
    # a scale per channel starting from 1 barely moves at LoRA's rate: 3e-3 as in its paper (T-Few); compare's
    # 15-step runs need 1.5e-2 (at 1e-3 it answered 0 of 10 held-out prompts on the demo)
    lr = 3e-3
    compare_lr = 1.5e-2
    adapter_gguf = False

    def matches(self, config: dict) -> bool:
        return config.get("peft_type") == "IA3"

    def default_targets(self, projections: list[str]) -> list[str]:
        return [p for p in projections if p in TARGETS]

    def peft_config(self, c, targets: list[str]):
        from peft import IA3Config

        return IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if t in FEEDFORWARD],
                         task_type="CAUSAL_LM")

    def read(self, tensors: dict, config: dict, arg) -> dict[str, Scale]:
        feedforward = config.get("feedforward_modules") or []
        feedforward = [feedforward] if isinstance(feedforward, str) else feedforward
        updates: dict[str, Scale] = {}
        for key, l in tensors.items():
            if not key.endswith(".ia3_l"):
                continue
            module = key.removesuffix(".ia3_l")
            name = module.removeprefix("base_model.model.")
            ff = any(module.endswith(f) for f in feedforward)
            if l.dim() != 2 or (l.shape[0] != 1 if ff else l.shape[1] != 1):
                raise EdgeftError(f"--adapter {arg}: {key} is {list(l.shape)}, not an IA³ vector for a "
                                  f"{'feedforward' if ff else 'attention'} module; the adapter is damaged")
            updates[f"{name}.weight"] = Scale(l)
            if not ff:  # peft scales an output-side module's bias with it (Qwen2's k/v have biases)
                updates[f"{name}.bias"] = Scale(l.reshape(-1))
        if not updates:
            raise EdgeftError(f"--adapter {arg}: no IA³ vectors in its adapter_model.safetensors")
        return updates
