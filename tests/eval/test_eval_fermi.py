"""``persona-mw eval fermi`` on a tiny synthetic folder in the DSP layout, with the real local model."""

from __future__ import annotations

import gzip
import json

from persona_mw.cli import main

STYLES = {
    "academy": "In academic terms, the literature suggests that {t} is studied rigorously; empirical evidence indicates.",
    "business": "From a business perspective, {t} drives revenue, ROI and market growth for stakeholders.",
    "entertainment": "Wow, {t} is super fun!! Imagine the party, the music and the laughs!",
    "literature": "Like a river under moonlight, {t} whispers its quiet verses to the wandering soul.",
    "normal": "{t} is a thing people do. It can be useful.",
}
TOPICS = ["gardening", "cooking", "chess", "running", "painting", "sailing", "coding", "baking"]


def test_eval_fermi_reports_persona_and_optimized_prompts(tmp_path, monkeypatch, capsys):
    import persona_mw.eval.fermi as fermi_eval

    d = tmp_path / "dsp"
    d.mkdir()
    items = [{"query": f"Tell me about {t}.", "responses": {k: s.format(t=t) for k, s in STYLES.items()}} for t in TOPICS]
    with gzip.open(d / "domain_specific_preference.test.json.gz", "wt", encoding="utf-8") as fh:
        json.dump(items, fh)
    # Small and quick: no optimizer LLM call, no persona generation (deterministic proposals only).
    monkeypatch.setitem(fermi_eval.SETTINGS, "fermi", {**fermi_eval.SETTINGS["fermi"], "optimizer_calls": 0,
                                                       "max_response_tokens": 12,
                                                       "styles": ["I like fun answers.", "I like formal answers."]})
    monkeypatch.setitem(fermi_eval.SETTINGS, "persona", {**fermi_eval.SETTINGS["persona"], "every": 1000})
    out = tmp_path / "fermi.json"
    assert main(["eval", "fermi", "--data", str(d), "--history", "3", "--test", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "fermi" and res["config"]["history"] == 3
    m = res["metrics"]
    for label in ("none", "persona", "optimized", "best"):
        assert 0.0 <= m[f"pairwise@H3:{label}"] <= 1.0 and 0.0 <= m[f"top1@H3:{label}"] <= 1.0
        assert 0.0 <= m[f"pairwise_pmi@H3:{label}"] <= 1.0
    assert m["pairwise_pmi@H3:none"] == 0.5  # no prompt raises nothing: every pair ties
    # Only a better prompt replaces the persona one, so in-sample the optimized prompt is never worse.
    assert m["train_margin@H3:best"] >= m["train_margin@H3:persona"]
    assert m["accepted@H3"] > 0
