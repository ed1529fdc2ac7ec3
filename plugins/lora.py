"""Per-node LoRA adapters trained with DPO on the node's feedback, mixed by the graph's weights.

Training: each choice / edit / rating event counts toward the nodes it belongs to (the user, the
user in its context, the user's groups, the context). When a node has ``every`` new events, a
background job (``ctx.schedule``; ``background: false`` runs it inline) trains the node's adapter
from its pairs (choices: chosen over each rejected; edits: edited over original; ratings: higher
over lower rated answer to the same prompt), group and context nodes from their members' pooled
events, within ``job_seconds`` (``persona_mw.plugins._lora``: DPO written out, on the top
``top_layers`` decoder layers). The job is durable in the sense that the event log is the
source: a job lost to a crash is redone by the next event of that node (``pending`` stays counted).

Storage: ``<dir>/nodes/<node>/v<version>.safetensors`` (PEFT key names) and ``node.json``; the
profile keeps ``extra["lora"]`` = version, file, model, event range, training stats (exported with
the profile: the metadata, not the weights). Forget deletes the user's node folders, every group
adapter trained on their events and every merged adapter that included any of them.

Residual jobs (``residual: true``; HYDRA's per-user heads over a shared base): a user's job trains over
what their groups' adapters serve a member without one (``parents_adapter``), applied frozen, and stores
the exact sum, base then residual (rank ``r`` more than the base). Its record names the base's versions
(``base``); its folder's ``node.json`` names the users the base learned from (``learned_from``; not in
the profile, which the user may export), so forgetting any of them deletes this adapter as well; the
user's waiting events stay counted and the next job retrains over what is left. A base that changes
while the job runs (a retrain or a forget) drops the job's result.

Serving (``mixing: merge``, the default): the adapters of the scope's nodes are merged exactly
(``sum w_n Delta W_n``; ``w_n`` the scope's shrinkage with each node's evidence the events its adapter
learned from, renormalized over nodes with an adapter; see ``scope_adapter``), cached per
scope in memory and as ``<dir>/merged/<key>.safetensors`` with a sidecar naming its nodes; a new
version of a node makes a new key and removes the stale merges. A missing or unreadable adapter
file is left out (its weight goes to the rest of the scope: the parents) with a trace note; the
turn never fails for it. No adapter in scope: no hook, the base model unchanged.

Serving (``mixing: logits``): each node with an adapter gets a prompt stream of its own (the answer's
prompt, its rows decoded with that node's adapter: ``Decoding.stream_adapters``), and the answer's
next-token scores are ``sum_n w_n log_softmax(stream_n)`` (``mix_logits``; MOD / Personalized Soups at
decoding time), with the same ``w_n`` as the merge. A scope with one adapter uses it directly.

Serving (``serve: remote``, ``persona_mw.plugins._lora_remote``): on the litellm backend, each turn asks
the backend's server (vLLM multi-LoRA) for the scope's adapter by its served name (the merge, else the
nodes by weight, else the base model); ``persona-mw lora export --all`` writes the folders and vLLM's
``--lora-modules`` arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from persona_mw import hookimpl
from persona_mw.context import PluginContext
from persona_mw.errors import PersonaError, RequestError
from persona_mw.nodes import context_node, group_node, kind_of, user_context_node, user_node
from persona_mw.plugins._steering import chat_texts, check_white_box, event_pairs, require_white_box
from persona_mw.types import ChoiceFeedback, Decoding, EditFeedback, Feedback, RatingFeedback, Turn

log = logging.getLogger("persona_mw.plugins.lora")

KEY = "lora"
NodeKind = Literal["user", "user_context", "group", "context"]
NODE_KINDS: tuple[NodeKind, ...] = ("user", "user_context", "group", "context")
LEARN_KINDS = ("choice", "edit", "rating")


def rating_pairs(events: list[Any], gap: float = 0.25) -> list[tuple[str, str, str]]:
    """(prompt, higher rated, lower rated) for answers to the same prompt rated ``gap`` apart."""
    by: dict[str, list[tuple[float, str]]] = {}
    for ev in events:
        if isinstance(ev, RatingFeedback):
            by.setdefault(ev.prompt, []).append((ev.rating, ev.response))
    out = []
    for prompt, rated in by.items():
        for ra, a in rated:
            for rb, b in rated:
                if ra - rb >= gap and a != b:
                    out.append((prompt, a, b))
    return out


def mix_logits(weights: list[float]) -> Any:
    """``combine`` of ``mixing: logits``: the answer's next-token scores are ``sum_n w_n log_softmax(s_n)``
    over the node streams (``scores [rows, S, V]``); the answer row's own (base model) scores are not used."""

    def combine(main: Any, scores: Any) -> Any:
        out = None
        for i, w in enumerate(weights):
            part = w * scores[:, i, :].log_softmax(dim=-1)
            out = part if out is None else out + part
        return out if out is not None else main

    return combine


