"""A trained adapter as data: where it is, what base it belongs to, and its per-weight updates.

Reading the adapter's safetensors directly (instead of through a PeftModel) lets `merge` stream the base
tensor by tensor without holding two copies of the model; the GGUF exporter applies the same updates while
converting. Each update folds its method into a weight, W' = update.apply(W), as peft's own merge does; how
each method reads and folds its update lives in its module of edgeft/methods/. Every update works on a block of
the weight's rows (`rows`): the GGUF converter streams large weights that way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgeftError
from .inputs import check_safetensors, load_safetensors, read_json
from .methods import Update, of_adapter
from .models import fingerprint
from .progress import console
from .run import Run

ADAPTER_META = "edgeft_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's name for the adapter's tensors


@dataclass
class Adapter:
    path: Path  # the adapter folder (adapter_config.json + adapter_model.safetensors)
    config: dict  # adapter_config.json
    meta: dict | None  # edgeft_adapter.json: base, fingerprint, quant; None for a plain PEFT adapter
    run: Path | None  # the run folder it was trained in, when it came from `edgeft train`
    loras: dict[str, Update] = field(default_factory=dict)  # base tensor name -> its update (any method)

    @property
    def base(self) -> str | None:
        return (self.meta or {}).get("base") or self.config.get("base_model_name_or_path")

    @property
    def method(self) -> str:
        return of_adapter(self.config, self.path / "adapter_config.json").name

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
    method = of_adapter(config, f"--adapter {arg}")
    method.check_config(config, p / "adapter_config.json")
    meta_file = p / ADAPTER_META
    meta = read_json(meta_file, fix) if meta_file.is_file() else None
    run = p.parent if Run(p.parent).is_run() else None
    adapter = Adapter(path=p, config=config, meta=meta, run=run)
    tensors = _tensors(p, arg)
    adapter.loras = method.read(tensors, config, arg)
    return adapter


def _tensors(p: Path, arg) -> dict:
    weights = p / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise EdgeftError(f"--adapter {arg}: no {ADAPTER_WEIGHTS} in {p}")
    return load_safetensors(weights, "the adapter is damaged; copy it again or train again")


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
            console.print("warning: base fingerprint differs from the adapter's; merging anyway (--force)", style="yellow")
    else:
        console.print("warning: the adapter has no edgeft fingerprint (not from `edgeft train`); "
                      "only module names and shapes are checked", style="yellow")
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
