"""Precision and recall of persona_mw.privacy's PII detectors on benchmarks/data/pii_corpus.jsonl.

    python benchmarks/pii_eval.py                       # writes benchmarks/results/pii.json
    python benchmarks/pii_eval.py --out /tmp/old.json   # e.g. run from another checkout's venv
    python benchmarks/pii_eval.py --baseline /tmp/old.json   # puts those figures side by side

Only ``persona_mw.privacy.Redactor`` is used, so the same script measures any version of the detectors
(whichever ``persona_mw`` the interpreter imports). Scoring, per kind, per language and overall:

- recall: a labeled entity is found when spans of its kind cover >= 90% of its characters (strict);
  ``recall_any`` counts any overlap (the value is at least partly masked);
- precision: a detected span is right when it overlaps a labeled entity of the same kind; every span
  in a negative sentence, or of the wrong kind, is a false positive;
- ``clean_negatives``: the share of negative sentences left untouched.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).parent / "data" / "pii_corpus.jsonl"
OUT = Path(__file__).parent / "results" / "pii.json"
KINDS = ["email", "phone", "card", "iban", "address"]


def load(path: Path = CORPUS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def evaluate(rows: list[dict[str, Any]], redactor: Any) -> dict[str, Any]:
    # counters keyed by (lang, kind): gold, found, found_any, tp (detected spans that are right), fp
    c: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    misses: list[dict[str, Any]] = []
    false_alarms: list[dict[str, Any]] = []
    clean = negatives = 0
    t = time.perf_counter()
    preds = [redactor.find(r["text"]) for r in rows]
    elapsed = time.perf_counter() - t
    for row, pred in zip(rows, preds):
        lang, text, gold = row["lang"], row["text"], row["entities"]
        if not gold:
            negatives += 1
            clean += not pred
        for e in gold:
            cover = sum(1 for i in range(e["start"], e["end"])
                        if any(s <= i < en and k == e["kind"] for s, en, k in pred))
            n = e["end"] - e["start"]
            cnt = c[(lang, e["kind"])]
            cnt["gold"] += 1
            cnt["found"] += cover >= 0.9 * n
            cnt["found_any"] += cover > 0
            if cover < 0.9 * n:
                misses.append({"id": row["id"], "kind": e["kind"], "value": e["value"],
                               "got": [text[s:en] + f" [{k}]" for s, en, k in pred]})
        for s, en, k in pred:
            ok = any(s < e["end"] and en > e["start"] and e["kind"] == k for e in gold)
            c[(lang, k)]["tp" if ok else "fp"] += 1
            if not ok:
                false_alarms.append({"id": row["id"], "kind": k, "span": text[s:en], "text": text})

    def summary(keys: list[tuple[str, str]]) -> dict[str, Any]:
        tot: dict[str, int] = defaultdict(int)
        for key in keys:
            for name, v in c[key].items():
                tot[name] += v
        return {"precision": _ratio(tot["tp"], tot["tp"] + tot["fp"]), "recall": _ratio(tot["found"], tot["gold"]),
                "recall_any": _ratio(tot["found_any"], tot["gold"]), "entities": tot["gold"],
                "detections": tot["tp"] + tot["fp"], "false_positives": tot["fp"]}

    langs = sorted({r["lang"] for r in rows})
    kinds = [k for k in KINDS if any(k2 == k for _, k2 in c)] + sorted({k for _, k in c if k not in KINDS})
    return {
        "overall": summary(list(c)),
        "per_kind": {k: summary([key for key in c if key[1] == k]) for k in kinds},
        "per_language": {lang: summary([key for key in c if key[0] == lang]) for lang in langs},
        "per_language_kind": {lang: {k: summary([(lang, k)]) for k in kinds if (lang, k) in c} for lang in langs},
        "clean_negatives": _ratio(clean, negatives),
        "ms_per_sentence": round(elapsed / max(1, len(rows)) * 1000, 3),
        "misses": misses,
        "false_positives": false_alarms,
    }


def speed(rows: list[dict[str, Any]], redactor: Any) -> dict[str, float]:
    """Milliseconds per redaction of a 4000-character text dense with PII (the first corpus sentences
    joined, like a long trace) and of one without digits (a system prompt); best of 5 rounds, warm."""
    dense = " ".join(r["text"] for r in rows[:80])[:4000]
    plain = ("You are a helpful assistant. Answer in three short sentences and prefer concise, formal "
             "wording. " * 50)[:4000]
    out = {}
    for name, text in (("ms_4k_text_dense_pii", dense), ("ms_4k_text_no_digits", plain)):
        redactor.redact(text)
        best = min(_timed(redactor.redact, text) for _ in range(5))
        out[name] = round(best * 1000, 2)
    return out


def _timed(fn: Any, arg: Any) -> float:
    t = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--baseline", type=Path, help="an earlier run's JSON, shown side by side as 'baseline'")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    args = ap.parse_args(argv)

    import persona_mw.privacy as privacy

    rows = load(args.corpus)
    redactor = privacy.Redactor(KINDS)
    result = evaluate(rows, redactor)
    result["speed"] = speed(rows, redactor)
    backend = getattr(privacy, "phone_backend", lambda: "regex (no phone_backend)")()
    report: dict[str, Any] = {
        "corpus": {"path": str(args.corpus.name), "sentences": len(rows),
                   "positives": sum(1 for r in rows if r["entities"]),
                   "negatives": sum(1 for r in rows if not r["entities"]),
                   "languages": sorted({r["lang"] for r in rows})},
        "detectors": {"module": privacy.__file__, "phone_backend": backend,
                      "regions": list(getattr(privacy, "DEFAULT_REGIONS", ()))},
        "result": result,
    }
    if args.baseline:
        base = json.loads(args.baseline.read_text())
        report["baseline"] = {"detectors": base.get("detectors"), "result": base.get("result")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    def line(name: str, s: dict[str, Any], b: dict[str, Any] | None) -> str:
        old = f"   (baseline P={b['precision']} R={b['recall']})" if b else ""
        return f"{name:10s} P={s['precision']} R={s['recall']} R_any={s['recall_any']} n={s['entities']}{old}"

    br = report.get("baseline", {}).get("result") if args.baseline else None
    print(line("overall", result["overall"], br and br["overall"]))
    for k, s in result["per_kind"].items():
        print(line(k, s, br and br["per_kind"].get(k)))
    for lang, s in result["per_language"].items():
        print(line(lang, s, br and br["per_language"].get(lang)))
    print(f"clean negatives {result['clean_negatives']}" + (f" (baseline {br['clean_negatives']})" if br else ""),
          f"| {result['ms_per_sentence']} ms/sentence | misses {len(result['misses'])}"
          f" | false positives {len(result['false_positives'])} | {result['speed']} | -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
