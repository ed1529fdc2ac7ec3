"""Bad inputs through HTTP and the Python API: always a clear 4xx / PersonaError, never a 5xx, a traceback
or a broken stream; with the memory plugin's after-turn jobs on (each one finishes, every user still
exports), and a short run against the real local model."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from persona_mw.server import create_app, serve_in_thread

from .fuzz import fuzz_http, fuzz_python
from .soak_inputs import fuzz_memory, fuzz_model


def test_bad_inputs_get_clear_errors(make_mw: Any) -> None:
    mw = make_mw("pipeline: [{use: stated}]\nprivacy: {redact: [email, phone]}\n")
    mw.feedback(kind="stated", user="ana", text="Be brief.")
    with serve_in_thread(create_app(mw, max_body_bytes=16 * 1024)) as url, httpx.Client(timeout=30) as client:
        http = fuzz_http(client, url, random.Random(7), 250)
    assert http["bad"] == [], "\n".join(http["bad"][:10])
    py = fuzz_python(mw, random.Random(8), 200)
    assert py["bad"] == [], "\n".join(py["bad"][:10])


def test_bad_inputs_through_a_learning_pipeline(tmp_path: Any, store_url: Any) -> None:
    result = fuzz_memory(tmp_path, 400, seed=11, url=store_url())
    assert result["bad"] == [], "\n".join(result["bad"][:10])
    assert result["turns_answered"] >= 20  # the after-turn path really ran, on hostile-but-valid turns
    assert result["jobs_left"] == 0, result["job_errors"]
    assert result["export_bad"] == [], result["export_bad"][:5]


@pytest.mark.slow
def test_bad_inputs_against_the_real_local_model(tmp_path: Any, store_url: Any) -> None:
    from persona_mw.adapters.transformers import TransformersBackend

    backend = TransformersBackend(model="smollm2-135m-instruct", max_new_tokens=4)
    result = fuzz_model(tmp_path, 16, seed=2, backend=backend, url=store_url())
    assert result["bad"] == [], "\n".join(result["bad"][:10])
    assert result["turns_answered"] >= 2  # some reached the model
    assert result["jobs_left"] == 0 and result["export_bad"] == []
