"""The lora plugin's scale path (issue #18): turns routed to per-scope adapters on a vLLM multi-LoRA
server through the litellm backend. The server is a fake of vLLM's API on loopback (GET /v1/models,
POST /v1/chat/completions echoing the model it got, vLLM's 404 body for an unknown model); persona-mw
runs real turns with the real litellm backend and the real SQLite store. Adapter state is written the
way the plugin stores it (no training here: that is tests/plugins/test_lora.py)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from persona_mw.plugins._lora_remote import RemoteRouter, ServedModels, models_url, served_name

pytest.importorskip("litellm")
pytest.importorskip("fastapi")
from fastapi import FastAPI, Request  # noqa: E402  (module level: FastAPI resolves the annotations here)
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


class FakeVLLM:
    """What vLLM started with ``--enable-lora --lora-modules NAME=DIR ...`` answers (the parts we use)."""

    def __init__(self) -> None:
        self.loras: set[str] = set()
        self.received: list[str] = []
        self.lists = 0
        self.models_status = 200

    def app(self) -> Any:
        app = FastAPI()

        @app.get("/v1/models")
        def models() -> Any:
            self.lists += 1
            if self.models_status != 200:
                return JSONResponse(status_code=self.models_status, content={"object": "error", "message": "busy"})
            data = [{"id": BASE, "object": "model", "owned_by": "vllm", "root": BASE, "parent": None}]
            data += [{"id": n, "object": "model", "owned_by": "vllm", "root": f"/srv/{n}", "parent": BASE}
                     for n in sorted(self.loras)]
            return {"object": "list", "data": data}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            model = body.get("model")
            self.received.append(model)
            if model != BASE and model not in self.loras:
                return JSONResponse(status_code=404, content={
                    "object": "error", "message": f"The model `{model}` does not exist.", "type": "NotFoundError",
                    "param": None, "code": 404})
            text = f"served by {model}"
            if body.get("stream"):
                def events() -> Iterator[str]:
                    for piece, done in ((text[:6], None), (text[6:], None), ("", "stop")):
                        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
                                 "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": done}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"

                return StreamingResponse(events(), media_type="text/event-stream")
            return {"id": "c1", "object": "chat.completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}

        return app


@pytest.fixture()
def vllm() -> Iterator[tuple[FakeVLLM, str]]:
    from persona_mw.server import serve_in_thread

    fake = FakeVLLM()
    with serve_in_thread(fake.app()) as url:
        yield fake, url


def remote_mw(make_mw: Any, url: str, root: Path, ttl: float = 30.0, db: str | None = None) -> Any:
    from persona_mw.adapters.litellm import LiteLLMBackend

    backend = LiteLLMBackend(f"openai/{BASE}", api_base=url + "/v1", api_key="x", max_retries=0)
    return make_mw(f"pipeline: [{{use: lora, serve: remote, models_ttl: {ttl}, dir: '{root}'}}]\n", backend=backend,
                   db=db)


def give_adapter(mw: Any, node: str, evidence: int, users: list[str], adapter: Any = None) -> str:
    """The plugin's stored state of a trained node (profile ``extra.lora``; the file when given)."""
    plugin = mw.plugin("lora")
    rel = plugin.files.write(node, 1, adapter) if adapter is not None else f"nodes/x/{node}/v1.safetensors"
    entry = {"file": rel, "model": BASE, "version": 1, "evidence": evidence, "events": {"count": evidence},
             "users": users, "trained_at": time.time(), "r": 2}
    mw.profiles.update(node, lambda p: p.extra.update(lora=dict(entry)))
    return served_name(node, entry)


def trace_text(reply: Any) -> str:
    return json.dumps(reply.trace.model_dump(mode="json"))


def test_names_are_valid_vllm_module_names_stable_and_hide_the_user_id() -> None:
    entry = {"version": 3, "trained_at": 1.5, "file": "nodes/a/v3.safetensors"}
    name = served_name("user:ana@context:work", entry)
    assert name == served_name("user:ana@context:work", dict(entry)) and name.startswith("persona-user_context-")
    assert "ana" not in name and all(c.isalnum() or c in "-_" for c in name) and "-v3-" in name
    assert served_name("user:ana@context:work", {**entry, "trained_at": 2.0}) != name  # retrained: a new name
    assert served_name("user:bob@context:work", entry) != name
    assert models_url("http://h:8000/v1/") == "http://h:8000/v1/models" == models_url("http://h:8000")


