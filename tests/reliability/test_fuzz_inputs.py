"""Bad inputs through HTTP and the Python API: always a clear 4xx / PersonaError, never a 5xx or a traceback."""

from __future__ import annotations

import random
from typing import Any

import httpx

from persona_mw.server import create_app, serve_in_thread

from .fuzz import fuzz_http, fuzz_python


def test_bad_inputs_get_clear_errors(make_mw: Any) -> None:
    mw = make_mw("pipeline: [{use: stated}]\nprivacy: {redact: [email, phone]}\n")
    mw.feedback(kind="stated", user="ana", text="Be brief.")
    with serve_in_thread(create_app(mw, max_body_bytes=16 * 1024)) as url, httpx.Client(timeout=30) as client:
        http = fuzz_http(client, url, random.Random(7), 250)
    assert http["bad"] == [], "\n".join(http["bad"][:10])
    py = fuzz_python(mw, random.Random(8), 200)
    assert py["bad"] == [], "\n".join(py["bad"][:10])
