"""The tokenizer of an HF folder as GGUF metadata, written the way llama.cpp's converter writes it, without
importing torch or transformers (their import alone was ~340 MB of the converter's peak memory).

Two vocabularies, as checkpoints come on the hub:

- SentencePiece (`tokenizer.model`: Llama 2, Mistral, Gemma, Phi-3): pieces, scores and piece types are read from
  the model file itself (a small protobuf reader below: no sentencepiece package needed), then added tokens from
  added_tokens.json / tokenizer_config.json (and, for Phi-3, tokenizer.json) override their ids. llama.cpp's
  "llama" tokenizer model; rows beyond the tokenizer (padded embeddings) become `[PAD{i}]`, type UNUSED.
- byte-level BPE (`tokenizer.json`: Llama 3, Qwen2/3, SmolLM): vocab + added tokens, merges, and the
  pre-tokenizer *name* llama.cpp needs to split text as HF does. HF's splitting is the pre-tokenizer transformers
  actually runs, which is not always the file's: transformers 5 picks a tokenizer class from tokenizer_config.json
  and the model type, and some classes (Qwen2Tokenizer, GPT2Tokenizer) rebuild the pre-tokenizer from code. That
  choice is reproduced here for the classes those families use; any other class that rebuilds is asked of
  transformers itself in a short-lived subprocess, so the answer stays exact.

Special token ids, add_bos/add_eos, merges and the chat template come from gguf's SpecialVocab, as in llama.cpp.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_USER_DEFINED, SPM_UNUSED, SPM_BYTE = 1, 2, 3, 4, 5, 6


class VocabError(ValueError):
    pass


# --- SentencePiece -------------------------------------------------------------------------------------------

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes):
    """(field number, value) of each field of one protobuf message: bytes for length-delimited fields, an int
    for varints, the raw 4 bytes for fixed32 (SentencePiece's score); fixed64 is skipped."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise IndexError(i + n)
            yield field, buf[i:i + n]
            i += n
        elif wire == 0:
            v, i = _varint(buf, i)
            yield field, v
        elif wire == 5:
            yield field, buf[i:i + 4]
            i += 4
        elif wire == 1:
            i += 8
        else:
            raise ValueError(wire)


def read_spm_pieces(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) for every piece of a SentencePiece ModelProto (field 1, repeated SentencePiece:
    1 piece string, 2 score float, 3 type enum defaulting to NORMAL). Other fields are skipped by wire type."""
    try:
        pieces = [_piece(value) for field, value in _fields(path.read_bytes()) if field == 1]
    except (IndexError, ValueError, UnicodeDecodeError, struct.error):
        raise VocabError(f"{path}: not a SentencePiece model (damaged protobuf); copy tokenizer.model from the base "
                         f"model again") from None
    if not pieces:
        raise VocabError(f"{path}: SentencePiece model without pieces; copy tokenizer.model from the base model again")
    return pieces


def _piece(buf: bytes) -> tuple[str, float, int]:
    if not isinstance(buf, bytes):
        raise ValueError("piece is not a message")
    piece, score, kind = "", 0.0, SPM_NORMAL
    for field, value in _fields(buf):
        if field == 1 and isinstance(value, bytes):
            piece = value.decode("utf-8")
        elif field == 2 and isinstance(value, bytes):
            (score,) = struct.unpack("<f", value)
        elif field == 3 and isinstance(value, int):
            kind = value
    return piece, score, kind


def looks_special(token: str) -> bool:
    """Added tokens some checkpoints forget to mark special but llama.cpp treats as control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def spm_vocab(model_dir: Path, vocab_size: int | None, phi3: bool = False):
    """(tokens, scores, types) as llama.cpp builds them from tokenizer.model plus the added-token files. `phi3`
    follows Phi-3's variant (added tokens also from tokenizer.json, only the `special` flag decides CONTROL)."""
    pieces = read_spm_pieces(model_dir / "tokenizer.model")
    n = vocab_size or len(pieces)
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [SPM_UNUSED] * n
    for i, (piece, score, kind) in enumerate(pieces):
        if i >= n:
            if phi3:
                raise VocabError(f"{model_dir / 'tokenizer.model'}: {len(pieces)} pieces but vocab_size {n} in "
                                 f"config.json; the tokenizer does not belong to this model")
            break  # pieces beyond the embedding are ignored
        tokens[i] = piece
        scores[i] = score
        types[i] = kind if kind in (SPM_UNKNOWN, SPM_CONTROL, SPM_UNUSED, SPM_BYTE) else SPM_NORMAL

    def put(i: int, text: str, kind: int) -> None:
        if i >= n:
            if phi3:
                raise VocabError(f"{model_dir}: added token {text!r} has id {i} >= vocab_size {n}; the tokenizer does "
                                 f"not belong to this model")
            return
        tokens[i], scores[i], types[i] = text, -1000.0, kind

    added_file = model_dir / "added_tokens.json"
    if added_file.is_file():
        for text, i in json.loads(added_file.read_text(encoding="utf-8")).items():
            put(int(i), text, SPM_USER_DEFINED)
    cfg_file = model_dir / "tokenizer_config.json"
    if cfg_file.is_file():
        decoder = json.loads(cfg_file.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        for i, data in decoder.items():
            text = data["content"]
            if phi3:
                put(int(i), text, SPM_CONTROL if data.get("special") else SPM_USER_DEFINED)
            elif data.get("special") or looks_special(text):
                put(int(i), text, SPM_CONTROL)
            else:
                put(int(i), text.replace("\u2581", " "), SPM_USER_DEFINED)  # user-defined spaces pre-normalised
    tok_file = model_dir / "tokenizer.json"
    if phi3 and tok_file.is_file():
        for data in json.loads(tok_file.read_text(encoding="utf-8")).get("added_tokens", []):
            put(int(data["id"]), data["content"], SPM_CONTROL if data.get("special") else SPM_USER_DEFINED)
    return tokens, scores, types


def write_spm(writer, model_dir: Path, vocab_size: int | None, phi3: bool = False) -> int:
    tokens, scores, types = spm_vocab(model_dir, vocab_size, phi3)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special_vocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return len(tokens)


# --- byte-level BPE ------------------------------------------------------------------------------------------

# transformers 5 (tokenization_auto): model types whose hub tokenizer_class is ignored, and the class registered for
# each model type of our families. Only the entries that decide these families' tokenizer class are kept.
_HUB_CLASS_IGNORED = {"phi3", "qwen2"}
_REGISTERED_CLASS = {"qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer", "gemma2": "GemmaTokenizer",
                     "gemma3": "GemmaTokenizer", "gemma3_text": "GemmaTokenizer", "phi3": "TokenizersBackend"}
# (names after transformers strips "Fast": PreTrainedTokenizerFast is looked up as PreTrainedTokenizer)
_GENERIC = {"TokenizersBackend", "PreTrainedTokenizerFast", "PreTrainedTokenizer", "PythonBackend"}
# Classes whose __init__ rebuilds the pre-tokenizer in code, and what they build.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def _rebuilt_pre_tokenizer(cls: str, tok_config: dict) -> dict:
    prefix = bool(tok_config.get("add_prefix_space") or False)
    if cls == "Qwen2Tokenizer":
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True, "use_regex": False}]}
    if cls == "GPT2Tokenizer":
        return {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True, "use_regex": True}
    raise KeyError(cls)


