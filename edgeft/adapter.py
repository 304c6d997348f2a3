"""A trained adapter as data: where it is, what base it belongs to, and its per-weight updates.

Reading the adapter's safetensors directly (instead of through a PeftModel) lets `merge` stream the base
tensor by tensor without holding two copies of the model; the GGUF exporter applies the same updates while
converting. Each update folds one method into a weight, W' = update.apply(W), as peft's own merge does:
  - LoRA and rsLoRA: W + s·B·A (s = alpha/r, or alpha/sqrt(r) for rsLoRA);
  - DoRA: m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm taken per output row, m the learned magnitude;
  - IA³: W scaled by the learned vector l, per output row (k, v: and their bias) or per input column (the
    MLP down projection, a "feedforward" module).
Every update works on a block of the weight's rows (`rows`): the GGUF converter streams large weights that way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import EdgeftError
from .inputs import check_safetensors, load_safetensors, read_json
from .models import fingerprint
from .progress import console
from .run import Run

if TYPE_CHECKING:
    import torch

ADAPTER_META = "edgeft_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's name for the adapter's tensors


METHODS = ("lora", "rslora", "dora", "ia3")


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


@dataclass
class Scale:
    """IA³: a learned vector multiplying the weight's output rows ([out, 1]), its input columns ([1, in], the
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


@dataclass
class Adapter:
    path: Path  # the adapter folder (adapter_config.json + adapter_model.safetensors)
    config: dict  # adapter_config.json
    meta: dict | None  # edgeft_adapter.json: base, fingerprint, quant; None for a plain PEFT adapter
    run: Path | None  # the run folder it was trained in, when it came from `edgeft train`
    loras: dict[str, "Lora | Scale"] = field(default_factory=dict)  # base tensor name -> its update (any method)

    @property
    def base(self) -> str | None:
        return (self.meta or {}).get("base") or self.config.get("base_model_name_or_path")

    @property
    def method(self) -> str:
        if self.config.get("peft_type") == "IA3":
            return "ia3"
        return "dora" if self.config.get("use_dora") else "rslora" if self.config.get("use_rslora") else "lora"

    @property
    def trained_quant(self) -> str:
        return (self.meta or {}).get("quant", "none")


def find_adapter(arg: str | Path) -> Adapter:
    """`arg` is a run folder (with adapter/) or an adapter folder."""
    p = Path(arg)
    if (Run(p).adapter / "adapter_config.json").is_file():
        p = Run(p).adapter
    if not (p / "adapter_config.json").is_file():
        raise EdgeftError(f"--adapter {arg}: no adapter_config.json there (nor in {arg}/adapter); pass a run "
                          f"folder from `edgeft train` or a PEFT adapter folder")
    fix = "the adapter folder is damaged; copy it again or train again"
    config = read_json(p / "adapter_config.json", fix)
    kind = config.get("peft_type", "LORA")
    if kind not in ("LORA", "IA3"):
        raise EdgeftError(f"--adapter {arg}: a {kind} adapter; edgeft merges LoRA, rsLoRA, DoRA and IA³ adapters")
    if kind == "LORA":
        for key in ("r", "lora_alpha"):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
                raise EdgeftError(f"{p / 'adapter_config.json'}: '{key}' is {value!r}, not a positive number; {fix}")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(config.get(key) or {}, dict):
                raise EdgeftError(f"{p / 'adapter_config.json'}: '{key}' must be an object; {fix}")
    meta_file = p / ADAPTER_META
    meta = read_json(meta_file, fix) if meta_file.is_file() else None
    run = p.parent if Run(p.parent).is_run() else None
    adapter = Adapter(path=p, config=config, meta=meta, run=run)
    tensors = _tensors(p, arg)
    adapter.loras = _read_ia3(tensors, config, arg) if kind == "IA3" else _read_loras(tensors, config, arg)
    return adapter


def _tensors(p: Path, arg) -> dict:
    weights = p / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise EdgeftError(f"--adapter {arg}: no {ADAPTER_WEIGHTS} in {p}")
    return load_safetensors(weights, "the adapter is damaged; copy it again or train again")


