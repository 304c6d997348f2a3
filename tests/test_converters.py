"""The converter's families against the two references that matter: llama.cpp's own convert_hf_to_gguf.py (tensor for
tensor, key for key, on the same folder) and HF transformers (llama.cpp running our GGUF scores the same tokens as
transformers running the folder). Every model is tiny and built offline (tests/tiny_models.py): no default model,
no download. Run: python -m pytest -q tests/test_converters.py"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeft.converters.compare import compare, key_differences, reference_convert, tensors_equal
from edgeft.converters.families import ConversionError, families, family_for, imatrix_name_map
from edgeft.converters.hf_to_gguf import convert
from edgeft.llamacpp import reference_tree

from . import tiny_models as tm

# Shapes of each family as they come on the hub, beyond the family's own tiny config (tiny_models.TINY):
# name -> (TINY key, config overrides, tokenizer (kind, style) or None for the family's).
VARIANTS: dict[str, tuple[str, dict, tuple | None]] = {
    **{k: (k, {}, None) for k in tm.TINY},
    "llama-tied-headdim24": ("llama", {"tie_word_embeddings": True, "head_dim": 24}, None),
    "llama-rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, None),
    "llama3-padded-vocab": ("llama3", {"vocab_size": 3072}, None),  # Llama 3.2 / Qwen2.5 pad their embeddings
    "llama-spm-padded-vocab": ("llama", {"vocab_size": 2048}, None),
    "qwen2-untied-yarn": ("qwen2", {"tie_word_embeddings": False, "max_position_embeddings": 4096,
                                    "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 1024}}, None),
    "qwen2-spm": ("qwen2", {}, ("spm", "llama2")),
    "qwen3-untied": ("qwen3", {"tie_word_embeddings": False, "head_dim": 16}, None),
    "gemma2-headdim32": ("gemma2", {"head_dim": 32, "query_pre_attn_scalar": 32}, None),
    "gemma3-softcap": ("gemma3", {"final_logit_softcapping": 30.0}, None),
    "smollm3-untied-bpe-smollm": ("smollm3", {"tie_word_embeddings": False}, ("bpe", "smollm")),
    "mistral-headdim32": ("mistral", {"head_dim": 32}, None),
    # Checkpoints stored in bf16 / f16 as on the hub (the tiny defaults are float32): the BF16->F16 cast, BF16/F16
    # pass-through, and Gemma's +1 norm shift computed from a 16-bit source (llama.cpp keeps F16 in float16 there).
    "gemma3-bf16": ("gemma3", {"dtype": "bfloat16"}, None),
    "gemma2-f16": ("gemma2", {"dtype": "float16"}, None),
    "llama3-bf16": ("llama3", {"dtype": "bfloat16"}, None),
    "phi3-f16-window": ("phi3", {"dtype": "float16", "sliding_window": 2047}, None),  # Phi-3-mini-4k's window
    # SmolLM2's layout (the default model): byte-level BPE with digit splitting in a 49152-row Llama, where
    # llama.cpp's converter writes add_bos_token = false.
    "smollm2-like": ("llama", {"vocab_size": 49152, "tie_word_embeddings": True}, ("bpe", "smollm")),
}

# Keys we write differently from llama.cpp's converter, with the reason. None today: general.* comes from the same
# gguf Metadata code path, and the bos/eos flags llama.cpp's newer SpecialVocab adds are added here too.
EXEMPT_KEYS: dict[str, str] = {}
CONTEXT = 256  # tokens scored; > the Gemma sliding window (64), so local attention is exercised


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-families")


@pytest.fixture(scope="session")
def build(tiny_root):
    """variant name -> its model folder, built once per session."""
    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant.endswith("-hub-v4") and variant not in made:
            made[variant] = tm.as_hub_v4_config(shutil.copytree(get(variant[:-len("-hub-v4")]), tiny_root / variant))
        if variant not in made:
            key, overrides, tok = VARIANTS[variant]
            if tok is None:
                tok_dir = tm.tokenizer_for(key, tiny_root / "tokenizers")
            else:
                kind, style = tok
                d = tiny_root / "tokenizers" / f"{kind}-{style}"
                tok_dir = tm.spm_tokenizer(d, style) if kind == "spm" else tm.bpe_tokenizer(d, style)
            made[variant] = tm.tiny_model(key, tiny_root / variant, tok_dir, **overrides)
        return made[variant]
    return get


def _pre(folder: Path) -> str | None:
    """The pre-tokenizer name the reference run is told, for the test tokenizers llama.cpp cannot know by hash."""
    cfg = json.loads((folder / "tokenizer.json").read_text())
    if (folder / "tokenizer.model").is_file():
        return None
    pre = json.dumps(cfg.get("pre_tokenizer"))
    for style, name in tm.BPE_PRE.items():
        if style == "smollm" and "Digits" in pre:
            return name
        if style == "qwen2" and json.dumps(tm.QWEN2_REGEX)[1:-1] in pre:
            return name
        if style == "llama3" and json.dumps(tm.LLAMA3_REGEX)[1:-1] in pre:
            return name
        if style == "gpt4o" and json.dumps(tm.GPT4O_REGEX)[1:-1] in pre:
            return name
    raise AssertionError(f"unknown test tokenizer in {folder}")


def test_registry_covers_every_family_and_refuses_unknown_architectures(tmp_path):
    registered = {a for cls in families() for a in cls.hf_archs}
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
            "Gemma3ForCausalLM", "Phi3ForCausalLM", "SmolLM3ForCausalLM"} <= registered
    # Adding a family means adding its tiny test entry: every registered architecture has one.
    assert registered <= {spec["arch"] for spec in tm.TINY.values()}
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError) as e:
        family_for(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "GPT2LMHeadModel is not supported" in msg and "Gemma3ForCausalLM" in msg
    assert str(tmp_path) in msg


# F16 for every variant, F32 for each family's own tiny model, and each family's config.json as transformers 4 wrote
# it (rope_theta/rope_scaling at the top, no head_dim): llama.cpp reads configs through AutoConfig, we read the JSON.
def _tier(cases: list, fast: set) -> list:
    """Every family's own tiny model in the fast tier; the other shapes, dtypes and config vintages marked slow
    (each runs llama.cpp's converter in a subprocess, a few seconds apiece)."""
    return [pytest.param(*c, marks=() if c in fast else pytest.mark.slow) if isinstance(c, tuple)
            else pytest.param(c, marks=() if c in fast else pytest.mark.slow) for c in cases]


@pytest.mark.parametrize("variant,outtype", _tier(
    [(v, "f16") for v in VARIANTS] + [(v, "f32") for v in tm.TINY] + [(f"{v}-hub-v4", "f16") for v in tm.TINY]
    + [(v, t) for v in ("gemma3-bf16", "gemma2-f16", "llama3-bf16", "phi3-f16-window") for t in ("f32", "bf16")]
    + [("qwen2", "bf16"), ("phi4mini", "bf16")], fast={(v, "f16") for v in tm.TINY}))
def test_converts_like_llama_cpp(variant, outtype, build, tmp_path):
    folder = build(variant)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    convert(folder, ours, outtype)
    reference_convert(reference_tree(), folder, theirs, outtype, _pre(folder))
    cmp = compare(ours, theirs)
    assert tensors_equal(cmp), {k: cmp[k] for k in ("only_ours", "only_theirs", "different")}
    assert cmp["tensors_ours"] == cmp["tensors_theirs"] > 0
    assert key_differences(cmp) <= set(EXEMPT_KEYS), cmp["values"]


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


# transformers 5 forces Qwen2Tokenizer on model_type qwen2 (a byte-level BPE rebuilt from the SentencePiece vocab), so
# HF itself does not run a Qwen2 folder's tokenizer.model; llama.cpp does. That variant is compared to llama.cpp's
# converter only.
@pytest.mark.parametrize("variant", _tier([v for v in VARIANTS if v != "qwen2-spm"], fast=set(tm.TINY)))
def test_llama_cpp_runs_our_gguf_like_transformers(variant, build, tmp_path):
    """Perplexity within 0.1% and the same argmax on a few hundred tokens; same tokenization; chat template kept."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.llamacpp import LlamaCpp

    folder = build(variant)
    path = tmp_path / "m.gguf"
    convert(folder, path, "f32")
    tok = AutoTokenizer.from_pretrained(folder)
    reader = GGUFReader(path)
    assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template

    text = tm.sample_text()
    ids = tok(tm.docs_text()[:4000], add_special_tokens=False)["input_ids"][:CONTEXT]
    assert len(ids) == CONTEXT
    cpp = LlamaCpp(path, n_ctx=CONTEXT, threads=2)
    try:
        assert cpp.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]
        with_specials = cpp.llm.tokenize(text.encode(), add_bos=True, special=False)
        assert with_specials == tok(text)["input_ids"]  # bos added (or not) as HF does
        got = cpp.logits(ids)
    finally:
        cpp.close()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    ppl_cpp, ppl_hf = np.exp(_nll(got, ids)), np.exp(_nll(want, ids))
    assert abs(ppl_cpp / ppl_hf - 1) < 1e-3, (ppl_cpp, ppl_hf)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99
    np.testing.assert_allclose(got, want, atol=2e-3 * max(1.0, float(np.abs(want).max())), rtol=0)


@pytest.mark.parametrize("variant", ["qwen2", "llama3", "smollm3-untied-bpe-smollm", "phi4mini"])
def test_pre_tokenizer_is_the_one_transformers_runs(variant, build, monkeypatch):
    """Without importing transformers, the converter decides which pre-tokenizer HF applies (transformers 5 swaps
    it by tokenizer class); it must be the one AutoTokenizer actually builds, and for these hub layouts it must
    know it without its transformers-in-a-subprocess fallback."""
    from transformers import AutoTokenizer

    from edgeft.converters import gguf_vocab
    from edgeft.converters.gguf_vocab import effective_pre_tokenizer

    def no_fallback(model_dir):
        raise AssertionError(f"{model_dir}: fell back to asking transformers")
    monkeypatch.setattr(gguf_vocab, "_pre_tokenizer_from_transformers", no_fallback)
    folder = build(variant)
    config = json.loads((folder / "config.json").read_text())
    mine = effective_pre_tokenizer(folder, config, json.loads((folder / "tokenizer.json").read_text()))
    theirs = json.loads(AutoTokenizer.from_pretrained(folder).backend_tokenizer.to_str())["pre_tokenizer"]
    assert json.dumps(mine, sort_keys=True) == json.dumps(theirs, sort_keys=True)


def test_spm_reader_matches_sentencepiece(build):
    import sentencepiece as spm

    from edgeft.converters.gguf_vocab import read_spm_pieces

    for variant in ("llama", "gemma2"):
        model = build(variant) / "tokenizer.model"
        sp = spm.SentencePieceProcessor(model_file=str(model))
        pieces = read_spm_pieces(model)
        assert [p for p, _, _ in pieces] == [sp.IdToPiece(i) for i in range(sp.vocab_size())]
        assert [s for _, s, _ in pieces] == [sp.GetScore(i) for i in range(sp.vocab_size())]
        assert sum(sp.IsByte(i) for i in range(sp.vocab_size())) == 256 == sum(t == 6 for _, _, t in pieces)


@pytest.mark.parametrize("arch,variant", [pytest.param(arch, key, id=key or arch) for arch, key in tm.registry_cases()])
def test_lora_adapter_and_fused_conversion_agree_with_transformers(arch, variant, build, tmp_path):
    """Every registered family, random LoRA factors on every projection `edgeft train` targets (Llama: q/k B rows
    permuted like the base; Phi-3: the fused qkv_proj and gate_up_proj): base GGUF + GGUF adapter in llama.cpp, the
    fused GGUF, and transformers with the merged weights give the same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.methods.lora import Lora
    from edgeft.converters.lora_to_gguf import convert_lora
    from edgeft.llamacpp import LlamaCpp
    from edgeft.train import find_projections

    assert variant is not None, f"{arch} is registered in the converter but has no tiny model in tests/tiny_models.TINY"
    folder = build(variant)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    targets = find_projections(model)
    ids = list(range(5, 5 + 64))
    with torch.no_grad():
        before = model(torch.tensor([ids])).logits[0].numpy()
    gen = torch.Generator().manual_seed(7)
    loras = {}
    for name, p in model.named_parameters():
        # Factors small enough that llama.cpp's float16 KV cache stays inside the tolerance with every projection
        # adapted; the assert on `want` below keeps the adapters' effect far above it.
        if name.endswith(".weight") and name.split(".")[-2] in targets:
            loras[name] = Lora(a=torch.randn(4, p.shape[1], generator=gen) * 0.2,
                               b=torch.randn(p.shape[0], 4, generator=gen) * 0.2, scale=0.5)
    assert len(loras) == len(targets) * model.config.num_hidden_layers, sorted(loras)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, lora in loras.items():
            # round the factors through float16 as the GGUF adapter stores them, so all three see the same delta
            lora.a, lora.b = lora.a.half().float(), lora.b.half().float()
            params[name].copy_(lora.apply(params[name]))
        want = model(torch.tensor([ids])).logits[0].numpy()
    atol = 5e-3 * max(1.0, float(np.abs(want).max()))
    assert np.abs(want - before).max() > 10 * atol, "the adapters barely change the logits: the check would be empty"
    base, fused, adapter = tmp_path / "base.gguf", tmp_path / "fused.gguf", tmp_path / "lora.gguf"
    convert(folder, base, "f32")
    assert convert(folder, fused, "f32", loras=loras).fused_loras == len(loras)
    assert convert_lora(loras, folder, adapter) == 2 * len(loras)
    for path, lora in ((fused, None), (base, adapter)):
        cpp = LlamaCpp(path, n_ctx=64, threads=2, lora=lora)
        got = cpp.logits(ids)
        cpp.close()
        np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=str(path.name))


