"""One validated read for every kind of file a user hands us: JSON (manifests, configs, adapter configs,
JSONL rows), safetensors and GGUF. Damage becomes one EdgeftError line naming the file, the place and the
fix (exit 2), never a traceback and never a dead process.

The owners of each kind call these: dataset.py (training rows: JSONL, JSON), adapter.py (adapter folders),
models.py (model folders), ledger.py (manifests), config.py (config files), llamacpp.py (GGUF files, whose load
runs in a child process first when the file came from outside: llama.cpp aborts on some damaged files).

GGUF is checked before llama.cpp sees it, by our own bounded reader of the header (the `gguf` package's
GGUFReader walks every array element and length the file claims, so a damaged count makes it run for
minutes): every count and length against the bytes that are left, the alignment, every tensor's type,
shape and data range against the file's length, and the values llama.cpp asserts on instead of refusing
(duplicate vocabulary entries as it reads them, up to a NUL; a layer count beyond its arrays; non-finite
hyperparameters; strings that are not UTF-8).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeftError, first_line


# ------------------------------------------------------------------------------------------------ JSON
def _constant(name: str) -> None:
    # NaN/Infinity are not JSON; older edgeft versions and other tools write them. Read them as null.
    return None


NEWLINE = b"\n"


def decode_utf8(data: bytes | str, where: str, fix: str, by_line: bool = False) -> str:
    """Text from UTF-8 bytes (a BOM allowed); invalid bytes named by offset, and by line when `by_line` (a
    file of rows: the line is where the user looks)."""
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = f"{where}:{data.count(NEWLINE, 0, e.start) + 1}" if by_line else where
        raise EdgeftError(f"{at}: not UTF-8 text (byte {e.start}); {fix}") from None


class DuplicateKey(ValueError):
    """A key given twice in one JSON object or YAML mapping: parsers keep the last silently; edgeft refuses."""

    def __init__(self, key, line: int | None = None):
        super().__init__(key)
        self.key, self.line = key, line

    def message(self, where: str, text: str | None = None, start: int = 0) -> str:
        """`text`: the JSON document, the object that failed starting at `start` (its line is then named)."""
        line = self.line
        if line is None and text is not None and "\n" in text:  # JSON's hook knows no position: find the
            pattern = re.compile(re.escape(json.dumps(self.key)) + r"\s*:")  # key's second spelling
            spots = [m.start() for m in pattern.finditer(text, start)]
            line = text.count("\n", 0, spots[1]) + 1 if len(spots) > 1 else None
        return f"{where}{f':{line}' if line else ''}: key {self.key!r} is given twice; keep one"


def _no_duplicates(pairs: list[tuple]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k)
        out[k] = v
    return out


def parse_yaml(text: str, where: str):
    """YAML (and so JSON) text as data, refusing a key given twice in one mapping (PyYAML keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep)

        def construct_document(self, node):
            counted: dict[int, int] = {}

            def size(n) -> int:  # values the node expands to, each alias counted in full (memoised by node)
                if id(n) not in counted:
                    counted[id(n)] = 0  # a node that contains itself (a recursive alias) counts once
                    items = n.value if isinstance(n, yaml.SequenceNode) else \
                        [x for pair in n.value for x in pair] if isinstance(n, yaml.MappingNode) else []
                    counted[id(n)] = 1 + sum(size(x) for x in items)
                return counted[id(n)]

            if size(node) > YAML_EXPANDED_LIMIT:
                raise _AliasBomb()
            return super().construct_document(node)

    try:
        return yaml.load(text, Loader=Loader)
    except DuplicateKey as e:
        raise EdgeftError(e.message(where)) from None
    except _AliasBomb:
        raise EdgeftError(f"{where}: its aliases (*name) expand to more than {YAML_EXPANDED_LIMIT:,} values; write "
                          f"the values out, or use fewer nested aliases") from None


class _AliasBomb(Exception):
    pass


