"""Property-based fuzzing of the HTTP API against its own OpenAPI schema (schemathesis): no 5xx, ever,
and every 4xx is OpenAI-shaped JSON. ``PERSONA_MW_FUZZ_EXAMPLES`` raises the example count for a soak."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from persona_mw import Middleware  # noqa: E402
from persona_mw.server import create_app, serve_in_thread  # noqa: E402
from persona_mw.testing import ScriptedBackend  # noqa: E402

EXAMPLES = int(os.environ.get("PERSONA_MW_FUZZ_EXAMPLES", "50"))


@pytest.fixture(scope="module")
def fuzz_url(session_store_url: Callable[[], str]) -> Iterator[str]:
    mw = Middleware(store=session_store_url(), backend=ScriptedBackend(), autoload=False)
    mw.feedback(kind="stated", user="ana", text="short answers")
    with serve_in_thread(create_app(mw, max_body_bytes=64 * 1024)) as url:
        yield url
    mw.close()


def test_no_server_errors(fuzz_url: str) -> None:
    """Every operation in /openapi.json, with bodies, paths and headers generated from the schema.

    (schemathesis' own pytest plugin does not run under pytest 9, so operations are walked here.)
    """
    from hypothesis import given

    api = schemathesis.openapi.from_url(fuzz_url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 8
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            response = case.call(base_url=fuzz_url, timeout=30)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")
            elif response.status_code >= 400:
                err = response.json()["error"]
                assert err["message"] and err["type"], err

        check()
    assert not failures, "\n".join(failures[:10])
