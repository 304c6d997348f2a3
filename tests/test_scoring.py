import math

import numpy as np
import pytest
import torch

from edgeft.scoring import score, token_logprobs, torch_logits_fn, windows

from .tiny_models import TINY, tiny_model


@pytest.mark.parametrize("n,window,stride", [(2, 2, 2), (10, 4, 4), (10, 4, 1), (1000, 512, 512),
                                             (1000, 512, 128), (513, 512, 512), (7, 16, 16)])
def test_windows_score_each_token_at_most_once_and_only_with_context(n, window, stride):
    scored = []
    plan = windows(n, window, stride)
    for w in plan:
        assert w.end - w.begin <= window
        assert w.begin < w.score_from <= w.end
        scored.extend(range(w.score_from, w.end))
    assert scored == sorted(set(scored))
    if stride < window:
        assert scored == list(range(1, n))  # overlapping windows: every token but the first
    else:
        # disjoint chunks: all but each chunk's first token
        assert set(range(n)) - set(scored) == set(range(0, n, window))


def test_token_logprobs_matches_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 11)).astype(np.float32) * 10
    targets = np.array([0, 3, 10, 5, 5])
    expected = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)[torch.arange(5), targets]
    np.testing.assert_allclose(token_logprobs(logits, targets), expected.numpy(), rtol=1e-12)


def _tiny_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype="float32").eval()


def test_single_window_equals_transformers_loss(tiny_llama):
    model = _tiny_model(tiny_llama)
    ids = list(range(100, 400))
    result = score(ids, torch_logits_fn(model), window=512, stride=512)
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert result.tokens == 299 and result.windows == 1
    assert result.ppl == pytest.approx(math.exp(loss), rel=1e-5)


def test_tiny_random_llama_perplexity_is_deterministic(tiny_llama):
    model = _tiny_model(tiny_llama)
    vocab = model.config.vocab_size
    ids = [(i * 7919) % vocab for i in range(1200)]
    a = score(ids, torch_logits_fn(model), window=256, stride=128)
    b = score(ids, torch_logits_fn(_tiny_model(tiny_llama)), window=256, stride=128)
    assert a.ppl == b.ppl and a.tokens == 1199
    # random init: close to a uniform guess over the vocabulary, far from a trained model
    assert 0.5 * vocab < a.ppl < 2 * vocab
    # overlapping windows give more context per scored token than disjoint ones, but on noise it's the same
    c = score(ids, torch_logits_fn(_tiny_model(tiny_llama)), window=256, stride=256)
    assert c.ppl == pytest.approx(a.ppl, rel=0.05) and c.ppl != a.ppl


@pytest.mark.parametrize("family,dtype,overrides", [
    *[(family, "bfloat16", {}) for family in TINY],  # a weight read outside its module's forward would show
    ("qwen2", "float16", {}),
    # sqrt(72) is no bfloat16 value: Gemma's embed_scale, computed at construction, must be float32's
    ("gemma3", "bfloat16", {"hidden_size": 72}),
    ("llama", "float32", {}),
])
def test_a_16_bit_checkpoint_scored_at_16_bits_gives_the_float32_logits(family, dtype, overrides, tiny_tokenizer,
                                                                         tmp_path):
    from edgeft.models import load_for_scoring, load_model, stored_dtype

    folder = tiny_model(family, tmp_path / family, tiny_tokenizer, dtype=dtype, **overrides)
    lean = load_for_scoring(folder)
    held = {p.dtype for p in lean.parameters()}
    assert stored_dtype(folder) == dtype and held == {getattr(torch, dtype)}
    full = load_model(folder, "float32").eval()
    ids = [(i * 7919) % full.config.vocab_size for i in range(300)]
    assert np.array_equal(torch_logits_fn(lean)(ids), torch_logits_fn(full)(ids))
    assert {p.dtype for p in lean.parameters()} == held  # upcast for the forward only
    with torch.inference_mode():  # greedy answers (the task gate) too: the KV cache path
        prompt = torch.tensor([ids[:20]])
        assert torch.equal(lean.generate(prompt, max_new_tokens=6, do_sample=False),
                           full.generate(prompt, max_new_tokens=6, do_sample=False))


def _result(token_nll, top1=None):
    from edgeft.scoring import PerplexityResult

    nll = float(np.sum(token_nll))
    return PerplexityResult(ppl=math.exp(nll / len(token_nll)), nll_sum=nll, tokens=len(token_nll), windows=1,
                            window=len(token_nll) + 1, stride=len(token_nll) + 1, seconds=0.0, backend="test",
                            token_nll=list(map(float, token_nll)), token_top1=top1)


def test_score_keeps_per_token_nlls_that_sum_to_its_total():
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 50, 300)]
    logits_fn = lambda w: np.random.default_rng(len(w)).normal(size=(len(w), 50))  # noqa: E731
    r = score(ids, logits_fn, window=128, stride=128, per_token=True)
    assert len(r.token_nll) == len(r.token_top1) == r.tokens
    assert math.isclose(sum(r.token_nll), r.nll_sum, rel_tol=1e-12)
    assert "token_nll" not in r.to_json()


def test_the_board_gate_is_robust_to_rounding_noise_and_still_catches_a_broken_build():
    """Healthy boards: per-token NLL differences of mean 0 and the spread measured on the emulated Pi 5
    (sd 0.14 nats over the smoke's 128 tokens). The raw perplexity ratio of 128 tokens crosses 2% for many
    of them, which is how the old gate failed healthy boards; the change beyond 3 standard errors never
    does. Broken boards (a true change of +8%, or garbage) fail it."""
    from edgeft.gates import BOARD_MATCH, BOARD_Z
    from edgeft.scoring import token_difference

    rng = np.random.default_rng(2024)
    host = rng.gamma(2.0, 1.4, size=128)  # per-token NLLs of the host, a perplexity near 16
    raw_fails = robust_fails = caught = 0
    trials = 2000
    for _ in range(trials):
        healthy = token_difference(_result(host + rng.normal(0, 0.14, 128)), _result(host), BOARD_Z)
        raw_fails += abs(healthy.change) > BOARD_MATCH
        robust_fails += healthy.excess > BOARD_MATCH
        broken = token_difference(_result(host + math.log(1.08) + rng.normal(0, 0.14, 128)), _result(host), BOARD_Z)
        caught += broken.excess > BOARD_MATCH
    assert raw_fails > 0.05 * trials  # the old gate: a healthy board failed about one run in nine
    assert robust_fails == 0
    assert caught > 0.6 * trials  # +8% is caught in most 128-token runs (and always with more tokens)
    garbage = token_difference(_result(host + rng.normal(2.0, 1.0, 128)), _result(host), BOARD_Z)
    assert garbage.excess > 1.0
    nan = token_difference(_result(np.append(host[:-1], np.nan)), _result(host), BOARD_Z)
    assert math.isnan(nan.excess)
    same = token_difference(_result(host, [1] * 128), _result(host, [1] * 64 + [2] * 64), BOARD_Z)
    assert same.excess == 0.0 and same.change == 0.0 and same.top1_agreement == 0.5
