"""``persona-mw mcp``: the SDK's own client over stdio (the CLI spawned) and streamable HTTP (loopback),
tenants from API keys as in the HTTP API, isolation probes, and fuzzed tool arguments."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import httpx
import pytest

pytest.importorskip("mcp", reason="the [mcp] extra is not installed")

from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared._httpx_utils import create_mcp_http_client  # noqa: E402

from persona_mw import Middleware, parse_config  # noqa: E402
from persona_mw.mcp_server import McpAccess, build_mcp_server, mcp_http_app  # noqa: E402
from persona_mw.server import serve_in_thread  # noqa: E402
from persona_mw.store import open_store  # noqa: E402
from persona_mw.testing import ScriptedBackend  # noqa: E402

from tests.conftest import tenant_url  # noqa: E402

PIPELINE = """
pipeline:
  - use: stated
    placement: system
  - use: memory
    embedder: false
    placement: system
    top_k: 5
"""
TOOLS = {"search_memories", "add_memory", "record_feedback", "get_profile_summary", "personalized_prompt"}
KEYS = {"acme": ["key-acme"], "beta": ["key-beta"]}


def text_of(result: Any) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


def new_mw(url: str, api_keys: dict[str, list[str]] | None = None) -> Middleware:
    cfg = parse_config(PIPELINE)
    cfg.store.path = url
    if api_keys:
        cfg.server.api_keys = api_keys
    return Middleware(cfg, backend=ScriptedBackend(), autoload=False)


def http_client(url: str, key: str | None) -> Client:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return Client(streamable_http_client(url, http_client=create_mcp_http_client(headers=headers)))


@pytest.fixture
def tenanted(store_url: Callable[[], str]) -> Iterator[tuple[Middleware, str]]:
    mw = new_mw(store_url(), api_keys=KEYS)
    try:
        with serve_in_thread(mcp_http_app(McpAccess(mw))) as base:
            yield mw, base + "/mcp"
    finally:
        mw.close()


# --------------------------------------------------------------------------- stdio: the CLI spawned


@pytest.mark.slow
def test_stdio_cli_serves_one_tenant_with_the_local_model(tmp_path: Path, store_url: Callable[[], str]) -> None:
    """``persona-mw mcp --tenant acme`` (default config: the local model) spawned by the SDK's client."""
    store = store_url()
    config = tmp_path / "persona.yaml"
    default = (Path(__file__).parents[1] / "persona_mw" / "default.yaml").read_text()
    config.write_text(default + "\nserver:\n  api_keys:\n    acme: [key-acme]\n    beta: [key-beta]\n")
    env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "PERSONA_MW", "PATH", "HOME", "TRANSFORMERS"))}
    env["HF_HUB_OFFLINE"] = "1"
    params = StdioServerParameters(command=sys.executable, env=env, args=[
        "-m", "persona_mw.cli", "mcp", "--config", str(config), "--store", str(store), "--tenant", "acme"])

    async def main() -> None:
        async with Client(params, read_timeout_seconds=300) as c:
            assert {t.name for t in (await c.list_tools()).tools} == TOOLS
            templates = {t.uri_template for t in (await c.list_resource_templates()).resource_templates}
            assert templates == {"persona://users/{user}/profile", "persona://users/{user}/memories"}
            r = await c.call_tool("record_feedback", {"user": "ana", "kind": "stated",
                                                       "text": "Answer like a pirate."})
            assert not r.is_error, text_of(r)
            r = await c.call_tool("add_memory", {"user": "ana", "text": "I live in Lisbon", "kind": "fact"})
            assert not r.is_error, text_of(r)
            r = await c.call_tool("search_memories", {"user": "ana", "query": "where does ana live? Lisbon"})
            hits = r.structured_content["results"]
            assert any("Lisbon" in h["memory"]["text"] for h in hits), hits
            r = await c.call_tool("get_profile_summary", {"user": "ana"})
            summary = r.structured_content["summary"]
            assert "pirate" in summary and len(summary) < 2000, summary
            r = await c.call_tool("personalized_prompt", {
                "user": "ana", "messages": [{"role": "user", "content": "Where should I eat tonight?"}]})
            assert not r.is_error, text_of(r)
            prompt = "\n".join(m["content"] for m in r.structured_content["messages"])
            assert "pirate" in prompt and "Where should I eat tonight?" in prompt
            res = await c.read_resource("persona://users/ana/memories")
            assert "Lisbon" in res.contents[0].text
            r = await c.call_tool("search_memories", {"user": "ana", "query": "x", "k": 0})
            assert r.is_error and "k" in text_of(r) and "Traceback" not in text_of(r)

    asyncio.run(main())
    # the data is in acme's own store (as `serve` keeps it), not in the base file
    cfg = parse_config("{}")
    cfg.store.path = tenant_url(store, "acme")
    with Middleware(cfg, backend=ScriptedBackend(), autoload=False) as acme:
        assert any("Lisbon" in m.text for m in acme.memory.list("ana"))
    cfg.store.path = store
    with Middleware(cfg, backend=ScriptedBackend(), autoload=False) as base:
        assert not base.store.has_user("ana")


