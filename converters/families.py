"""The architectures the converter knows: one small class per family, registered by the HF architecture names it
handles (as llama.cpp's converter registers one class per architecture).

A family says what differs from the plain decoder: which GGUF architecture it becomes, the hyperparameter keys it
writes (the set llama.cpp's own converter writes for it, so both files load alike), its tensor transforms (q/k row
permutation for llama.cpp's interleaved RoPE, Gemma's +1 norm shift, rope factor tensors), which tensors it drops
and which vocabulary it reads. hf_to_gguf (full model), lora_to_gguf (adapters) and `imatrix_name_map` (importance
matrices) all go through it, so adding a family is one class here plus its tiny test entry.

Only `numpy` and the `gguf` package are imported: reading a config and a vocabulary must not cost a torch import.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np


class ConversionError(ValueError):
    """Input the converter refuses; the message is one line naming the file and the fix."""


_REGISTRY: dict[str, type["Family"]] = {}


def register(cls: type["Family"]) -> type["Family"]:
    for name in cls.hf_archs:
        if name in _REGISTRY:
            raise TypeError(f"{name} registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        _REGISTRY[name] = cls
    return cls


def families() -> list[type["Family"]]:
    """Every registered family class, in registration order (each once)."""
    seen: list[type[Family]] = []
    for cls in _REGISTRY.values():
        if cls not in seen:
            seen.append(cls)
    return seen


def supported() -> dict[str, str]:
    """HF architecture name -> GGUF architecture name, for every registered architecture."""
    return {name: cls.gguf_arch_name() for name, cls in _REGISTRY.items()}


def read_config(model_dir: Path) -> dict:
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{model_dir}: no config.json; pass a Hugging Face model folder")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConversionError(f"{config_file}: not valid JSON; save the model again") from None


def family_for(model_dir: Path, config: dict | None = None) -> "Family":
    """The family instance for an HF folder, or a one-line ConversionError naming the supported architectures."""
    model_dir = Path(model_dir)
    config = read_config(model_dir) if config is None else config
    hf_arch = (config.get("architectures") or ["?"])[0]
    if hf_arch not in _REGISTRY:
        raise ConversionError(f"{model_dir}: architecture {hf_arch} is not supported; supported: "
                              f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[hf_arch](model_dir, config, hf_arch)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary dims as [first half; second half]; llama.cpp's llama-style archs rotate
    adjacent pairs. Reorder rows (dim 0) per head from half-split to interleaved (works for biases too)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Family:
    """A decoder-only transformer as llama.cpp's base text converter writes it. Subclasses override what differs."""

    hf_archs: tuple[str, ...] = ()
    arch: str = ""  # gguf.MODEL_ARCH member name
    permute_qk = False  # llama-style (NORM) RoPE: q/k rows go from half-split to interleaved
    norm_shift = 0.0  # added to every norm weight (Gemma stores w and computes x * (1 + w))
    drop_lm_head = False  # the head is always the embedding in llama.cpp (Gemma), even if a checkpoint has one

    def __init__(self, model_dir: Path, config: dict, hf_arch: str):
        self.dir = Path(model_dir)
        self.config_file = self.dir / "config.json"
        self.hf_arch = hf_arch
        c = dict(config)
        if isinstance(c.get("text_config"), dict):
            c.update(c["text_config"])
        self.c = c
        self.n_layer = self.need("num_hidden_layers")
        self.n_head = self.need("num_attention_heads")
        self.n_head_kv = c.get("num_key_value_heads", self.n_head)
        self.hidden = self.need("hidden_size")
        self.rope = self._rope_parameters()

    # --- identity --------------------------------------------------------------------------------------------

    @classmethod
    def gguf_arch_name(cls) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, cls.arch)]

    @property
    def model_arch(self):
        import gguf

        return getattr(gguf.MODEL_ARCH, self.arch)

    def need(self, key: str):
        if key not in self.c:
            raise ConversionError(f"{self.config_file}: no '{key}' for {self.hf_arch}; the config is incomplete")
        return self.c[key]

    @property
    def head_dim(self) -> int:
        return self.c.get("head_dim") or self.hidden // self.n_head

    # --- RoPE ------------------------------------------------------------------------------------------------

    def _rope_parameters(self) -> dict:
        """transformers 5's `rope_parameters` or the hub's older rope_theta/rope_scaling, as one dict; layer-typed
        configs (Gemma 3) keep {"full_attention": {...}, "sliding_attention": {...}}."""
        c = self.c
        rp = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        if "full_attention" in rp or "sliding_attention" in rp:
            return rp
        if "rope_type" not in rp and "type" in rp:
            rp["rope_type"] = rp["type"]
        for key in ("rope_theta", "rotary_emb_base"):
            if "rope_theta" not in rp and c.get(key) is not None:
                rp["rope_theta"] = c[key]
        local = c.get("rope_local_base_freq", c.get("local_rope_theta"))
        if local is not None:
            rp["sliding_attention"] = {"rope_theta": local}
        for key in ("partial_rotary_factor", "original_max_position_embeddings"):
            if key not in rp and c.get(key) is not None:
                rp[key] = c[key]
        return rp

    @property
    def global_rope(self) -> dict:
        return self.rope.get("full_attention", self.rope)

    def rope_scaling_type(self) -> str | None:
        t = self.global_rope.get("rope_type")
        return None if t in (None, "default") else str(t).lower()

    # --- hyperparameters -------------------------------------------------------------------------------------

    def write_hparams(self, w) -> None:
        """The keys llama.cpp's base text converter writes from a config."""
        import gguf

        c = self.c
        w.add_block_count(self.n_layer)
        if c.get("max_position_embeddings") is not None:
            w.add_context_length(c["max_position_embeddings"])
        w.add_embedding_length(self.hidden)
        if c.get("intermediate_size") is not None:
            w.add_feed_forward_length(c["intermediate_size"])
        w.add_head_count(self.n_head)
        if c.get("num_key_value_heads") is not None:
            w.add_head_count_kv(c["num_key_value_heads"])
        rp = self.global_rope
        kind = self.rope_scaling_type()
        if kind == "linear" and rp.get("factor") is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rp["factor"])
        elif kind == "yarn" and rp.get("factor") is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rp["factor"])
            w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
            for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                             ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                if rp.get(key) is not None:
                    add(rp[key])
            attn = rp.get("attention_factor", rp.get("attn_factor"))
            if attn is not None:
                w.add_rope_scaling_yarn_attn_factor(attn)
        elif kind in ("longrope", "su"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        elif kind not in (None, "llama3", "linear", "yarn"):
            raise ConversionError(f"{self.config_file}: rope scaling '{kind}' is not supported for {self.hf_arch}; "
                                  f"supported: linear, yarn, llama3, longrope")
        if rp.get("rope_theta") is not None:
            w.add_rope_freq_base(rp["rope_theta"])
        local = (self.rope.get("sliding_attention") or {}).get("rope_theta")
        if local is not None:
            w.add_rope_freq_base_swa(local)
        if c.get("rms_norm_eps") is not None:
            w.add_layer_norm_rms_eps(c["rms_norm_eps"])
        if c.get("head_dim") is not None:
            w.add_key_length(c["head_dim"])
            w.add_value_length(c["head_dim"])

    # --- tensors ---------------------------------------------------------------------------------------------

    def tensor_names(self):
        import gguf

        return gguf.get_tensor_name_map(self.model_arch, self.n_layer)

    def skip(self, hf_name: str) -> bool:
        """Tensors llama.cpp never reads: recomputed rotary tables, a head it takes from the embedding."""
        if hf_name.endswith(("rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")):
            return True
        return self.drop_lm_head and hf_name == "lm_head.weight"

    def row_permutation(self, hf_name: str) -> int | None:
        """n_head to permute this tensor's rows with (q/k of llama-style RoPE archs), else None."""
        if not self.permute_qk:
            return None
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return self.n_head
        if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return self.n_head_kv
        return None

    def value_shift(self, hf_name: str) -> float:
        """A constant added to every value of this tensor (Gemma's norm weights)."""
        return self.norm_shift if self.norm_shift and hf_name.endswith("norm.weight") else 0.0

    def extra_tensors(self) -> dict[str, np.ndarray]:
        """Tensors computed from the config (rope factors), GGUF name -> float32 array."""
        import gguf

        rp = self.global_rope
        if self.rope_scaling_type() != "llama3":
            return {}
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight":
                llama3_rope_factors(rp, self.head_dim, rp.get("rope_theta", 10000.0))}

    # --- vocabulary ------------------------------------------------------------------------------------------

    def write_vocab(self, w) -> int:
        """SentencePiece when the folder has tokenizer.model, else the BPE tokenizer.json (llama.cpp's order)."""
        from .gguf_vocab import write_bpe, write_spm

        if (self.dir / "tokenizer.model").is_file():
            return write_spm(w, self.dir, self.c.get("vocab_size"))
        return write_bpe(w, self.dir, self.c)