# The fluency guard's default prompts: ordinary requests that no node's events hold (an adapter reads the
# prompts it was trained on fluently even when it breaks on new ones; stop 32's CV, docs/notes/lora5.md).
GUARD_PROMPTS = (
    "How does a refrigerator keep food cold?",
    "What should I look for when choosing a laptop?",
    "Why does the sky look blue?",
    "Give me a few tips for a job interview.",
)


def all_pairs(events: list[Any]) -> list[tuple[str, str, str]]:
    """The events' (prompt, chosen, rejected) pairs; a pair whose two answers are the same text holds
    no preference (nothing to learn from it) and is left out."""
    pairs: list[tuple[str, str, str]] = list(event_pairs(events))
    return [p for p in pairs + rating_pairs(events) if p[1] != p[2]]


def safe_name(node: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", node)[:48] + "-" + hashlib.sha256(node.encode()).hexdigest()[:10]


class AdapterFiles:
    """The adapter folder: one subfolder per node, merged adapters, a small in-memory cache."""

    def __init__(self, root: Path, cache_size: int = 32) -> None:
        self.root = root
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_size = cache_size

    def node_dir(self, node: str) -> Path:
        return self.root / "nodes" / safe_name(node)

    def write(self, node: str, version: int, adapter: Any, learned_from: list[str] | None = None) -> str:
        """Store ``node``'s adapter as its only version. ``learned_from``: the users whose events the
        adapter it was trained over learned from (a residual job's base), kept beside it in ``node.json``
        for forget, not in the profile (which the user can export)."""
        from persona_mw.plugins import _lora

        d = self.node_dir(node)
        d.mkdir(parents=True, exist_ok=True)
        side: dict[str, Any] = {"node": node}
        if learned_from:
            side["learned_from"] = sorted(learned_from)
        (d / "node.json").write_text(json.dumps(side), encoding="utf-8")
        path = d / f"v{version}.safetensors"
        _lora.save(adapter, path)
        for old in d.glob("v*.safetensors"):  # keep the latest only
            if old != path:
                old.unlink(missing_ok=True)
        self.drop_merged({node}, keep=None)
        return str(path.relative_to(self.root))

    def read(self, rel: str) -> Any:
        from persona_mw.plugins import _lora

        with self._lock:
            if rel in self._cache:
                self._cache.move_to_end(rel)
                return self._cache[rel]
        ad = _lora.load(self.root / rel)
        with self._lock:
            self._cache[rel] = ad
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return ad

    def merged(self, parts: list[tuple[str, str, float]]) -> Any:
        """The exact merge of ``(node, file, weight)`` parts, cached in memory and on disk."""
        from persona_mw.plugins import _lora

        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]
        rel = f"merged/{key}.safetensors"
        with self._lock:
            if rel in self._cache:
                return self._cache[rel]
        adapters = [(self.read(f), w) for _, f, w in parts]
        ad = _lora.merge(adapters)
        path = self.root / rel
        _lora.save(ad, path)
        (self.root / "merged" / f"{key}.json").write_text(
            json.dumps({"nodes": [n for n, _, _ in parts], "files": [f for _, f, _ in parts]}), encoding="utf-8")
        with self._lock:
            self._cache[rel] = ad
        return ad

    def drop_merged(self, nodes: set[str], keep: str | None = None) -> int:
        """Delete every merged adapter that included one of ``nodes``; returns how many."""
        n = 0
        for side in (self.root / "merged").glob("*.json"):
            try:
                members = set(json.loads(side.read_text(encoding="utf-8")).get("nodes", []))
            except (OSError, ValueError):
                members = set(nodes)  # unreadable: cannot prove it excludes them
            if members & nodes:
                rel = f"merged/{side.stem}.safetensors"
                (self.root / rel).unlink(missing_ok=True)
                side.unlink(missing_ok=True)
                with self._lock:
                    self._cache.pop(rel, None)
                n += 1
        return n

    def delete_nodes(self, match: Any, side: Any = None) -> list[str]:
        """Delete the folders of nodes for which ``match(node)`` or ``side(node.json's content)``; returns
        their ids."""
        gone = []
        for d in (self.root / "nodes").glob("*"):
            try:
                meta = json.loads((d / "node.json").read_text(encoding="utf-8"))
                node = meta["node"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if match(node) or (side is not None and side(meta)):
                shutil.rmtree(d, ignore_errors=True)
                gone.append(node)
        with self._lock:
            for rel in [r for r in self._cache if not (self.root / r).exists()]:
                self._cache.pop(rel, None)
        if gone:
            self.drop_merged(set(gone))
        return gone


class LoraAdapters:
    """Train per-node LoRA adapters from feedback; decode with the scope's adapters, merged or mixed at the logits."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        every: int = Field(default=20, ge=1, description="new events of a node before its adapter is (re)trained")
        r: int = Field(default=4, ge=1, le=64, description="LoRA rank")
        alpha: int = Field(default=8, ge=1, description="LoRA alpha (scaling alpha / r; an integer, as PEFT's config)")
        targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
                                   description="linear modules to adapt (last name part)")
        top_layers: int | None = Field(default=4, ge=1, description="adapt only the top N decoder layers "
                                       "(training then runs only those layers per step); null: all")
        lr: float = Field(default=1e-2, gt=0, description="AdamW learning rate")
        loss: Literal["dpo", "simpo"] = Field(
            default="simpo", description="preference loss: dpo (summed log-probs relative to the base model) or simpo "
            "(reference-free, per-token mean log-probs with a target margin gamma)")
        beta: float | None = Field(default=None, gt=0, description="the loss's beta; null: 0.1 for dpo, 2.0 for simpo")
        gamma: float = Field(default=1.0, ge=0, description="simpo's target reward margin (unused by dpo)")
        nll: float = Field(default=1.0, ge=0, description="weight of the chosen answers' per-token negative "
                           "log-likelihood added to the preference loss (RPO; 0: none). It keeps the adapter's "
                           "answers fluent: without it simpo at this lr broke the fluency guard")
        fluency_guard: float | None = Field(
            default=None, gt=1, description="after each job, the adapter's greedy answers to the node's "
            "`guard_prompts` (ordinary requests) must be at most this many times as perplexing to the base model "
            "as the base model's own answers; otherwise the adapter is scaled down (1/2, 1/4, 1/8) until they "
            "are (the job's stats: `guard`). null: no check")
        guard_prompts: list[str] = Field(
            default_factory=lambda: list(GUARD_PROMPTS), min_length=1, max_length=16,
            description="prompts whose answers the fluency guard checks; not the node's own: an adapter answers "
            "the prompts it was trained on fluently even when it breaks on new ones")
        residual: bool = Field(
            default=False, description="train a user's adapter as a residual over what their groups' adapters "
            "serve a new member (frozen during the job; HYDRA's per-user heads over a shared base): the stored "
            "adapter is that base plus the user's residual, so the graph's mix serves base + w * residual. "
            "Forgetting a member of those groups also deletes the adapters trained over theirs")
        steps: int = Field(default=40, ge=1, description="optimizer steps per job (at most)")
        batch_choices: int = Field(default=2, ge=1, description="choices (each with all its rejected) per step")
        job_seconds: float | None = Field(default=60.0, gt=0, description="time budget of one training job's loop")
        max_choices: int = Field(default=40, ge=1, description="most recent events a job trains on")
        max_response_tokens: int = Field(default=32, ge=1, description="answer tokens trained on")
        max_prompt_tokens: int = Field(default=64, ge=8, description="prompt tokens kept (the end)")
        bf16: bool | None = Field(default=None, description="train through bfloat16 copies of the frozen "
                                  "weights (the adapter stays float32); null: when the CPU has bfloat16 matmuls "
                                  "(AVX512-BF16 or AMX)")
        threads: int | None = Field(default=None, ge=1, le=256, description="torch threads for a training job "
                                    "(restored after it); null: the backend's setting")
        background: bool = Field(default=True, description="train off the request path (false: inline)")
        node_kinds: list[NodeKind] = Field(
            default_factory=lambda: list(NODE_KINDS),
            description="which nodes get adapters")
        mixing: Literal["merge", "logits"] = Field(
            default="merge", description="how the scope's adapters combine: merge (an exact weight-space merge "
            "cached per scope; one row per answer) or logits (each node's adapter decodes its own stream of the "
            "prompt, and the answer's next-token scores are sum_n w_n log_softmax(stream_n), as MOD / "
            "Personalized Soups at decoding time; one more row per node)")
        dir: str | None = Field(default=None, description="adapter folder (default: beside the SQLite store)")
        serve: Literal["local", "remote"] = Field(
            default="local", description="local: decode with the scope's adapter on the white-box local model; "
            "remote: ask the main (litellm) backend's server for the scope's adapter by its served name "
            "(vLLM multi-LoRA; see `persona-mw lora export --all`), falling back to the base model")
        models_ttl: float = Field(default=30.0, gt=0, description="serve: remote: seconds the server's model "
                                  "list (GET /v1/models) is cached (a 404 on a served name refreshes it)")

    def __init__(self, config: Config | None = None, name: str = "lora") -> None:
        self.config = config or self.Config()
        self.name = name
        self._ctx: PluginContext | None = None
        self.files: AdapterFiles | None = None
        self._training: set[str] = set()
        self.router: Any = None
        self._train_lock = threading.Lock()

    # ---------------------------------------------------------------- setup

    @hookimpl
    def persona_startup(self, ctx: PluginContext) -> None:
        if self.config.serve == "remote":
            from persona_mw.plugins._lora_remote import start_router

            self._ctx = ctx
            self.files = AdapterFiles(self._root(ctx))
            self.router = start_router(self, ctx)
            return
        check_white_box(self, ctx, "lora")
        self._ctx = ctx
        self.files = AdapterFiles(self._root(ctx))

    def _root(self, ctx: PluginContext) -> Path:
        if self.config.dir:
            return Path(self.config.dir).expanduser()
        path = getattr(ctx.store, "path", None)
        if path and path != ":memory:" and not str(path).startswith("file::memory"):
            return Path(str(path) + ".lora")
        return Path(tempfile.mkdtemp(prefix="persona-mw-lora-"))

    def settings(self, seed: int = 0) -> Any:
        from persona_mw.plugins import _lora

        c = self.config
        return _lora.TrainSettings(
            r=c.r, alpha=c.alpha, targets=tuple(c.targets), lr=c.lr, steps=c.steps,
            beta=c.beta if c.beta is not None else (2.0 if c.loss == "simpo" else 0.1), loss=c.loss,
            gamma=c.gamma if c.loss == "simpo" else 0.0, nll=c.nll,
            batch_choices=c.batch_choices, max_prompt_tokens=c.max_prompt_tokens,
            max_response_tokens=c.max_response_tokens, seconds=c.job_seconds, top_layers=c.top_layers, seed=seed,
            bf16=_lora.bf16_fast() if c.bf16 is None else c.bf16, threads=c.threads)

    # ---------------------------------------------------------------- events -> nodes

    def nodes_of(self, event: Any) -> list[str]:
        """The nodes an event counts toward (filtered by ``node_kinds``)."""
        assert self._ctx is not None
        out = [user_node(event.user)]
        if event.context:
            out += [user_context_node(event.user, event.context), context_node(event.context)]
        out += [group_node(g) for g in self._ctx.graph.groups_of(event.user)]
        return [n for n in out if kind_of(n) in self.config.node_kinds]

    def events_of(self, node: str) -> tuple[list[Any], list[str], int]:
        """The node's learnable events (members' pooled for groups and contexts), most recent
        ``max_choices``; the users they came from; and how many learnable events the node has in all
        (the adapter's evidence when the scope's adapters are weighted)."""
        assert self._ctx is not None
        store = self._ctx.store
        kind = kind_of(node)
        from persona_mw.nodes import parse

        ref = parse(node)
        if kind == "user":
            evs = store.list_feedback(user=ref.user, kinds=LEARN_KINDS)
        elif kind == "user_context":
            evs = [e for e in store.list_feedback(user=ref.user, kinds=LEARN_KINDS) if e.context == ref.name]
        elif kind == "group":
            members = [parse(e.src).user for e in store.edges_to(node) if e.kind == "member"]
            evs = [e for m in members if m for e in store.list_feedback(user=m, kinds=LEARN_KINDS)]
        elif kind == "context":
            evs = [e for e in store.list_feedback(kinds=LEARN_KINDS) if e.context == ref.name]
        else:
            evs = []
        total = len(evs)
        evs = sorted(evs, key=lambda e: e.created_at)[-self.config.max_choices:]
        return evs, sorted({e.user for e in evs}), total

    @hookimpl
    async def persona_feedback(self, event: Feedback, store: Any) -> None:
        if self._ctx is None or not isinstance(event, (ChoiceFeedback, EditFeedback, RatingFeedback)):
            return
        due = []
        for node in self.nodes_of(event):
            box: dict[str, int] = {}

            def count(prof: Any, box: dict[str, int] = box) -> None:
                st = dict(prof.extra.get(KEY) or {})
                st["pending"] = int(st.get("pending", 0)) + 1
                prof.extra[KEY] = st
                box["pending"] = st["pending"]

            self._ctx.update_profile(node, count)
            if box["pending"] >= self.config.every:
                due.append(node)
        if self.router is not None:
            return  # serve: remote: no local model here to train on; the events are counted (pending)
        for node in due:
            if self.config.background:
                self._ctx.schedule(self.train_node(node))
            else:
                await self.train_node(node)

    # ---------------------------------------------------------------- training job

    async def train_node(self, node: str, *, seed: int = 0) -> dict[str, Any] | None:
        """Train ``node``'s adapter from its events now; returns the stored entry (None: nothing to
        learn, or a job for this node is already running)."""
        if self._ctx is None or self.files is None:
            raise PersonaError("the lora plugin is not started")
        with self._train_lock:
            if node in self._training:
                return None
            self._training.add(node)
        try:
            return await self._train(node, seed)
        finally:
            with self._train_lock:
                self._training.discard(node)

    async def _train(self, node: str, seed: int) -> dict[str, Any] | None:
        from persona_mw.plugins import _lora

        assert self._ctx is not None and self.files is not None
        events, users, total = self.events_of(node)
        pairs = all_pairs(events)
        if not pairs:
            return None
        backend = self._ctx.backend()
        model = getattr(backend, "model_name", getattr(backend, "name", ""))
        settings = self.settings(seed)
        fmt = _formatter(backend)
        limit = self.config.fluency_guard
        checks = list(self.config.guard_prompts)
        base: Any = None
        bases: dict[str, dict[str, Any]] = {}
        if self.config.residual and kind_of(node) == "user":
            from persona_mw.nodes import parse

            base, bases = self.parents_adapter(parse(node).user or "", model)

        def job(m: Any, t: Any) -> tuple[Any, dict[str, Any]]:
            ad, st = _lora.train_lora(m, t, fmt, pairs, settings, base=base)
            if limit is not None:
                ad, st["guard"] = _lora.fluency_guard(m, t, [fmt(p) for p in checks], ad, limit,
                                                      settings.max_response_tokens, settings.threads)
            return ad, st

        adapter, stats = await backend.call(job)
        gone = self._forgotten_during(events)
        if gone:  # their rows went while it trained: nothing learned from them may be written now
            log.info("lora: %s: %s forgotten while its job ran; the job's result is dropped", node, gone)
            return None
        if self._bases_changed(bases):  # the base was forgotten (or retrained) meanwhile
            log.info("lora: %s: the adapters it was trained over changed while its job ran; result dropped", node)
            return None
        entry: dict[str, Any] = {}
        files = self.files
        span = {"count": len(events), "pairs": len(pairs), "first": events[0].id, "last": events[-1].id,
                "first_at": events[0].created_at, "last_at": events[-1].created_at}

        def reject(prof: Any) -> None:  # the guard failed at every scale: the node keeps what it had
            st = dict(prof.extra.get(KEY) or {})
            st.update(rejected={"at": time.time(), "users": users, "events": span, "guard": stats["guard"]},
                      pending=max(0, int(st.get("pending", 0)) - len(events)))
            prof.extra[KEY] = st
            entry.update(st)

        if limit is not None and not stats["guard"]["passed"]:
            log.warning("lora: %s: the new adapter failed the fluency guard at every scale (%s); not stored",
                        node, stats["guard"]["tried"])
            self._ctx.update_profile(node, reject)
            return entry

        def store(prof: Any) -> None:
            st = dict(prof.extra.get(KEY) or {})
            version = int(st.get("version", 0)) + 1
            adapter.meta = {"node": node, "version": version, "model": model}
            rel = files.write(node, version, adapter, sorted({u for b in bases.values() for u in b["users"]}))
            st.pop("rejected", None)
            st.update(version=version, file=rel, model=model, r=settings.r, targets=list(settings.targets),
                      top_layers=settings.top_layers, trained_at=time.time(), users=users,
                      evidence=total, events=span, stats=stats,
                      pending=max(0, int(st.get("pending", 0)) - len(events)))
            if bases:
                st["base"] = {b: info["version"] for b, info in bases.items()}
            else:
                st.pop("base", None)
            prof.extra[KEY] = st
            entry.update(st)

        self._ctx.update_profile(node, store)
        if self._bases_changed(bases):  # a forget ran between the check above and the write
            self._drop_derived({node})
            return None
        return entry

    def parents_adapter(self, user: str, model_name: str) -> tuple[Any, dict[str, dict[str, Any]]]:
        """What the user's groups' adapters serve a member without an adapter of their own (their merge
        with the graph's weights, as ``scope_adapter`` gives a new user), the base of a residual job; and
        ``{node: {"version", "users"}}`` of the adapters in it (None, {}: none)."""
        assert self._ctx is not None and self.files is not None
        graph = self._ctx.graph
        me = user_node(user)
        nodes = [n for n in graph.neighbourhood(user).nodes if n != me]
        profiles = self._ctx.store.get_profiles(nodes)
        files, evidence, notes = self._usable(nodes, profiles, model_name)
        for n in notes:
            log.info("lora: residual base for %s: %s", me, n)
        parts = _parts(files, graph.shrink_weights(user, None, (), evidence))
        if not parts:
            return None, {}
        info = {}
        for n, _, _ in parts:
            st = profiles[n].extra[KEY]
            info[n] = {"version": int(st.get("version", 0)), "users": list(st.get("users") or [])}
        try:
            adapter = self.files.read(parts[0][1]) if len(parts) == 1 else self.files.merged(parts)
        except PersonaError as exc:
            log.warning("lora: residual base for %s unusable (%s): trained on its own", me, exc)
            return None, {}
        return adapter, info

    def _bases_changed(self, bases: dict[str, dict[str, Any]]) -> bool:
        if not bases:
            return False
        assert self._ctx is not None
        now = self._ctx.store.get_profiles(sorted(bases))
        for b, info in bases.items():
            st = (now[b].extra.get(KEY) if now.get(b) is not None else None) or {}
            if not st.get("file") or int(st.get("version", 0)) != info["version"]:
                return True
        return False

    def _drop_derived(self, nodes: set[str]) -> None:
        """Delete the adapters of ``nodes`` (trained over a base that is gone) and their records."""
        assert self.files is not None
        self.files.delete_nodes(lambda n: n in nodes)
        self._reset_records(nodes)

    def _reset_records(self, nodes: set[str]) -> None:
        """Clear the adapter records of ``nodes``, keeping the count of events waiting for the next job."""
        assert self._ctx is not None

        def reset(p: Any) -> None:
            st = p.extra.get(KEY) or {}
            p.extra[KEY] = {"pending": int(st.get("pending", 0))}

        for n in nodes:
            self._ctx.update_profile(n, reset)

    def _forgotten_during(self, events: list[Any]) -> list[str]:
        """The users whose events a job read that are no longer stored (forgotten while it ran). A user's
        own nodes are covered by the store's forget epoch; a group or context pools other members' events,
        which that guard does not cover. A forget that deletes the rows after this check is undone by its
        own ``persona_forget`` if the write lands first (it sees the user in ``users``); one whose whole run
        falls between this check and the write is not caught (a window of one file write)."""
        assert self._ctx is not None
        by_user: dict[str, set[str]] = {}
        for e in events:
            by_user.setdefault(e.user, set()).add(e.id)
        store = self._ctx.store
        return sorted(u for u, ids in by_user.items()
                      if not ids <= {e.id for e in store.list_feedback(user=u, kinds=LEARN_KINDS)})

    # ---------------------------------------------------------------- serving

    def scope_adapter(self, turn: Turn, model_name: str) -> tuple[Any, dict[str, float], list[str]]:
        """The merged adapter of the scope (None if no node has one; with ``mixing: logits`` and two
        nodes or more, the list of their adapters, in the order of the weights), the weights used, and
        notes about adapters that could not be read.

        The weights are the scope's shrinkage (``PreferenceGraph.shrink_weights``: the same graph
        and prior strength) with each node's evidence the learnable events its adapter was trained
        from (pooled over members for a group or context), renormalized over the nodes with a
        usable adapter. Not the scope's own weights: those count the core's evidence, which a group
        node has only when something writes it (a stated group preference, the profile plugin's
        refit), so a group adapter trained on its members' events would get weight 0 and a new
        member nothing. A node without a usable adapter keeps nothing and passes its weight on to
        its parents (a new user rides on their groups; an unreadable file degrades to the parents).
        """
        assert self.files is not None and self._ctx is not None
        files, evidence, notes = self._usable([sn.id for sn in (turn.scope.nodes if turn.scope is not None else [])],
                                              turn.profiles, model_name)
        if not files:
            return None, {}, notes
        req = turn.request
        parts = _parts(files, self._ctx.graph.shrink_weights(req.user, req.context, req.groups, evidence))
        if not parts:
            return None, {}, notes
        total = sum(w for _, _, w in parts)
        used = {n: w / total for n, _, w in parts}
        if len(parts) == 1:
            return self.files.read(parts[0][1]), used, notes
        if self.config.mixing == "logits":  # one adapter per node, mixed at the logits (``mix_logits``)
            return [self.files.read(f) for _, f, _ in parts], used, notes
        try:
            return self.files.merged(parts), used, notes
        except PersonaError as exc:
            notes.append(f"merge failed ({exc})")
            return None, {}, notes

    def _usable(self, nodes: list[str], profiles: dict[str, Any],
                model_name: str) -> tuple[dict[str, str], dict[str, int], list[str]]:
        """The nodes' readable adapter files for ``model_name``, their evidence, and notes on unreadable ones."""
        assert self.files is not None
        files: dict[str, str] = {}
        evidence: dict[str, int] = {}
        notes: list[str] = []
        for n in nodes:
            prof = profiles.get(n)
            st = (prof.extra.get(KEY) if prof is not None else None) or {}
            if not st.get("file") or st.get("model") != model_name:
                continue
            try:
                self.files.read(st["file"])
            except PersonaError as exc:
                notes.append(f"adapter of {n} unusable ({exc}); its weight goes to the rest of the scope")
                continue
            files[n] = st["file"]
            evidence[n] = max(1, int(st.get("evidence") or (st.get("events") or {}).get("count") or 1))
        return files, evidence, notes

    @hookimpl
    def persona_decoding(self, turn: Turn, backend: Any) -> Decoding | None | Awaitable[Decoding | None]:
        if self.router is not None:  # serve: remote (awaited by the pipeline)
            return cast("Awaitable[Decoding | None]", self.router.decoding(turn))
        from persona_mw.plugins._lora import adapter_hook

        require_white_box(self, backend, "lora")
        model = getattr(backend, "model_name", getattr(backend, "name", ""))
        adapter, used, notes = self.scope_adapter(turn, model)
        for n in notes:
            turn.note(f"lora degraded: {n}")
        if adapter is None:
            turn.note("no adapter in scope: base model")
            return None
        turn.note("adapter " + ", ".join(f"{k}:{w:.2f}" for k, w in used.items()))
        meta = {"nodes": used, "degraded": bool(notes)}
        if isinstance(adapter, list):  # mixing: logits, two or more nodes
            turn.note(f"mixed at the logits: {len(adapter)} adapter streams")
            return Decoding(source=self.name, streams=[list(turn.messages) for _ in adapter],
                            stream_adapters=adapter, combine=mix_logits(list(used.values())), meta=meta)
        return Decoding(source=self.name, activation_hooks=[adapter_hook(adapter)], meta=meta)

    # ---------------------------------------------------------------- forget, report

    @hookimpl
    def persona_forget(self, user: str, nodes: list[str]) -> None:
        """Delete the user's adapters, the group/context adapters trained on their events, and
        every merged adapter including any of them."""
        if self.files is None:
            return
        own = {user_node(user)}
        prefix = user_node(user) + "@"
        linked = set(nodes)

        def match(node: str) -> bool:
            if node in own or node.startswith(prefix):
                return True
            return node in linked and self._trained_on(node, user)

        def over_theirs(meta: dict[str, Any]) -> bool:  # trained over an adapter that learned from them
            return user in (meta.get("learned_from") or [])

        gone = set(self.files.delete_nodes(match, over_theirs))
        self._reset_records({n for n in gone if kind_of(n) == "user"} - own)
        gone |= own
        self.files.drop_merged(own)
        from persona_mw.plugins._lora_remote import forget

        forget(self.files.root, lambda n: n in gone or n.startswith(prefix))
        if self.router is not None:
            self.router.forget_seen()

    def _trained_on(self, node: str, user: str) -> bool:
        assert self._ctx is not None
        prof = self._ctx.store.get_profiles([node]).get(node)
        st = (prof.extra.get(KEY) if prof is not None else None) or {}
        if user in st.get("users", []):
            if prof is not None:
                self._ctx.update_profile(node, lambda p: p.extra.pop(KEY, None))
            return True
        if user in (st.get("rejected") or {}).get("users", []):  # only a rejected job read their events

            def drop(p: Any) -> None:
                kept = dict(p.extra.get(KEY) or {})
                kept.pop("rejected", None)
                p.extra[KEY] = kept

            self._ctx.update_profile(node, drop)
        return False

    @hookimpl
    def persona_profile_report(self, user: str, profiles: dict[str, Any]) -> dict[str, Any] | None:
        out = {}
        for node, prof in profiles.items():
            st = ((prof or {}).get("extra") or {}).get(KEY) or {}
            if st.get("file"):
                out[node] = {k: st.get(k) for k in ("version", "file", "model", "r", "targets", "events",
                                                    "trained_at", "pending")}
                if st.get("base"):  # trained as a residual over these adapters (node: version)
                    out[node]["base"] = st["base"]
                out[node]["seconds"] = (st.get("stats") or {}).get("total_seconds")
                if (st.get("stats") or {}).get("guard"):
                    out[node]["guard"] = st["stats"]["guard"]
            if st.get("rejected"):
                rej = st["rejected"]
                out.setdefault(node, {})["rejected"] = {"at": rej.get("at"), "events": rej.get("events"),
                                                        "guard": rej.get("guard")}
        return {"lora": out} if out else None


