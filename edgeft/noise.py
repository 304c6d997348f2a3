"""Library messages a user cannot act on, silenced by their exact text; everything else still shows.

Each entry is a message a library prints on every run of a step, that says nothing about the user's model
or data and asks for nothing the user should do (a deprecation inside a library we call, an optional
kernel package that is not needed). `edgeft --verbose` shows them all again.
"""

from __future__ import annotations

import logging
import re
import warnings

# (category, start of the message) for warnings.warn
WARNINGS = [
    # transformers 5 renamed checkpointing to "activation checkpointing"; peft still asks the old name.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated"),
    # torch.onnx.export (dynamo) walks pytrees with an API torch itself deprecated; nothing for the user to do.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
]
# logger name -> starts of messages it logs
LOG_MESSAGES = {
    # bitsandbytes looks for an optional hub kernel package on AVX512-BF16 CPUs and falls back without it.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # torch.onnx's exporter registers torchvision's ops when it can; a language model uses none of them.
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed",),
}


# starts of llama.cpp log lines (through llama-cpp-python's log callback, which prints them to stderr)
LLAMA_CPP_LINES = (
    # The quantizer names every tensor whose rows do not fit a k-quant's 256-value blocks (180 lines for the
    # default model's Q4_K_M); the export entry counts them instead (metrics.tensor_types and its note).
    re.compile(r"warning: \S+\s+- ncols\s+\d+ not divisible by"),
    re.compile(r"\w+: WARNING: \d+ of \d+ tensor\(s\) required fallback quantization"),
    # A mixed recipe (export --budget) overrides every tensor's type, one line each; the entry records the recipe.
    re.compile(r"llama_tensor_get_type: \S+\s+- applying manual override"),
)
_quiet = False  # silence() was called: quiet_llama_cpp_log() may install its filter
_llama_cpp_filter = None  # the installed callback (ctypes must keep it alive)


class _Drop(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def silence() -> None:
    global _quiet
    _quiet = True
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, starts in LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(_Drop(starts))


def quiet_llama_cpp_log() -> None:
    """After silence(): drop LLAMA_CPP_LINES from llama.cpp's log and pass everything else on to the callback
    llama-cpp-python installed. A line may arrive in pieces; the pieces after a dropped start are dropped up to
    its newline. Called before llama.cpp work rather than by silence(), which must not import llama_cpp."""
    global _llama_cpp_filter
    if not _quiet or _llama_cpp_filter is not None:
        return
    import ctypes

    import llama_cpp

    previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
    dropping = False

    def forward(level: int, text: bytes, data) -> None:
        nonlocal dropping
        line = text.decode("utf-8", "replace")
        if dropping or any(p.match(line) for p in LLAMA_CPP_LINES):
            dropping = not line.endswith("\n")
        elif previous:
            previous(level, text, data)

    _llama_cpp_filter = llama_cpp.llama_log_callback(forward)
    llama_cpp.llama_log_set(_llama_cpp_filter, user_data)
