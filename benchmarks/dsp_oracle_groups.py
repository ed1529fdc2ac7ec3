"""DSP: how much better would the profile model rank with perfect groups? (issue #20; not a test)

For each outer fold of ``persona-mw eval dsp --folds 5`` (seed 0, the same splits), the setting that fold
chose in ``benchmarks/results/cv5_dsp_lm.json`` is run twice on the fold's test users and queries:
with the groups the plugin discovers (as in the CV run), and with every user put in the group of their
hidden domain instead (``group:auto-<domain>``; an oracle no deployment has). The gap is what better
group discovery could add at most; the oracle's figure is what these features and this model give
with the pooled evidence of exactly the right users.

Run: python benchmarks/dsp_oracle_groups.py <data>/dsp  ->  benchmarks/results/dsp_oracle_groups.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from persona_mw.eval import dsp
from persona_mw.plugins import profile as prof

ROOT = Path(__file__).resolve().parent


def _oracle(self, store, users, mats, g):  # noqa: ANN001 - ProfilePlugin._discover's signature
    for u in users:
        m = re.search(r"d(\d+)-u", u)
        assert m is not None, u
        store.add_edge(prof.Edge(src=u, dst=f"{prof.AUTO_PREFIX}{m.group(1)}", kind="member", weight=1.0))
    return {"k": 4}


def main() -> None:
    b = dsp._bench(sys.argv[1], (5, 20), 4)
    outer = dsp.cv_splits(len(b.items), dsp._users(b, 10), 5, 0)
    chosen = json.loads((ROOT / "results" / "cv5_dsp_lm.json").read_text())["folds"]
    discover = prof.ProfilePlugin._discover
    out: dict = {"benchmark": "dsp_oracle_groups", "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
                 "folds": []}
    for f, split in enumerate(outer):
        row: dict = {"fold": f, "chosen": chosen[f]["chosen"]}
        for name, fn in (("discovered", discover), ("oracle", _oracle)):
            prof.ProfilePlugin._discover = fn  # type: ignore[method-assign]
            m = dsp.trial(b, split, chosen[f]["chosen"], False)
            row[name] = {k: round(v, 4) for k, v in m.items() if k.startswith("top1") or k.startswith("purity")}
        prof.ProfilePlugin._discover = discover  # type: ignore[method-assign]
        out["folds"].append(row)
        print(f, row["discovered"], row["oracle"], flush=True)
    for name in ("discovered", "oracle"):
        out[name] = {k: round(float(np.mean([r[name][k] for r in out["folds"]])), 4)
                     for k in ("top1@H5", "top1@H20")}
    (ROOT / "results" / "dsp_oracle_groups.json").write_text(json.dumps(out, indent=1) + "\n")
    print(out["discovered"], out["oracle"])


if __name__ == "__main__":
    main()
