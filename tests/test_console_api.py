"""The data API (``persona_mw.api_data``) and the web console (``/console``) over real HTTP on loopback,
with the real SQLite store and a backend that echoes its prompt (so the prompt is what we assert on).

The browser flows are in ``test_console_browser.py``; here: every route's behaviour, errors naming the
field, hostile input (0 5xx), tenant isolation, HTML escaping, CSRF and the OpenAPI document.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator

import httpx
import pytest

from persona_mw import Middleware, parse_config
from persona_mw.server import create_app, serve_in_thread
from persona_mw.testing import ScriptedBackend
from persona_mw.types import Message

KEYS = {"acme": ["acme-key-0001"], "globex": ["globex-key-001"]}
ACME = {"Authorization": "Bearer acme-key-0001"}
GLOBEX = {"Authorization": "Bearer globex-key-001"}
CONFIG = "pipeline:\n  - use: stated\n  - use: memory\n    embedder: false\n    mode: bm25\n"


def echo_prompt(messages: list[Message]) -> str:
    return "\n".join(f"[{m.role}] {m.text}" for m in messages)


@pytest.fixture(scope="module")
def server(session_store_url: Callable[[], str]) -> Iterator[tuple[str, Middleware]]:
    cfg = parse_config(CONFIG)
    cfg.store.path = session_store_url()
    mw = Middleware(cfg, backend=ScriptedBackend(script=echo_prompt), autoload=False)
    with serve_in_thread(create_app(mw, api_keys=KEYS)) as url:
        yield url, mw
    mw.close()


def chat(url: str, user: str, text: str, headers: dict[str, str] = ACME) -> dict[str, Any]:
    r = httpx.post(url + "/v1/chat/completions", json={"user": user, "messages": [{"role": "user", "content": text}]},
                   headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def add(url: str, user: str, text: str, headers: dict[str, str] = ACME, **extra: Any) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/users/{user}/memories", json={"text": text, **extra}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["data"][0]  # type: ignore[no-any-return]


def test_memories_add_list_edit_pin_delete_change_the_next_prompt(server: Any) -> None:
    url, _ = server
    first = add(url, "ana", "I love green tea")
    assert first["kind"] == "preference" and first["pinned"] and first["source"] == "stated"
    assert "I love green tea" in chat(url, "ana", "What should I drink?")["choices"][0]["message"]["content"]
    listed = httpx.get(url + "/v1/users/ana/memories", headers=ACME).json()
    assert [m["id"] for m in listed["data"]] == [first["id"]] and listed["total"] == 1

    r = httpx.patch(f"{url}/v1/users/ana/memories/{first['id']}", json={"text": "I love black coffee"}, headers=ACME)
    assert r.status_code == 200 and r.json()["text"] == "I love black coffee" and r.json()["source"] == "edited"
    assert r.json()["meta"]["extracted_by"] == "stated"
    prompt = chat(url, "ana", "What should I drink?")["choices"][0]["message"]["content"]
    assert "I love black coffee" in prompt and "green tea" not in prompt

    # a fact is retrieved only when relevant; pinned, it is offered on every turn
    fact = add(url, "ana", "Ana's cat is called Miso", kind="fact", polarity=None)
    assert not fact["pinned"]
    assert "Miso" not in chat(url, "ana", "Plan my weekend")["choices"][0]["message"]["content"]
    r = httpx.patch(f"{url}/v1/users/ana/memories/{fact['id']}", json={"pinned": True}, headers=ACME)
    assert r.status_code == 200 and r.json()["pinned"] is True
    assert "Miso" in chat(url, "ana", "Plan my weekend")["choices"][0]["message"]["content"]
    # unpinning a preference keeps it stored but out of the pinned block
    r = httpx.patch(f"{url}/v1/users/ana/memories/{first['id']}", json={"pinned": False}, headers=ACME)
    assert r.json()["pinned"] is False
    assert "black coffee" not in chat(url, "ana", "Plan my weekend")["choices"][0]["message"]["content"]

    hits = httpx.get(url + "/v1/users/ana/memories/search", params={"q": "cat Miso", "mode": "bm25"}, headers=ACME)
    assert hits.status_code == 200 and hits.json()["data"][0]["id"] == fact["id"]
    assert "score" in hits.json()["data"][0]

    r = httpx.delete(f"{url}/v1/users/ana/memories/{fact['id']}", headers=ACME)
    assert r.status_code == 200 and r.json()["deleted"] is True and r.json()["rows"] == 1
    assert httpx.delete(f"{url}/v1/users/ana/memories/{fact['id']}", headers=ACME).status_code == 404
    assert "Miso" not in chat(url, "ana", "Plan my weekend")["choices"][0]["message"]["content"]


def test_traces_show_each_plugin_and_the_final_prompt(server: Any) -> None:
    url, _ = server
    add(url, "tess", "I prefer answers in French")
    body = chat(url, "tess", "Hello there, marker-one")
    traces = httpx.get(url + "/v1/users/tess/traces?limit=5", headers=ACME).json()["data"]
    assert traces[0]["id"] == body["persona_trace"]["id"]
    prompt = "\n".join(m["content"] for m in traces[0]["prompt"])
    assert "marker-one" in prompt and "I prefer answers in French" in prompt
    assert any(s["plugin"] == "memory" and s["changed"] for s in traces[0]["steps"])
    chat(url, "tess", "second turn")
    newest = httpx.get(url + "/v1/users/tess/traces?limit=1", headers=ACME).json()["data"]
    assert len(newest) == 1 and "second turn" in newest[0]["prompt"][-1]["content"]


def test_users_list_and_search_per_tenant(server: Any) -> None:
    url, _ = server
    for u in ("zed-one", "zed-two", "yan"):
        add(url, u, f"I like the colour of {u}")
    add(url, "zed-globex", "I like plums", headers=GLOBEX)
    ids = [u["id"] for u in httpx.get(url + "/v1/users?q=ZED", headers=ACME).json()["data"]]
    assert ids == ["zed-one", "zed-two"]
    page = httpx.get(url + "/v1/users?q=zed&limit=1", headers=ACME).json()
    assert len(page["data"]) == 1 and page["has_more"] is True
    assert page["data"][0]["memories"] == 1
    globex = [u["id"] for u in httpx.get(url + "/v1/users", headers=GLOBEX).json()["data"]]
    assert globex == ["zed-globex"]


def test_tenants_and_users_never_reach_each_others_memories(server: Any) -> None:
    url, _ = server
    mine = add(url, "iso-a", "I like secret-acme-tea")
    add(url, "iso-b", "I like other-user-tea")
    # another user's path, same tenant: unknown
    r = httpx.patch(f"{url}/v1/users/iso-b/memories/{mine['id']}", json={"text": "hijacked"}, headers=ACME)
    assert r.status_code == 404 and r.json()["error"]["param"] == "memory_id"
    assert httpx.delete(f"{url}/v1/users/iso-b/memories/{mine['id']}", headers=ACME).status_code == 404
    # another tenant, same user id: unknown user and memory
    add(url, "iso-a", "I like globex-tea", headers=GLOBEX)
    for method, path in (("GET", "/v1/users/iso-a/memories"), ("GET", "/v1/users/iso-a/traces"),
                         ("GET", "/v1/users/iso-a/memories/search?q=tea")):
        body = httpx.request(method, url + path, headers=GLOBEX).text
        assert "secret-acme-tea" not in body and mine["id"] not in body
    r = httpx.patch(f"{url}/v1/users/iso-a/memories/{mine['id']}", json={"pinned": False}, headers=GLOBEX)
    assert r.status_code == 404
    texts = [m["text"] for m in httpx.get(url + "/v1/users/iso-a/memories", headers=ACME).json()["data"]]
    assert texts == ["I like secret-acme-tea"]  # untouched
    for path in ("/v1/users", "/v1/users/iso-a/memories", "/v1/feedback/batch"):
        assert httpx.request("POST" if "batch" in path else "GET", url + path).status_code == 401


def test_feedback_batch_validates_all_before_recording_any(server: Any) -> None:
    url, _ = server
    good = {"kind": "stated", "user": "bat", "text": "Use metric units.", "id": "ev-1"}
    r = httpx.post(url + "/v1/feedback/batch", json={"events": [good, {"kind": "rating", "user": "bat"}]},
                   headers=ACME)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("events[1].")
    assert httpx.get(url + "/v1/users/bat/profile", headers=ACME).status_code == 404  # nothing recorded
    r = httpx.post(url + "/v1/feedback/batch", headers={**ACME, "X-Persona-User": "bat"}, json={"events": [
        good, {"kind": "stated", "text": "Be brief."}, {**good}]})
    assert r.status_code == 200, r.text
    assert [d["status"] for d in r.json()["data"]] == ["recorded", "recorded", "duplicate"]
    assert r.json()["data"][2]["error"]["param"] == "events[2].id" and r.json()["recorded"] == 2
    stated = httpx.get(url + "/v1/users/bat/profile", headers=ACME).json()["profiles"]["user:bat"]["stated"]
    assert {s["text"] for s in stated} == {"Use metric units.", "Be brief."}
    r = httpx.post(url + "/v1/feedback/batch", json={"events": [good] * 1001}, headers=ACME)
    assert r.status_code == 400 and r.json()["error"]["param"] == "events"


# ("..": HTTP clients resolve it before sending, so it never reaches a route with that id)
HOSTILE_IDS = ["a" * 129, "ana%2Fbob", "%00", "ana<script>", "ana%20bob", "ünï", "ana;drop"]


def test_hostile_input_is_a_clear_4xx_never_a_5xx(server: Any) -> None:
    url, _ = server
    add(url, "host", "I like tests")
    mid = httpx.get(url + "/v1/users/host/memories", headers=ACME).json()["data"][0]["id"]
    cases: list[tuple[str, str, Any, str | None]] = []
    for bad in HOSTILE_IDS:
        cases += [("GET", f"/v1/users/{bad}/memories", None, "user"), ("POST", f"/v1/users/{bad}/memories",
                   {"text": "x"}, "user"), ("GET", f"/v1/users/{bad}/traces", None, "user"),
                  ("PATCH", f"/v1/users/host/memories/{bad}", {"pinned": True}, "memory_id"),
                  ("DELETE", f"/v1/users/host/memories/{bad}", None, "memory_id")]
    m = f"/v1/users/host/memories/{mid}"
    cases += [
        ("GET", "/v1/users?limit=0", None, "limit"), ("GET", "/v1/users?limit=abc", None, "limit"),
        ("GET", "/v1/users?offset=-1", None, "offset"), ("GET", "/v1/users?q=" + "x" * 200, None, "q"),
        ("GET", "/v1/users/host/memories?context=a/b", None, "context"),
        ("GET", "/v1/users/host/memories?include_superseded=maybe", None, "include_superseded"),
        ("GET", "/v1/users/host/memories/search", None, "q"), ("GET", "/v1/users/host/memories/search?q=x&k=0", None, "k"),
        ("GET", "/v1/users/host/memories/search?q=x&mode=magic", None, "mode"),
        ("GET", "/v1/users/nobody/memories", None, "user"), ("GET", "/v1/users/nobody/traces", None, "user"),
        ("POST", "/v1/users/host/memories", {}, "text"), ("POST", "/v1/users/host/memories", {"text": ""}, "text"),
        ("POST", "/v1/users/host/memories", {"text": 5}, "text"), ("POST", "/v1/users/host/memories", {"text": "   "}, "text"),
        ("POST", "/v1/users/host/memories", {"text": "x" * 2001}, "text"),
        ("POST", "/v1/users/host/memories", {"text": "a", "kind": "secret"}, "kind"),
        ("POST", "/v1/users/host/memories", {"text": "a", "pinned": "yes"}, "pinned"),
        ("POST", "/v1/users/host/memories", {"text": "a", "extra": 1}, "extra"),
        ("POST", "/v1/users/host/memories", {"text": "a", "context": "../x"}, "context"),
        ("POST", "/v1/users/host/memories", {"text": "a", "kind": "fact", "polarity": "avoid"}, "polarity"),
        ("POST", "/v1/users/host/memories", [1, 2], None), ("POST", "/v1/users/host/memories", "not json", None),
        ("PATCH", m, {}, "text"), ("PATCH", m, {"text": None, "pinned": None}, "text"), ("PATCH", m, {"text": ""}, "text"),
        ("PATCH", m, {"text": "\u0000\u0001"}, "text"), ("PATCH", m, {"pinned": 1}, "pinned"),
        ("PATCH", m, {"owner": "user:other"}, "owner"),
        ("POST", "/v1/feedback/batch", {}, "events"), ("POST", "/v1/feedback/batch", {"events": []}, "events"),
        ("POST", "/v1/feedback/batch", {"events": [5]}, "events.0"),
        ("POST", "/v1/feedback/batch", {"events": [{"kind": "stated", "text": "x"}]}, "events[0].user"),
        ("POST", "/v1/feedback/batch", {"events": [{"kind": "nope", "user": "host"}]}, "events[0].kind"),
        ("POST", "/v1/feedback/batch", {"events": [{"kind": "stated", "user": "a/b", "text": "x"}]}, "events[0].user"),
    ]
    for method, path, body, param in cases:
        kw: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body} if body is not None else {}
        r = httpx.request(method, url + path, headers={**ACME, "Content-Type": "application/json"}, **kw)
        assert 400 <= r.status_code < 500, (method, path, body, r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"], (method, path)
        if param is not None:  # (an id that changes the path, like "a%2Fb", is an unknown route: 404)
            odd_path = "%" in path or "/../" in path or path.endswith("/..")
            assert err["param"] == param or (r.status_code in (404, 405) and odd_path), (method, path, body, err)
    # the memory survived all of it
    assert httpx.get(url + "/v1/users/host/memories", headers=ACME).json()["data"][0]["text"] == "I like tests"


def test_openapi_lists_every_new_route_but_not_the_console(server: Any) -> None:
    url, _ = server
    paths = httpx.get(url + "/openapi.json").json()["paths"]
    assert set(paths["/v1/users/{user}/memories"]) == {"get", "post"}
    assert set(paths["/v1/users/{user}/memories/{memory_id}"]) == {"patch", "delete"}
    for p in ("/v1/users", "/v1/users/{user}/memories/search", "/v1/users/{user}/traces", "/v1/feedback/batch"):
        assert p in paths, p
    assert paths["/v1/users"]["get"]["security"] == [{"bearer": []}]
    assert not [p for p in paths if p.startswith("/console")]


# --------------------------------------------------------------------------- the console pages


def login(url: str, key: str) -> httpx.Client:
    c = httpx.Client(base_url=url, timeout=30)
    r = c.post("/console/login", data={"key": key})
    assert r.status_code == 303 and r.headers["location"] == "/console/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    return c


def csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found
    return found.group(1)


def test_console_needs_a_key_and_shows_only_the_tenants_users(server: Any) -> None:
    url, _ = server
    add(url, "page-acme", "I like acme pages")
    add(url, "page-globex", "I like globex pages", headers=GLOBEX)
    r = httpx.get(url + "/console/users/page-acme")
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    assert httpx.post(url + "/console/login", data={"key": "wrong-key-000"}).status_code == 401
    acme = login(url, "acme-key-0001")
    users = acme.get("/console/?q=page").text
    assert "page-acme" in users and "page-globex" not in users
    assert acme.get("/console/users/page-globex").status_code == 404
    assert "I like acme pages" in acme.get("/console/users/page-acme").text
    globex = login(url, "globex-key-001")
    assert "acme pages" not in globex.get("/console/users/page-acme").text
    assert globex.get("/console/users/page-acme").status_code == 404


def test_console_escapes_hostile_memories(server: Any) -> None:
    url, _ = server
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    add(url, "xss", f"I like {evil}")
    httpx.post(url + "/v1/feedback", json={"kind": "stated", "user": "xss", "text": f"Call me {evil}"}, headers=ACME)
    chat(url, "xss", f"hello {evil}")
    c = login(url, "acme-key-0001")
    page = c.get("/console/users/xss").text
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert "default-src 'self'" in c.get("/console/users/xss").headers["content-security-policy"]
    bad_user = c.get("/console/users/%3Cscript%3E")
    assert bad_user.status_code == 400 and "<script>" not in bad_user.text


def test_console_actions_need_the_form_token_and_a_typed_confirmation(server: Any) -> None:
    url, _ = server
    mem = add(url, "act", "I like the console")
    c = login(url, "acme-key-0001")
    page = c.get("/console/users/act").text
    token = csrf(page)
    # without the token (a cross-site form), nothing changes
    r = c.post(f"/console/users/act/memories/{mem['id']}/edit", data={"text": "forged"})
    assert r.status_code == 403
    r = c.post(f"/console/users/act/memories/{mem['id']}/edit", data={"text": "I like the edited console",
                                                                        "csrf": token})
    assert r.status_code == 303
    assert "I like the edited console" in c.get("/console/users/act").text
    r = c.post(f"/console/users/act/memories/{mem['id']}/pin", data={"pinned": "0", "csrf": token})
    assert r.status_code == 303
    assert httpx.get(url + "/v1/users/act/memories", headers=ACME).json()["data"][0]["pinned"] is False
    export = c.get("/console/users/act/export")
    assert export.status_code == 200 and "attachment" in export.headers["content-disposition"]
    assert export.json()["memories"][0]["text"] == "I like the edited console"
    r = c.post("/console/users/act/forget", data={"confirm": "wrong", "csrf": token})
    assert r.status_code == 400 and "confirm" in r.text
    assert httpx.get(url + "/v1/users/act/memories", headers=ACME).status_code == 200
    r = c.post("/console/users/act/forget", data={"confirm": "act", "csrf": token})
    assert r.status_code == 303
    assert httpx.get(url + "/v1/users/act/memories", headers=ACME).status_code == 404
    assert c.get("/console/users/act").status_code == 404


def test_console_is_open_without_keys(store_url: Callable[[], str]) -> None:
    mw = Middleware(store=store_url(), backend=ScriptedBackend(), autoload=False)
    mw.memory.remember("olga", "I like open consoles")
    try:
        with serve_in_thread(create_app(mw)) as url:
            r = httpx.get(url + "/console/")
            assert r.status_code == 200 and "olga" in r.text
            assert "I like open consoles" in httpx.get(url + "/console/users/olga").text
            assert httpx.get(url + "/console/login", follow_redirects=False).status_code == 303
    finally:
        mw.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_memory_id_no_memory_can_have_is_a_404_on_every_store(kind: str, request: pytest.FixtureRequest,
                                                              tmp_path: Any) -> None:
    """A NUL in a memory id reached the store: Postgres text cannot hold one, so the console answered 503
    there. Now the console checks the id's shape as the data API does, before any store is asked."""
    from .conftest import fresh_pg_url

    url = str(tmp_path / "c.db") if kind == "sqlite" else fresh_pg_url(request.getfixturevalue("pg_server"), "con")
    mw = Middleware(store=url, backend=ScriptedBackend(), autoload=False)
    try:
        with serve_in_thread(create_app(mw, api_keys=KEYS)) as base:
            c = login(base, "acme-key-0001")
            add(base, "nul", "I like coffee")
            token = csrf(c.get("/console/users/nul").text)
            for action in ("edit", "pin", "delete"):
                r = c.post(f"/console/users/nul/memories/%00/{action}", data={"csrf": token, "text": "x"})
                assert r.status_code == 404, (action, r.status_code, r.text[:200])
            assert "I like coffee" in c.get("/console/users/nul").text  # nothing stored changed
    finally:
        mw.close()