def hf_tokenizer_class(model_type: str | None, tok_config: dict, tok_json: dict, config: dict) -> str:
    """The class transformers 5's AutoTokenizer instantiates for this folder (its rules, for our families)."""
    hub = (tok_config.get("tokenizer_class") or config.get("tokenizer_class") or "").removesuffix("Fast") or None
    registered = _REGISTERED_CLASS.get(model_type or "")
    if "auto_map" in tok_config:
        return "remote-code"
    if hub == "LlamaTokenizer" and model_type not in _HUB_CLASS_IGNORED and _byte_level(tok_json):
        return "TokenizersBackend"  # LlamaTokenizer hard-codes Metaspace; a ByteLevel file is used as it is
    if hub and registered and registered != hub:
        if registered not in _GENERIC:
            return registered if model_type in _HUB_CLASS_IGNORED else hub
        return "TokenizersBackend"
    if hub:
        return "TokenizersBackend" if hub in _GENERIC else hub
    return registered or "TokenizersBackend"


def _byte_level(tok_json: dict) -> bool:
    def has(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(p) for p in node.get("pretokenizers", []) + node.get("decoders", []))
    return has(tok_json.get("pre_tokenizer")) or has(tok_json.get("decoder"))


def effective_pre_tokenizer(model_dir: Path, config: dict, tok_json: dict) -> dict | None:
    """The pre-tokenizer HF runs for this folder (see the module docstring)."""
    cfg_file = model_dir / "tokenizer_config.json"
    tok_config = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    cls = hf_tokenizer_class(config.get("model_type"), tok_config, tok_json, config)
    if cls in _GENERIC:
        return tok_json.get("pre_tokenizer")
    try:
        return _rebuilt_pre_tokenizer(cls, tok_config)
    except KeyError:
        return _pre_tokenizer_from_transformers(model_dir)


