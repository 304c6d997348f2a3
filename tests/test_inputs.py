"""The validated reads of files users hand us: JSON, safetensors, and GGUF checked before llama.cpp sees it
(with the loads that can abort run in a child process). Damaged files are real files: a real GGUF from our
converter rewritten with one bad value, or fuzzed byte by byte."""

import math
import random
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from edgeft.errors import EdgeftError
from edgeft.inputs import check_gguf, check_safetensors, load_safetensors, parse_json, read_json


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory):
    from edgeft.converters.hf_to_gguf import convert

    path = tmp_path_factory.mktemp("gguf") / "tiny-F16.gguf"
    convert(tiny_llama, path, "f16")
    return path


def rewrite_gguf(src, dst, meta=None, alignment=None, tokens=None):
    """A copy of the GGUF `src` written by the gguf package's own writer, with metadata replaced
    (meta: key -> (value, GGUFValueType)), another alignment, or the vocabulary changed by `tokens`."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    if alignment is not None:
        writer.data_alignment = alignment
        writer.add_uint32("general.alignment", alignment)
    meta = dict(meta or {})
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.alignment"):
            continue
        value, vtype = meta.pop(f.name, (f.contents(), f.types[0]))
        if f.name == "tokenizer.ggml.tokens" and tokens is not None:
            value = tokens(value)
        writer.add_key_value(f.name, value, vtype, f.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def raw_llama_load(path) -> int:
    """llama.cpp's own load of `path` with nothing of ours around it, in a child: its exit status
    (negative: killed by that signal, e.g. -6 for the SIGABRT of a GGML_ASSERT)."""
    code = "import sys\nfrom llama_cpp import Llama\nLlama(model_path=sys.argv[1], n_ctx=16, verbose=False).eval([1])"
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True).returncode


def _damaged(kind):
    """The damage that aborted the whole process in the issue's fuzzing (GGML_ASSERT, SIGABRT)."""
    from gguf import GGUFValueType as T

    return {
        "alignment 1": dict(alignment=1),
        "absurd block count": dict(meta={"llama.block_count": (100_000, T.UINT32)}),
        "NaN epsilon": dict(meta={"llama.attention.layer_norm_rms_epsilon": (math.nan, T.FLOAT32)}),
        "duplicate vocabulary entry": dict(tokens=lambda t: t[:10] + [t[9]] + t[11:]),
    }[kind]


DAMAGE = {"alignment 1": "general.alignment is 1", "absurd block count": "llama.block_count is 100000",
          "NaN epsilon": "layer_norm_rms_epsilon is nan", "duplicate vocabulary entry": "repeated entry"}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_gguf_damage_that_aborts_llama_cpp_is_refused_before_it_loads(tiny_gguf, tmp_path, kind):
    bad = rewrite_gguf(tiny_gguf, tmp_path / "bad.gguf", **_damaged(kind))
    with pytest.raises(EdgeftError, match=f"bad.gguf: .*{DAMAGE[kind]}.*export or download it again"):
        check_gguf(bad)


def test_a_good_gguf_and_its_faithful_copy_pass(tiny_gguf, tmp_path):
    header = check_gguf(tiny_gguf)
    assert header.architecture == "llama" and len(header.tensors) == 20
    copy = check_gguf(rewrite_gguf(tiny_gguf, tmp_path / "copy.gguf"))
    assert [t[:3] for t in copy.tensors] == [t[:3] for t in header.tensors]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_llama_cpp_really_aborts_on_that_damage_and_the_child_probe_turns_it_into_an_error(tiny_gguf, tmp_path,
                                                                                          kind):
    """The danger is real (llama.cpp alone dies by SIGABRT), and the backstop for what a header check does
    not know: the load in a child, whose abort is an error here."""
    from edgeft.llamacpp import LlamaCpp, probe

    bad = rewrite_gguf(tiny_gguf, tmp_path / "bad.gguf", **_damaged(kind))
    assert raw_llama_load(bad) == -6
    with pytest.raises(EdgeftError, match="bad.gguf: llama.cpp crashed loading it \\(SIGABRT"):
        probe(bad)
    with pytest.raises(EdgeftError, match=DAMAGE[kind]):
        LlamaCpp(bad, n_ctx=16)
    LlamaCpp(tiny_gguf, n_ctx=16).close()  # a good file from outside passes both checks


_EXTREMES = [0, 1, 7, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]


def fuzz_gguf(good: bytes, data_start: int, rng: random.Random) -> bytes:
    """One damaged copy: bytes of the header flipped, a 32/64-bit field smashed to an extreme, the file cut
    short, or bytes of the tensor data changed."""
    b = bytearray(good)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(data_start)] = rng.randrange(256)
    elif kind in (1, 2):
        size = 8 if kind == 1 else 4
        pos = rng.randrange(0, data_start - size)
        value = rng.choice(_EXTREMES + [rng.getrandbits(64)]) % 2 ** (8 * size)
        b[pos:pos + size] = value.to_bytes(size, "little")
    elif kind == 3:
        del b[rng.randrange(len(b)):]
    else:
        for _ in range(16):
            b[rng.randrange(data_start, len(b))] = rng.randrange(256)
    return bytes(b)