def _parts(files: dict[str, str], weights: dict[str, float]) -> list[tuple[str, str, float]]:
    """``(node, file, weight)`` of the nodes with an adapter file and a positive weight (rounded: the
    merge cache's key)."""
    return [(n, f, round(weights.get(n, 0.0), 4)) for n, f in files.items() if weights.get(n, 0.0) > 0]


def _formatter(backend: Any) -> Any:
    def fmt(prompt: str) -> str:
        prefix, _ = chat_texts(backend, prompt, [])
        return str(prefix)

    return fmt


def export_node(mw: Any, node: str, out: str) -> Path:
    """``persona-mw lora export NODE --out DIR``: the node's adapter as a PEFT folder."""
    from persona_mw.plugins._lora import export_peft

    plugin = next((p.instance for p in mw.host.pipeline if isinstance(p.instance, LoraAdapters)), None)
    if plugin is None or plugin.files is None:
        raise RequestError("no lora plugin in the pipeline (--config)", field="config")
    prof = mw.store.get_profiles([node]).get(node)
    st = (prof.extra.get(KEY) if prof is not None else None) or {}
    if not st.get("file"):
        raise RequestError(f"node {node!r} has no adapter", field="node")
    # The registry name of the base model (SmolLM2-135M-Instruct for smollm2-135m-instruct): a serving
    # engine is started on the base weights and given this folder as a LoRA module.
    base = st.get("model") or ""
    return Path(export_peft(plugin.files.root / st["file"], Path(out), base))


