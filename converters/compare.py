"""Our GGUF against llama.cpp's: run llama.cpp's own convert_hf_to_gguf.py on a folder and compare two GGUFs tensor
by tensor (names, shapes, types, values) and key by key. Used by the tests, bench/convert.py and `edgeft export`.

llama.cpp's script is the one vendored in the llama-cpp-python sdist of the installed version, handed in as a
`ReferenceTree` (edgeft.llamacpp.reference_tree builds it: converters/ imports nothing from edgeft, so it stays a
library the edgeft package uses, never the other way round), and runs unmodified in its own process, with one
exception: it recognises a byte-level BPE pre-tokenizer only by a hash of how hub tokenizers split a test string,
which no freshly trained vocabulary can match. `pre_tokenizer=` names the pre-tokenizer for that case only (the hash lookup is wrapped, not
replaced: a hub tokenizer it knows is still named by llama.cpp); tokenizer parity in llama.cpp then proves the name.

`llamacpp_convert` is the same run as `edgeft export --format gguf --converter llamacpp` uses it (and `auto`, for an
architecture our registry lacks): the name for an unknown hash is the one our vocabulary reader derives from the
tokenizer's own pre-tokenizer, and a failure is one line naming the architecture.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .families import ConversionError, read_config


@dataclass(frozen=True)
class ReferenceTree:
    """llama.cpp's converter as the caller has it installed: this package's whole interface to its host."""
    src: Path  # a llama.cpp source tree holding convert_hf_to_gguf.py
    version: str  # what the conversion is recorded as (the llama-cpp-python release the tree came from)
    pydeps: Path  # where sentencepiece is installed privately when the environment lacks it


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
        except NotImplementedError:  # hash unknown: a tokenizer trained for the tests, or one not in its table
            print("edgeft-named-pre-tokenizer:", pre, file=sys.stderr)  # the caller records that we named it
            return pre
    base.TextModel.get_vocab_base_pre = named
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def _pythonpath_with_sentencepiece(target: Path) -> str | None:
    """llama.cpp's converter imports sentencepiece even for BPE models. It is in edgeft's test extra; without it, a
    private --target install in `target` is used."""
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        return None
    if not (target / "sentencepiece").is_dir():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                               "sentencepiece"], capture_output=True, text=True)
        if proc.returncode:
            raise ConversionError(f"llama.cpp's converter needs the sentencepiece package and pip could not install "
                                  f"it into {target}; pip install sentencepiece (edgeft's test extra has it)")
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


def reference_command(tree: ReferenceTree, model_dir: Path, out: Path, outtype: str = "f16",
                      pre_tokenizer: str | None = None) -> tuple[list[str], dict, str]:
    """(command, environment, working folder) that run llama.cpp's convert_hf_to_gguf.py on `model_dir` with the
    current Python, writing `out`."""
    src = tree.src
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    extra = _pythonpath_with_sentencepiece(tree.pydeps)
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
    if pre_tokenizer:
        env["EDGEFT_REFERENCE_PRE"] = pre_tokenizer
    return ([sys.executable, "-c", _WRAPPER, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
             "--outfile", str(out)], env, str(src))


def reference_convert(tree: ReferenceTree, model_dir: Path, out: Path, outtype: str = "f16",
                      pre_tokenizer: str | None = None) -> dict:
    """llama.cpp's convert_hf_to_gguf.py on `model_dir` in a subprocess; returns `measured`'s figures."""
    cmd, env, cwd = reference_command(tree, model_dir, out, outtype, pre_tokenizer)
    return measured(cmd, env=env, cwd=cwd)


# Trees before the conversion/ package registered each class in the one script, as @Model.register("Arch", ...)
# and later @ModelBase.register(...); the strings inside are the architecture names.
_REGISTER = re.compile(r"@(?:Model|ModelBase)\.register\(([^)]*)\)")
_QUOTED = re.compile(r"""["']([^"'\s]+)["']""")


def llamacpp_architectures(src: Path) -> set[str]:
    """The HF architectures llama.cpp's converter at `src` converts as text models, read from its source (importing it
    would cost torch and run its module code). Where there is a conversion/ package, its TEXT_MODEL_MAP is the table
    the script looks text architectures up in (the decorators there also register vision projectors, which a text
    export cannot use); otherwise the register decorators of the script and its modules."""
    package = src / "conversion" / "__init__.py"
    if package.is_file():
        for node in ast.parse(package.read_text(encoding="utf-8")).body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if any(getattr(t, "id", "") == "TEXT_MODEL_MAP" for t in targets):
                return set(ast.literal_eval(node.value))
    files = [src / "convert_hf_to_gguf.py", *sorted((src / "conversion").glob("*.py"))]
    return {name for f in files if f.is_file() for args in _REGISTER.findall(f.read_text(encoding="utf-8"))
            for name in _QUOTED.findall(args)}


def llamacpp_architecture(config: dict) -> str:
    """The architecture llama.cpp's converter picks for a text export: a text_config's own, else the model's."""
    listed = (config.get("text_config") or {}).get("architectures") or config.get("architectures") or ["?"]
    return listed[0]


def tokenizer_pre_name(model_dir: Path, config: dict) -> str | None:
    """The BPE pre-tokenizer name our vocabulary reader derives for `model_dir` (None for a SentencePiece model or a
    pre-tokenizer it does not recognise); llama.cpp's run is told it only when its hash table has none."""
    from .gguf_vocab import effective_pre_tokenizer, gpt2_pre_name

    tokenizer_json = model_dir / "tokenizer.json"
    if (model_dir / "tokenizer.model").is_file() or not tokenizer_json.is_file():
        return None
    try:
        return gpt2_pre_name(effective_pre_tokenizer(model_dir, config, json.loads(tokenizer_json.read_text())))
    except ValueError:  # VocabError or a damaged tokenizer.json: then llama.cpp's own refusal is what the user sees
        return None


def llamacpp_convert(tree: ReferenceTree, model_dir: Path, out: Path, outtype: str = "f16") -> dict:
    """llama.cpp's convert_hf_to_gguf.py as edgeft export's converter, writing `out` (the caller makes it atomic).
    Returns what the ledger records; a failure of the script is a one-line ConversionError naming the architecture."""
    from gguf import GGUFReader

    config = read_config(model_dir)
    arch = llamacpp_architecture(config)
    pre = tokenizer_pre_name(model_dir, config)
    cmd, env, cwd = reference_command(tree, model_dir, out, outtype, pre)
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          errors="replace")
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    name = f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {tree.version})"
    if proc.returncode:
        said = lines[-1][:300] if lines else f"exit status {proc.returncode}"
        raise ConversionError(f"{model_dir}: {name} failed on {arch} ({said}); fix what it names in the model folder "
                              f"(or install the package it names) and export again")
    reader = GGUFReader(out)
    named = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("edgeft-named-pre-tokenizer:")),
                 None)
    return {"converter": name, "arch": reader.fields["general.architecture"].contents(),
            "tensors": len(reader.tensors), "pre_tokenizer_named_by_edgeft": named}


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