def test_console_routes_under_hostile_input_never_5xx(server: Any) -> None:
    """Hostile ids in every console path, hostile forms on every action: a 4xx page (or a redirect to the
    login), never a 5xx, never the hostile text unescaped; nothing stored changes."""
    url, _ = server
    mem = add(url, "fuzzc", "I like fuzzing")
    c = login(url, "acme-key-0001")
    token = csrf(c.get("/console/users/fuzzc").text)
    ids = HOSTILE_IDS + ["<b>x</b>", "a" * 5000, "x' OR '1'='1", "user:fuzzc", "fuzzc@context:x"]
    for bad in ids:
        for method, path in (("GET", f"/console/users/{bad}"), ("GET", f"/console/users/{bad}/export"),
                             ("POST", f"/console/users/{bad}/forget"),
                             ("POST", f"/console/users/fuzzc/memories/{bad}/edit"),
                             ("POST", f"/console/users/fuzzc/memories/{bad}/pin"),
                             ("POST", f"/console/users/fuzzc/memories/{bad}/delete"),
                             ("POST", f"/console/users/{bad}/memories/{mem['id']}/delete"),
                             ("GET", f"/console/?q={bad}&offset=0"), ("GET", f"/console/static/{bad}")):
            r = c.request(method, path, data={"csrf": token, "text": "x", "confirm": bad} if method == "POST" else None)
            assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
            assert "<b>x</b>" not in r.text and "<script>" not in r.text, (method, path)
    action = f"/console/users/fuzzc/memories/{mem['id']}"
    forms: list[tuple[str, Any]] = [
        ("/edit", {"csrf": token, "text": "x" * 3000}), ("/edit", {"csrf": token, "text": ""}),
        ("/edit", {"csrf": token, "text": "\u0000\u0001"}), ("/edit", {"csrf": "0" * 64, "text": "forged"}),
        ("/edit", b"\xff\xfe\x00garbage"), ("/edit", b"a=" + b"x" * (70 * 1024)),
        ("/edit", "&".join(f"f{i}=1" for i in range(200)) + f"&csrf={token}"),
        ("/pin", {"csrf": token, "pinned": "maybe"}), ("/delete", {}),
    ]
    for suffix, body in forms:
        kw: dict[str, Any] = {"content": body} if isinstance(body, (bytes, str)) else {"data": body}
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if "content" in kw else None
        r = c.post(action + suffix, headers=headers, **kw)
        assert r.status_code < 500, (suffix, r.status_code, r.text[:300])
    assert c.post("/console/login", content=b"\xff" * 10,
                  headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 401
    texts = [m["text"] for m in httpx.get(url + "/v1/users/fuzzc/memories", headers=ACME).json()["data"]]
    assert texts == ["I like fuzzing"]