def parse_json(data: bytes | str, where: str, fix: str):
    """Parse one JSON document (bytes: UTF-8, a BOM allowed). Refuses invalid UTF-8, invalid JSON, nesting
    too deep for the parser, and strings that are not valid Unicode (lone surrogates from \\ud800 escapes)."""
    data = decode_utf8(data, where, fix)
    try:
        value = json.loads(data, parse_constant=_constant, object_pairs_hook=_no_duplicates)
    except DuplicateKey as e:
        raise EdgeftError(e.message(where, data)) from None
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno}"
        raise EdgeftError(f"{where}: not valid JSON ({e.msg} at {at}); {fix}") from None
    except RecursionError:
        raise EdgeftError(f"{where}: JSON nested too deeply to read; {fix}") from None
    check_unicode(value, where, fix)
    return value


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def parse_json_rows(data: bytes | str, where: str, fix: str, key: str = "rows"
                    ) -> tuple[list[tuple[int, object]], dict] | None:
    """A JSON document of rows: an array, or an object holding the array under `key` (its other members are
    returned too: settings for the whole file). Each row comes with the line it starts on, and damage in a
    row is named by its line, as in a JSON Lines file. None when the document is neither (the caller reads
    it another way, e.g. as JSON Lines with a .json name)."""
    text = decode_utf8(data, where, fix, by_line=True)
    decoder = json.JSONDecoder(parse_constant=_constant, object_pairs_hook=_no_duplicates)
    newlines = [m.start() for m in re.finditer("\n", text)]

    def line(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    def skip(pos: int) -> int:
        return _SPACE.match(text, pos).end()

    def array(pos: int) -> tuple[list, int]:  # text[pos] is "["; each element decoded on its own
        items: list[tuple[int, object]] = []
        pos = skip(pos + 1)
        while not text.startswith("]", pos):
            if items:
                if not text.startswith(",", pos):
                    raise EdgeftError(f"{where}:{line(pos)}: not valid JSON (',' or ']' expected after a row); {fix}")
                pos = skip(pos + 1)
            try:
                item, end = decoder.raw_decode(text, pos)
            except DuplicateKey as e:
                raise EdgeftError(e.message(where, text, pos)) from None
            except json.JSONDecodeError as e:
                raise EdgeftError(f"{where}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); {fix}") from None
            except RecursionError:
                raise EdgeftError(f"{where}:{line(pos)}: JSON nested too deeply to read; {fix}") from None
            check_unicode(item, f"{where}:{line(pos)}", fix)
            items.append((line(pos), item))
            pos = skip(end)
        return items, pos + 1

    start = skip(0)
    if text.startswith("[", start):
        items, end = array(start)
        rest: dict = {}
    elif text.startswith("{", start):
        try:
            whole, end = decoder.raw_decode(text, start)
        except DuplicateKey as e:
            raise EdgeftError(e.message(where, text, start)) from None
        except (json.JSONDecodeError, RecursionError):
            return None
        if not isinstance(whole, dict) or not isinstance(whole.get(key), list):
            return None
        pos = skip(start + 1)  # find where the array starts, to number its rows by line
        while True:
            name, pos = decoder.raw_decode(text, pos)
            pos = skip(skip(pos) + 1)  # past the ':'
            if name == key and text.startswith("[", pos):
                break
            pos = skip(skip(decoder.raw_decode(text, pos)[1]) + 1)  # past the value and its ','
        items = array(pos)[0]
        rest = {k: v for k, v in whole.items() if k != key}
        check_unicode(rest, where, fix)
    else:
        return None
    if skip(end) != len(text):
        raise EdgeftError(f"{where}:{line(skip(end))}: not valid JSON (more data after the rows); {fix}")
    return items, rest


def check_unicode(value, where: str, fix: str) -> None:
    """Every string (keys too) encodes as UTF-8: a lone surrogate would fail later, in a tokenizer or a print."""
    stack = [(value, "")]
    seen: set[int] = set()  # YAML anchors share objects: walk each once (an alias bomb stays linear)
    while stack:
        x, place = stack.pop()
        if isinstance(x, (dict, list)):
            if id(x) in seen:
                continue
            seen.add(id(x))
        if isinstance(x, str):
            if _shown(x) != x:
                raise EdgeftError(f"{where}: {place or 'a string'} is not valid Unicode (a lone surrogate "
                                  f"escape such as \\ud800); {fix}")
        elif isinstance(x, dict):
            for k, v in x.items():
                name = _shown(str(k))
                stack += [(k, f"the key {name!r}"), (v, f"{place}.{name}" if place else name)]
        elif isinstance(x, list):
            stack += [(v, f"{place}[{i}]") for i, v in enumerate(x)]


def shown_value(value, limit: int = 80) -> str:
    """A value from a file, short enough for a one-line error: nested and long values cut with "...". An
    error echoes what it refuses, and what it refuses may be huge (YAML aliases expand a few lines into millions
    of values)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, 4, limit, limit
    text = _shown(r.repr(value))
    return text if len(text) <= limit else text[:limit - 3] + "..."


# A YAML document's aliases may expand to at most this many values: the largest edgeft file (a fleet of
# hundreds of boards) is far below it, and ten lines of aliases nested nine deep reach 43 million.
YAML_EXPANDED_LIMIT = 100_000


def _shown(s: str) -> str:
    """`s` as it can be printed: lone surrogates escaped."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def read_json(path: str | os.PathLike, fix: str, expect: type = dict):
    """A JSON file the user handed us (directly or inside a folder), of the `expect`ed top-level type."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EdgeftError(f"{path}: cannot read it ({e.strerror}); {fix}") from None
    value = parse_json(data, str(path), fix)
    if not isinstance(value, expect):
        raise EdgeftError(f"{path}: holds a JSON {_kind(value)}, not an {_kind(expect())}; {fix}")
    return value


def token_ids(value, at_least: int = 0) -> bool:
    """A list of at least `at_least` token ids (ints a vocabulary can be indexed with), as stored in a run."""
    return isinstance(value, list) and len(value) >= at_least and \
        all(type(i) is int and 0 <= i < 2**31 for i in value)


def _kind(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


# ------------------------------------------------------------------------------------------- tokenizer
def check_tokenizer_json(path: str | os.PathLike) -> None:
    """A folder's tokenizer.json has the shape the tokenizers library reads (an object whose "model" is an object
    with a type, "added_tokens" a list of {id, content}); a wrong shape was an AttributeError, KeyError or
    TypeError out of transformers, or a Rust error naming no file."""
    path = Path(path)
    fix = "copy the tokenizer files again or save the tokenizer with save_pretrained"
    doc = parse_json(path.read_bytes(), str(path), fix)
    if not isinstance(doc, dict):
        raise EdgeftError(f"{path}: a tokenizer.json is a JSON object, not a JSON {_kind(doc)}; {fix}")
    model = doc.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("type", "BPE"), str):
        raise EdgeftError(f"{path}: field 'model' must be an object with its 'type' (BPE, Unigram, WordPiece); {fix}")
    added = doc.get("added_tokens", [])
    if not isinstance(added, list):
        raise EdgeftError(f"{path}: field 'added_tokens' must be a list; {fix}")
    for i, t in enumerate(added):
        if not (isinstance(t, dict) and token_ids([t.get("id")]) and isinstance(t.get("content"), str)):
            raise EdgeftError(f"{path}: added_tokens[{i}] needs an integer 'id' and a string 'content'; {fix}")


# ---------------------------------------------------------------------------------------- safetensors
def check_safetensors(folder: str | os.PathLike, fix: str) -> None:
    """Every .safetensors file in `folder`: a readable header whose tensors lie within the file (the
    converter's header reader, so a truncated shard is refused before any weight is read)."""
    from .converters.hf_to_gguf import ConversionError, read_safetensors_index

    try:
        read_safetensors_index(Path(folder))
    except ConversionError as e:
        raise EdgeftError(f"{e}; {fix}" if "no .safetensors" not in str(e) else str(e)) from None
    except (KeyError, TypeError, ValueError, AttributeError, struct.error, OverflowError):
        # a header that parses as JSON but is not a safetensors table
        files = sorted(Path(folder).glob("*.safetensors"))
        where = files[0] if len(files) == 1 else f"a .safetensors file in {folder}"
        raise EdgeftError(f"{where}: damaged safetensors header; {fix}") from None


def load_safetensors(path: str | os.PathLike, fix: str) -> dict:
    """All tensors of one safetensors file (torch), after the header check of its folder; the library's own
    errors (dtype/shape vs byte range, overlapping tensors) become one line too."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise EdgeftError(f"{path}: no such file; {fix}")
    check_safetensors(path.parent, fix)
    try:
        return load_file(path)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise EdgeftError(f"{path}: damaged safetensors file ({first_line(e)}); {fix}") from None


# ----------------------------------------------------------------------------------------------- GGUF
GGUF_MAX_STRING = 16 << 20  # the longest metadata string we accept (chat templates are ~10 KiB)
GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS
GGUF_MAX_NAME = 63  # GGML_MAX_NAME - 1
LLAMA_MAX_LAYERS = 512  # llama.cpp sizes per-layer arrays with this; more layers overrun them (an assert)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Bad(Exception):
    """A problem found in a GGUF header; the message says where."""


@dataclass
class GGUFHeader:
    version: int
    metadata: dict  # key -> value (arrays of strings as lists of bytes; big arrays kept whole)
    tensors: list[tuple[str, tuple[int, ...], int, int, int]]  # name, dims, ggml type, offset, bytes
    data_start: int
    file_bytes: int

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch.decode("utf-8", "replace") if isinstance(arch, bytes) else None


class _Cursor:
    """Reads the header sequentially from the file in large chunks, never past its end."""

    def __init__(self, f, size: int):
        self.f, self.size, self.pos = f, size, 0
        self.buf, self.buf_start = b"", 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left:
            raise _Bad(f"{what} at byte {self.pos} needs {n} bytes but the file has {self.left} left (truncated "
                       f"or a damaged length)")
        end = self.pos + n
        if end > self.buf_start + len(self.buf):
            self.f.seek(self.pos)
            self.buf = self.f.read(max(n, 8 << 20))
            self.buf_start = self.pos
        off = self.pos - self.buf_start
        self.pos = end
        return memoryview(self.buf)[off:off + n]

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> bytes:
        n = self.unpack("<Q", f"{what} length")
        if n > GGUF_MAX_STRING:
            raise _Bad(f"{what} claims {n} bytes (more than {GGUF_MAX_STRING})")
        return bytes(self.take(n, what))

    def strings(self, n: int, what: str) -> list[bytes]:
        """An array of n strings (a vocabulary: 10^5 of them), read straight from the buffer where it can."""
        out = []
        unpack_from, buf = struct.unpack_from, self.buf
        for i in range(n):
            off = self.pos - self.buf_start
            if off + 8 <= len(buf):
                (k,) = unpack_from("<Q", buf, off)
                if k <= GGUF_MAX_STRING and off + 8 + k <= len(buf):
                    out.append(buf[off + 8:off + 8 + k])
                    self.pos += 8 + k
                    continue
            out.append(self.string(f"{what}[{i}]"))  # at the buffer's end, or the error message
            buf = self.buf
        return out


def _value(cur: _Cursor, vtype: int, what: str, in_array: bool = False):
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype], what)
    if vtype == _STRING:
        return cur.string(what)
    if vtype == _ARRAY and not in_array:
        itype = cur.unpack("<I", f"{what} element type")
        n = cur.unpack("<Q", f"{what} length")
        if itype in _SCALARS:
            size = struct.calcsize(_SCALARS[itype])
            if n * size > cur.left:
                raise _Bad(f"{what} claims {n} elements, more than the {cur.left} bytes left")
            fmt = _SCALARS[itype]
            return list(struct.unpack(f"<{n}{fmt[1]}", cur.take(n * size, what)))
        if itype == _STRING:
            if n * 8 > cur.left:
                raise _Bad(f"{what} claims {n} strings, more than the {cur.left} bytes left")
            return cur.strings(n, what)
        raise _Bad(f"{what} has element type {itype}; arrays hold numbers or strings")
    raise _Bad(f"{what} has value type {vtype}, which GGUF does not define" if vtype != _ARRAY else
               f"{what} is an array of arrays, which llama.cpp does not read")


def _read_gguf_header(f, size: int) -> GGUFHeader:
    import gguf

    cur = _Cursor(f, size)
    if bytes(cur.take(4, "magic")) != b"GGUF":
        raise _Bad("it does not start with GGUF (not a GGUF file)")
    version = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise _Bad(f"version {version}; llama.cpp reads versions 2 and 3")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "metadata count")
    if n_kv * 13 > cur.left or n_tensors * 24 > cur.left:  # the smallest possible entries
        raise _Bad(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in the {cur.left} bytes left")
    meta: dict = {}
    types: dict[str, int] = {}
    for i in range(n_kv):
        key_bytes = cur.string(f"metadata key #{i}")
        try:
            key = key_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"metadata key #{i} is not UTF-8") from None
        if not key or key in meta:
            raise _Bad(f"metadata key #{i} {key!r} is {'empty' if not key else 'repeated'}")
        types[key] = cur.unpack("<I", f"{key} type")
        meta[key] = _value(cur, types[key], key)

    tensors = []
    for i in range(n_tensors):
        name_bytes = cur.string(f"tensor #{i} name")
        name = name_bytes.decode("utf-8", "replace")
        n_dims = cur.unpack("<I", f"tensor {name} dimension count")
        if not 1 <= n_dims <= GGUF_MAX_DIMS:
            raise _Bad(f"tensor {name} has {n_dims} dimensions (1 to {GGUF_MAX_DIMS})")
        dims = tuple(cur.unpack("<Q", f"tensor {name} dimension") for _ in range(n_dims))
        ggml_type = cur.unpack("<I", f"tensor {name} type")
        offset = cur.unpack("<Q", f"tensor {name} offset")
        tensors.append((name, dims, ggml_type, offset))

    alignment = meta.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if "general.alignment" in meta and types["general.alignment"] != 4:
        raise _Bad("general.alignment is not a uint32")
    # The GGUF spec: a multiple of 8 (and llama.cpp pads with it, so a power of two).
    if alignment < 8 or alignment & (alignment - 1):
        raise _Bad(f"general.alignment is {alignment}; it must be a power of two and at least 8")
    data_start = cur.pos + (-cur.pos) % alignment
    out = []
    names = set()
    for name, dims, ggml_type, offset in tensors:
        if not name or len(name.encode()) > GGUF_MAX_NAME or name in names:
            raise _Bad(f"tensor name {name!r} is {'repeated' if name in names else 'empty or too long'}")
        names.add(name)
        try:
            block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise _Bad(f"tensor {name} has type {ggml_type}, unknown to this llama.cpp") from None
        if any(d < 1 or d > 1 << 40 for d in dims) or math.prod(dims) > 1 << 50:
            raise _Bad(f"tensor {name} has shape {list(dims)}")
        if dims[0] % block:
            raise _Bad(f"tensor {name}: its first dimension {dims[0]} is not a multiple of its type's block {block}")
        nbytes = math.prod(dims) // block * type_bytes
        if offset % alignment:
            raise _Bad(f"tensor {name} starts at offset {offset}, not a multiple of the alignment {alignment}")
        if data_start + offset + nbytes > size:
            raise _Bad(f"tensor {name} needs bytes up to {data_start + offset + nbytes} but the file has {size} "
                       f"(truncated, or a damaged offset or shape)")
        out.append((name, dims, ggml_type, offset, nbytes))
    spans = sorted((o, o + n, name) for name, _, _, o, n in out)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise _Bad(f"tensors {a} and {b} overlap")
    return GGUFHeader(version, meta, out, data_start, size)


def _check_gguf_values(h: GGUFHeader) -> None:
    """What llama.cpp asserts on (aborting the process) instead of refusing with an error."""
    for key, value in h.metadata.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise _Bad(f"{key} is {value}")
        # GGUF strings are UTF-8; llama.cpp's vocabulary code aborts on a token that is not.
        for i, text in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(text, bytes):
                try:
                    text.decode("utf-8")
                except UnicodeDecodeError:
                    raise _Bad(f"{key}{f'[{i}]' if isinstance(value, list) else ''} is not UTF-8 text") from None
        if "epsilon" in key and isinstance(value, (int, float)) and value <= 0:
            raise _Bad(f"{key} is {value}; it must be positive")
    arch = h.architecture
    if arch is None:
        raise _Bad("general.architecture is missing or not a string")
    blocks = h.metadata.get(f"{arch}.block_count")
    if blocks is not None:
        if not isinstance(blocks, int) or not 1 <= blocks <= LLAMA_MAX_LAYERS:
            raise _Bad(f"{arch}.block_count is {blocks}; llama.cpp supports 1 to {LLAMA_MAX_LAYERS} layers")
        for name, *_ in h.tensors:
            if name.startswith("blk."):
                idx = name.split(".")[1]
                if not idx.isdigit() or int(idx) >= blocks:
                    raise _Bad(f"tensor {name} is beyond {arch}.block_count {blocks}")
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, bytes) for t in tokens):
            raise _Bad("tokenizer.ggml.tokens is not a list of strings")
        # llama.cpp reads each token as a C string (up to a NUL) and asserts that no two are equal.
        as_read = [t.split(b"\0", 1)[0] for t in tokens]
        if len(set(as_read)) != len(as_read):
            seen: set = set()
            dup = next(t for t in as_read if t in seen or seen.add(t))
            raise _Bad(f"tokenizer.ggml.tokens has a repeated entry {dup.decode('utf-8', 'replace')!r} (as llama.cpp "
                       f"reads it, up to a NUL byte)")
        for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            value = h.metadata.get(key)
            if value is not None and (not isinstance(value, list) or len(value) != len(tokens)):
                raise _Bad(f"{key} does not hold one entry for each of the {len(tokens)} tokens")


def check_gguf(path: str | os.PathLike, what: str = "") -> GGUFHeader:
    """The header of a GGUF file, checked for what would make llama.cpp crash or read past the file."""
    path = Path(path)
    where = f"{what} {path}".strip()
    fix = "the file is damaged or not a GGUF llama.cpp can load; export or download it again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = _read_gguf_header(f, size)
        _check_gguf_values(header)
    except _Bad as e:
        raise EdgeftError(f"{where}: {e}; {fix}") from None
    except (OSError, MemoryError) as e:
        raise EdgeftError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or type(e).__name__}); "
                          f"{fix}") from None
    return header
