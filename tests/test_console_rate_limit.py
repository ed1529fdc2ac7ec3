"""The data API's routes and the console's pages count against the same per-tenant rate
(``server.rate_limit``) as the ``/v1`` chat routes: a tenant over it gets 429 + Retry-After there too,
and another tenant is served as before. (Before, both bypassed the limiter.) Real server on loopback,
real SQLite store, API keys."""

from __future__ import annotations

from typing import Any

import httpx

from persona_mw.server import create_app, serve_in_thread

KEYS = {"victim": ["key-victim"], "attacker": ["key-attacker"]}


def _h(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer key-{tenant}"}


def test_data_api_counts_against_the_tenant_rate(make_mw: Any) -> None:
    mw = make_mw("server: {rate_limit: {requests_per_s: 0.01, burst: 3}}\n")
    with serve_in_thread(create_app(mw, api_keys=KEYS)) as url, httpx.Client(timeout=30) as c:
        codes = [c.get(f"{url}/v1/users", headers=_h("attacker")).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429], codes
        r = c.post(f"{url}/v1/users/ana/memories", json={"text": "likes tea"}, headers=_h("attacker"))
        assert r.status_code == 429 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        # the data API and /v1/chat share the one bucket
        chat = c.post(f"{url}/v1/chat/completions", headers=_h("attacker"),
                      json={"user": "ana", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 429
        assert c.get(f"{url}/v1/users", headers=_h("victim")).status_code == 200


def test_console_pages_count_against_the_tenant_rate(make_mw: Any) -> None:
    mw = make_mw("server: {rate_limit: {requests_per_s: 0.01, burst: 2}}\n")
    with serve_in_thread(create_app(mw, api_keys=KEYS)) as url, httpx.Client(timeout=30) as c:
        attacker = httpx.Client(timeout=30, cookies={"persona_console_key": "key-attacker"})
        victim = httpx.Client(timeout=30, cookies={"persona_console_key": "key-victim"})
        with attacker, victim:
            codes = [attacker.get(f"{url}/console/").status_code for _ in range(4)]
            assert codes == [200, 200, 429, 429], codes
            r = attacker.get(f"{url}/console/")
            assert r.headers["retry-after"] and "rate limit exceeded" in r.text
            assert "text/html" in r.headers["content-type"]
            assert victim.get(f"{url}/console/").status_code == 200
        # the key in the header or the cookie is the same tenant: its /v1 calls are refused too
        assert c.get(f"{url}/v1/users", headers=_h("attacker")).status_code == 429
