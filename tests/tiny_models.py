"""Tiny, offline, deterministic checkpoints of every converter family, with tokenizers shaped like the hub's.

No model hub is reachable where edgeft is tested, and the default model (135M) is too slow for a fast tier.
Everything here is built from the CPython docs (`pydoc_data.topics`, in the stdlib) in seconds:

- `spm_tokenizer(dir, style)`: a SentencePiece BPE model (`tokenizer.model`, byte fallback) trained on the docs,
  plus the tokenizer.json/tokenizer_config.json transformers writes for it, in the layout of Llama 2 / Mistral
  ("llama2"), Gemma ("gemma") or Phi-3 ("phi3": Llama 2's model plus added chat tokens above the SPM vocab).
- `bpe_tokenizer(dir, style)`: a byte-level BPE tokenizer.json (`tokenizers` trains one in a second) with a
  ChatML template, pre-tokenized like Qwen2 ("qwen2"), Llama 3 ("llama3") or SmolLM ("smollm").
- `tiny_model(family_or_hf_arch, out_dir, tokenizer_dir, **config_overrides)`: a random-weight model of that
  family (a few layers, hidden 64) saved with the tokenizer; the one place that knows each family's tiny config.

Builders write into `dir` and return it; they are deterministic (same bytes for the same arguments).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# ChatML with a default system turn, as SmolLM2's template renders it (our own text).
CHATML_WITH_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a small test model.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA2_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                   "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}"
                   "{% endif %}{% endfor %}")
# Gemma's turns are "user" and "model": the assistant role is renamed, as the hub's template does, so a rendered
# answer continues exactly the generation prompt.
GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                  "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
                  "{{ '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
PHI3_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + "
                 "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

SPM_STYLES = ("llama2", "gemma", "phi3")
BPE_STYLES = ("qwen2", "llama3", "smollm", "gpt4o")

# Pre-tokenizer regexes as the hub's tokenizer.json files carry them.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# o200k (GPT-4o, Phi-4-mini): case-aware words, digits in threes, '/' kept after punctuation.
GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's name for each BPE style's pre-tokenizer: its converter recognises hub tokenizers by a hash of their
# output, which no freshly trained vocabulary can match, so the reference run is told the name (see
# edgeft.converters.compare.reference_convert) and tokenizer parity in llama.cpp proves it right.
BPE_PRE = {"qwen2": "qwen2", "llama3": "llama-bpe", "smollm": "smollm", "gpt4o": "gpt-4o"}


def docs_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


def sample_text(chars: int = 600) -> str:
    """A few hundred characters of docs plus non-ASCII text (byte fallback / multi-byte BPE paths)."""
    body = docs_text()
    start = body.index("The \"with\" statement") if "The \"with\" statement" in body else 1000
    return body[start:start + chars] + "\nCafé naïve — 東京 2024: x=12345; ünïcödé ✓\n\t  indented  spaces"


def _train_spm(prefix: Path, style: str, vocab_size: int) -> None:
    import sentencepiece as spm

    corpus = prefix.parent / "corpus.txt"
    corpus.write_text(docs_text(), encoding="utf-8")
    if style == "gemma":
        # Gemma: <pad> <eos> <bos> <unk> first, no dummy prefix, no whitespace folding, turn markers as pieces.
        ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                   unk_piece="<unk>")
        extra = dict(add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
                     user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"])
    else:
        # Llama 2 / Mistral / Phi-3: <unk> <s> </s>, dummy prefix, no pad piece.
        ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
        extra = dict(add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity")
    # The model file records its input and prefix paths: train from inside the folder with relative names so the
    # bytes do not depend on where the folder is.
    cwd = os.getcwd()
    os.chdir(prefix.parent)
    try:
        _train(spm, corpus.name, prefix.name, vocab_size, ids, extra)
    finally:
        os.chdir(cwd)
    corpus.unlink()


def _train(spm, corpus: str, prefix: str, vocab_size: int, ids: dict, extra: dict) -> None:
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        split_digits=True, character_coverage=1.0, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, max_sentence_length=100000, minloglevel=2, allow_whitespace_only_pieces=True,
        **ids, **extra)


def spm_tokenizer(out_dir: str | Path, style: str = "llama2", vocab_size: int = 2000) -> Path:
    """A SentencePiece tokenizer folder: tokenizer.model + the tokenizer.json/tokenizer_config.json that transformers
    makes of it, in the hub layout of `style` (llama2, gemma, phi3)."""
    from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer

    if style not in SPM_STYLES:
        raise ValueError(f"style {style}: use one of {SPM_STYLES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    work = out / "_spm"
    work.mkdir(exist_ok=True)
    _train_spm(work / "sp", style, vocab_size)
    model = work / "sp.model"
    # transformers 5 builds the fast tokenizer from tokenizer.model in a folder that only has it.
    shutil.copy(model, work / "tokenizer.model")
    cls = GemmaTokenizer if style == "gemma" else LlamaTokenizer
    tok = cls.from_pretrained(str(work))
    if style == "gemma":
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tok.chat_template = GEMMA_TEMPLATE
    elif style == "phi3":
        # Phi-3 appends chat tokens to Llama 2's 32000-piece model as added tokens (ids >= the SPM size);
        # <|endoftext|> is its eos, the rest mark turns.
        tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|assistant|>", "<|end|>",
                                                              "<|user|>", "<|system|>"]})
        tok.eos_token = "<|endoftext|>"
        tok.chat_template = PHI3_TEMPLATE
    else:
        tok.chat_template = LLAMA2_TEMPLATE
    tok.save_pretrained(str(out))
    shutil.copy(model, out / "tokenizer.model")
    shutil.rmtree(work)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("vocab_file", None)  # a path into the scratch folder
    # As the hub's configs say: Llama 2 / Mistral / Gemma prepend bos, Phi-3 does not.
    cfg["add_bos_token"] = style != "phi3"
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if cfg["add_bos_token"]:
        # The hub's tokenizer.json carries the bos in its post-processor (transformers 5 does not add it from
        # tokenizer_config's add_bos_token alone).
        tj_path = out / "tokenizer.json"
        tj = json.loads(tj_path.read_text())
        bos = tok.bos_token
        tj["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_token_id], "tokens": [bos]}}}
        tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=2))
    # Sanity: what transformers loads back from the saved folder must still be this SentencePiece vocabulary.
    back = AutoTokenizer.from_pretrained(str(out))
    assert back.convert_tokens_to_ids("<0x41>") > 0, "byte-fallback pieces missing"
    return out


def bpe_tokenizer(out_dir: str | Path, style: str = "qwen2", vocab_size: int = 3000, chat_template: str = CHATML) -> Path:
    """A byte-level BPE tokenizer.json trained on the docs, with ChatML special tokens and chat template, pre-tokenized
    like `style` (qwen2, llama3, smollm). llama3 style also has a <|begin_of_text|> bos added by its post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in BPE_STYLES:
        raise ValueError(f"style {style}: use one of {BPE_STYLES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<|begin_of_text|>"] if style == "llama3" else [])
    tok = Tokenizer(models.BPE())
    if style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        regex = {"qwen2": QWEN2_REGEX, "llama3": LLAMA3_REGEX, "gpt4o": GPT4O_REGEX}[style]
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs_text().split("\n\n"), trainer=trainer)
    if style == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                          special_tokens=[("<|begin_of_text|>", bos)])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|begin_of_text|>" if style == "llama3" else None,
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = chat_template
    fast.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # As on the hub: Qwen2 ships tokenizer_class Qwen2Tokenizer (transformers 5 rebuilds the pre-tokenizer from it),
    # Phi-4-mini GPT2Tokenizer (llama.cpp's Phi-3 converter reads that as "BPE, not SentencePiece"), Llama 3 and
    # SmolLM PreTrainedTokenizerFast (used as the file says).
    cfg["tokenizer_class"] = {"qwen2": "Qwen2Tokenizer", "gpt4o": "GPT2Tokenizer"}.get(style, "PreTrainedTokenizerFast")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out