def _pre_tokenizer_from_transformers(model_dir: Path) -> dict | None:
    """Ask transformers itself (a subprocess, so its ~400 MB import never adds to the converter's peak)."""
    import subprocess
    import sys

    code = ("import json,sys\nfrom transformers import AutoTokenizer\n"
            "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "print(json.dumps(json.loads(t.backend_tokenizer.to_str()).get('pre_tokenizer')))")
    proc = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise VocabError(f"{model_dir}: transformers cannot load this tokenizer ({tail}); fix the tokenizer files")
    return json.loads(proc.stdout.strip().splitlines()[-1])


GPT4O_SPLIT_START = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"


def gpt2_pre_name(pre: dict | None) -> str:
    """llama.cpp's name for the pre-tokenizer (tokenizer.json's `pre_tokenizer` structure)."""
    if not pre:
        return "default"
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    regex = " ".join(str((p.get("pattern") or {}).get("Regex", "")) for p in parts if p.get("type") == "Split")
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM/StarCoder family: each digit alone, then GPT-2's regex
    if regex.startswith(GPT4O_SPLIT_START):
        return "gpt-4o"  # o200k (Phi-4-mini): case-aware words, digits in threes
    if "\\p{N}{1,3}" in regex:
        return "llama-bpe"  # Llama 3's regex groups digits in threes
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in regex and "\\p{N}|" in regex:
        return "qwen2"
    raise VocabError(f"unrecognised BPE pre-tokenizer {json.dumps(pre)[:120]}; this tokenizer family is not "
                     f"supported by the converter yet")


def bpe_vocab(model_dir: Path, config: dict):
    """(tokens, types, pre name) as llama.cpp's get_vocab_base builds them, from tokenizer.json (+ the added tokens
    tokenizer_config.json declares), padded with [PAD{i}] to the model's vocab_size."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise VocabError(f"{model_dir}: missing tokenizer files (tokenizer.json); save the tokenizer next to the "
                         f"model with tokenizer.save_pretrained()")
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise VocabError(f"{path}: not valid JSON; save the tokenizer again") from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise VocabError(f"{path}: tokenizer model {model.get('type')} is not supported here (byte-level BPE or a "
                         f"SentencePiece tokenizer.model)")
    if model.get("byte_fallback"):
        raise VocabError(f"{path}: a SentencePiece-style BPE tokenizer.json without tokenizer.model; copy "
                         f"tokenizer.model from the base model")
    vocab: dict[str, int] = dict(model["vocab"])
    added: dict[str, bool] = {}
    for a in tok.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
        added[a["content"]] = bool(a.get("special"))
    cfg_file = model_dir / "tokenizer_config.json"
    if cfg_file.is_file():
        for i, a in json.loads(cfg_file.read_text(encoding="utf-8")).get("added_tokens_decoder", {}).items():
            vocab.setdefault(a["content"], int(i))
            added[a["content"]] = added.get(a["content"], False) or bool(a.get("special"))
    size = config.get("vocab_size") or len(vocab)
    if max(vocab.values()) >= size:
        raise VocabError(f"{path}: token id {max(vocab.values())} >= vocab_size {size} in config.json; the tokenizer "
                         f"does not belong to this model")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.NORMAL
    for text, special in added.items():
        i = vocab[text]
        if special or looks_special(text):
            types[i] = gguf.TokenType.CONTROL
        else:
            tokens[i] = text.replace("\u2581", " ")
            types[i] = gguf.TokenType.USER_DEFINED
    pre = gpt2_pre_name(effective_pre_tokenizer(model_dir, config, tok))
    return tokens, [int(t) for t in types], pre


def write_bpe(writer, model_dir: Path, config: dict) -> int:
    tokens, types, pre = bpe_vocab(model_dir, config)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab(model_dir, load_merges=True).add_to_gguf(writer, quiet=True)
    return len(tokens)


def special_vocab(model_dir: Path, **kw):
    """gguf's SpecialVocab, plus what llama.cpp's newer copy of it also says: a ByteLevel post-processor adds
    neither bos nor eos, so both flags are written as false instead of being left to llama.cpp's defaults."""
    import gguf

    sv = gguf.SpecialVocab(model_dir, **kw)
    path = model_dir / "tokenizer.json"
    if path.is_file():
        post = json.loads(path.read_text(encoding="utf-8")).get("post_processor") or {}
        if any(p.get("type") == "ByteLevel" for p in post.get("processors", [post])):
            sv.add_special_token.setdefault("bos", False)
            sv.add_special_token.setdefault("eos", False)
    return sv
