"""llama.cpp as a backend, through llama-cpp-python: logits per window, tokenization, greedy generation,
quantization (`llama_model_quantize`, the same code as the `llama-quantize` tool).

Scoring uses scoring.score with these logits, so a GGUF is measured on exactly the run's token ids in
exactly the windows `edgeft eval` uses.

A GGUF that did not come from this process (a run folder can be copied from anywhere) is checked first:
its header by edgeft.inputs.check_gguf, then a load and one decode in a child process, because llama.cpp
answers some damaged files with GGML_ASSERT, which aborts the whole process. In the child an abort is an
exit status, turned into a one-line error here. Files the exporter has just written are `trusted`.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from pathlib import Path

import numpy as np

from .errors import EdgeftError
from .inputs import check_gguf

# --quant name -> llama.cpp file type (llama_ftype); f16/bf16/f32 come from the converter itself.
QUANT_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
               "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
               "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
               "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
               "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K"}


# llama-cpp-python silences a load (verbose=False) by pointing sys.stdout/sys.stderr and the fds 1 and 2 at
# /dev/null and back. Two loads at once in one process (the boards of a fleet smoke score the same GGUF) can
# restore each other's /dev/null and silence the process for good, so loads take turns.
_LOAD = threading.Lock()


def _threads(threads: int | None) -> int:
    return threads or max(1, os.cpu_count() or 1)


# The child process of `probe`: load, make a small context, decode one token.
_PROBE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], lora_path=sys.argv[2] or None, n_ctx=16, n_batch=16, verbose=False, seed=0)
llm.eval([min(1, llm.n_vocab() - 1)])
"""
PROBE_TIMEOUT_S = 600


def probe(path: Path, lora: Path | None = None) -> None:
    """Load `path` (with `lora`) and decode a token in a child process; an abort or a crash there (a damaged
    file that llama.cpp asserts on) becomes an EdgeftError here instead of killing this process."""
    import signal
    import subprocess
    import sys

    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(lora or "")], capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S, errors="replace")
    except subprocess.TimeoutExpired:
        raise EdgeftError(f"{path}: llama.cpp did not finish loading it in {PROBE_TIMEOUT_S} s") from None
    if proc.returncode == 0:
        return
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    said = lines[-1].strip()[:200] if lines else "no message"
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else proc.returncode
        asserted = next((line.strip()[:200] for line in lines if "GGML_ASSERT" in line or "error" in line.lower()),
                        said)
        raise EdgeftError(f"{path}: llama.cpp crashed loading it ({name}: {asserted}); the file is damaged or not a "
                          f"model this llama.cpp supports")
    raise EdgeftError(f"{path}: llama.cpp cannot load it ({said}); the file is damaged or not a model this "
                      f"llama.cpp supports")