# --- tiny models ---------------------------------------------------------------------------------------------

# Each family's tiny config: the family's distinguishing features switched on, everything else small.
# head_dim 16 with hidden 64 / 4 heads is the plain case; shape variants override it.
_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.1)
TINY: dict[str, dict] = {
    "llama": dict(arch="LlamaForCausalLM", model_type="llama", tokenizer=("spm", "llama2"),
                  config=dict(tie_word_embeddings=False)),
    "llama3": dict(arch="LlamaForCausalLM", model_type="llama", tokenizer=("bpe", "llama3"),
                   config=dict(tie_word_embeddings=True, rope_theta=500000.0,
                               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                 high_freq_factor=4.0, original_max_position_embeddings=256))),
    "mistral": dict(arch="MistralForCausalLM", model_type="mistral", tokenizer=("spm", "llama2"),
                    config=dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": dict(arch="Qwen2ForCausalLM", model_type="qwen2", tokenizer=("bpe", "qwen2"),
                  config=dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": dict(arch="Qwen3ForCausalLM", model_type="qwen3", tokenizer=("bpe", "qwen2"),
                  config=dict(tie_word_embeddings=True, head_dim=32, rope_theta=1000000.0)),
    "gemma2": dict(arch="Gemma2ForCausalLM", model_type="gemma2", tokenizer=("spm", "gemma"),
                   config=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64, attn_logit_softcapping=50.0,
                               final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                               tie_word_embeddings=True)),
    # 6 layers: layers 0-4 slide over a window with the local rope base, layer 5 is global (Gemma 3's pattern).
    "gemma3": dict(arch="Gemma3ForCausalLM", model_type="gemma3_text", tokenizer=("spm", "gemma"),
                   config=dict(num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                               final_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh",
                               tie_word_embeddings=True, rope_theta=1000000.0, rope_local_base_freq=10000.0)),
    "phi3": dict(arch="Phi3ForCausalLM", model_type="phi3", tokenizer=("spm", "phi3"),
                 config=dict(num_key_value_heads=4, tie_word_embeddings=False, sliding_window=None,
                             original_max_position_embeddings=1024, pad_vocab_to=64)),
    # Phi-4-mini: GQA, partial rotary (0.75) and longrope factors (one per rotary pair) over a short original context.
    "phi4mini": dict(arch="Phi3ForCausalLM", model_type="phi3", tokenizer=("bpe", "gpt4o"),
                     config=dict(tie_word_embeddings=True, partial_rotary_factor=0.75, max_position_embeddings=1024,
                                 original_max_position_embeddings=256, sliding_window=None,
                                 rope_scaling=dict(rope_type="longrope", long_factor="auto", short_factor="auto"))),
    # 4 layers: layer 3 has no rope (SmolLM3 drops rope on every 4th layer).
    "smollm3": dict(arch="SmolLM3ForCausalLM", model_type="smollm3", tokenizer=("bpe", "llama3"),
                    config=dict(num_hidden_layers=4, tie_word_embeddings=True, rope_theta=2000000.0)),
}
# HF architecture -> its family's plain tiny entry (the first TINY key with that architecture).
ARCH_TO_TINY: dict[str, str] = {}
for _key, _spec in TINY.items():
    ARCH_TO_TINY.setdefault(_spec["arch"], _key)