def llama3_rope_factors(rp: dict, head_dim: int, theta: float) -> np.ndarray:
    """Llama 3.1+ scales RoPE frequencies by wavelength band; llama.cpp reads one factor per rotary pair from a
    `rope_freqs` tensor.

    Bit-equal to llama.cpp's converter, which computes in float32 torch: its `scalar / tensor` is
    reciprocal-then-multiply (two roundings), reproduced here step by step; its float32 pow is reproduced by a
    float64 pow rounded once to float32 (equal for every published Llama 3.x shape; a 1-ulp miss is possible)."""
    f32 = np.float32
    factor = rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = f32(old_ctx / low), f32(old_ctx / high)
    x = np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)
    freqs = f32(1) / (np.float64(theta) ** x.astype(np.float64)).astype(f32)
    out = []
    for freq in freqs:
        wavelen = (f32(1) / freq) * f32(2 * math.pi)
        if wavelen < high_wavelen:
            out.append(f32(1))
        elif wavelen > low_wavelen:
            out.append(f32(factor))
        else:
            smooth = ((f32(1) / wavelen) * f32(old_ctx) - f32(low)) / f32(high - low)
            out.append(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth))
    return np.array(out, dtype=f32)


@register
class Llama(Family):
    """Llama 2 / 3.x (llama3 rope factors), TinyLlama, SmolLM/SmolLM2."""

    hf_archs = ("LlamaForCausalLM",)
    arch = "LLAMA"
    permute_qk = True
    fills_head_dim = True  # LlamaConfig/MistralConfig set head_dim = hidden/heads when a config.json has none

    def __init__(self, model_dir: Path, config: dict, hf_arch: str):
        if self.fills_head_dim and config.get("head_dim") is None and config.get("hidden_size") and \
                config.get("num_attention_heads"):
            # llama.cpp's converter reads configs through transformers' AutoConfig, which fills this in (so Llama 2,
            # Mistral 7B and TinyLlama files, which have no head_dim, still get attention.key_length written).
            config = {**config, "head_dim": config["hidden_size"] // config["num_attention_heads"]}
        super().__init__(model_dir, config, hf_arch)

    def write_hparams(self, w) -> None:
        super().write_hparams(w)
        w.add_vocab_size(self.need("vocab_size"))
        w.add_rope_dimension_count(self.head_dim)

    def write_vocab(self, w) -> int:
        import gguf

        cfg = self.dir / "tokenizer_config.json"
        if cfg.is_file():
            prefix = json.loads(cfg.read_text(encoding="utf-8")).get("add_prefix_space")
            if prefix is not None:
                w.add_add_space_prefix(prefix)
        n = super().write_vocab(w)
        if self.c.get("vocab_size") == 49152:
            # llama.cpp's converter says "no bos" for every 49152-token Llama vocabulary (Granite small, SmolLM,
            # SmolLM2 and our default model: HF adds none there); without the key llama.cpp would add one.
            w.kv_data[0].pop(gguf.Keys.Tokenizer.ADD_BOS, None)
            w.add_add_bos_token(False)
        return n


@register
class Mistral(Llama):
    """Mistral 7B v0.1-v0.3: Llama's graph in llama.cpp (its sliding window is not written, as llama.cpp does)."""

    hf_archs = ("MistralForCausalLM",)


@register
class Qwen2(Family):
    """Qwen2 / Qwen2.5: q/k/v biases, NEOX RoPE (no permutation)."""

    hf_archs = ("Qwen2ForCausalLM",)
    arch = "QWEN2"


@register
class Qwen3(Qwen2):
    """Qwen3 dense: per-head q/k RMS norms (attn_q_norm/attn_k_norm), explicit head_dim, no biases."""

    hf_archs = ("Qwen3ForCausalLM",)
    arch = "QWEN3"


@register
class Gemma2(Family):
    """Gemma 2: norms stored as w for x*(1+w), attention and final logit soft-capping, alternating sliding window.
    llama.cpp's Gemma 2 reads no rope base (fixed 10000) and writes its own short key set."""

    hf_archs = ("Gemma2ForCausalLM",)
    arch = "GEMMA2"
    norm_shift = 1.0
    drop_lm_head = True

    def write_hparams(self, w) -> None:
        c = self.c
        w.add_context_length(self.need("max_position_embeddings"))
        w.add_embedding_length(self.hidden)
        w.add_block_count(self.n_layer)
        w.add_feed_forward_length(self.need("intermediate_size"))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(self.need("rms_norm_eps"))
        w.add_key_length(self.need("head_dim"))
        w.add_value_length(self.need("head_dim"))
        w.add_attn_logit_softcapping(self.need("attn_logit_softcapping"))
        w.add_final_logit_softcapping(self.need("final_logit_softcapping"))
        w.add_sliding_window(self.need("sliding_window"))
        if c.get("query_pre_attn_scalar") not in (None, self.c["head_dim"]) and self.n_layer != 46:
            # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 46-layer 27B only).
            raise ConversionError(f"{self.config_file}: query_pre_attn_scalar {c['query_pre_attn_scalar']} != head_dim "
                                  f"{c['head_dim']}; llama.cpp cannot represent this Gemma 2 attention scale")

    def write_vocab(self, w) -> int:
        n = super().write_vocab(w)
        w.add_add_space_prefix(False)
        return n


@register
class Gemma3(Family):
    """Gemma 3 text (1B and the text tower of the larger ones): norm shift, q/k norms, 5 local layers with a local
    rope base per global layer, optional final soft-capping. The embedding is scaled by llama.cpp itself."""

    hf_archs = ("Gemma3ForCausalLM",)
    arch = "GEMMA3"
    norm_shift = 1.0

    def __init__(self, model_dir: Path, config: dict, hf_arch: str):
        # Gemma 3 configs may omit fields whose Gemma 3 defaults llama.cpp then writes anyway.
        config = {"max_position_embeddings": 131072, "num_attention_heads": 8, "rms_norm_eps": 1e-6,
                  "head_dim": 256, "num_key_value_heads": 4, **config}
        super().__init__(model_dir, config, hf_arch)
        self.global_rope.setdefault("rope_theta", 1_000_000.0)

    def write_hparams(self, w) -> None:
        c = self.c
        super().write_hparams(w)
        if c.get("attn_logit_softcapping") is not None:
            raise ConversionError(f"{self.config_file}: attn_logit_softcapping is set; Gemma 3 has none, llama.cpp "
                                  f"cannot apply it")
        if c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(c["final_logit_softcapping"])
        if c.get("sliding_window_pattern") != 1:
            w.add_sliding_window(self.need("sliding_window"))
        self._check_layer_pattern()

    def _check_layer_pattern(self) -> None:
        """llama.cpp hard-codes Gemma 3's pattern (every 6th layer global); refuse a config it would misread."""
        types = self.c.get("layer_types")
        if types:
            want = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.n_layer)]
            if list(types) != want:
                raise ConversionError(f"{self.config_file}: layer_types differ from Gemma 3's 5 local : 1 global "
                                      f"pattern, which llama.cpp assumes; it would run this model wrong")

    def write_vocab(self, w) -> int:
        n = super().write_vocab(w)
        if (self.dir / "tokenizer.model").is_file():
            w.add_add_space_prefix(False)
        return n


