"""The registry of PEFT methods: what train, merge, export and compare ask about a method.

A method is one module in this package (lora.py, rslora.py, dora.py, ia3.py) holding a `Method` subclass,
registered with `@register`, as converters/families.py registers architectures and peft its tuners
(`register_peft_method`). A method says how peft builds it, which modules it targets by default, its learning
rates, how its trained update is read from the adapter's safetensors and folded into a weight, and whether
llama.cpp's adapter GGUF can carry it. Adding a method is one module (imported in __init__.py) and its test.
No torch or peft at import time: the CLI lists methods without loading them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

from ..errors import EdgeftError

if TYPE_CHECKING:
    import torch

# Methods peft has that cannot reach a board: they add virtual tokens no GGUF or ONNX runtime carries.
NOT_DEPLOYABLE = {"prompt": "prompt tuning", "prefix": "prefix tuning", "p_tuning": "p-tuning"}


class Update(Protocol):
    """One base weight's trained update, folded as peft's own merge folds it: W' = update.apply(W)."""

    def shape(self) -> list[int | None]: ...

    def apply(self, w: "torch.Tensor", rows: slice = slice(None)) -> "torch.Tensor": ...


class Method:
    name: ClassVar[str]
    order: ClassVar[int]  # where help and errors list it
    summary: ClassVar[str]  # one phrase for --help
    peft_type: ClassVar[str]  # adapter_config.json's peft_type
    lr: ClassVar[float]  # train's default peak rate
    # compare's default for its short runs (15 steps), measured on the demo task (README "PEFT methods")
    compare_lr: ClassVar[float]
    adapter_gguf: ClassVar[bool]  # llama.cpp's LoRA adapter GGUF can hold the update (else: export it fused)

    def matches(self, config: dict) -> bool:
        """Whether a saved adapter_config.json is this method."""
        raise NotImplementedError

    def default_targets(self, projections: list[str]) -> list[str]:
        """The modules trained when --target-modules is not given, of the model's projections."""
        return projections

    def peft_config(self, c, targets: list[str]):
        """peft's config for a TrainConfig `c`."""
        raise NotImplementedError

    def check_config(self, config: dict, path) -> None:
        """Refuse an adapter_config.json whose numbers this method cannot use (one line naming the field)."""

    def read(self, tensors: dict, config: dict, arg) -> dict[str, Update]:
        """Base tensor name -> its update, from the adapter's tensors."""
        raise NotImplementedError


_METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS:  # two modules claiming one name would make the winner depend on import order
        raise ValueError(f"PEFT method {cls.name!r} is registered twice ({type(_METHODS[cls.name]).__name__}, "
                         f"{cls.__name__})")
    _METHODS[cls.name] = cls()
    return cls


def names() -> tuple[str, ...]:
    return tuple(sorted(_METHODS, key=lambda name: _METHODS[name].order))


def get(name: str, flag: str = "--method") -> Method:
    if name in NOT_DEPLOYABLE:
        raise EdgeftError(f"{flag} {name}: {NOT_DEPLOYABLE[name]} adds virtual tokens that no GGUF or ONNX runtime "
                          f"carries, so it cannot reach a board; use {', '.join(names())}")
    if name not in _METHODS:
        raise EdgeftError(f"{flag} {name}: unknown; use {', '.join(names())}")
    return _METHODS[name]


def of_adapter(config: dict, where) -> Method:
    """The method of a saved adapter (its adapter_config.json)."""
    found = [m for m in _METHODS.values() if m.matches(config)]
    if len(found) != 1:
        kind = config.get("peft_type", "LORA")
        raise EdgeftError(f"{where}: a {kind} adapter{' of an unclear kind' if found else ''}; edgeft merges "
                          f"{', '.join(names())} adapters")
    return found[0]


def lr_defaults(attribute: str) -> dict[str, float]:
    """Each method's rate of one kind ("lr" or "compare_lr")."""
    return {name: getattr(_METHODS[name], attribute) for name in names()}