def test_imatrix_names_cover_every_linear_layer(build):
    """Each family: every nn.Linear's weight maps to a tensor of our GGUF (or to none where llama.cpp takes the
    head from the embedding), so an importance matrix reaches every matrix llama.cpp quantizes."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    for variant in tm.TINY:
        folder = build(variant)
        out = folder.parent / f"{variant}-imatrix.gguf"
        convert(folder, out, "f16")
        names = {t.name for t in GGUFReader(out).tensors}
        to_gguf = imatrix_name_map(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        tied = model.config.tie_word_embeddings
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not (tied and name == "lm_head"):
                target = to_gguf(f"{name}.weight")
                assert target in names or (target is None and name == "lm_head"), (variant, name, target)
        out.unlink()


def test_refusals_are_one_line_and_name_the_fix(build, tmp_path):
    smol = tmp_path / "smollm3-bad-nope"
    shutil.copytree(build("smollm3"), smol)
    cfg = json.loads((smol / "config.json").read_text())
    cfg["no_rope_layers"] = [1, 0, 1, 1]
    (smol / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="no_rope_layers .* every 4th layer"):
        convert(smol, tmp_path / "x.gguf")

    phi = tmp_path / "phi3-no-spm"
    shutil.copytree(build("phi3"), phi)
    (phi / "tokenizer.model").unlink()
    with pytest.raises(ConversionError) as e:
        convert(phi, tmp_path / "y.gguf")
    assert "\n" not in str(e.value) and "tokenizer.model" in str(e.value) and str(phi) in str(e.value)

    gemma = tmp_path / "gemma3-odd-layers"
    shutil.copytree(build("gemma3"), gemma)
    cfg = json.loads((gemma / "config.json").read_text())
    cfg["layer_types"] = ["full_attention"] * cfg["num_hidden_layers"]
    (gemma / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="layer_types"):
        convert(gemma, tmp_path / "z.gguf")


def test_test_tokenizers_are_deterministic(tmp_path):
    """The offline tokenizers are trained, not downloaded: the same call must give the same bytes, or every
    comparison above would be against a moving target."""
    for build_tok, style, files in ((tm.spm_tokenizer, "gemma", ("tokenizer.model", "tokenizer.json")),
                                    (tm.bpe_tokenizer, "qwen2", ("tokenizer.json", "tokenizer_config.json"))):
        a, b = build_tok(tmp_path / f"a-{style}", style), build_tok(tmp_path / f"b-{style}", style)
        for f in files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