@register
class Phi3(Family):
    """Phi-3 / 3.5 mini, Phi-4-mini: fused qkv_proj (attn_qkv) and gate_up_proj (ffn_up, gate first) kept fused,
    NEOX RoPE over a partial rotary dimension (Phi-4-mini: 0.75), longrope factors as rope_factors_long/short."""

    hf_archs = ("Phi3ForCausalLM",)
    arch = "PHI3"

    @property
    def rope_dims(self) -> int:
        return int(self.global_rope.get("partial_rotary_factor", 1.0) * self.hidden) // self.n_head

    def _orig_ctx(self) -> int:
        orig = self.rope.get("original_max_position_embeddings", self.c.get("original_max_position_embeddings"))
        if orig is None:
            raise ConversionError(f"{self.config_file}: no original_max_position_embeddings; Phi-3 configs carry it "
                                  f"(the pre-extension context), add it")
        return orig

    def write_hparams(self, w) -> None:
        c = self.c
        w.add_context_length(self.need("max_position_embeddings"))
        w.add_rope_scaling_orig_ctx_len(self._orig_ctx())
        w.add_embedding_length(self.hidden)
        w.add_feed_forward_length(self.need("intermediate_size"))
        w.add_block_count(self.n_layer)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.need("num_key_value_heads"))
        w.add_layer_norm_rms_eps(self.need("rms_norm_eps"))
        w.add_rope_dimension_count(self.rope_dims)
        w.add_rope_freq_base(self.global_rope["rope_theta"])
        w.add_sliding_window(c.get("sliding_window") or 0)  # 0 tells Phi-4 (no window) from Phi-3
        if self.global_rope.get("long_factor"):
            w.add_rope_scaling_attn_factors(self._attn_factor())

    def _attn_factor(self) -> float:
        scale = self.c["max_position_embeddings"] / self._orig_ctx()
        kind = self.rope_scaling_type()
        if kind in ("su", "longrope"):
            return math.sqrt(1 + math.log(scale) / math.log(self._orig_ctx())) if scale > 1.0 else 1.0
        if kind == "yarn":
            return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        raise ConversionError(f"{self.config_file}: rope scaling '{kind}' with long/short factors is not supported; "
                              f"use longrope")

    def extra_tensors(self) -> dict[str, np.ndarray]:
        import gguf

        rp = self.global_rope
        long, short = rp.get("long_factor"), rp.get("short_factor")
        if not long:
            return {}
        if not short or len(long) != len(short) or len(long) * 2 != self.rope_dims:
            raise ConversionError(f"{self.config_file}: rope long_factor/short_factor must both have "
                                  f"{self.rope_dims // 2} entries (one per rotary pair)")
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": np.array(long, dtype=np.float32),
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": np.array(short, dtype=np.float32)}

    def write_vocab(self, w) -> int:
        from .gguf_vocab import write_bpe, write_spm

        cfg = self.dir / "tokenizer_config.json"
        cls = json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class") if cfg.is_file() else None
        if cls == "GPT2Tokenizer":  # Phi-4-mini ships a BPE (o200k) tokenizer
            return write_bpe(w, self.dir, self.c)
        if not (self.dir / "tokenizer.model").is_file():
            raise ConversionError(f"{self.dir}: no tokenizer.model; Phi-3 needs its SentencePiece model (copy it from "
                                  f"the base model)")
        return write_spm(w, self.dir, self.c.get("vocab_size"), phi3=True)


