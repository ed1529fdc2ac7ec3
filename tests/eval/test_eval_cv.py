"""``eval dsp|traits --folds K``: nested cross-validation (persona_mw.eval.cv) on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from persona_mw.cli import main
from persona_mw.eval import dsp, traits
from persona_mw.eval.cv import kfold, nested_cv, summarize
from tests.eval.test_eval_cli import dsp_dir, traits_dir  # noqa: F401  (fixtures)

FAST = {"features": {"embedding": False, "ngram_dim": 512}}  # lexical features only: no embedding model


def test_kfold_covers_every_index_once():
    folds = kfold(11, 3, np.random.default_rng(0))
    assert sorted(np.concatenate(folds).tolist()) == list(range(11))
    assert sorted(len(f) for f in folds) == [3, 4, 4]
    with pytest.raises(ValueError):
        kfold(2, 3, np.random.default_rng(0))


def test_nested_cv_chooses_by_the_inner_folds_only():
    """Setting "a" wins on the inner splits, "b" on the outer test folds: the CV must pick "a"."""
    seen_inner: list[str] = []

    def trial(split, setting, final):
        if not final:
            seen_inner.append(split)
        inner_best = setting["name"] == "a"
        if "/in" not in split:  # an outer test fold
            return {"top1": 0.9 if not inner_best else 0.4, "top1:base": 0.3}
        return {"top1": 0.8 if inner_best else 0.5}

    rep = nested_cv(["outer0", "outer1", "outer2"], lambda s: [f"{s}/in0", f"{s}/in1"], trial,
                    [{"name": "b"}, {"name": "a"}], lambda m: m["top1"])
    assert [f["chosen"] for f in rep["folds"]] == [{"name": "a"}] * 3
    assert rep["chosen_most_often"] == {"name": "a"}
    assert rep["metrics"]["top1"] == pytest.approx(0.4) and rep["std"]["top1"] == 0.0
    assert all("/in" in s for s in seen_inner)  # the outer folds never scored a setting
    assert rep["folds"][0]["inner_scores"] == {"name=b": 0.5, "name=a": 0.8}


def test_summarize_mean_and_spread():
    mean, std = summarize([{"x": 0.2, "y": 1.0}, {"x": 0.4}])
    assert mean == {"x": pytest.approx(0.3)} and std == {"x": pytest.approx(0.1)}


def test_dsp_folds_keep_test_queries_and_users_out_of_training():
    users = [(f"d{d}-u{i}", d) for d in range(4) for i in range(5)]
    outer = dsp.cv_splits(20, users, 5, seed=0)
    assert sorted(np.concatenate([s.test for s in outer]).tolist()) == list(range(20))
    assert sorted(u for s in outer for u in s.scored) == sorted(users)
    for s in outer:
        assert not set(s.test.tolist()) & set(s.obs.tolist())
        assert sorted({d for _, d in s.scored}) == [0, 1, 2, 3]  # stratified by domain
        for inner in dsp.inner_splits(s, 2):
            assert set(inner.test.tolist()) | set(inner.obs.tolist()) <= set(s.obs.tolist())
            assert not set(inner.test.tolist()) & set(inner.obs.tolist())
            assert not set(inner.users) & set(s.scored)  # the outer fold's scored users are out


@pytest.mark.slow
def test_eval_dsp_cv_reports_folds_spread_and_choices(dsp_dir):  # noqa: F811
    grid = [{**FAST, "prior_precision": 1.0}, {**FAST, "prior_precision": 3.0}]
    rep = dsp.run_cv(dsp_dir, folds=3, inner_folds=2, users_per_domain=3, hs=(5,), grid=grid)
    m = rep["metrics"]
    assert {"top1@H5", "top1@H5:user_only", "top1@H5:centroid", "pairwise@H5"} <= set(m)
    assert m["top1@H5"] > 0.5  # the styles are blatant
    assert "purity@H5:groups" in m
    assert len(rep["folds"]) == 3 and all(f["chosen"] in grid for f in rep["folds"])
    assert set(rep["std"]) == set(m) and rep["grid"] == grid
    assert rep["chosen_most_often"] in grid and "inner" in rep["protocol"]


@pytest.mark.slow
def test_eval_traits_cv_reports_folds(traits_dir):  # noqa: F811
    grid = [{**FAST, "prior_precision": 1.0}, {**FAST, "prior_precision": 0.3}]
    rep = traits.run_cv(traits_dir, folds=2, inner_folds=2, grid=grid,
                        sizes=traits.Sizes(groups=2, users_per_group=3, test_users=1, novel_groups=0, test_choices=6))
    m = rep["metrics"]
    assert {"acc@k0", "acc@k5", "acc@k5:user_only", "acc@k20"} <= set(m)
    assert m["acc@k0"] > 0.7
    assert len(rep["folds"]) == 2 and set(rep["std"]) == set(m)


def test_cv_trials_featurize_each_text_once_with_unchanged_results(dsp_dir, monkeypatch):  # noqa: F811
    """Serving caches feature rows per party; the harness owns every simulated user, so a repeated trial
    featurizes nothing again (it used to redo every response once per user and middleware), replays no
    feedback (its events are the same), and scores the same as the old way (per-party cache, replayed)."""
    from persona_mw.features import Featurizer

    calls: list[str] = []
    lexical = Featurizer._lexical
    monkeypatch.setattr(Featurizer, "_lexical", lambda self, t: calls.append(t) or lexical(self, t))
    b = dsp._bench(dsp_dir, (5,), 4)
    split = dsp.cv_splits(len(b.items), dsp._users(b, 3), 3, seed=0)[0]
    setting = {**FAST, "prior_precision": 1.0}
    from collections import OrderedDict

    from persona_mw.eval import common
    from persona_mw.middleware import Middleware

    monkeypatch.setattr(common, "_REPLAYS", OrderedDict())  # an earlier test may have replayed these events
    fed: list[str] = []
    feedback = Middleware.feedback
    monkeypatch.setattr(Middleware, "feedback", lambda self, ev: fed.append(ev["user"]) or feedback(self, ev))
    first = dsp.trial(b, split, setting, False)
    assert len(fed) == len(split.users) * 5
    calls.clear()
    fed.clear()
    dsp.trial(b, split, {**setting, "prior_precision": 3.0}, False)  # another setting of the grid
    assert dsp.trial(b, split, setting, False) == first
    assert calls == []  # every row served from the shared cache
    assert fed == []  # the same events: the store their replay left is copied, whatever the setting
    from persona_mw.eval.common import per_party_features

    with per_party_features():
        assert dsp.trial(b, split, setting, False) == first
    assert len(calls) > len(set(calls))  # serving's way: the same texts again, once per user


def test_use_featurizer_is_undone_on_exit():
    from persona_mw.eval.common import shared_featurizer
    from persona_mw.features import FeatureSpec
    from persona_mw.plugins.profile import get_featurizer, use_featurizer

    spec = FeatureSpec(embedding=False, ngram_dim=64)
    before = get_featurizer(spec)
    with use_featurizer(shared_featurizer(spec)) as f:
        assert get_featurizer(spec) is f is shared_featurizer(spec) and f is not before
    assert get_featurizer(spec) is before


def test_eval_folds_bad_values_are_clean_errors(dsp_dir, tmp_path, capsys):  # noqa: F811
    assert main(["eval", "dsp", "--data", str(dsp_dir), "--folds", "1"]) == 2
    assert "--folds" in capsys.readouterr().err
    assert main(["eval", "dsp", "--data", str(dsp_dir), "--folds", "50"]) == 2
    assert "--folds 50" in capsys.readouterr().err
    out = tmp_path / "x.json"
    assert main(["eval", "traits", "--data", str(dsp_dir), "--folds", "3", "--out", str(out)]) == 2
    assert not out.exists()


def test_profile_grid_offers_the_hidden_state_block():
    from persona_mw.eval.cv import FEATURE_CHOICES, PROFILE_GRID
    from persona_mw.models import DEFAULT_MODEL

    assert PROFILE_GRID[0] == {"prior_precision": 1.0, "graph.prior_strength": 5.0}  # the defaults first
    lm = [s for s in PROFILE_GRID if "features" in s]
    assert {s["features"]["lm_layer"] for s in lm} == {4, 8} and all(s["features"]["lm"] == DEFAULT_MODEL for s in lm)
    assert len(PROFILE_GRID) == 4 * len(FEATURE_CHOICES)


@pytest.mark.slow
def test_eval_dsp_cv_runs_the_hidden_state_block(dsp_dir):  # noqa: F811
    lm = {"features": {"embedding": False, "ngram_dim": 0, "style": False, "lm": "smollm2-135m-instruct",
                       "lm_layer": 2}}
    rep = dsp.run_cv(dsp_dir, folds=2, inner_folds=2, users_per_domain=2, hs=(5,), grid=[lm])
    assert rep["folds"][0]["chosen"] == lm
    assert rep["metrics"]["top1@H5"] > 0.5  # the block alone tells the blatant styles apart
    from persona_mw.eval.common import _SHARED
    from persona_mw.features import FeatureSpec

    used = _SHARED[FeatureSpec.model_validate(lm["features"]).key()]
    assert used.spec.lm and used.dim == 576 and len(used._cache) > 0  # the trials featurized through it
