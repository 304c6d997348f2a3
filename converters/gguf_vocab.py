"""The tokenizer of an HF folder as GGUF metadata: tokens, types, merges, special ids, chat template, and the
pre-tokenizer name llama.cpp needs to split text the way HF does.

Merges, special token ids, add_bos/add_eos flags and the chat template come from gguf's SpecialVocab (it
reads tokenizer.json, tokenizer_config.json and chat_template.jinja). Tokens and their types we build
ourselves: added tokens marked special become CONTROL (llama.cpp then never produces them from plain text
and stops on them), other added tokens USER_DEFINED.

The pre-tokenizer is recognised from tokenizer.json's own structure rather than a table of hashes; a
mismatch would still be caught by the tokenizer-parity check after export.
"""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json",)


class VocabError(ValueError):
    pass


def gpt2_pre_name(pre: dict | None) -> str:
    """llama.cpp's name for the pre-tokenizer described by tokenizer.json's `pre_tokenizer`."""
    if not pre:
        return "default"
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    regex = " ".join(str((p.get("pattern") or {}).get("Regex", "")) for p in parts if p.get("type") == "Split")
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM/StarCoder family: each digit alone, then GPT-2's regex
    if "\\p{N}{1,3}" in regex:
        return "llama-bpe"  # Llama 3's regex groups digits in threes
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in regex and "\\p{N}|" in regex:
        return "qwen2"
    raise VocabError(f"unrecognised BPE pre-tokenizer {json.dumps(pre)[:120]}; this tokenizer family is not "
                     f"supported by the converter yet")


def add_vocab(writer, model_dir: Path, config_vocab_size: int | None) -> int:
    """Add the tokenizer to `writer`; returns the vocabulary size written (padded to the model's)."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise VocabError(f"{model_dir}: missing tokenizer files (tokenizer.json); save the tokenizer next to the "
                         f"model with tokenizer.save_pretrained()")
    tok = _as_transformers_loads_it(model_dir) or json.loads(path.read_text(encoding="utf-8"))
    model = tok["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for content, a in added.items():
        vocab.setdefault(content, a["id"])
    size = max(max(vocab.values()) + 1, config_vocab_size or 0)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.NORMAL
    for content, a in added.items():
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED

    byte_fallback = model.get("type") == "BPE" and model.get("byte_fallback", False)
    if model.get("type") == "BPE" and not byte_fallback:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(gpt2_pre_name(tok.get("pre_tokenizer")))
        load_merges = True
    elif byte_fallback:
        # SentencePiece-style BPE (Llama 2, TinyLlama, Mistral): llama.cpp's "llama" model uses scores, not merges;
        # HF keeps the merge order, so rank by id as SentencePiece does, and mark the <0xNN> byte tokens.
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        for text, i in vocab.items():
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[i] = gguf.TokenType.BYTE
        writer.add_token_scores([-float(i) for i in range(size)])
        load_merges = False
    else:
        raise VocabError(f"{path}: tokenizer model {model.get('type')} is not supported (BPE only)")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    special = gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=size)
    if "bos" not in special.add_special_token:
        # Say what HF does rather than leave llama.cpp to its per-vocabulary default.
        special.add_special_token["bos"] = _hf_adds_bos(path, special.special_token_ids.get("bos"))
    special.add_to_gguf(writer, quiet=True)
    return size


def _as_transformers_loads_it(model_dir: Path) -> dict | None:
    """The tokenizer as transformers builds it, serialised. It can differ from tokenizer.json: transformers 5
    picks the tokenizer class from the model type and that class may replace the pre-tokenizer (a Qwen2
    config gets Qwen2's split regex whatever the file says). HF's behaviour is what llama.cpp must match."""
    from transformers import AutoTokenizer

    try:
        backend = AutoTokenizer.from_pretrained(model_dir).backend_tokenizer
    except Exception:
        return None
    return json.loads(backend.to_str())


def _hf_adds_bos(tokenizer_json: Path, bos_id: int | None) -> bool:
    if bos_id is None:
        return False
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id