class LlamaCpp:
    """One loaded GGUF (optionally with a LoRA GGUF applied at load time, as `--lora` does)."""

    def __init__(self, path: Path, n_ctx: int = 512, threads: int | None = None, lora: Path | None = None,
                 trusted: bool = False):
        from jinja2 import TemplateError
        from llama_cpp import Llama

        if not trusted:
            for f in (path, lora):
                if f is not None:
                    check_gguf(f)
            probe(Path(path), lora)
        self.path = Path(path)
        try:
            with _LOAD:
                self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                                 n_threads=_threads(threads), lora_path=str(lora) if lora else None, verbose=False,
                                 seed=0)
        except (ValueError, RuntimeError) as e:
            raise EdgeftError(f"{path}: llama.cpp cannot load it ({e})") from None
        except TemplateError as e:  # llama-cpp-python compiles the GGUF's chat template when it loads
            raise EdgeftError(f"{path}: its chat template (tokenizer.chat_template) does not parse ({e}); fix the "
                              f"template in the model folder and export again") from None
        self.n_ctx = n_ctx

    def logits(self, window_ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(window_ids)
        return np.asarray(self.llm.scores[: len(window_ids)], dtype=np.float32)

    @property
    def bos(self) -> int | None:
        """The BOS llama.cpp puts in front of a prompt for this GGUF (its vocabulary's add_bos_token, as
        llama-perplexity and edgeft-board read it), or None when it adds none."""
        from llama_cpp import llama_vocab_bos, llama_vocab_get_add_bos

        vocab = self.llm._model.vocab
        return int(llama_vocab_bos(vocab)) if llama_vocab_get_add_bos(vocab) else None

    def tokenize(self, text: str) -> list[int]:

        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def generate(self, prompt_ids: list[int], max_tokens: int = 48) -> tuple[list[int], bool]:
        """Greedy continuation of `prompt_ids`; returns (new ids, stopped at an end-of-generation token)."""
        from llama_cpp import llama_vocab_is_eog

        self.llm.reset()
        out: list[int] = []
        vocab = self.llm._model.vocab
        for tok in self.llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            if llama_vocab_is_eog(vocab, tok):
                return out, True
            out.append(tok)
            if len(out) >= max_tokens or len(prompt_ids) + len(out) >= self.n_ctx:
                break
        return out, False

    def close(self) -> None:
        self.llm.close()


# The file type a header names for a file whose tensors are mostly of one ggml type (what `llama-cli`, Ollama and
# `show` print as the model's quantization); the mixed recipe's header names its bulk type, not q8_0.
FILE_TYPE_OF = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
                "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
                "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
                "q3_k": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                "q5_k": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None, imatrix: dict | None = None,
             types: dict[str, str] | None = None, requantize: bool = False, file_type: str | None = None) -> None:
    """llama.cpp's quantization of `src` into `dst`, optionally guided by an importance matrix
    (edgeft.imatrix: GGUF tensor name -> mean squared input per column). `types` (GGUF tensor name -> ggml type
    name, e.g. 'q5_0') overrides llama.cpp's choice for those tensors (its `tt_overrides`, what llama-quantize's
    --tensor-type passes); `quant` still decides the others and, unless `file_type` (a FILE_TYPE_OF key) says
    otherwise, the file type the header names."""
    import llama_cpp

    if quant not in QUANT_TYPES:
        raise EdgeftError(f"--quant {quant}: use f16, bf16, f32 or one of {', '.join(QUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FILE_TYPE_OF[file_type] if file_type else QUANT_TYPES[quant])
    params.nthread = _threads(threads)
    params.allow_requantize = requantize
    keep = None
    if imatrix:
        from .imatrix import as_ctypes

        arr, keep = as_ctypes(imatrix)
        params.imatrix = ctypes.cast(arr, type(params.imatrix))
    overrides = None
    if types:
        overrides = _tensor_overrides(types)
        params.tt_overrides = ctypes.cast(overrides, type(params.tt_overrides))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep, overrides  # the buffers the imatrix and override arrays point into lived until here
    if rc != 0:
        # llama.cpp says only "failed"; a full disk is the cause the user can fix, and the partial output is
        # still there now, so the free space tells (a quantized file is never larger than its source).
        free = shutil.disk_usage(dst.parent).free
        if free < src.stat().st_size:
            raise EdgeftError(f"{dst}: no space left on device while quantizing to {quant} ({free / 2**20:.1f} MiB "
                              f"free, up to {src.stat().st_size / 2**20:.1f} MiB needed); free space there or write "
                              f"elsewhere (--out/--run); nothing half-written was kept")
        raise EdgeftError(f"llama.cpp could not quantize {src} to {quant} (code {rc})")


def stock_size(src: Path, quant: str, imatrix: dict | None = None) -> int:
    """The size llama.cpp's stock recipe `quant` would give `src`'s tensors, without writing it (its dry run,
    which reports the total only in its log, to 0.01 MiB: read from there)."""
    import re

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    params.dry_run = True
    keep = None
    if imatrix:
        from .imatrix import as_ctypes

        arr, keep = as_ctypes(imatrix)
        params.imatrix = ctypes.cast(arr, type(params.imatrix))
    said: list[str] = []
    previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
    capture = llama_cpp.llama_log_callback(lambda level, text, data: said.append(text.decode("utf-8", "replace")))
    llama_cpp.llama_log_set(capture, user_data)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), os.devnull.encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(previous, user_data)
    del keep
    log = "".join(said)
    sizes = [re.search(rf"{what} size\s*=\s*([0-9.]+) MiB", log) for what in ("model", "quant")]
    if rc != 0 or not all(sizes):
        raise EdgeftError(f"llama.cpp could not size {src} as {quant} (code {rc})")
    # the file is its tensors plus the header (metadata, vocabulary), which quantizing leaves as it is
    tensors, quantized = (float(m.group(1)) * 2**20 for m in sizes)
    return int(Path(src).stat().st_size - tensors + quantized)


