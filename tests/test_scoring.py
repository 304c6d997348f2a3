import math

import numpy as np
import pytest
import torch

from edgeft.scoring import score, token_logprobs, torch_logits_fn, windows


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
