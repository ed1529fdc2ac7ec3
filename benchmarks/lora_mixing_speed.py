"""What does mixing LoRA adapters at the logits cost against merging them in weight space?

One request at a time on the local backend (float32 SmolLM2-135M-Instruct, greedy, 32 new tokens), with
the ``lora`` plugin's two ways of serving a scope whose nodes hold adapters (random rank-4 adapters on
q_proj/v_proj of every layer, the plugin's default targets):

- ``base``: no adapter;
- ``merged_2`` / ``merged_4``: the nodes' adapters merged into one (``mixing: merge``, the default): one row;
- ``logits_2`` / ``logits_4``: one prompt stream per node, each with its adapter, mixed as
  ``sum_n w_n log_softmax`` (``mixing: logits``): one more row per node.

Modes are interleaved per round so machine noise hits all alike; reports the median milliseconds per
generated token, and writes ``benchmarks/results/lora_mixing_speed.json``. Not a test.
Run: ``.venv/bin/python benchmarks/lora_mixing_speed.py [--rounds 3] [--tokens 32]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "lora_mixing_speed.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    import torch

    from persona_mw.adapters.transformers import TransformersBackend
    from persona_mw.plugins import _lora
    from persona_mw.plugins.lora import mix_logits
    from persona_mw.types import Decoding, GenerationParams, Message

    b = TransformersBackend(model="smollm2-135m-instruct")
    asyncio.run(b.load())
    model = b._model

    def adapter(seed: int) -> _lora.Adapter:
        g = torch.Generator().manual_seed(seed)
        w = {}
        for name, lin in _lora.target_modules(model, ("q_proj", "v_proj")).items():
            w[name] = (torch.randn(4, lin.in_features, generator=g) * 0.01,
                       torch.randn(lin.out_features, 4, generator=g) * 0.01)
        return _lora.Adapter(w, r=4, alpha=4.0, targets=("q_proj", "v_proj"))

    ads = [adapter(i) for i in range(4)]
    q = [Message(role="user", content="Explain how a refrigerator works, step by step.")]
    p = GenerationParams(max_tokens=args.tokens, temperature=0.0)
    modes = {
        "base": [],
        "merged_2": [Decoding(source="lora", activation_hooks=[_lora.adapter_hook(_lora.merge([(a, 0.5) for a in ads[:2]]))])],
        "merged_4": [Decoding(source="lora", activation_hooks=[_lora.adapter_hook(_lora.merge([(a, 0.25) for a in ads]))])],
        "logits_2": [Decoding(source="lora", streams=[q, q], stream_adapters=ads[:2], combine=mix_logits([0.5, 0.5]))],
        "logits_4": [Decoding(source="lora", streams=[q] * 4, stream_adapters=ads, combine=mix_logits([0.25] * 4))],
    }
    for dec in modes.values():  # warm every path
        asyncio.run(b.generate(q, params=GenerationParams(max_tokens=2, temperature=0.0), decoding=dec))
    per_token: dict[str, list[float]] = {k: [] for k in modes}
    tokens: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, dec in modes.items():
            t = time.perf_counter()
            c = asyncio.run(b.generate(q, params=p, decoding=dec))[0]
            tokens[name] = int(c.tokens or 0) or len(b.tokenizer(c.text)["input_ids"])
            per_token[name].append((time.perf_counter() - t) / max(1, tokens[name]))
    med = {k: statistics.median(v) for k, v in per_token.items()}
    out = {"median_ms_per_token": {k: round(1000 * v, 1) for k, v in med.items()}, "tokens_last_round": tokens,
           "ratio_to_merged": {"logits_2": round(med["logits_2"] / med["merged_2"], 2),
                               "logits_4": round(med["logits_4"] / med["merged_4"], 2)},
           "ratio_merged_to_base": {k: round(med[k] / med["base"], 2) for k in ("merged_2", "merged_4")},
           "tokens": args.tokens, "rounds": args.rounds, "threads": torch.get_num_threads(),
           "load_avg": os.getloadavg(), "machine": platform.machine(), "cpus": os.cpu_count()}
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
