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
from .errors import EdgeftError, first_line
from .inputs import load_safetensors, read_json
from .progress import console
from .run import CHECKPOINTS

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


# ------------------------------------------------------------------------------ a training run's checkpoints
def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if p.is_dir())


def save_checkpoint(run_dir: Path, step: int, adapter: dict, optimizer: dict, scheduler, state: dict,
                    keep: int) -> None:
    """Adapter, optimizer and schedule: all a resumed run needs, since the data order and the dropout
    masks are functions of (seed, step, rank) (train.step_seed). Written by the main process only: under data
    parallelism every rank holds the same adapter and optimizer state; sharded, the main process holds them
    gathered (keyed by parameter name). Tensors go to safetensors and the rest to JSON: loading a checkpoint can
    never run code."""
    import shutil

    save_state(run_dir / CHECKPOINTS / f"step-{step:06d}", {
        "step": step, "adapter": adapter, "optimizer": optimizer, "scheduler": scheduler.state_dict(), **state})
    for old in checkpoints(run_dir)[:-max(keep, 1)]:
        shutil.rmtree(old)


def load_checkpoint(path: Path, model, optimizer, scheduler, sharded: bool) -> dict:
    """Restore the adapter, optimizer and schedule from `path`; the rest of the saved state is returned."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    blob = load_state(path)
    fix = "it is not from this training; resume from another checkpoint or start without --resume"
    kinds = {"step": int, "adapter": dict, "optimizer": dict, "scheduler": dict, "curve": list, "seen_tokens": int,
             "train_seconds": (int, float)}
    bad = [k for k, kind in kinds.items() if not isinstance(blob.get(k), kind)]
    if bad:
        raise EdgeftError(f"{path}: {', '.join(bad)} missing or of the wrong kind; {fix}")
    adapter = blob["adapter"]
    tensors = all(isinstance(v, torch.Tensor) for v in adapter.values())
    names = {n for n, p in model.named_parameters() if p.requires_grad} if sharded else get_peft_model_state_dict(model)
    if set(adapter) != set(names) or not tensors:
        raise EdgeftError(f"{path}: its adapter tensors do not match the model's LoRA modules; {fix}")
    try:
        if sharded:  # every process reads the whole state and keeps its own shard of it
            whole = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(model, adapter, options=whole)
            set_optimizer_state_dict(model, optimizer, blob["optimizer"], options=whole)
        else:
            set_peft_model_state_dict(model, adapter)
            optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise EdgeftError(f"{path}: cannot restore the training state ({first_line(e)}); {fix}") from None
    return blob


def latest_checkpoint(run_dir: Path, saved: Path, before: dict | None, now: dict, keys: tuple[str, ...],
                      unsaved: dict) -> Path:
    """The checkpoint --resume continues from, after checking that the settings in `keys` are the interrupted
    run's (`before`, read from `saved`; a key it lacks takes its `unsaved` default)."""
    found = checkpoints(run_dir)
    if not found:
        pickled = sorted((run_dir / CHECKPOINTS).glob("step-*.pt"))
        if pickled:
            raise EdgeftError(f"--resume: {pickled[-1]} is an old pickle checkpoint, which runs code when loaded; "
                              f"edgeft no longer reads them: start without --resume")
        raise EdgeftError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS}; start without --resume")
    if before is not None:
        changed = [k for k in keys if before.get(k, unsaved.get(k)) != now.get(k)]
        if changed:
            raise EdgeftError(f"--resume: {', '.join(changed)} differ from the interrupted run ({saved}); resume with "
                              f"the same settings or use a new --run")
    return found[-1]


class StopAtStepBoundary:
    """Ctrl-C during training: the first asks the loop to stop after the optimizer step it is in (the loop
    saves a checkpoint there, so resuming gives exactly the adapter an uninterrupted run would); a second
    raises KeyboardInterrupt at once, saving nothing. A KeyboardInterrupt anywhere else in a step would
    leave a state that is half one step and half the next (parameters updated, schedule not yet), which a
    checkpoint must never record. Installed only in the main thread (Python delivers signals there)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        console.print("Ctrl-C: stopping at the end of this step, where a checkpoint is saved (Ctrl-C again: "
                      "stop at once, saving nothing of this step)", style="yellow")

    def __enter__(self) -> "StopAtStepBoundary":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