def _read_loras(tensors: dict, config: dict, arg) -> dict[str, Lora]:
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
        scale = ma / math.sqrt(mr) if config.get("use_rslora") else ma / mr
        a, b = tensors[key], tensors[b_key]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise EdgeftError(f"--adapter {arg}: {key} is {list(a.shape)} and its lora_B {list(b.shape)}; they do "
                              f"not multiply, the adapter is damaged")
        if config.get("fan_in_fan_out"):
            raise EdgeftError(f"--adapter {arg}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported; "
                              f"module {short}")
        magnitude = None
        if config.get("use_dora"):  # peft names it with or without a .weight suffix across versions
            magnitude = next((tensors[k] for k in (f"{module}.lora_magnitude_vector",
                                                   f"{module}.lora_magnitude_vector.weight") if k in tensors), None)
            if magnitude is None or magnitude.shape != (b.shape[0],):
                raise EdgeftError(f"--adapter {arg}: a DoRA adapter without a magnitude vector of {b.shape[0]} for "
                                  f"{module}; the adapter is damaged")
        loras[f"{name}.weight"] = Lora(a=a, b=b, scale=scale, magnitude=magnitude)
    if not loras:
        raise EdgeftError(f"--adapter {arg}: no LoRA tensors in its adapter_model.safetensors")
    return loras


def _read_ia3(tensors: dict, config: dict, arg) -> dict[str, Scale]:
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


# ------------------------------------------------------------------- does it belong to this base?
def base_weights(base_path: Path) -> dict[str, tuple[Path, list[int]]]:
    """Every weight name in the base's safetensors -> (file, shape), read from headers only."""
    from safetensors import safe_open

    files = sorted(base_path.glob("*.safetensors"))
    if not files:
        raise EdgeftError(f"--model {base_path}: no .safetensors weights; re-save the model with "
                          f"save_pretrained(safe_serialization=True)")
    check_safetensors(base_path, "the model folder is damaged; copy or save it again")
    out = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                out[k] = (f, list(st.get_slice(k).get_shape()))
    return out


def check_adapter_fits(adapter: Adapter, base_path: Path, weights: dict, force: bool) -> dict:
    """Refuse an adapter that does not belong to this base. Returns the fingerprint record for the ledger."""
    record = {"checked": False, "forced": False}
    recorded = (adapter.meta or {}).get("base_fingerprint")
    if recorded and not isinstance(recorded, dict):
        raise EdgeftError(f"{adapter.path / ADAPTER_META}: 'base_fingerprint' is not an object; the adapter folder is "
                          f"damaged; copy it again or train again")
    if recorded:
        actual = fingerprint(base_path)
        record.update(checked=True, recorded=recorded, actual=actual)
        if recorded != actual:
            if not force:
                raise EdgeftError(
                    f"adapter {adapter.path} was trained on {adapter.base} ({recorded.get('architecture')}, weights "
                    f"{str(recorded.get('weights_sha256'))[:12]}) but --model {base_path} is {actual['architecture']}, "
                    f"weights {actual['weights_sha256'][:12]}; pass the base it was trained on, or --force")
            record["forced"] = True
            console.print("[yellow]warning: base fingerprint differs from the adapter's; merging anyway (--force)")
    else:
        console.print("[yellow]warning: the adapter has no edgeft fingerprint (not from `edgeft train`); "
                      "only module names and shapes are checked")
    # An IA³ bias update applies only where the base has that bias.
    adapter.loras = {n: u for n, u in adapter.loras.items() if n in weights or not n.endswith(".bias")}
    missing = [n for n in adapter.loras if n not in weights]
    if missing:
        raise EdgeftError(f"adapter {adapter.path} targets {len(missing)} module(s) the base {base_path} does not have "
                          f"(e.g. {missing[0].removesuffix('.weight')}); it was trained on another architecture")
    for name, lora in adapter.loras.items():
        want = lora.shape()
        if len(weights[name][1]) != len(want) or any(w is not None and w != h for w, h in zip(want, weights[name][1])):
            raise EdgeftError(f"adapter {adapter.path}: {name} is {weights[name][1]} in the base but the adapter "
                              f"expects {want}; it was trained on a model of another size")
    return record


def name_base_on_hub(folder: Path, hub_id: str) -> None:
    """Name the base by its hub id where peft wrote the local folder's absolute path (adapter_config.json's
    base_model_name_or_path, the model card's base_model), so the adapter means the same base on any machine
    (AutoPeftModelForCausalLM, the hub). edgeft finds the base through ADAPTER_META, which keeps the local path
    and the fingerprint. Written after peft saved: a hub id in its config while saving makes peft look the base
    up on the hub."""
    import re

    from .atomic import write_json

    config = read_json(folder / "adapter_config.json", "the adapter was just written; train again")
    write_json(folder / "adapter_config.json", {**config, "base_model_name_or_path": hub_id})
    card = folder / "README.md"
    if card.is_file():
        card.write_text(re.sub(r"(?m)^base_model: .*$", f"base_model: {hub_id}", card.read_text(), count=1))
