"""PEFT methods, one module each, registered (see registry.py). Importing this package imports every module
in it, so that a new method is one new file and its test."""

import importlib
import pkgutil

from .registry import NOT_DEPLOYABLE, Method, Update, get, lr_defaults, names, of_adapter, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["NOT_DEPLOYABLE", "Method", "Update", "get", "lr_defaults", "names", "of_adapter", "register"]
