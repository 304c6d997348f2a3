"""Training state on disk without pickle: tensors in one safetensors file, everything else as JSON.

`torch.load` of a pickle runs whatever code the file names, so a checkpoint planted in a run folder would
run as the user on `train --resume`. Neither safetensors nor JSON can hold code. The state is any nest of
dicts, lists, tuples, numbers, strings, None and tensors (a PEFT state dict, an optimizer's and a
scheduler's state_dict); what JSON cannot say directly is tagged, so loading gives back equal values of
equal types (int dict keys, tuples, non-finite floats, tensors bit for bit):

    {"$tensor": "t12"}   a tensor stored in tensors.safetensors under that key
    {"$tuple": [...]}    a tuple
    {"$items": [[k, v], ...]}   a dict whose keys are not all strings (an optimizer's param ids)
    {"$float": "nan"}    a float that is not finite
"""

from __future__ import annotations

import math
from pathlib import Path

from .atomic import atomic_dir, write_json
from .errors import EdgeftError
from .inputs import load_safetensors, read_json

STATE = "state.json"
TENSORS = "tensors.safetensors"
FORMAT = 1


def _encode(x, tensors: dict):
    import torch

    if isinstance(x, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = x.detach().cpu().contiguous()
        return {"$tensor": key}
    if isinstance(x, float) and not math.isfinite(x):
        return {"$float": str(x)}
    if isinstance(x, tuple):
        return {"$tuple": [_encode(v, tensors) for v in x]}
    if isinstance(x, list):
        return [_encode(v, tensors) for v in x]
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in x):
            return {k: _encode(v, tensors) for k, v in x.items()}
        return {"$items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in x.items()]}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint")


def _decode(x, tensors: dict, where: str):
    if isinstance(x, list):
        return [_decode(v, tensors, where) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) == 1:
        (tag, value), = x.items()
        if tag == "$tensor":
            if value not in tensors:
                raise EdgeftError(f"{where}: refers to tensor {value!r}, missing from {TENSORS}; the checkpoint is "
                                  f"damaged")
            return tensors[value]
        if tag == "$float":
            return float(value)
        if tag == "$tuple":
            return tuple(_decode(value, tensors, where))
        if tag == "$items":
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value}
    return {k: _decode(v, tensors, where) for k, v in x.items()}


def save_state(folder: Path, state: dict) -> None:
    """Write `state` as FOLDER/state.json + FOLDER/tensors.safetensors, the folder appearing only whole."""
    from safetensors.torch import save_file

    tensors: dict = {}
    encoded = _encode(state, tensors)
    with atomic_dir(folder) as tmp:
        save_file(tensors, tmp / TENSORS)
        write_json(tmp / STATE, {"format": FORMAT, "state": encoded})


def load_state(folder: Path) -> dict:
    """The state saved by save_state; a damaged or foreign folder is a one-line error."""
    fix = "the checkpoint is damaged; resume from another one (delete this folder) or start without --resume"
    saved = read_json(folder / STATE, fix)
    if saved.get("format") != FORMAT or not isinstance(saved.get("state"), dict):
        raise EdgeftError(f"{folder / STATE}: not an edgeft checkpoint of format {FORMAT}; {fix}")
    tensors = load_safetensors(folder / TENSORS, fix)
    try:
        return _decode(saved["state"], tensors, str(folder / STATE))
    except (TypeError, ValueError):  # a tag holding the wrong kind of value
        raise EdgeftError(f"{folder / STATE}: damaged state; {fix}") from None
