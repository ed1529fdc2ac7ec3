"""Shared fixtures: an in-memory middleware on a scripted backend, and the real local model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture
def make_mw(tmp_path):
    """Build a Middleware from YAML text on a real SQLite file and a scripted backend."""
    from persona_mw import Middleware, parse_config
    from persona_mw.testing import ScriptedBackend

    made = []

    def make(yaml_text: str = "", backend=None, plugins=None, db: str | None = None):
        cfg = parse_config(yaml_text or "{}")
        cfg.store.path = db or str(tmp_path / f"store{len(made)}.db")
        mw = Middleware(cfg, backend=backend or ScriptedBackend(), plugins=plugins, autoload=False)
        made.append(mw)
        return mw

    yield make
    for mw in made:
        if not mw.closed:
            mw.close()


@pytest.fixture(scope="session")
def local_backend():
    """The real packaged SmolLM2-135M-Instruct, loaded once per test session."""
    from persona_mw.adapters.transformers import TransformersBackend

    return TransformersBackend(model="smollm2-135m-instruct", max_new_tokens=48)