def test_fuzzed_ggufs_are_checked_fast_and_never_raise_anything_but_a_one_line_error(tiny_gguf, tmp_path):
    good = tiny_gguf.read_bytes()
    start = check_gguf(tiny_gguf).data_start
    rng = random.Random(7)
    path = tmp_path / "fuzz.gguf"
    refused = passed = 0
    slowest = 0.0
    for _ in range(400):
        path.write_bytes(fuzz_gguf(good, start, rng))
        t0 = time.perf_counter()
        try:
            check_gguf(path)
            passed += 1
        except EdgeftError as e:
            assert "\n" not in str(e) and str(e).startswith(str(path))
            refused += 1
        slowest = max(slowest, time.perf_counter() - t0)
    print(f"fuzz gguf header: refused {refused}, passed {passed}, 0 other exceptions")  # README's counts
    assert refused > 150 and passed > 50, (refused, passed)  # both outcomes are exercised
    assert slowest < 2.0  # a damaged count never makes the reader walk the file


@pytest.mark.slow
def test_fuzzed_ggufs_through_llama_cpp_never_take_this_process_down(tiny_gguf, tmp_path):
    """120 fuzzed files loaded the way smoke loads a GGUF from a run folder (pre-check, then the load in a
    child): each loads or is a one-line error; this test's process is still here at the end."""
    from edgeft.llamacpp import LlamaCpp

    good = tiny_gguf.read_bytes()
    start = check_gguf(tiny_gguf).data_start
    rng = random.Random(11)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(120):
        path.write_bytes(fuzz_gguf(good, start, rng))
        try:
            LlamaCpp(path, n_ctx=16, threads=1).close()
            outcomes["loaded"] += 1
        except EdgeftError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    print(f"fuzz gguf through llama.cpp: 120 files, {outcomes}, 0 crashes")  # the counts the README states
    assert outcomes["loaded"] > 10 and outcomes["refused"] > 50, outcomes


def test_gguf_header_counts_and_lengths_are_bounded_by_the_file(tmp_path):
    """Hand-built headers: counts and lengths claiming more than the file holds are refused at once."""
    def header(*parts):
        path = tmp_path / f"h{len(list(tmp_path.iterdir()))}.gguf"
        path.write_bytes(b"GGUF" + b"".join(parts))
        return path

    cases = [
        (header(struct.pack("<IQQ", 3, 2**62, 0)), "cannot fit"),
        (header(struct.pack("<IQQ", 3, 0, 1), struct.pack("<Q", 2**60), b"\0" * 16), "key #0 claims"),
        (header(struct.pack("<IQQ", 9, 0, 0)), "version 9"),
        (header(struct.pack("<IQQ", 3, 0, 1), struct.pack("<Q", 3), b"abc", struct.pack("<IIQ", 9, 8, 2**59)),
         "claims 576460752303423488 strings"),
        (header(struct.pack("<IQQ", 3, 0, 1), struct.pack("<Q", 3), b"abc", struct.pack("<I", 99), b"\0" * 8),
         "value type 99"),
    ]
    for path, needle in cases:
        with pytest.raises(EdgeftError, match=needle):
            check_gguf(path)
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(EdgeftError, match="does not start with GGUF"):
        check_gguf(tmp_path / "text.gguf")


def test_json_reads_refuse_what_is_not_json_text(tmp_path):
    fix = "fix it"
    assert parse_json(b"\xef\xbb\xbf{\"a\": 1}\r\n", "x", fix) == {"a": 1}  # BOM and CRLF are fine
    assert parse_json(b'{"a": NaN}', "x", fix) == {"a": None}  # not JSON, read as null
    for data, needle in [(b"\xff\xfe", "not UTF-8"), (b"{", "not valid JSON"), (b"[" * 10**5, "nested too deeply"),
                         (b'{"k": "\\udc80"}', "k is not valid Unicode"), (b'{"\\ud800": 1}', "the key")]:
        with pytest.raises(EdgeftError, match=needle):
            parse_json(data, "x", fix)
    (tmp_path / "l.json").write_text("[1]")
    with pytest.raises(EdgeftError, match="holds a JSON array, not an object"):
        read_json(tmp_path / "l.json", fix)


def test_safetensors_truncated_or_with_a_damaged_header_are_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    good = (tmp_path / "model.safetensors").read_bytes()
    assert load_safetensors(tmp_path / "model.safetensors", "fix")["w"].shape == (64, 64)
    for data, needle in [(good[:-100], "truncated"), (good[:5], "truncated"),
                         (struct.pack("<Q", 10) + b"[1, 2, 3]  " + good[18:], "damaged safetensors header"),
                         (struct.pack("<Q", 8) + b"not json" + good[16:], "damaged safetensors header")]:
        (tmp_path / "model.safetensors").write_bytes(data)
        with pytest.raises(EdgeftError, match=needle):
            check_safetensors(tmp_path, "copy it again")


def test_gguf_loads_from_many_threads_leave_this_process_stdout_and_stderr_alone(tiny_gguf):
    """llama-cpp-python silences a load by swapping sys.stdout/sys.stderr and the fds 1 and 2 for /dev/null and
    back; two loads at once (a fleet smoke scores the same GGUF for every board) could restore the other's
    /dev/null, and every later line of the process (the --json result) vanished."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from edgeft.llamacpp import LlamaCpp

    def where() -> tuple:
        return sys.stdout, sys.stderr, os.fstat(1).st_ino, os.fstat(2).st_ino

    before = where()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: LlamaCpp(tiny_gguf, n_ctx=16, threads=1, trusted=True).close(), range(64)))
    assert where() == before