def export_every(mw: Any, out: str, merged: bool = False) -> dict[str, Any]:
    """``persona-mw lora export --all --out DIR [--merged]``: every node's adapter (and the merged
    adapters turns asked for) as PEFT folders named by their served names, with ``manifest.json``."""
    from persona_mw.plugins._lora_remote import export_all

    plugin = next((p.instance for p in mw.host.pipeline if isinstance(p.instance, LoraAdapters)), None)
    if plugin is None or plugin.files is None:
        raise RequestError("no lora plugin in the pipeline (--config)", field="config")
    manifest: dict[str, Any] = export_all(plugin.files, mw.store, Path(out), merged=merged)
    return manifest


def cmd_lora(args: Any) -> int:
    """``persona-mw lora export (NODE | --all [--merged]) --out DIR [--config FILE] [--store PATH]``."""
    import os
    import sys

    from persona_mw.config import default_config, load_config
    from persona_mw.middleware import Middleware

    path = args.config or os.environ.get("PERSONA_MW_CONFIG")
    cfg = load_config(path) if path else default_config()
    if args.store:
        cfg.store.path = args.store
    if bool(args.node) == bool(args.all):
        print("persona-mw lora export: give a NODE or --all", file=sys.stderr)
        return 2
    mw = Middleware(cfg)
    try:
        if args.all:
            manifest = export_every(mw, args.out, merged=args.merged)
        else:
            out = export_node(mw, args.node, args.out)
    finally:
        mw.close()
    if args.all:
        print(f"wrote {len(manifest['adapters'])} adapters and {Path(args.out) / 'manifest.json'}; start vLLM "
              f"with --enable-lora --max-lora-rank {_vllm_rank(manifest['max_lora_rank'])} and:", file=sys.stderr)
        print(" ".join(["--lora-modules", *manifest["lora_modules"]]) if manifest["lora_modules"] else "")
        return 0
    print(f"wrote {out} (a PEFT folder: serve the base model with --enable-lora --lora-modules NAME={out})",
          file=sys.stderr)
    return 0


