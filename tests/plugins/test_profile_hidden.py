"""The profile's optional ``lm`` feature block: hidden states of the packaged local model."""

from __future__ import annotations

import numpy as np
import pytest

from persona_mw.errors import PersonaError
from persona_mw.features import FeatureSpec, Featurizer

MODEL = "smollm2-135m-instruct"
TEXTS = ["Welcome to the show, folks! Tonight we laugh about taxes.",
         "Quarterly revenue rose 4% on stronger enterprise demand.",
         "Prior work (Smith, 2019) reports a significant effect; we replicate it.",
         "Short."]

PIPE = """
pipeline:
  - use: profile
    discover_groups: false
    features: {embedding: false, ngram_dim: 256, lm: smollm2-135m-instruct, lm_layer: 2}
"""

SHOW = ["Welcome back to the show, everyone! Tonight's guest is a real riot.",
        "Hey folks, grab your popcorn, this story is a wild ride!",
        "Ladies and gentlemen, put your hands together for our next act!",
        "What a night, friends! Stick around, the best part is coming up."]
REPORT = ["The committee reviewed the figures and approved the annual budget.",
          "Revenue for the period was in line with guidance and margins held.",
          "The study measured outcomes in two cohorts over twelve months.",
          "Results are summarized in the table below, with standard errors."]


def test_the_block_is_the_models_own_layer_output_and_batch_invariant():
    import torch

    from persona_mw.hidden_features import HiddenStateEncoder, standardize_rows
    from persona_mw.models import load

    enc = HiddenStateEncoder(MODEL, layer=3, batch_size=4)
    together = enc.encode(TEXTS)
    enc.batch_size = 1
    alone = enc.encode(TEXTS)
    assert together.shape == (4, 576) and np.allclose(together, alone, atol=1e-5)  # padding changes nothing
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    model, tok = load(MODEL)  # the serving model: its hidden_states[3] is what the truncated copy gives
    with torch.inference_mode():
        ids = tok(TEXTS[1], return_tensors="pt")
        ref = model(**ids, output_hidden_states=True).hidden_states[3][0].mean(0).numpy()[None]
    assert np.allclose(standardize_rows(ref), together[1:2], atol=1e-5)
    assert not np.allclose(together[0], together[1], atol=1e-2)


def test_spec_key_is_unchanged_without_the_block():
    # the key stored with every profile fitted before the block existed (a changed key would orphan them)
    assert FeatureSpec().key() == "3d84e617" and FeatureSpec(embedding_scale=1.5).key() == "40f31252"
    assert FeatureSpec(lm=MODEL).key() != FeatureSpec().key()
    assert FeatureSpec(lm=MODEL, lm_layer=4).key() != FeatureSpec(lm=MODEL).key()


def test_featurizer_appends_the_block_with_its_scale():
    base = Featurizer(FeatureSpec(embedding=False, ngram_dim=64))
    spec = FeatureSpec(embedding=False, ngram_dim=64, lm=MODEL, lm_layer=2, lm_scale=2.0)
    f = Featurizer(spec)
    X = f.transform(TEXTS[:2])
    assert X.shape == (2, 19 + 64 + 576) == (2, f.dim)
    assert np.allclose(X[:, :83], base.transform(TEXTS[:2]))
    assert np.allclose(np.linalg.norm(X[:, 83:], axis=1), 2.0, atol=1e-4)


def test_unknown_model_or_layer_is_a_clear_error():
    with pytest.raises(PersonaError, match="not found"):
        Featurizer(FeatureSpec(embedding=False, ngram_dim=0, lm="no-such-model")).transform(["x"])
    with pytest.raises(PersonaError, match="lm_layer 99"):
        Featurizer(FeatureSpec(embedding=False, ngram_dim=0, lm=MODEL, lm_layer=99)).transform(["x"])


def test_profile_learns_and_scores_through_the_block(make_mw):
    from persona_mw.plugins.profile import refit_profiles, score_texts
    from persona_mw.types import ChatRequest, Message

    mw = make_mw(PIPE)
    for j in range(8):
        mw.feedback({"kind": "choice", "user": "host", "prompt": "q", "chosen": SHOW[j % 4],
                     "rejected": [REPORT[(j + 1) % 4]]})
    refit_profiles(mw)
    prof = mw.store.get_profile("user:host")
    assert len(prof.weights) == 19 + 256 + 576 and prof.extra["profile"]["spec"]["lm"] == MODEL
    req = ChatRequest(user="host", messages=[Message(role="user", content="hi")])
    scope, profiles = mw.graph.resolve(req)
    unseen = ["Good evening, folks, and welcome to a brand new episode!",
              "The board approved the revised forecast for next year."]
    s = score_texts(scope, profiles, "q", unseen)
    assert s[0] > s[1]


@pytest.mark.parametrize("lm, said", [("smolm2-135m", "did you mean 'smollm2-135m-instruct'"),
                                       ("/nowhere/model", "no model at '/nowhere/model'")])
def test_bad_model_in_config_is_refused_at_startup(make_mw, lm, said):
    from persona_mw.errors import ConfigError

    with pytest.raises(ConfigError, match="features.lm") as err:
        make_mw(PIPE.replace("lm: smollm2-135m-instruct", f"lm: {lm}"))
    assert said in str(err.value)


def test_concurrent_first_use_loads_once_and_gives_the_sequential_rows():
    """Requests score candidates from many threads; the first ones race to load the model."""
    import threading

    from persona_mw.hidden_features import HiddenStateEncoder

    enc = HiddenStateEncoder(MODEL, layer=2, batch_size=2)
    from transformers import AutoModelForCausalLM

    loads: list[int] = []
    real = AutoModelForCausalLM.from_pretrained

    def counting(*a, **k):
        loads.append(1)
        return real(*a, **k)

    batches = [TEXTS[i:] + TEXTS[:i] for i in range(4)]
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i):
        try:
            got[i] = enc.encode(batches[i])
        except BaseException as exc:  # pragma: no cover - the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoModelForCausalLM, "from_pretrained", counting)
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors and len(got) == 4
    assert len(loads) == 1  # one private copy, however many threads asked first
    ref = HiddenStateEncoder(MODEL, layer=2, batch_size=1).encode(TEXTS)
    for i, rows in got.items():
        expect = np.roll(ref, -i, axis=0)
        assert np.allclose(rows, expect, atol=1e-5), i