def test_each_user_is_routed_to_their_own_adapter_a_new_member_to_the_group_and_the_merge_when_served(
        make_mw: Any, vllm: tuple[FakeVLLM, str], tmp_path: Path) -> None:
    fake, url = vllm
    mw = remote_mw(make_mw, url, tmp_path / "adapters")
    for user in ("ana", "bob"):
        mw.join(user, "shorties")
    ana = give_adapter(mw, "user:ana", 3, ["ana"])
    group = give_adapter(mw, "group:shorties", 6, ["ana", "dan"])
    dan = give_adapter(mw, "user:dan", 9, ["dan"])  # not in this group, not in anyone's scope but his
    fake.loras = {ana, group, dan}

    replies = {u: mw.chat(user=u, messages="hi") for u in ("ana", "bob", "cy")}
    assert fake.received == [ana, group, BASE]  # bob (no adapter) rides on the group; cy has none
    assert replies["ana"].text == f"served by {ana}" and replies["bob"].text == f"served by {group}"
    assert "user:ana's adapter" in trace_text(replies["ana"]) and "not served: persona-mix-" in trace_text(replies["ana"])
    assert "group:shorties's adapter (weight 1.00)" in trace_text(replies["bob"])
    assert "no adapter in scope: base model" in trace_text(replies["cy"])
    assert ana not in fake.received[1:] and dan not in fake.received

    mixes = json.loads((tmp_path / "adapters" / "mixes.json").read_text())  # the merge ana's turns want
    (mix,) = mixes
    assert [p[0] for p in mixes[mix]["parts"]] == ["user:ana", "group:shorties"]
    fake.loras.add(mix)
    mw.plugin("lora").router.models.invalidate()
    reply = mw.chat(user="ana", messages="hi")
    assert fake.received[-1] == mix and "the scope's merged adapter" in trace_text(reply)
    assert mw.chat(user="bob", messages="hi").text == f"served by {group}"  # not ana's merge


def test_a_404_refreshes_the_list_and_retries_once_with_the_next_served_name(
        make_mw: Any, vllm: tuple[FakeVLLM, str], tmp_path: Path) -> None:
    fake, url = vllm
    mw = remote_mw(make_mw, url, tmp_path / "adapters")
    mw.join("ana", "shorties")
    ana = give_adapter(mw, "user:ana", 3, ["ana"])
    group = give_adapter(mw, "group:shorties", 6, ["ana"])
    fake.loras = {ana, group}
    assert mw.chat(user="ana", messages="hi").text == f"served by {ana}"
    fake.loras = {group}  # the operator restarted vLLM without ana's adapter; the cached list still has it
    reply = mw.chat(user="ana", messages="hi")
    assert fake.received == [ana, ana, group] and reply.text == f"served by {group}"
    assert reply.trace.flags == [f"lora remote: the server does not have {ana} (404); retried with {group}"]
    assert fake.lists == 2  # the 404 refreshed the list

    fake.loras = set()  # streaming too, down to the base model
    fake.received.clear()
    text = "".join(c.delta for c in mw.stream(user="ana", messages="hi"))
    assert fake.received == [group, BASE] and text == f"served by {BASE}"


def test_a_server_whose_list_fails_or_is_empty_or_that_is_down_gives_the_base_model(
        make_mw: Any, vllm: tuple[FakeVLLM, str], tmp_path: Path) -> None:
    import asyncio

    fake, url = vllm
    mw = remote_mw(make_mw, url, tmp_path / "adapters", ttl=0.001)
    ana = give_adapter(mw, "user:ana", 3, ["ana"])
    fake.models_status = 503
    reply = mw.chat(user="ana", messages="hi")
    assert fake.received == [BASE] and "the server's model list is unavailable (HTTPStatusError" in trace_text(reply)
    fake.models_status = 200  # lists only the base model
    reply = mw.chat(user="ana", messages="hi")
    assert fake.received == [BASE, BASE] and f"serves none of the scope's adapters ({ana})" in trace_text(reply)

    from persona_mw.types import ChatRequest, Message, Turn

    with socket_closed() as dead:  # nothing listens there: the list fails fast, the turn is not failed
        router = RemoteRouter(tmp_path, ServedModels(models_url(dead), timeout=1.0), mw.graph)
        req = ChatRequest(user="ana", messages=[Message(role="user", content="hi")])
        scope, profiles = mw.graph.resolve(req)
        turn = Turn(request=req, scope=scope, profiles=profiles)
        assert asyncio.run(router.decoding(turn)) is None
        assert "model list is unavailable (ConnectError" in turn._notes[-1]