def ggml_type(name: str) -> int:
    """A ggml type's number from its name ('q4_0', 'q6_k', 'f16')."""
    from gguf import GGMLQuantizationType

    try:
        return int(GGMLQuantizationType[name.upper()])
    except KeyError:
        raise EdgeftError(f"{name}: not a ggml tensor type") from None


def _tensor_overrides(types: dict[str, str]):
    """llama.cpp's override array: one anchored, escaped pattern per tensor (llama.cpp matches them as regular
    expressions and takes the first that matches, so a name must match only itself), null-terminated."""
    import re

    import llama_cpp

    arr = (llama_cpp.llama_model_tensor_override * (len(types) + 1))()
    for i, (name, type_name) in enumerate(sorted(types.items())):
        arr[i].pattern = f"^{re.escape(name)}$".encode()
        arr[i].type = ggml_type(type_name)
    arr[len(types)].pattern = None
    return arr


_GGML = None


def _ggml():
    """libggml-base of the installed binding: the row quantizers llama_model_quantize itself calls."""
    global _GGML
    if _GGML is None:
        import llama_cpp

        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        _GGML = lib
    return _GGML


def row_bytes(type_name: str, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` values stored as `type_name` (ggml_row_size)."""
    return int(_ggml().ggml_row_size(ggml_type(type_name), n_per_row))


def quantize_rows(type_name: str, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """`rows` (float32, [n, k]) quantized by ggml's own quantizer for `type_name` (ggml_quantize_chunk: the
    function llama_model_quantize calls per tensor, with the importance matrix the same way) and read back as
    float32 with gguf-py's dequantizer: what llama.cpp would store for these rows."""
    from gguf import GGMLQuantizationType, quants

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, k = rows.shape
    size = row_bytes(type_name, k)
    out = np.empty(n * size, dtype=np.uint8)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    _ggml().ggml_quantize_chunk(ggml_type(type_name), rows.ctypes.data, out.ctypes.data, 0, n, k,
                                None if weights is None else weights.ctypes.data)
    return quants.dequantize(out.reshape(n, size), GGMLQuantizationType[type_name.upper()]).reshape(n, k)


def binding_version() -> str:
    """The installed llama-cpp-python's version: it names the llama.cpp source (and converter) edgeft uses."""
    from importlib import metadata

    return metadata.version("llama_cpp_python")


def reference_tree():
    """llama.cpp's converter of the installed binding, as converters.compare takes it."""
    from .converters.compare import ReferenceTree
    from .models import edgeft_home

    return ReferenceTree(src=vendored_source(), version=binding_version(), pydeps=edgeft_home() / "src" / "bench-pydeps")


def vendored_source() -> Path:
    """The llama.cpp source tree that the installed llama-cpp-python was built from (its PyPI sdist vendors
    it): fetched once with pip into $EDGEFT_HOME/src, so tools built from it (and its convert_hf_to_gguf.py)
    read and write the same GGUF version as the Python binding. Needs PyPI (or a pip cache/index that has the
    sdist)."""
    import subprocess
    import sys
    import tarfile
    import tempfile

    from .atomic import atomic_dir
    from .models import edgeft_home

    version = binding_version()
    target = edgeft_home() / "src" / f"llama-cpp-python-{version}"
    if (target / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return target / "vendor" / "llama.cpp"
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={version}", "-d", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode or not sdists:
            raise EdgeftError(f"could not fetch the llama-cpp-python {version} source with pip "
                              f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no sdist'}); "
                              f"it is needed once, for llama.cpp's tools and its converter")
        with atomic_dir(target) as out, tarfile.open(sdists[0]) as tar:
            tar.extractall(tmp, filter="data")
            (extracted,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
            for item in extracted.iterdir():
                item.rename(out / item.name)
    return target / "vendor" / "llama.cpp"
