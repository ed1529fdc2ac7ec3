"""PrefEval item by item: which items a source tree's pipeline answers right, to compare two trees on the
same items (``acc`` "not lower than today", issue #20). Not a test.

    python benchmarks/prefeval_items.py --data <data>/prefeval --form explicit --limit 10 --out A.json
    python benchmarks/prefeval_items.py --tree /tmp/old --data ... --out B.json

``--tree``: another checkout whose ``persona_mw`` is imported instead of this one. A tree from before the
plugins moved (e.g. 6b607fc) needs ``persona_mw/plugins -> ../plugins`` and ``persona_mw/adapters ->
../adapters`` symlinks, and its ``memory`` plugin is registered here (its builtins did not list it).
Writes ``{"items": {"topic:index": [correct, recalled]}, "acc": ..., "pref_recall": ...}``; with
``--compare`` another such file, also the items whose answer differs."""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=None)
    ap.add_argument("--data", required=True)
    ap.add_argument("--form", default="explicit")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--turns", type=int, default=300)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", default=None)
    args = ap.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
    import persona_mw.builtins as builtins

    builtins.BUILTIN_PLUGINS.setdefault("memory", "persona_mw.plugins.memory:MemoryPlugin")
    import persona_mw.eval.prefeval as pe

    items = pe.load(args.data, None, [args.form], args.limit)
    hist = pe.distractors(args.data, args.turns)
    got = {f"{it['topic']}:{it['index']}": list(pe.run_item(it, args.form, hist, variant="memory", seed=0))
           for it in items}
    out = {"code": pe.__file__, "form": args.form, "limit": args.limit, "turns": args.turns, "items": got,
           "acc": sum(v[0] for v in got.values()) / len(got),
           "pref_recall": sum(v[1] for v in got.values()) / len(got)}
    if args.compare:
        with open(args.compare) as fh:
            other = json.load(fh)["items"]
        out["differs_from_compare"] = sorted(k for k in got if other.get(k) != got[k])
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"{args.form}: {len(got)} items, acc {out['acc']:.4f}, pref_recall {out['pref_recall']:.4f}",
          f"differ: {len(out['differs_from_compare'])}" if args.compare else "")


if __name__ == "__main__":
    main()
