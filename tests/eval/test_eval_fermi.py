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
    _lora_takes_the_fermi_methods(d, out, m, tmp_path, monkeypatch, capsys)


def _lora_takes_the_fermi_methods(d, fermi_out, m, tmp_path, monkeypatch, capsys):
    """``eval lora --fermi FILE``: FERMI's persona / optimized figures join the report only from a
    result of the same seed, history and test queries whose ``none`` scored as this run's. (The lora
    run itself is replaced: what is checked here is the joining; eval lora runs in benchmarks/.)"""
    import persona_mw.eval.lora as lora_eval

    none = m["pairwise@H3:none"]
    monkeypatch.setattr(lora_eval, "run", lambda *a, **k: {"pairwise@H3:none": none, "pairwise@H3:lora": 0.75})
    base = ["eval", "lora", "--data", str(d), "--test", "2", "--fermi", str(fermi_out)]
    args = [*base, "--history", "3"]
    out = tmp_path / "lora.json"
    assert main([*args, "--out", str(out)]) == 0
    got = json.loads(out.read_text())["metrics"]
    for label in ("persona", "optimized"):
        for metric in ("pairwise", "pairwise_pmi", "top1", "margin"):
            assert got[f"{metric}@H3:{label}"] == m[f"{metric}@H3:{label}"]
    assert got["pairwise@H3:lora"] == 0.75 and not any(k.endswith(":best") or "fermi_none" in k for k in got)
    capsys.readouterr()
    for bad in ([*args, "--seed", "1"], [*base, "--history", "4"]):  # another split / other histories
        assert main(bad) != 0 and "was run with" in capsys.readouterr().err
    monkeypatch.setattr(lora_eval, "run", lambda *a, **k: {"pairwise@H3:none": none + 0.1})
    assert main(args) != 0 and "not the same protocol" in capsys.readouterr().err
    assert main([*base[:-1], str(out), "--history", "3"]) != 0  # a lora result is not a fermi one
    assert "is not an `eval fermi` result" in capsys.readouterr().err
    assert main(["eval", "fermi", "--data", str(d), "--fermi", str(fermi_out)]) != 0
    assert "is an option of `eval lora`" in capsys.readouterr().err
