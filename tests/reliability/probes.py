"""Isolation probes shared by the test suite (a few hundred) and the soak run (10,000+).

A world of users in the open API and in three tenants, all with near-identical content (stated
preferences, choices, chat turns), each piece carrying a marker unique to its owner; the same user
ids exist in every tenant. Randomized requests go through every entry point (the data API and the
console's pages included), and the backend
echoes its whole prompt, so anything of another user or tenant that reached a prompt, a response,
a trace, a profile or an export shows up as a foreign marker: a leak.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from persona_mw import Middleware, parse_config
from persona_mw.server import create_app, serve_in_thread
from persona_mw.testing import ScriptedBackend
from persona_mw.types import Message

def _has_memory() -> bool:
    try:
        from persona_mw.plugins.memory import MemoryPlugin  # noqa: F401
    except ImportError:
        return False
    return True


MEMORY = _has_memory()
OPEN = "-"  # the tenant name of the open (keyless) API and of the Python API
TENANTS = ("acme", "globex", "initech")
ENTRY_POINTS = ("python", "python_stream", "prepare_complete", "http_open", "http_stream", "openai_tenant",
                "openai_wrap", "messages_tenant", "messages_stream", "responses_tenant", "responses_stream")
TENANT_ENTRIES = ("openai_tenant", "messages_tenant", "responses_tenant")


def echo_prompt(messages: list[Message]) -> str:
    """The whole prompt back, role by role: what the model saw is what the caller gets."""
    return "\n".join(f"[{m.role}] {m.text}" for m in messages)


_MARK = re.compile(r"mk[0-9a-f]{12}")


def marker() -> str:
    return "mk" + secrets.token_hex(6)


def _config(db: str, groups: dict[str, tuple[str, list[str]]]) -> Any:
    lines = ["pipeline:", "  - use: stated", "    placement: user_suffix", "    budget_tokens: 2000",
             "  - use: profile", "    features: {embedding: false, ngram_dim: 256}"]
    if MEMORY:
        # long-term memory over each user's own turns (BM25 only: no model download in the probes)
        lines += ["  - use: memory", "    embedder: false", "    mode: bm25", "    store_turns: true"]
    if groups:
        lines += ["graph:", "  groups:"]
    for gid, (mk, members) in groups.items():
        lines.append(f"    {gid}: {{stated: [\"Prefer the team style {mk}\"], members: [{', '.join(members)}]}}")
    cfg = parse_config("\n".join(lines) + "\n")
    cfg.store.path = db
    return cfg


@dataclass
class World:
    root: Path
    users: int = 12
    seed: int = 0
    # name -> store URL (default: a SQLite file ``root/<name>.db``); Postgres: a schema per name
    store_url: Any = None
    rng: random.Random = field(init=False)
    # (tenant, user) -> markers they own; group markers by (tenant, group)
    owned: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    group_marks: dict[tuple[str, str], str] = field(default_factory=dict)
    stated_marks: dict[tuple[str, str], str] = field(default_factory=dict)
    members: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    traces: dict[str, list[str]] = field(default_factory=dict)  # tenant -> trace ids
    memory_ids: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (tenant, user) -> memory ids seen
    probes: int = 0
    leaks: list[str] = field(default_factory=list)
    controls_failed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._all: set[str] = set()
        self.rng = random.Random(self.seed)
        self.user_ids = [f"user{i:03d}" for i in range(self.users)]

    # -- building --------------------------------------------------------------------------------

    def _groups(self, tenant: str) -> dict[str, tuple[str, list[str]]]:
        out = {}
        for g in ("red", "blue"):
            mk = marker()
            self._all.add(mk)
            self.group_marks[(tenant, f"group:{g}")] = mk
            members = [u for i, u in enumerate(self.user_ids) if (i % 3 == 0) == (g == "red") and i % 2 == 0]
            for u in members:
                self.members.setdefault((tenant, u), set()).add(f"group:{g}")
            out[g] = (mk, members)
        return out

    def allowed(self, tenant: str, user: str) -> set[str]:
        own = set(self.owned.get((tenant, user), set()))
        own |= {self.group_marks[(tenant, g)] for g in self.members.get((tenant, user), set())}
        return own

    def everything(self) -> set[str]:
        return {m for ms in self.owned.values() for m in ms} | set(self.group_marks.values())

    @property
    def everything_set(self) -> set[str]:
        return self._all

    def own(self, tenant: str, user: str) -> str:
        mk = marker()
        self.owned.setdefault((tenant, user), set()).add(mk)
        self._all.add(mk)
        return mk

    def seed_events(self, tenant: str, user: str) -> list[dict[str, Any]]:
        """Near-identical events for everyone: only the markers differ."""
        self.stated_marks[(tenant, user)] = mine = self.own(tenant, user)
        return [
            {"kind": "stated", "user": user, "text": f"I like answers about green tea, ref {mine}"},
            {"kind": "stated", "user": user, "text": "Answer in two short sentences."},
            {"kind": "choice", "user": user, "prompt": f"tea? {self.own(tenant, user)}",
             "chosen": f"Green tea is lovely {self.own(tenant, user)}", "rejected": [f"Coffee {self.own(tenant, user)}"]},
            {"kind": "rating", "user": user, "prompt": "tea?", "response": f"Oolong {self.own(tenant, user)}",
             "rating": 0.8},
        ]

    @contextlib.contextmanager
    def running(self) -> Iterator[World]:
        """Start the open middleware + server, the tenant server, and an echoing upstream for wrap()."""
        backend = ScriptedBackend(script=echo_prompt)
        where = self.store_url or (lambda name: str(self.root / f"{name}.db"))
        self.open_mw = Middleware(_config(where("open"), self._groups(OPEN)), backend=backend,
                                  autoload=False)
        self.keys = {t: f"key-{t}-{secrets.token_hex(8)}" for t in TENANTS}
        tenant_base = Middleware(_config(where("tenants"), {}), backend=backend, autoload=False)
        # every tenant gets the same declared groups but its own markers
        tenant_groups = {t: self._groups(t) for t in TENANTS}
        with contextlib.ExitStack() as stack:
            stack.callback(self.open_mw.close)
            stack.callback(tenant_base.close)
            self.open_url = stack.enter_context(serve_in_thread(create_app(self.open_mw)))
            app = create_app(tenant_base, api_keys={t: [k] for t, k in self.keys.items()})
            self.tenant_url = stack.enter_context(serve_in_thread(app))
            self.upstream_url = stack.enter_context(serve_in_thread(_echo_upstream(backend)))
            import httpx
            import openai

            self.http = stack.enter_context(httpx.Client(timeout=30))
            self.clients = {t: openai.OpenAI(base_url=self.tenant_url + "/v1", api_key=k, max_retries=0)
                            for t, k in self.keys.items()}
            from persona_mw.integrations.openai import wrap

            self.wrapped = wrap(openai.OpenAI(base_url=self.upstream_url + "/v1", api_key="unused", max_retries=0),
                                self.open_mw)
            for u in self.user_ids:
                for ev in self.seed_events(OPEN, u):
                    self.open_mw.feedback(ev)
            for t in TENANTS:
                tenant_mw = app.state.tenants.middleware(t)
                for gid, (mk, members) in tenant_groups[t].items():
                    tenant_mw.state(f"Prefer the team style {mk}", group=gid)
                    for u in members:
                        from persona_mw.store import Edge

                        tenant_mw.store.add_edge(Edge(src=f"user:{u}", dst=f"group:{gid}", kind="member"))
                for u in self.user_ids:
                    for ev in self.seed_events(t, u):
                        r = self.http.post(self.tenant_url + "/v1/feedback", json=ev,
                                           headers={"Authorization": f"Bearer {self.keys[t]}"})
                        assert r.status_code == 201, r.text
            self.tenant_app = app
            yield self

    # -- probing ---------------------------------------------------------------------------------

    def check(self, tenant: str, user: str, text: str, where: str) -> None:
        self.probes += 1
        # Every marker in the text must be one the asker may see (markers are found by their shape,
        # so the check costs the same whatever the number of markers handed out).
        allowed = self.allowed(tenant, user)
        known = self.everything_set
        hits = [m for m in set(_MARK.findall(text)) if m in known and m not in allowed]
        if hits:
            self.leaks.append(f"{where}: {tenant}/{user} saw {hits[:3]}")

    def ask(self, entry: str, tenant: str, user: str) -> tuple[str, str | None]:
        """One chat through ``entry``; returns (the echoed prompt, trace id)."""
        content = f"What about tea? turn {self.own(tenant, user)}"
        msgs = [{"role": "user", "content": content}]
        if entry == "python":
            r = self.open_mw.chat(user=user, messages=msgs)
            return r.text, r.trace.id
        if entry == "python_stream":
            chunks = list(self.open_mw.stream(user=user, messages=msgs))
            return "".join(c.delta or "" for c in chunks if not c.done), chunks[-1].trace_id
        if entry == "prepare_complete":
            turn = self.open_mw.prepare(user=user, messages=msgs)
            answer = echo_prompt(turn.messages)
            r = self.open_mw.complete(turn, answer)
            return r.text, r.trace.id
        if entry in ("http_open", "http_stream"):
            body = {"model": "m", "user": user, "messages": msgs, "stream": entry == "http_stream"}
            r = self.http.post(self.open_url + "/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            if entry == "http_open":
                return r.json()["choices"][0]["message"]["content"], r.headers.get("x-persona-trace")
            text = ""
            for line in r.text.splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for ch in json.loads(line[6:]).get("choices", []):
                        text += ch.get("delta", {}).get("content") or ""
            return text, r.headers.get("x-persona-trace")
        if entry == "openai_tenant":
            raw = self.clients[tenant].chat.completions.with_raw_response.create(model="m", messages=msgs, user=user)
            return raw.parse().choices[0].message.content or "", raw.headers.get("x-persona-trace")
        if entry == "openai_wrap":
            out = self.wrapped.chat.completions.create(model="m", messages=msgs, user=user)
            return out.choices[0].message.content or "", None
        return self.ask_format(entry, tenant, user, msgs)

    def ask_format(self, entry: str, tenant: str, user: str, msgs: list[dict[str, str]]) -> tuple[str, str | None]:
        """Anthropic Messages / OpenAI Responses: the tenant's key (``*_tenant``) or the open server streamed."""
        base, headers = (self.tenant_url, self._auth(tenant)) if tenant != OPEN else (self.open_url, {})
        stream = entry.endswith("_stream")
        if entry.startswith("messages"):
            body: dict[str, Any] = {"max_tokens": 64, "messages": msgs, "metadata": {"user_id": user}, "stream": stream}
            r = self.http.post(base + "/v1/messages", json=body, headers=headers)
            assert r.status_code == 200, r.text
            if not stream:
                return r.json()["content"][0]["text"], r.headers.get("x-persona-trace-id")
            deltas = [json.loads(ln[6:]).get("delta", {}) for ln in r.text.splitlines() if ln.startswith("data: ")]
            return "".join(d.get("text") or "" for d in deltas), r.headers.get("x-persona-trace-id")
        if entry.startswith("responses"):
            r = self.http.post(base + "/v1/responses", json={"input": msgs, "user": user, "stream": stream},
                               headers=headers)
            assert r.status_code == 200, r.text
            if not stream:
                return r.json()["output"][0]["content"][0]["text"], r.headers.get("x-persona-trace-id")
            events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: ")]
            return "".join(e.get("delta") or "" for e in events if e["type"].endswith(".delta")), \
                r.headers.get("x-persona-trace-id")
        raise ValueError(entry)

    def probe(self) -> None:
        entry = self.rng.choice(ENTRY_POINTS)
        tenant = self.rng.choice(TENANTS) if entry in TENANT_ENTRIES else OPEN
        user = self.rng.choice(self.user_ids)
        text, trace_id = self.ask(entry, tenant, user)
        self.check(tenant, user, text, f"{entry} response")
        # Positive control: the user's own stated marker must be in their prompt, or the probe proves nothing.
        if self.stated_marks[(tenant, user)] not in text:
            self.controls_failed.append(f"{entry}: {tenant}/{user} prompt lacks their own preference")
        if trace_id:
            self.traces.setdefault(tenant, []).append(trace_id)
        roll = self.rng.random()
        if roll < 0.15 and trace_id:
            self.check(tenant, user, json.dumps(self.read_trace(tenant, trace_id)), f"{entry} trace")
        elif roll < 0.25:
            self.check(tenant, user, json.dumps(self.read_user(tenant, user, "profile")), "profile")
        elif roll < 0.32:
            self.check(tenant, user, json.dumps(self.read_user(tenant, user, "export")), "export")
        elif roll < 0.40:
            self.cross_tenant_trace(tenant)
        elif roll < 0.50:
            what = self.rng.choice(("memories", "search", "traces"))
            self.check(tenant, user, json.dumps(self.read_data(tenant, user, what)), f"GET {what}")
        elif roll < 0.60:
            page = self.console_page(tenant, user)
            self.check(tenant, user, page, "console user page")
            if self.stated_marks[(tenant, user)] not in page:  # the page shows the user's own data
                self.controls_failed.append(f"console: {tenant}/{user} page lacks their own preference")
        elif roll < 0.66:
            self.cross_memory(tenant, user)

    def _auth(self, tenant: str) -> dict[str, str]:
        return {} if tenant == OPEN else {"Authorization": f"Bearer {self.keys[tenant]}"}

    def _base(self, tenant: str) -> str:
        return self.open_url if tenant == OPEN else self.tenant_url

    def read_trace(self, tenant: str, trace_id: str) -> Any:
        r = self.http.get(f"{self._base(tenant)}/v1/traces/{trace_id}", headers=self._auth(tenant))
        assert r.status_code == 200, r.text
        return r.json()

    def read_user(self, tenant: str, user: str, what: str) -> Any:
        if tenant == OPEN and self.rng.random() < 0.5:
            return self.open_mw.profile(user) if what == "profile" else self.open_mw.export_user(user)
        path = f"/v1/users/{user}/profile" if what == "profile" else f"/v1/users/{user}"
        r = self.http.get(self._base(tenant) + path, headers=self._auth(tenant))
        assert r.status_code == 200, r.text
        return r.json()

    def read_data(self, tenant: str, user: str, what: str) -> Any:
        """The data API (persona_mw.api_data): the user's memories, a search of them, their traces."""
        path = {"memories": f"/v1/users/{user}/memories?include_superseded=true",
                "search": f"/v1/users/{user}/memories/search?q=green+tea+answers&k=50&mode=bm25",
                "traces": f"/v1/users/{user}/traces?limit=50"}[what]
        r = self.http.get(self._base(tenant) + path, headers=self._auth(tenant))
        assert r.status_code == 200, r.text
        if what == "memories":
            self.memory_ids.setdefault((tenant, user), set()).update(m["id"] for m in r.json()["data"])
        return r.json()

    def console_page(self, tenant: str, user: str) -> str:
        """The console's user page, logged in with the tenant's key (its cookie) or open."""
        cookies = {} if tenant == OPEN else {"persona_console_key": self.keys[tenant]}
        r = self.http.get(f"{self._base(tenant)}/console/users/{user}", cookies=cookies)
        assert r.status_code == 200, r.text[:300]
        users = self.http.get(f"{self._base(tenant)}/console/?q=user", cookies=cookies)
        assert users.status_code == 200 and "/console/login" not in str(users.url)
        return r.text + users.text

    def cross_memory(self, tenant: str, user: str) -> None:
        """A memory id of another user (same tenant) or of another tenant, under this user's path: 404."""
        theirs = [(t, u, mid) for (t, u), ids in self.memory_ids.items() for mid in ids
                  if (t, u) != (tenant, user) and (t == tenant or tenant != OPEN)]
        if not theirs:
            return
        t, u, mid = self.rng.choice(theirs)
        base, auth = self._base(tenant), self._auth(tenant)
        self.probes += 1
        r = self.http.patch(f"{base}/v1/users/{user}/memories/{mid}", json={"pinned": True}, headers=auth)
        if r.status_code != 404:  # (the 404 names the id it was asked for, nothing of the memory)
            self.leaks.append(f"{tenant}/{user} edited memory {mid} of {t}/{u}: {r.status_code}")
        self.check(tenant, user, r.text, "cross-user memory edit")
        if tenant != OPEN and t != tenant:  # the other tenant's own user id here is someone else
            r = self.http.delete(f"{base}/v1/users/{u}/memories/{mid}", headers=auth)
            if r.status_code != 404:
                self.leaks.append(f"tenant {tenant} deleted memory {mid} of {t}/{u}: {r.status_code}")

    def cross_tenant_trace(self, tenant: str) -> None:
        """Another tenant's (or the open API's) trace id must be unknown here: 404, not its content."""
        others = [t for t in self.traces if t != tenant and self.traces[t]]
        if not others or tenant == OPEN:
            return
        other = self.rng.choice(others)
        trace_id = self.rng.choice(self.traces[other])
        r = self.http.get(f"{self.tenant_url}/v1/traces/{trace_id}", headers=self._auth(tenant))
        self.probes += 1
        if r.status_code != 404:
            self.leaks.append(f"tenant {tenant} read trace {trace_id} of {other}: {r.status_code}")


def _echo_upstream(backend: ScriptedBackend) -> Any:
    """A bare OpenAI-compatible endpoint answering with the echoed prompt (the wrapped client's LLM)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Request) -> Any:
        body = await request.json()
        text = echo_prompt([Message.model_validate(m) for m in body["messages"]])
        return JSONResponse({"id": "up", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def run_probes(root: Path, n: int, users: int = 12, seed: int = 0, store_url: Any = None) -> dict[str, Any]:
    with World(root, users=users, seed=seed, store_url=store_url).running() as world:
        while world.probes < n:
            world.probe()
        world.open_mw.drain()
        return {"probes": world.probes, "leaks": world.leaks, "controls_failed": world.controls_failed}