def _vllm_rank(r: int) -> int:
    """The smallest rank vLLM's --max-lora-rank accepts that holds ``r``."""
    return next((v for v in (8, 16, 32, 64, 128, 256, 320, 512) if v >= r), r)


def register_commands(cli: Any) -> None:
    """The ``lora`` subcommand (registered by ``persona_mw.builtins``)."""
    help_ = ("the lora plugin's adapters: export NODE --out DIR writes a PEFT folder "
             "(adapter_config.json + adapter_model.safetensors) that vLLM and other PEFT-aware servers load; "
             "export --all --out DIR writes every node's (named by its served name), manifest.json, and prints "
             "vLLM's --lora-modules arguments")
    p = cli.add_parser("lora", help=help_, description=help_)
    p.add_argument("action", choices=["export"], help="what to do")
    p.add_argument("node", nargs="?", help="the node id, e.g. user:ana or group:nurses")
    p.add_argument("--all", action="store_true", help="every node with an adapter (folders named by served name)")
    p.add_argument("--merged", action="store_true", help="with --all: also the merged scope adapters turns asked "
                   "for (serve: remote records them)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--config", help="pipeline YAML with a lora entry (default: $PERSONA_MW_CONFIG)")
    p.add_argument("--store", help="a SQLite store path (overrides the config)")
    p.set_defaults(func=cmd_lora)


__all__ = ["cmd_lora", "register_commands", "AdapterFiles", "LoraAdapters", "all_pairs", "export_every", "export_node",
           "rating_pairs"]