@register
class SmolLM3(Llama):
    """SmolLM3: Llama with RoPE dropped on every 4th layer (`no_rope_layers`). llama.cpp fixes that step at 4 and
    reads no key for it, so other patterns are refused rather than converted into a different model."""

    hf_archs = ("SmolLM3ForCausalLM",)
    arch = "SMOLLM3"
    fills_head_dim = False  # SmolLM3Config leaves head_dim out

    def write_hparams(self, w) -> None:
        super().write_hparams(w)
        pattern = self.c.get("no_rope_layers")
        if pattern is not None:
            want = [0 if (i + 1) % 4 == 0 else 1 for i in range(self.n_layer)]
            if list(pattern) != want:
                raise ConversionError(f"{self.config_file}: no_rope_layers {pattern} is not 'no rope on every 4th "
                                      f"layer', the only pattern llama.cpp runs for SmolLM3")


def imatrix_name_map(model_dir: Path) -> Callable[[str], str | None]:
    """HF Linear weight name -> the GGUF tensor its importance-matrix row belongs to (None when llama.cpp has no such
    tensor, e.g. a head Gemma takes from the embedding). q/k row permutation does not move input columns, so the
    activations need no reordering."""
    fam = family_for(model_dir)
    names = fam.tensor_names()

    def name(hf_name: str) -> str | None:
        if fam.skip(hf_name):
            return None
        return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    return name
