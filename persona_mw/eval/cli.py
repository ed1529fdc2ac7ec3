"""``persona-mw eval BENCHMARK --data DIR [--out FILE]``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from persona_mw.errors import PersonaError
from persona_mw.eval.common import print_table, write_result


def run_eval(benchmark: str, data: str, out: str | None = None) -> int:
    if not Path(data).exists():
        raise PersonaError(f"--data: no such folder {data!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if benchmark == "dsp":
        from persona_mw.eval import dsp as mod
    elif benchmark == "traits":
        from persona_mw.eval import traits as mod  # type: ignore[no-redef]
    else:
        raise PersonaError(f"unknown benchmark {benchmark!r} (known: dsp, traits)")
    metrics = mod.run(data)
    print_table(benchmark, metrics)
    write_result(out, benchmark, data, mod.config(), metrics)
    if out:
        print(f"wrote {out}", file=sys.stderr)
    return 0