class socket_closed:
    """A loopback URL on a port nothing listens on."""

    def __enter__(self) -> str:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return f"http://127.0.0.1:{port}/v1"

    def __exit__(self, *exc: Any) -> None:
        return None


def test_export_all_writes_peft_folders_and_forget_deletes_the_users_and_stops_routing_to_them(
        make_mw: Any, vllm: tuple[FakeVLLM, str], tmp_path: Path, capsys: Any) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from persona_mw.plugins import _lora
    from persona_mw.plugins.lora import cmd_lora

    def toy(seed: int) -> Any:
        g = torch.Generator().manual_seed(seed)
        return _lora.Adapter({"model.layers.0.self_attn.q_proj": (torch.randn(2, 6, generator=g),
                                                                   torch.randn(5, 2, generator=g))},
                             r=2, alpha=4.0, targets=("q_proj",))

    fake, url = vllm
    root, db = tmp_path / "adapters", str(tmp_path / "s.db")
    mw = remote_mw(make_mw, url, root, db=db)
    for user in ("ana", "bob"):
        mw.join(user, "shorties")
    ana = give_adapter(mw, "user:ana", 3, ["ana"], toy(1))
    group = give_adapter(mw, "group:shorties", 6, ["bob"], toy(2))  # trained on bob's events only
    mw.chat(user="ana", messages="hi")  # records the merge ana's turns want
    mw.close()

    out = root / "served"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"backend: {{type: litellm, model: 'openai/{BASE}', api_base: '{url}/v1'}}\n"
                   f"pipeline: [{{use: lora, serve: remote, dir: '{root}'}}]\n")
    args = argparse.Namespace(node=None, all=True, merged=True, out=str(out), config=str(cfg), store=db)
    assert cmd_lora(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    names = [e["name"] for e in manifest["adapters"]]
    assert set(names[:2]) == {ana, group} and names[2].startswith("persona-mix-") and len(names) == 3
    printed = capsys.readouterr()
    assert printed.out.split() == ["--lora-modules", *[f"{n}={out / n}" for n in names]]
    assert "--max-lora-rank 8" in printed.err
    for n in names:
        cfg_json = json.loads((out / n / "adapter_config.json").read_text())
        assert cfg_json["base_model_name_or_path"] == BASE and (out / n / "adapter_model.safetensors").exists()

    fake.loras = set(names)
    mw = remote_mw(make_mw, url, root, db=db)
    fake.received.clear()
    assert mw.chat(user="ana", messages="hi").text == f"served by {names[2]}"
    mw.forget("ana")
    assert not (out / ana).exists() and not (out / names[2]).exists() and (out / group).exists()
    assert [e["name"] for e in json.loads((out / "manifest.json").read_text())["adapters"]] == [group]
    assert json.loads((root / "mixes.json").read_text()) == {}
    mw.chat(user="ana", messages="hi")  # the server still has her old adapters loaded: never asked for
    mw.chat(user="bob", messages="hi")
    assert fake.received == [names[2], BASE, group]


def test_serve_remote_needs_a_backend_with_an_api_base_and_bad_values_name_the_field(make_mw: Any,
                                                                                     tmp_path: Path) -> None:
    from persona_mw.errors import ConfigError

    with pytest.raises(ConfigError, match="serve: remote asks the main backend's server .* has no api_base"):
        make_mw(f"pipeline: [{{use: lora, serve: remote, dir: '{tmp_path}'}}]\n")  # the scripted backend
    with pytest.raises(ConfigError, match="serve"):
        make_mw(f"pipeline: [{{use: lora, serve: vllm, dir: '{tmp_path}'}}]\n")
    with pytest.raises(ConfigError, match="models_ttl"):
        make_mw(f"pipeline: [{{use: lora, serve: remote, models_ttl: 0, dir: '{tmp_path}'}}]\n")


def test_concurrent_turns_of_two_users_each_get_their_own_route(make_mw: Any, vllm: tuple[FakeVLLM, str],
                                                                tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    fake, url = vllm
    mw = remote_mw(make_mw, url, tmp_path / "adapters", ttl=0.001)  # the list is refetched nearly every turn
    for user in ("ana", "bob"):
        mw.join(user, "shorties")
    ana = give_adapter(mw, "user:ana", 3, ["ana"])
    bob = give_adapter(mw, "user:bob", 3, ["bob"])
    group = give_adapter(mw, "group:shorties", 6, ["ana", "bob"])
    fake.loras = {ana, bob, group}
    users = ["ana", "bob"] * 8
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda u: mw.chat(user=u, messages=f"hi {u}").text, users))
    assert texts == [f"served by {ana if u == 'ana' else bob}" for u in users]
