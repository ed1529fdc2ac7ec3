"""``persona-mw eval BENCHMARK --data DIR [--out FILE]``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from persona_mw.errors import PersonaError
from persona_mw.eval.common import print_table, write_result


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - platforms without it
        return []


def run_eval(benchmark: str, data: str, out: str | None = None, **options: Any) -> int:
    if not Path(data).exists():
        raise PersonaError(f"--data: no such folder {data!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if benchmark == "style":
        from persona_mw.eval.style import run_style

        methods = options.pop("methods", None)
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        result = run_style(data, methods=methods, out=out, log=lambda m: print(m, file=sys.stderr, flush=True),
                           **{k: v for k, v in options.items() if v is not None})
        print_table(benchmark, result["metrics"])
        if out:
            print(f"wrote {out}", file=sys.stderr)
        return 0
    if benchmark in ("fermi", "lora"):
        from persona_mw.eval import fermi as fermi_mod
        from persona_mw.eval import lora as lora_mod

        history, test, seed = options.get("history") or 20, options.get("test") or 24, options.get("seed") or 0
        runner: Any = fermi_mod if benchmark == "fermi" else lora_mod
        fermi_file = options.get("fermi")
        if fermi_file and benchmark != "lora":
            raise PersonaError("--fermi is an option of `eval lora` (the persona/optimized figures of `eval fermi`)")
        extra = lora_mod.fermi_methods(fermi_file, history=history, test=test, seed=seed) if fermi_file else {}
        residual = bool(options.get("residual"))
        if residual and benchmark != "lora":
            raise PersonaError("--residual is an option of `eval lora`")
        more = {"residual": True} if residual else {}
        metrics = runner.run(data, history=history, test=test, seed=seed,
                             log=lambda m: print(m, file=sys.stderr, flush=True), **more)
        if extra:
            none = metrics.get(f"pairwise@H{history}:none")
            fermi_none = extra.pop(f"fermi_none@H{history}", None)
            if none is not None and fermi_none is not None and abs(none - fermi_none) > 1e-3:
                raise PersonaError(f"--fermi: its none scored pairwise {fermi_none:.4f}, this run's {none:.4f}: "
                                   "not the same protocol (data or code changed); re-run `eval fermi`")
            metrics.update(extra)
        print_table(benchmark, metrics)
        write_result(out, benchmark, data, runner.config(history, test, seed, **more), metrics)
        if out:
            print(f"wrote {out}", file=sys.stderr)
        return 0
    if benchmark in ("locomo", "prefeval"):
        from persona_mw.eval.memory_cli import run_memory_eval

        return run_memory_eval(benchmark, data, out, **options)
    if benchmark == "dsp":
        from persona_mw.eval import dsp as mod
    elif benchmark == "traits":
        from persona_mw.eval import traits as mod  # type: ignore[no-redef]
    else:
        raise PersonaError(f"unknown benchmark {benchmark!r} (known: dsp, traits, style, fermi, locomo, prefeval)")
    folds = options.get("folds")
    if folds is not None:
        if folds < 2:
            raise PersonaError(f"--folds: need at least 2 (got {folds})")
        inner = options.get("inner_folds") or 2
        if inner < 2:
            raise PersonaError(f"--inner-folds: need at least 2 (got {inner})")
        report = mod.run_cv(data, folds=folds, inner_folds=inner, log=lambda m: print(m, file=sys.stderr, flush=True))
        metrics = report.pop("metrics")
        print_table(benchmark, metrics)
        print_table(f"{benchmark} std", report["std"])
        write_result(out, benchmark, data, {**mod.config(), "folds": folds, "inner_folds": inner}, metrics,
                     extra={**report, "load_avg": _load()})
    else:
        metrics = mod.run(data)
        print_table(benchmark, metrics)
        write_result(out, benchmark, data, mod.config(), metrics)
    if out:
        print(f"wrote {out}", file=sys.stderr)
    return 0
