"""Library messages a user cannot act on, silenced by their exact text; everything else still shows.

Each entry is a message a library prints on every run of a step, that says nothing about the user's model
or data and asks for nothing the user should do (a deprecation inside a library we call, an optional
kernel package that is not needed). `edgeft --verbose` shows them all again.
"""

from __future__ import annotations

import logging
import warnings

# (category, start of the message) for warnings.warn
WARNINGS = [
    # transformers 5 renamed checkpointing to "activation checkpointing"; peft still asks the old name.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated"),
]
# logger name -> starts of messages it logs
LOG_MESSAGES = {
    # bitsandbytes looks for an optional hub kernel package on AVX512-BF16 CPUs and falls back without it.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


class _Drop(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def silence() -> None:
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, starts in LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(_Drop(starts))
