"""Our GGUF against llama.cpp's: run llama.cpp's own convert_hf_to_gguf.py on a folder and compare two GGUFs tensor
by tensor (names, shapes, types, values) and key by key. Used by the tests and bench/convert.py.

llama.cpp's script is the one vendored in the llama-cpp-python sdist of the installed version
(edgeft.llamacpp.vendored_source) and runs unmodified in its own process, with one exception: it recognises a
byte-level BPE pre-tokenizer only by a hash of how hub tokenizers split a test string, which no freshly trained
vocabulary can match. `pre_tokenizer=` names the pre-tokenizer for that case only (the hash lookup is wrapped, not
replaced: a hub tokenizer it knows is still named by llama.cpp); tokenizer parity in llama.cpp then proves the name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_WRAPPER = r"""
import os, runpy, sys
script = sys.argv[1]
src = os.path.dirname(script)
sys.path.insert(0, src)
sys.path.insert(1, os.path.join(src, "gguf-py"))
pre = os.environ.get("EDGEFT_REFERENCE_PRE")
if pre:
    from conversion import base
    lookup = base.TextModel.get_vocab_base_pre
    def named(self, tokenizer):
        try:
            return lookup(self, tokenizer)
        except NotImplementedError:  # hash unknown: a tokenizer trained for the tests
            return pre
    base.TextModel.get_vocab_base_pre = named
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def _pythonpath_with_sentencepiece() -> str | None:
    """llama.cpp's converter imports sentencepiece even for BPE models. It is in edgeft's test extra; without it, a
    private --target install under $EDGEFT_HOME/src is used."""
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        return None
    from edgeft.models import edgeft_home

    target = edgeft_home() / "src" / "bench-pydeps"
    if not (target / "sentencepiece").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        "sentencepiece"], check=True)
    return str(target)


# Linux carries a process's RSS high-water mark across exec (ru_maxrss of a fork+exec'd child starts at its parent's
# footprint, ~400 MB for a parent that imported torch). So the measured command is started by a bare Python launcher
# (~10 MB) and its peak is the launcher's wait4() figure for it.
_LAUNCHER = r"""
import os, sys
out = sys.argv[1]
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write("%d %d" % (os.waitstatus_to_exitcode(status), usage.ru_maxrss))
"""


def measured(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Run `cmd`; wall seconds and its peak RSS (itself and the children it waited for)."""
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".rusage") as report:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, report.name, *map(str, cmd)], env=env, cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - start
        err = proc.stderr.decode(errors="replace")
        parts = report.read().split()
    if proc.returncode or len(parts) != 2 or parts[0] != "0":
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed:\n{err[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": int(parts[1]) / 1024, "stderr": err}


def reference_convert(model_dir: Path, out: Path, outtype: str = "f16", pre_tokenizer: str | None = None) -> dict:
    """llama.cpp's convert_hf_to_gguf.py on `model_dir` in a subprocess; returns `measured`'s figures."""
    from edgeft.llamacpp import vendored_source

    src = vendored_source()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    extra = _pythonpath_with_sentencepiece()
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
    if pre_tokenizer:
        env["EDGEFT_REFERENCE_PRE"] = pre_tokenizer
    return measured([sys.executable, "-c", _WRAPPER, str(src / "convert_hf_to_gguf.py"), str(model_dir),
                     "--outtype", outtype, "--outfile", str(out)], env=env, cwd=str(src))


def ours_convert(model_dir: Path, out: Path, outtype: str = "f16") -> dict:
    """Our converter in its own process (so its peak RSS is measured the same way)."""
    return measured([sys.executable, "-m", "edgeft.converters.hf_to_gguf", str(model_dir), str(out), "--outtype",
                     outtype], env=dict(os.environ, HF_HUB_OFFLINE="1"))


def _fields(reader) -> dict:
    out = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            v = f.contents()
        except Exception:
            v = None
        out[k] = v
    return out


def compare(ours: Path, theirs: Path) -> dict:
    """Tensor and key differences between two GGUFs. Values are compared bit for bit (a NaN equals itself)."""
    from gguf import GGUFReader

    a, b = GGUFReader(ours), GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    different = []
    for n in sorted(ta.keys() & tb.keys()):
        x, y = ta[n], tb[n]
        if (x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape)
                or np.asarray(x.data).tobytes() != np.asarray(y.data).tobytes()):
            different.append(n)
    ka, kb = _fields(a), _fields(b)
    return {"tensors_ours": len(ta), "tensors_theirs": len(tb), "only_ours": sorted(ta.keys() - tb.keys()),
            "only_theirs": sorted(tb.keys() - ta.keys()), "different": different,
            "keys_only_ours": sorted(ka.keys() - kb.keys()), "keys_only_theirs": sorted(kb.keys() - ka.keys()),
            "keys_different": sorted(k for k in ka.keys() & kb.keys() if ka[k] != kb[k]),
            "values": {k: (ka.get(k), kb.get(k)) for k in (ka.keys() | kb.keys())
                       if ka.get(k) != kb.get(k) and not isinstance(ka.get(k), list)}}


def tensors_equal(cmp: dict) -> bool:
    return not (cmp["only_ours"] or cmp["only_theirs"] or cmp["different"])


def key_differences(cmp: dict) -> set[str]:
    return set(cmp["keys_only_ours"]) | set(cmp["keys_only_theirs"]) | set(cmp["keys_different"])
