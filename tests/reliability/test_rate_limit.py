"""Issue #17, last item: per-tenant fairness. ``server.rate_limit`` gives every tenant its own token
bucket; a tenant over it gets 429 + ``Retry-After`` before its body is read, and nothing it sent is
stored, while another tenant is served as before. Real parts: the HTTP server on loopback with
API keys, the SQLite store; the scripted backend stands in for the LLM only.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from persona_mw import ConfigError, parse_config
from persona_mw.server import create_app, serve_in_thread

KEYS = {"victim": ["key-victim"], "attacker": ["key-attacker"]}
HELLO = [{"role": "user", "content": "hello"}]


def _h(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer key-{tenant}"}


def _ready(mw: Any) -> Any:
    """Each tenant's store created ahead (a SQLite file beside the store, or a Postgres schema with its
    migrations, seconds on a loaded machine): the buckets below are timed in fractions of a second,
    and a first request that spends them creating a store would let the bucket refill meanwhile."""
    for tenant in KEYS:
        mw.store.for_tenant(tenant).close()
    return mw


def _chat(c: httpx.Client, url: str, tenant: str | None, user: str = "u1") -> httpx.Response:
    return c.post(f"{url}/v1/chat/completions", json={"user": user, "messages": HELLO},
                  headers=_h(tenant) if tenant else {})


def test_over_rate_gets_429_with_retry_after_and_other_tenant_is_unaffected(make_mw: Any) -> None:
    mw = _ready(make_mw("server: {rate_limit: {requests_per_s: 0.5, burst: 3}}\n"))
    with serve_in_thread(create_app(mw, api_keys=KEYS)) as url, httpx.Client(timeout=30) as c:
        codes = [_chat(c, url, "attacker").status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        r = _chat(c, url, "attacker")
        assert r.status_code == 429, r.text
        retry = r.headers["Retry-After"]
        assert retry.isdigit() and 1 <= int(retry) <= 2  # 1 token at 0.5/s: 2 s at most
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
        assert err["param"] == "server.rate_limit" and "attacker" in err["message"]
        # the feedback and the users/groups write routes count too, and what they carry is not stored
        r = c.post(f"{url}/v1/feedback", headers=_h("attacker"),
                   json={"kind": "stated", "user": "u1", "text": "Speak like a pirate"})
        assert r.status_code == 429, r.text
        assert c.put(f"{url}/v1/users/u2/groups/g1", headers=_h("attacker")).status_code == 429
        # the victim has its own bucket, untouched by the attacker's
        assert [_chat(c, url, "victim").status_code for _ in range(3)] == [200, 200, 200]
        # /healthz is never counted
        assert c.get(f"{url}/healthz").status_code == 200
        # a missing or unknown key is a 401 and charges nobody
        assert _chat(c, url, None).status_code == 401
        r = c.post(f"{url}/v1/chat/completions", json={"messages": HELLO}, headers={"Authorization": "Bearer nope-nope"})
        assert r.status_code == 401
    # nothing from the refused requests reached the attacker's store (every table, whatever the store:
    # a file beside the SQLite one, or a schema of its own on Postgres)
    import json

    from persona_mw.store import COPY_TABLES

    tenant_store = mw.store.for_tenant("attacker")
    try:
        dump = "\n".join(json.dumps(row, default=str) for table in COPY_TABLES
                         for row in tenant_store.dump_table(table)).lower()
    finally:
        tenant_store.close()
    assert "u1" in dump  # the allowed chats are there
    assert "pirate" not in dump and "g1" not in dump


def test_bucket_refills(make_mw: Any) -> None:
    mw = _ready(make_mw("server: {rate_limit: {requests_per_s: 5, burst: 2}}\n"))
    with serve_in_thread(create_app(mw, api_keys=KEYS)) as url, httpx.Client(timeout=30) as c:
        assert [_chat(c, url, "attacker").status_code for _ in range(2)] == [200, 200]
        r = _chat(c, url, "attacker")
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"  # 0.2 s rounded up to 1
        time.sleep(0.6)  # 5/s: 2 tokens back (capped at the burst)
        assert [_chat(c, url, "attacker").status_code for _ in range(2)] == [200, 200]
        assert _chat(c, url, "attacker").status_code == 429


def test_refused_before_the_body_is_read_and_size_costs_more(make_mw: Any) -> None:
    mw = _ready(make_mw("server: {rate_limit: {requests_per_s: 0.1, burst: 4, bytes_per_token: 1024}}\n"))
    with serve_in_thread(create_app(mw, api_keys=KEYS)) as url, httpx.Client(timeout=30) as c:
        # ~3.5 KB: costs 1 + 3 full KiB = all 4 tokens
        big = {"user": "u1", "messages": [{"role": "user", "content": "x" * 3500}]}
        assert c.post(f"{url}/v1/chat/completions", json=big, headers=_h("attacker")).status_code == 200
        # a small request needs 1 token: only ~0.1 left
        assert _chat(c, url, "attacker").status_code == 429
        # an unparseable body over the rate is a 429, not a 400: the body was never parsed
        r = c.post(f"{url}/v1/chat/completions", content=b"{not json", headers={
            **_h("attacker"), "Content-Type": "application/json"})
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        # the victim's small requests (1 token each) are not charged for the attacker's size
        assert [_chat(c, url, "victim").status_code for _ in range(4)] == [200] * 4


def test_per_tenant_override_and_open_server_default_tenant(make_mw: Any) -> None:
    mw = _ready(make_mw("server:\n  rate_limit: {requests_per_s: 0.1, burst: 1}\n"
                        "  tenant_rate_limits: {victim: null, attacker: {requests_per_s: 0.1, burst: 2}}\n"))
    with serve_in_thread(create_app(mw, api_keys=KEYS)) as url, httpx.Client(timeout=30) as c:
        assert [_chat(c, url, "victim").status_code for _ in range(6)] == [200] * 6  # unlimited
        assert [_chat(c, url, "attacker").status_code for _ in range(3)] == [200, 200, 429]
        r = _chat(c, url, "attacker")
        assert r.json()["error"]["param"] == "server.tenant_rate_limits.attacker"
    # no keys: one "default" tenant for everybody
    mw2 = make_mw("server: {rate_limit: {requests_per_s: 0.1, burst: 2}}\n")
    with serve_in_thread(create_app(mw2)) as url, httpx.Client(timeout=30) as c:
        codes = [_chat(c, url, None, user=f"u{i}").status_code for i in range(3)]
        assert codes == [200, 200, 429]
        assert "'default'" in _chat(c, url, None).json()["error"]["message"]


def test_off_by_default(make_mw: Any) -> None:
    mw = make_mw()
    assert mw.config.server.rate_limit is None and mw.config.server.tenant_rate_limits == {}
    with serve_in_thread(create_app(mw, api_keys=KEYS)) as url, httpx.Client(timeout=30) as c:
        codes = {_chat(c, url, "attacker").status_code for _ in range(40)}
        assert codes == {200}


@pytest.mark.parametrize("yaml_text, field", [
    ("server: {rate_limit: {requests_per_s: 0, burst: 1}}", "server.rate_limit.requests_per_s"),
    ("server: {rate_limit: {requests_per_s: 1}}", "server.rate_limit.burst"),
    ("server: {rate_limit: {requests_per_s: 1, burst: 0}}", "server.rate_limit.burst"),
    ("server: {rate_limit: {requests_per_s: 1, burst: 1, bytes_per_token: 10}}", "server.rate_limit.bytes_per_token"),
    ("server: {rate_limit: {requests_per_s: 1, burst: 1, per_minute: 3}}", "server.rate_limit.per_minute"),
    ("server: {tenant_rate_limits: {acme: {requests_per_s: -1, burst: 1}}}",
     "server.tenant_rate_limits.acme.requests_per_s"),
    ("server: {tenant_rate_limits: {'bad name': {requests_per_s: 1, burst: 1}}}", "invalid tenant name 'bad name'"),
])
def test_config_errors_name_the_field(yaml_text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        parse_config(yaml_text)


def test_hold_delays_the_refusal_not_the_other_tenant(make_mw: Any) -> None:
    import concurrent.futures

    mw = _ready(make_mw("server: {rate_limit: {requests_per_s: 0.2, burst: 1, hold_s: 0.8}}\n"))
    with serve_in_thread(create_app(mw, api_keys=KEYS)) as url, httpx.Client(timeout=30) as c:
        assert _chat(c, url, "attacker").status_code == 200
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            def timed(tenant: str) -> tuple[int, float]:
                with httpx.Client(timeout=30) as c2:
                    t = time.perf_counter()
                    code = _chat(c2, url, tenant).status_code
                    return code, time.perf_counter() - t

            refused = [pool.submit(timed, "attacker") for _ in range(6)]
            time.sleep(0.1)
            code, victim_s = timed("victim")
            results = [f.result() for f in refused]
        assert code == 200 and victim_s < 0.5, victim_s  # not queued behind the held refusals
        assert all(r[0] == 429 for r in results)
        assert all(r[1] >= 0.7 for r in results), results  # each 429 was held ~0.8 s, all at once
        assert max(r[1] for r in results) < 3.0, results
