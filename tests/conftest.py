"""Shared fixtures. Tests use the real default model (materialised once per session into a temporary
EDGEFT_HOME, unless EDGEFT_HOME is set) and tiny Llamas built from a config with its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download weights
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def edgeft_home(tmp_path_factory) -> Path:
    if os.environ.get("EDGEFT_HOME"):
        return Path(os.environ["EDGEFT_HOME"])
    home = tmp_path_factory.mktemp("edgeft-home")
    os.environ["EDGEFT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def default_model(edgeft_home) -> Path:
    from edgeft.models import DEFAULT_BASE, resolve_model

    return resolve_model(DEFAULT_BASE)


@pytest.fixture(scope="session")
def tiny_llama(default_model, tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights (seed 0) and the default model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_tiny(base: Path, run: Path, **overrides):
    """A few steps of edgeft train on the tiny Llama with demo-task rows: a real adapter in seconds."""
    import json

    from edgeft.data.demo_task import make_rows
    from edgeft.train import TrainConfig, train

    data = run.parent / f"{run.name}-data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(24)))
    settings = dict(base=str(base), data=str(data), run=str(run), batch_size=4, max_steps=6, save_every=2,
                    eval_budget=300, window=128, stride=128, eval_generate=0, max_ppl_rise=100.0, lr=1e-3)
    settings.update(overrides)
    return train(TrainConfig(**settings))


@pytest.fixture(scope="session")
def tiny_adapter_run(tiny_llama, tmp_path_factory) -> Path:
    """An adapter trained on the unquantized tiny Llama (lr high enough that the delta is far from zero)."""
    return train_tiny(tiny_llama, tmp_path_factory.mktemp("runs") / "tiny", lr=1e-2, max_steps=4).run
