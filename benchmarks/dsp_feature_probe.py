"""DSP feature probe: how well a plain linear Bradley-Terry model on given response features can pick a
domain's answer with *perfect* group labels (docs/notes/lm-features.md; not a test, not the eval).

Per split (5 random 60/40 splits of the queries) and domain: ``n`` pooled choices of that domain's
answer over one other answer, drawn from the 60%, fit scikit-learn's L2 logistic regression (C = 1, no
intercept) on the feature differences, and score top-1 of 5 on the other 40%. Feature blocks: style +
hashed n-grams, MiniLM, and a local model's hidden states at the given layers (``HiddenStateEncoder``).
Variants: each block alone with the defaults, two or four layers together, and "per-query centring"
(each answer's row less the mean of its question's five, renormalized).

Run: python benchmarks/dsp_feature_probe.py <data>/dsp [--layers 4,8,12,16] [--cache F.npz]
     -> benchmarks/results/dsp_feature_probe.json   (needs scikit-learn)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DOMAINS = ["academy", "business", "entertainment", "literature", "normal"]


def features(data: str, model: str, layers: list[int]) -> dict[str, np.ndarray]:
    from persona_mw.eval.dsp import load
    from persona_mw.features import FeatureSpec, Featurizer
    from persona_mw.hidden_features import HiddenStateEncoder

    texts = [it["responses"][d] for it in load(data) for d in DOMAINS]
    out = {"lex": Featurizer(FeatureSpec(embedding=False)).transform(texts),
           "minilm": Featurizer(FeatureSpec(style=False, ngram_dim=0)).transform(texts)}
    for layer in layers:
        out[f"lm@{layer}"] = HiddenStateEncoder(model, layer).encode(texts)
    return out


def probe(x: np.ndarray, n_choices: int, splits: int = 5) -> float:
    from sklearn.linear_model import LogisticRegression

    nq = x.shape[0] // 5
    x = x.reshape(nq, 5, -1)
    res = []
    for s in range(splits):
        rng = np.random.default_rng(s)
        perm = rng.permutation(nq)
        tr, te = perm[:int(0.6 * nq)], perm[int(0.6 * nq):]
        for d in range(4):
            qs = rng.choice(tr, size=n_choices, replace=n_choices > len(tr))
            diffs, ys = [], []
            for i, q in enumerate(qs):
                other = rng.choice([j for j in range(5) if j != d])
                sign = 1 if i % 2 == 0 else -1
                diffs.append(sign * (x[q, d] - x[q, other]))
                ys.append(int(sign > 0))
            m = LogisticRegression(C=1.0, fit_intercept=False, max_iter=2000).fit(np.array(diffs), ys)
            res.append(float(np.mean((x[te] @ m.coef_[0]).argmax(1) == d)))
    return float(np.mean(res))


def centred(x: np.ndarray) -> np.ndarray:
    y = x.reshape(x.shape[0] // 5, 5, -1)
    y = y - y.mean(1, keepdims=True)
    return (y / (np.linalg.norm(y, axis=2, keepdims=True) + 1e-9)).reshape(x.shape)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layers", default="4,8,12,16")
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    layers = [int(v) for v in args.layers.split(",")]
    if args.cache and Path(args.cache).exists():
        blocks = dict(np.load(args.cache))
    else:
        blocks = features(args.data, args.model, layers)
        if args.cache:
            np.savez(args.cache, **blocks)
    base = [blocks["lex"], blocks["minilm"]]
    variants: dict[str, np.ndarray] = {"defaults": np.concatenate(base, 1)}
    for layer in layers:
        variants[f"defaults + lm@{layer}"] = np.concatenate(base + [3 * blocks[f"lm@{layer}"]], 1)
        variants[f"defaults + lm@{layer} centred"] = np.concatenate(base + [3 * centred(blocks[f"lm@{layer}"])], 1)
    if {4, 8} <= set(layers):
        variants["defaults + lm@4 + lm@8"] = np.concatenate(
            base + [3 / np.sqrt(2) * blocks["lm@4"], 3 / np.sqrt(2) * blocks["lm@8"]], 1)
    variants[f"defaults + lm@{'+'.join(map(str, layers))}"] = np.concatenate(
        base + [3 / np.sqrt(len(layers)) * blocks[f"lm@{v}"] for v in layers], 1)
    if 8 in layers:
        variants["all centred (defaults + lm@8)"] = np.concatenate(
            [centred(blocks["lex"]), centred(blocks["minilm"]), 3 * centred(blocks["lm@8"])], 1)
    out = {"benchmark": "dsp_feature_probe", "model": args.model, "protocol": __doc__.split("\n\n")[1],
           "top1": {}}
    for name, x in variants.items():
        out["top1"][name] = {"25 choices": round(probe(x, 25), 4), "200 choices": round(probe(x, 200), 4)}
        print(f"{name:40s} {out['top1'][name]}", flush=True)
    path = Path(__file__).resolve().parent / "results" / "dsp_feature_probe.json"
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