def registry_cases() -> list[tuple[str, str | None]]:
    """(HF architecture, TINY key) for every architecture the converter registers, one per tiny model of it (Phi-3
    has two: plain, and Phi-4-mini's longrope). An architecture with none gives (arch, None): tests parametrized
    from this fail on it rather than leave the family out."""
    from edgeft.converters.families import supported

    cases: list[tuple[str, str | None]] = []
    for arch in supported():
        if arch not in ARCH_TO_TINY:
            cases.append((arch, None))
            continue
        cases += [(arch, key) for key, spec in TINY.items() if spec["arch"] == arch]
    return cases


def tokenizer_for(name: str, root: str | Path) -> Path:
    """The tokenizer folder a tiny model of `name` uses by default, built once under `root`."""
    kind, style = TINY[ARCH_TO_TINY.get(name, name)]["tokenizer"]
    d = Path(root) / f"{kind}-{style}"
    return spm_tokenizer(d, style) if kind == "spm" else bpe_tokenizer(d, style)


def _rope_config(fields: dict) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; accept the hub's older rope_theta/rope_scaling."""
    theta = fields.pop("rope_theta", None)
    scaling = fields.pop("rope_scaling", None)
    local = fields.pop("rope_local_base_freq", None)
    if fields.get("model_type") == "gemma3_text":
        fields["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": theta or 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": local or 1e4}}
        return fields
    if theta is None and scaling is None:
        return fields
    params = dict(scaling or {"rope_type": "default"})
    params["rope_theta"] = theta if theta is not None else 10000.0
    fields["rope_parameters"] = params
    return fields


def tiny_model(family: str, out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0, dtype: str = "float32",
               **overrides) -> Path:
    """A random-weight model of `family` (a TINY key or an HF architecture name) saved with the tokenizer in
    `tokenizer_dir`. `overrides` replace config fields (e.g. head_dim=24, tie_word_embeddings=False,
    rope_scaling={...}, vocab_size=N to pad the embedding beyond the tokenizer). Returns `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    key = ARCH_TO_TINY.get(family, family)
    spec = TINY[key]
    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    fields = dict(_BASE, **spec["config"])
    fields.update(overrides)
    pad_to = fields.pop("pad_vocab_to", None)
    vocab = len(tok)
    if pad_to:
        vocab = -(-vocab // pad_to) * pad_to  # the hub's padded embedding (Phi-3: 32064 rows for 32011 tokens)
    fields.setdefault("vocab_size", vocab)
    fields["model_type"] = spec["model_type"]
    fields = _rope_config(fields)
    rp = fields.get("rope_parameters") or {}
    if rp.get("long_factor") == "auto":
        # longrope: one factor per rotary pair; distinct values so a swapped long/short would show.
        head_dim = fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
        pairs = int(head_dim * fields.get("partial_rotary_factor", 1.0)) // 2
        rp["long_factor"] = [1.0 + 0.25 * i for i in range(pairs)]
        rp["short_factor"] = [1.0 + 0.05 * i for i in range(pairs)]
        rp.setdefault("original_max_position_embeddings", fields.get("original_max_position_embeddings"))
        rp.setdefault("partial_rotary_factor", fields.get("partial_rotary_factor", 1.0))
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    config.architectures = [spec["arch"]]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():
        # Random init leaves biases and norm weights at constants; make every tensor carry information so a
        # dropped shift, permutation or bias would change the logits.
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


def as_hub_v4_config(folder: str | Path) -> Path:
    """Rewrite `folder`'s config.json the way hub checkpoints saved by transformers 4 carry it: rope_theta and
    rope_scaling at the top level (Gemma 3: rope_local_base_freq, sliding_window_pattern), no head_dim where it is
    hidden/heads, no layer_types. llama.cpp's converter reads such files through AutoConfig (which fills the
    transformers 5 fields back in); ours reads the JSON. Returns `folder`."""
    path = Path(folder) / "config.json"
    c = json.loads(path.read_text())
    rp = c.pop("rope_parameters", None) or {}
    if c.get("model_type") == "gemma3_text":
        c["rope_theta"] = rp["full_attention"]["rope_theta"]
        c["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
        c["rope_scaling"] = None
        c["sliding_window_pattern"] = c.pop("_sliding_window_pattern", 6)
    else:
        c["rope_theta"] = rp.pop("rope_theta", 10000.0)
        rp.pop("partial_rotary_factor", None)
        if rp.get("rope_type", "default") != "default":
            if rp["rope_type"] == "longrope":
                rp = {"type": "longrope", "long_factor": rp["long_factor"], "short_factor": rp["short_factor"]}
            c["rope_scaling"] = rp
        else:
            c["rope_scaling"] = None
    if c.get("head_dim") == c["hidden_size"] // c["num_attention_heads"] and c.get("model_type") in (
            "llama", "mistral", "qwen2", "smollm3"):
        del c["head_dim"]
    c.pop("layer_types", None)
    c["transformers_version"] = "4.46.0"
    path.write_text(json.dumps(c, indent=2, sort_keys=True))
    return Path(folder)
