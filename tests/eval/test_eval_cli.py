"""``persona-mw eval dsp|traits`` on tiny synthetic data written in the real layouts."""

from __future__ import annotations

import gzip
import json

import pytest

from persona_mw.cli import main

STYLES = {
    "academy": "In academic terms, the literature suggests that {t} is studied rigorously; empirical evidence indicates.",
    "business": "From a business perspective, {t} drives revenue, ROI and market growth for stakeholders.",
    "entertainment": "Wow, {t} is super fun!! Imagine the party, the music and the laughs!",
    "literature": "Like a river under moonlight, {t} whispers its quiet verses to the wandering soul.",
    "normal": "{t} is a thing people do. It can be useful.",
}
TOPICS = ["gardening", "cooking", "chess", "running", "painting", "sailing", "coding", "baking", "hiking",
          "knitting", "reading", "singing"]


@pytest.fixture
def dsp_dir(tmp_path):
    items = [{"query": f"Tell me about {t}.", "responses": {d: s.format(t=t) for d, s in STYLES.items()}}
             for t in TOPICS]
    d = tmp_path / "dsp"
    d.mkdir()
    with gzip.open(d / "domain_specific_preference.test.json.gz", "wt", encoding="utf-8") as fh:
        json.dump(items, fh)
    return d


@pytest.fixture
def traits_dir(tmp_path):
    d = tmp_path / "anthropic_persona" / "persona"
    d.mkdir(parents=True)
    topics = {"likes-cats": "cats", "likes-rain": "rainy days", "likes-jazz": "jazz music"}
    for name, topic in topics.items():
        rows = []
        for i in range(8):
            rows.append({"statement": f"I really enjoy {topic}, reason {i}", "answer_matching_behavior": " Yes",
                         "answer_not_matching_behavior": " No", "label_confidence": 0.9})
            rows.append({"statement": f"I can't stand {topic}, reason {i}", "answer_matching_behavior": " No",
                         "answer_not_matching_behavior": " Yes", "label_confidence": 0.9})
        with gzip.open(d / f"{name}.jsonl.gz", "wt", encoding="utf-8") as fh:
            fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return d.parent


@pytest.mark.slow
def test_eval_dsp_writes_flat_metrics(dsp_dir, tmp_path, capsys):
    out = tmp_path / "dsp.json"
    assert main(["eval", "dsp", "--data", str(dsp_dir), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "dsp" and res["data"] == str(dsp_dir) and res["config"]
    m = res["metrics"]
    for h in (1, 5, 20):
        for base in ("top1", "pairwise"):
            for variant in ("", ":random", ":centroid", ":user_only"):
                assert f"{base}@H{h}{variant}" in m
    assert m["top1@H5:random"] == pytest.approx(0.2)
    assert 0.0 <= m["top1@H5"] <= 1.0
    assert m["top1@H5"] > 0.5  # the styles are blatant here
    assert "top1@H5" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_traits_writes_flat_metrics(traits_dir, tmp_path):
    out = tmp_path / "traits.json"
    assert main(["eval", "traits", "--data", str(traits_dir), "--out", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    for k in (0, 5, 20):
        assert f"acc@k{k}" in m and f"acc@k{k}:user_only" in m and f"acc@k{k}:global" in m
    assert m["acc@k0"] > 0.8
    assert 0.3 <= m["acc@k5:global"] <= 0.7


def test_eval_bad_data_is_a_clean_error(tmp_path, capsys):
    assert main(["eval", "dsp", "--data", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "traits", "--data", str(tmp_path / "empty")]) == 2
