"""Published model shapes, for checkpoints built from a config with random weights.

No model hub is reachable where edgeft is developed and benchmarked, yet memory, speed and converter
coverage must be measured at the real sizes. A checkpoint built from the published config has the real
tensor names, shapes and dtypes; only the values are random (normal, std = the config's
initializer_range). The tokenizer is whatever folder is given (the default model's, in benchmarks).
"""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_dir, write_json
from .errors import EdgeftError

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

# config.json fields as published on the hub (meta-llama/Llama-3.2-1B and -3B), minus token ids, which come
# from the tokenizer the checkpoint is built with.
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
                     "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                     "tie_word_embeddings": True, "initializer_range": 0.02, "rope_parameters": _LLAMA3_ROPE},
    "llama-3.2-3b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
                     "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                     "tie_word_embeddings": True, "initializer_range": 0.02, "rope_parameters": _LLAMA3_ROPE},
    # Qwen/Qwen2.5-3B: GQA 16/2, q/k/v biases, tied head, 151936-row embedding (the tokenizer has 151665 tokens).
    "qwen2.5-3b": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936,
                   "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                   "max_window_layers": 70, "rms_norm_eps": 1e-6, "hidden_act": "silu", "use_sliding_window": False,
                   "sliding_window": 32768, "tie_word_embeddings": True, "initializer_range": 0.02,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
}


def build_checkpoint(shape: str, tokenizer_dir: str | Path, out: str | Path, dtype: str = "bfloat16",
                     seed: int = 0, device: str | None = None, max_shard_size: str | None = None) -> Path:
    """Write a random-weight checkpoint of a published shape to `out` (reused if already complete).
    Weights are drawn on the GPU when there is one: a 3B model's 3.2 G normal draws take minutes on 2 cores.
    `max_shard_size` ("5GB" shards as the hub's checkpoints are) defaults to transformers' own."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if shape not in SHAPES:
        raise EdgeftError(f"--shape {shape}: unknown; use one of: {', '.join(SHAPES)}")
    out = Path(out)
    stamp = out / "edgeft_shape.json"
    if stamp.is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = dict(SHAPES[shape])
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "edgeft_shape.json", {"shape": shape, "seed": seed, "dtype": dtype,
                                               "params": sum(p.numel() for p in model.parameters()),
                                               "note": "random weights in the published shape"})
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # hand the memory back: the caller may train in this process next
    return out
