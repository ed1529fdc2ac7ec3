"""What does the profile's optional ``lm`` feature block cost per scored response?

Featurizes fresh answer-length texts (each text once: no cache hits) with the profile plugin's
default features (style + n-grams + MiniLM) and with the ``lm`` block added at layers 4 and 8 of the
packaged SmolLM2-135M (``persona_mw.hidden_features``), in batches of 4 (a best-of-4 rerank's
candidates) and of 64 (a refit's backlog). Modes are interleaved per round so machine noise hits all
alike; reports the median milliseconds per text and the ratio to the defaults, and writes
``benchmarks/results/profile_features_speed.json``. Not a test.
Run: ``.venv/bin/python benchmarks/profile_features_speed.py [--rounds 5] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "profile_features_speed.json"
WORDS = ("the market grew while our research team measured outcomes and the audience laughed at the show "
         "because every chapter of the story described costs revenue customers students theories and data").split()


def texts(n: int, seed: int, words: int = 110) -> list[str]:
    """``n`` distinct texts of about ``words`` words (a DSP answer's median length)."""
    import random

    r = random.Random(seed)
    return [f"Answer {seed}-{i}: " + " ".join(r.choice(WORDS) for _ in range(words)) + "." for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from persona_mw.features import FeatureSpec, Featurizer
    from persona_mw.models import DEFAULT_MODEL

    specs = {"defaults": FeatureSpec(embedding_scale=1.5),
             "lm_layer4": FeatureSpec(embedding_scale=1.5, lm=DEFAULT_MODEL, lm_layer=4),
             "lm_layer8": FeatureSpec(embedding_scale=1.5, lm=DEFAULT_MODEL, lm_layer=8)}
    feats = {k: Featurizer(s) for k, s in specs.items()}
    for f in feats.values():  # load every model before timing
        f.transform(texts(2, -1))
    per: dict[str, dict[int, list[float]]] = {k: {4: [], 64: []} for k in specs}
    seed = 0
    for _ in range(args.rounds):
        for batch in (4, 64):
            for name, f in feats.items():
                seed += 1
                batch_texts = texts(batch, seed)
                t = time.perf_counter()
                f.transform(batch_texts)
                per[name][batch].append((time.perf_counter() - t) * 1000 / batch)
    out = {"ms_per_text": {k: {str(b): round(statistics.median(v), 2) for b, v in d.items()} for k, d in per.items()},
           "rounds": args.rounds, "words_per_text": 110, "threads": torch.get_num_threads(),
           "load_avg": os.getloadavg(), "machine": platform.machine(), "cpus": os.cpu_count()}
    base = out["ms_per_text"]["defaults"]
    out["ratio_to_defaults"] = {k: {b: round(v[b] / base[b], 2) for b in v} for k, v in out["ms_per_text"].items()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