def test_stdio_needs_a_known_tenant_when_keys_are_configured(tmp_path: Path, capsys: Any,
                                                             store_url: Callable[[], str]) -> None:
    from persona_mw.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("server:\n  api_keys:\n    acme: [key-acme]\n")
    assert main(["mcp", "--config", str(config), "--store", store_url()]) == 2
    assert "--tenant" in capsys.readouterr().err
    assert main(["mcp", "--config", str(config), "--store", store_url(), "--tenant", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown tenant 'nope'" in err and "Traceback" not in err


# --------------------------------------------------------------------------- streamable HTTP


def test_http_keys_pick_the_tenant(tenanted: tuple[Middleware, str]) -> None:
    _, url = tenanted
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    hdrs = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    for key in (None, "wrong"):
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(url, json=init, headers={**hdrs, **auth})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    # server.max_body_bytes (1 MiB) holds here as in `serve`
    big = {**init, "params": {**init["params"], "pad": "x" * (2 << 20)}}
    r = httpx.post(url, json=big, headers={**hdrs, "Authorization": "Bearer key-acme"})
    assert r.status_code == 413, (r.status_code, r.text[:200])

    async def main() -> None:
        async with http_client(url, "key-acme") as acme, http_client(url, "key-beta") as beta:
            r = await acme.call_tool("add_memory", {"user": "ana", "text": "My cat is called Tortellini"})
            assert not r.is_error, text_of(r)
            r = await acme.call_tool("search_memories", {"user": "ana", "query": "cat Tortellini"})
            assert "Tortellini" in text_of(r)
            # beta has no user 'ana': its store is another file
            r = await beta.call_tool("search_memories", {"user": "ana", "query": "cat Tortellini"})
            assert r.is_error and "unknown user 'ana'" in text_of(r) and "Tortellini" not in text_of(r)
            from mcp.shared.exceptions import MCPError

            with pytest.raises(MCPError, match="unknown user"):
                await beta.read_resource("persona://users/ana/memories")
            res = await acme.read_resource("persona://users/ana/profile")
            assert json.loads(res.contents[0].text)["memories"] == 1

    asyncio.run(main())


# --------------------------------------------------------------------------- isolation probes


def test_isolation_probes_no_leaks(tenanted: tuple[Middleware, str]) -> None:
    """Each (tenant, user) holds canaries; every tool and resource, asked as every other (tenant, user),
    never shows them, with the probes running 16 at a time. Same user ids in both tenants on purpose."""
    _, url = tenanted
    owners = [(t, u) for t in ("acme", "beta") for u in ("ana", "ben", "cy")]
    canary = {o: f"zq{o[0]}{o[1]}canary" for o in owners}
    keys = {"acme": "key-acme", "beta": "key-beta"}
    probes = leaks = 0

    async def main() -> None:
        nonlocal probes, leaks
        async with http_client(url, keys["acme"]) as acme, http_client(url, keys["beta"]) as beta:
            client = {"acme": acme, "beta": beta}
            for (t, u), word in canary.items():
                c = client[t]
                assert not (await c.call_tool("record_feedback", {"user": u, "kind": "stated",
                                                                   "text": f"I like {word} style"})).is_error
                assert not (await c.call_tool("add_memory", {"user": u, "text": f"My code word is {word}",
                                                             "kind": "fact"})).is_error
            rng = random.Random(7)
            others_words = list(canary.values())
            calls: list[tuple[tuple[str, str], Callable[[Any], Awaitable[str]]]] = []
            for t, u in owners:
                for _ in range(10):
                    q = " ".join(rng.sample(others_words, 3)) + " code word style"

                    def probe_calls(u: str = u, q: str = q) -> list[Callable[[Any], Awaitable[str]]]:
                        async def search(c: Any) -> str:
                            return text_of(await c.call_tool("search_memories", {"user": u, "query": q, "k": 50}))

                        async def profile(c: Any) -> str:
                            return text_of(await c.call_tool("get_profile_summary", {"user": u}))

                        async def prompt(c: Any) -> str:
                            # the question (with others' canaries: the retrieval query) comes back as the
                            # user's own message; everything else in the prompt is what was added for u
                            r = await c.call_tool("personalized_prompt", {
                                "user": u, "messages": [{"role": "user", "content": q}]})
                            return "\n".join(m["content"].replace(q, "") for m in r.structured_content["messages"])

                        async def res_mem(c: Any) -> str:
                            return (await c.read_resource(f"persona://users/{u}/memories")).contents[0].text

                        async def res_prof(c: Any) -> str:
                            return (await c.read_resource(f"persona://users/{u}/profile")).contents[0].text

                        return [search, profile, prompt, res_mem, res_prof]

                    calls.extend(((t, u), f) for f in probe_calls())
            rng.shuffle(calls)
            gate = asyncio.Semaphore(16)  # concurrent, interleaving users and tenants on both sessions

            async def one(owner: tuple[str, str], call: Callable[[Any], Awaitable[str]]) -> None:
                nonlocal probes, leaks
                async with gate:
                    seen = await call(client[owner[0]])
                probes += 1
                assert canary[owner] in seen, (owner, seen[:300])  # the probe can see its own data
                leaks += sum(1 for other, word in canary.items() if other != owner and word in seen)

            await asyncio.gather(*(one(owner, call) for owner, call in calls))

    asyncio.run(main())
    assert probes >= 300 and leaks == 0, (probes, leaks)


# --------------------------------------------------------------------------- fuzzed arguments


def _junk(rng: random.Random, depth: int = 0) -> Any:
    makers: list[Callable[[], Any]] = [
        lambda: None, lambda: rng.randint(-10**12, 10**12), lambda: rng.random() * 1e6 - 5e5,
        lambda: rng.choice([True, False]),
        lambda: "".join(chr(rng.randrange(0, 0x2FFF)) for _ in range(rng.randrange(0, 40))),
        lambda: rng.choice(["ana", "", " ", "a" * 200, "../etc", "user:ana", "ana@context:x", "\x00", "ben"]),
    ]
    if depth < 2:
        makers += [
            lambda: [_junk(rng, depth + 1) for _ in range(rng.randrange(0, 4))],
            lambda: {rng.choice(["role", "content", "user", "x"]): _junk(rng, depth + 1)
                     for _ in range(rng.randrange(0, 3))},
            lambda: [{"role": rng.choice(["user", "system", "bot"]), "content": _junk(rng, depth + 1)}],
        ]
    return rng.choice(makers)()


def test_fuzzed_tool_arguments_are_tool_errors(store_url: Callable[[], str]) -> None:
    mw = new_mw(store_url())
    mw.feedback(kind="stated", user="ana", text="Short answers.")
    fields = ["user", "query", "k", "context", "text", "kind", "polarity", "prompt", "chosen", "rejected",
              "response", "rating", "before", "after", "messages", "groups"]
    rng = random.Random(21)
    errors = ok = 0

    async def main() -> None:
        nonlocal errors, ok
        async with Client(build_mcp_server(McpAccess(mw))) as c:
            for i in range(400):
                tool = rng.choice(sorted(TOOLS))
                args = {f: _junk(rng) for f in rng.sample(fields, rng.randrange(0, 6))}
                if rng.random() < 0.5:
                    args["user"] = rng.choice(["ana", "ben", _junk(rng)])
                r = await c.call_tool(tool, args)
                text = text_of(r)
                assert "Traceback" not in text and "internal error" not in text, (tool, args, text)
                if r.is_error:
                    errors += 1
                else:
                    ok += 1
            # still serving
            r = await c.call_tool("get_profile_summary", {"user": "ana"})
            assert "Short answers." in r.structured_content["summary"]

    try:
        asyncio.run(main())
    finally:
        mw.close()
    assert errors > 300, (errors, ok)


def test_tool_errors_name_the_field(store_url: Callable[[], str]) -> None:
    mw = new_mw(store_url())
    cases = [
        ("search_memories", {"user": "a b", "query": "x"}, "user"),
        ("search_memories", {"user": "ana"}, "query"),
        ("search_memories", {"user": "ana", "query": "x", "k": 1001}, "k"),
        ("add_memory", {"user": "ana", "text": "  "}, "text"),
        ("add_memory", {"user": "ana", "text": "x", "kind": "opinion"}, "kind"),
        ("record_feedback", {"user": "ana", "kind": "rating", "prompt": "p", "response": "r", "rating": 3}, "rating"),
        ("record_feedback", {"user": "ana", "kind": "choice", "prompt": "p", "chosen": "a"}, "rejected"),
        ("personalized_prompt", {"user": "ana", "messages": []}, "messages"),
        ("personalized_prompt", {"user": "ana", "messages": [{"role": "user", "content": "x"}], "context": "a b"},
         "context"),
        ("get_profile_summary", {"user": "nobody"}, "user"),
    ]

    async def main() -> None:
        async with Client(build_mcp_server(McpAccess(mw))) as c:
            for tool, args, field in cases:
                r = await c.call_tool(tool, args)
                assert r.is_error and field in text_of(r) and "Traceback" not in text_of(r), (tool, args, text_of(r))

    try:
        asyncio.run(main())
    finally:
        mw.close()


def test_cli_http_transport_with_api_keys(store_url: Callable[[], str]) -> None:
    """``persona-mw mcp --transport http --api-key ...`` as a user runs it: keys checked, tenants apart."""
    import socket
    import subprocess
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "persona_mw.cli", "mcp", "--transport", "http", "--port", str(port),
         "--store", url_ := store_url(), "--api-key", "acme=key-acme", "--api-key", "beta=key-beta"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.post(url, json={}).status_code == 401:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the MCP HTTP server did not start"
            time.sleep(0.2)

        async def main() -> None:
            async with http_client(url, "key-acme") as acme, http_client(url, "key-beta") as beta:
                assert not (await acme.call_tool("add_memory", {"user": "dee", "text": "I grow tomatoes",
                                                                "kind": "fact"})).is_error
                r = await acme.call_tool("search_memories", {"user": "dee", "query": "tomatoes"})
                assert "tomatoes" in text_of(r)
                r = await beta.call_tool("search_memories", {"user": "dee", "query": "tomatoes"})
                assert r.is_error and "tomatoes" not in text_of(r)

        asyncio.run(main())
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    with open_store(tenant_url(url_, "acme")) as acme_store:  # acme's data went to acme's own store
        assert acme_store.has_user("dee")
    with open_store(url_) as base_store:
        assert not base_store.has_user("dee")
