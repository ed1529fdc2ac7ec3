"""The lora plugin's adapters served by a PEFT-aware model server (``serve: remote``): vLLM's
multi-LoRA (``--enable-lora --lora-modules name=DIR ...``) behind the litellm backend.

- Names: ``served_name`` gives each trained version of a node's adapter a stable served name,
  ``persona-<kind>-<node hash>-v<version>-<stamp>``; ``mix_name`` one for a scope's merged adapter,
  ``persona-mix-<hash of its parts>``. Only ``[a-z0-9_-]``: valid vLLM LoRA module names and litellm
  model names. The node id is hashed, not spelled out: a server's ``/v1/models`` is often readable
  by anyone who can reach it, and must not list user ids. The stamp hashes the version's training
  time, so an adapter retrained after its user was forgotten never takes the old name.
- Routing (``RemoteRouter.decoding``): a turn asks the server for the best adapter it lists: the
  scope's merged adapter, else the scope's node adapters by weight (the user's own, the user in the
  context, the groups ...), else the base model. ``ServedModels`` reads ``GET {api_base}/models``
  (``/v1/models``), cached for ``ttl`` seconds; a 404 on the chosen name refreshes it and the
  backend retries once with the next name listed (``Decoding.reroute``). A server that is down or
  lists nothing means the base model, with a trace note; routing never fails a turn.
- Export (``export_all``): every node's current adapter (and the merged adapters turns asked for,
  recorded in ``<dir>/mixes.json``) as PEFT folders named by their served names, a ``manifest.json``
  and the ``--lora-modules`` arguments. ``forget`` removes a forgotten user's exported folders and
  recorded mixes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_mw.errors import PersonaError
from persona_mw.nodes import kind_of
from persona_mw.types import Decoding, Turn

KEY = "lora"
MIXES = "mixes.json"
EXPORTS = "exports.json"
MANIFEST = "manifest.json"


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def served_name(node: str, entry: dict[str, Any]) -> str:
    """The served name of the node's adapter version described by its profile entry ``extra["lora"]``."""
    version = int(entry.get("version") or 0)
    stamp = _digest(f"{node}|{version}|{entry.get('trained_at')}|{entry.get('file')}", 6)
    return f"persona-{kind_of(node)}-{_digest(node, 12)}-v{version}-{stamp}"


def mix_name(parts: Iterable[tuple[str, str, float]]) -> str:
    """The served name of the merge of ``(node, served name, weight)`` parts."""
    key = json.dumps(sorted((name, round(w, 4)) for _, name, w in parts))
    return f"persona-mix-{_digest(key, 16)}"


def models_url(api_base: str) -> str:
    """vLLM's model list under an OpenAI-style ``api_base`` (``http://host:8000/v1`` or without ``/v1``)."""
    base = api_base.rstrip("/")
    return base + "/models" if base.endswith("/v1") else base + "/v1/models"


class ServedModels:
    """The model names a server lists (``GET /v1/models``), cached for ``ttl`` seconds. A failure
    is cached as well (a server that is down costs one connection attempt per ``ttl``)."""

    def __init__(self, url: str, *, ttl: float = 30.0, timeout: float = 2.0, api_key: str | None = None) -> None:
        self.url = url
        self.ttl = ttl
        self.timeout = timeout
        self.api_key = api_key
        self._lock = threading.Lock()
        self._at = -1e18
        self._names: frozenset[str] = frozenset()
        self._error: str | None = None

    def invalidate(self) -> None:
        with self._lock:
            self._at = -1e18

    async def names(self) -> tuple[frozenset[str], str | None]:
        """(the names listed, None) or (empty, why the list is unavailable)."""
        with self._lock:
            if time.monotonic() - self._at < self.ttl:
                return self._names, self._error
        names, error = await self._fetch()
        with self._lock:
            self._at, self._names, self._error = time.monotonic(), names, error
        return names, error

    async def _fetch(self) -> tuple[frozenset[str], str | None]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                r = await client.get(self.url, headers=headers)
            r.raise_for_status()
            data = r.json().get("data")
            names = frozenset(str(m["id"]) for m in data if isinstance(m, dict) and m.get("id"))
        except (httpx.HTTPError, ValueError, TypeError, AttributeError, KeyError) as exc:
            return frozenset(), f"{type(exc).__name__}: {str(exc)[:120]}"
        return names, None


@dataclass
class Option:
    """One adapter the turn could be served with: a node's (or the scope's merge: ``node`` "mix")."""

    node: str
    name: str
    weight: float


def scope_options(turn: Turn, graph: Any) -> tuple[list[Option], list[tuple[str, str, float]]]:
    """The scope's adapters in the order to try (the merge first when there are two or more, then
    the nodes by weight), and the merge's ``(node, file, weight)`` parts (for exporting it).

    The weights are the local merge's (``LoraAdapters.scope_adapter``): the scope's shrinkage with
    each node's evidence the events its adapter learned from, over the nodes with an adapter. Only
    the nodes of this request's scope are looked at, so only this user's, their contexts' and their
    groups' adapters can be chosen."""
    names: dict[str, str] = {}
    files: dict[str, str] = {}
    evidence: dict[str, int] = {}
    for sn in (turn.scope.nodes if turn.scope is not None else []):
        prof = turn.profiles.get(sn.id)
        st = (prof.extra.get(KEY) if prof is not None else None) or {}
        if not st.get("file") or not st.get("version"):
            continue
        names[sn.id] = served_name(sn.id, st)
        files[sn.id] = str(st["file"])
        evidence[sn.id] = max(1, int(st.get("evidence") or (st.get("events") or {}).get("count") or 1))
    if not names:
        return [], []
    req = turn.request
    weights = graph.shrink_weights(req.user, req.context, req.groups, evidence)
    ranked = sorted(((n, round(float(weights.get(n, 0.0)), 4)) for n in names), key=lambda p: (-p[1], p[0]))
    ranked = [(n, w) for n, w in ranked if w > 0]
    total = sum(w for _, w in ranked) or 1.0
    options = [Option(n, names[n], w / total) for n, w in ranked]
    parts = [(n, files[n], w) for n, w in ranked]
    if len(options) > 1:
        options.insert(0, Option("mix", mix_name((n, names[n], w) for n, w in ranked), 1.0))
    return options, parts


class RemoteRouter:
    """Chooses the served model of each turn (see the module docstring)."""

    def __init__(self, root: Path, models: ServedModels, graph: Any, source: str = "lora") -> None:
        self.root = root
        self.models = models
        self.graph = graph
        self.source = source
        self._lock = threading.Lock()
        self._mixes_seen: set[str] = set()

    async def decoding(self, turn: Turn) -> Decoding | None:
        options, parts = scope_options(turn, self.graph)
        if not options:
            turn.note("lora remote: no adapter in scope: base model")
            return None
        if options[0].node == "mix":
            self._record_mix(options[0].name, parts, [o.name for o in options[1:]])
        listed, error = await self.models.names()
        if error is not None:
            turn.note(f"lora remote: the server's model list is unavailable ({error}): base model")
            return None
        pick = next((o for o in options if o.name in listed), None)
        skipped = [o.name for o in options if pick is None or options.index(o) < options.index(pick)]
        if pick is None:
            turn.note("lora remote: the server serves none of the scope's adapters "
                      f"({', '.join(skipped)}): base model")
            return None
        why = "the scope's merged adapter" if pick.node == "mix" else f"{pick.node}'s adapter (weight {pick.weight:.2f})"
        turn.note(f"lora remote: {pick.name} ({why})" + (f"; not served: {', '.join(skipped)}" if skipped else ""))
        return Decoding(source=self.source, model=pick.name, reroute=self._rerouter(turn, options),
                        meta={"served": pick.name, "node": pick.node, "skipped": skipped})

    def _rerouter(self, turn: Turn, options: list[Option]) -> Callable[[str | None], Any]:
        async def reroute(missing: str | None) -> str | None:
            self.models.invalidate()
            listed, error = await self.models.names()
            nxt = next((o for o in options if o.name != missing and o.name in listed), None)
            target = nxt.name if nxt is not None else "the base model"
            turn.trace.flags.append(f"lora remote: the server does not have {missing} (404); "
                                    f"retried with {target}" + (f" ({error})" if error else ""))
            return nxt.name if nxt is not None else None

        return reroute

    # ------------------------------------------------------------ merges the turns asked for

    def _record_mix(self, name: str, parts: list[tuple[str, str, float]], names: list[str]) -> None:
        """Remember a merged adapter a turn wanted, so ``lora export --all --merged`` can write it."""
        with self._lock:
            if name in self._mixes_seen:
                return
            mixes = read_json(self.root / MIXES)
            if name not in mixes:
                mixes[name] = {"parts": [list(p) for p in parts], "names": names, "at": time.time()}
                write_json(self.root / MIXES, mixes)
            self._mixes_seen.add(name)

    def forget_seen(self) -> None:
        with self._lock:
            self._mixes_seen.clear()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def start_router(plugin: Any, ctx: Any) -> RemoteRouter:
    """The router of a ``serve: remote`` plugin, on the main backend's server (its ``api_base``)."""
    backend = ctx.backend()
    inner = getattr(backend, "inner", backend)
    api_base = getattr(inner, "api_base", None)
    if not api_base:
        raise ctx.config_error(
            f"plugin {plugin.name!r}: serve: remote asks the main backend's server for adapters, but "
            f"{getattr(inner, 'name', type(inner).__name__)!r} has no api_base",
            hint="use `backend: {type: litellm, model: openai/<base model>, api_base: http://host:8000/v1}` "
            "(vLLM started with --enable-lora), or serve: local on the transformers backend")
    models = ServedModels(models_url(str(api_base)), ttl=plugin.config.models_ttl,
                          api_key=getattr(inner, "api_key", None))
    return RemoteRouter(plugin.files.root, models, ctx.graph, plugin.name)


# ---------------------------------------------------------------- export


def export_all(files: Any, store: Any, out: Path, *, merged: bool = False) -> dict[str, Any]:
    """Every node's current adapter (and with ``merged`` the recorded merges whose parts are all
    current) as PEFT folders ``out/<served name>``; writes ``out/manifest.json`` and returns it.
    Folders of a previous export into ``out`` that are no longer current are removed."""
    from persona_mw.plugins import _lora

    root: Path = files.root
    nodes = []
    for side in sorted((root / "nodes").glob("*/node.json")):
        try:
            nodes.append(str(json.loads(side.read_text(encoding="utf-8"))["node"]))
        except (OSError, ValueError, KeyError):
            continue
    profiles = store.get_profiles(nodes) if nodes else {}
    entries: list[dict[str, Any]] = []
    current: dict[str, tuple[str, str]] = {}  # node -> (served name, file)
    out.mkdir(parents=True, exist_ok=True)
    for node in nodes:
        prof = profiles.get(node)
        st = (prof.extra.get(KEY) if prof is not None else None) or {}
        if not st.get("file") or not (root / st["file"]).exists():
            continue
        name = served_name(node, st)
        _lora.export_peft(root / st["file"], out / name, str(st.get("model") or ""))
        current[node] = (name, str(st["file"]))
        entries.append({"name": name, "kind": "node", "nodes": [node], "version": st.get("version"),
                        "path": str(out / name), "base_model": st.get("model"), "r": st.get("r")})
    if merged:
        entries += _export_mixes(files, root, out, current, profiles)
    old = read_json(out / MANIFEST)
    keep = {e["name"] for e in entries}
    for e in old.get("adapters", []):
        name = str(e.get("name", ""))
        if name.startswith("persona-") and name not in keep and "/" not in name:
            shutil.rmtree(out / name, ignore_errors=True)
    manifest = {"adapters": entries, "max_lora_rank": max((int(e.get("r") or 0) for e in entries), default=0),
                "lora_modules": [f"{e['name']}={e['path']}" for e in entries]}
    write_json(out / MANIFEST, manifest)
    exports = read_json(root / EXPORTS)
    exports[str(out.resolve())] = {"at": time.time()}
    write_json(root / EXPORTS, exports)
    return manifest


def _export_mixes(files: Any, root: Path, out: Path, current: dict[str, tuple[str, str]],
                  profiles: dict[str, Any]) -> list[dict[str, Any]]:
    from persona_mw.plugins import _lora

    entries = []
    for name, mix in sorted(read_json(root / MIXES).items()):
        parts = [(str(n), str(f), float(w)) for n, f, w in mix.get("parts", [])]
        if not parts or any(current.get(n, ("", ""))[1] != f for n, f, _ in parts):
            continue  # a part was retrained or deleted since: the turns now ask for another merge
        if mix_name((n, current[n][0], w) for n, _, w in parts) != name:
            continue
        try:
            ad = files.merged(parts)
        except PersonaError:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / "adapter.safetensors"
            _lora.save(ad, f)
            _lora.export_peft(f, out / name, str(_base_of(profiles, parts[0][0])))
        entries.append({"name": name, "kind": "mix", "nodes": [n for n, _, _ in parts],
                        "weights": [w for _, _, w in parts], "path": str(out / name),
                        "base_model": _base_of(profiles, parts[0][0]), "r": int(ad.r)})
    return entries


def _base_of(profiles: dict[str, Any], node: str) -> str:
    prof = profiles.get(node)
    return str(((prof.extra.get(KEY) if prof is not None else None) or {}).get("model") or "")


# ---------------------------------------------------------------- forget


def forget(root: Path, gone: Callable[[str], bool]) -> list[str]:
    """Delete the exported folders (in every folder ``export_all`` wrote) and the recorded merges
    that include a node for which ``gone(node)``; returns the served names removed."""
    removed: list[str] = []
    mixes = read_json(root / MIXES)
    drop = [k for k, m in mixes.items() if any(gone(str(p[0])) for p in m.get("parts", []))]
    for k in drop:
        mixes.pop(k, None)
    if drop:
        write_json(root / MIXES, mixes)
    for folder in read_json(root / EXPORTS):
        out = Path(folder)
        manifest = read_json(out / MANIFEST)
        entries = manifest.get("adapters", [])
        left = []
        for e in entries:
            name = str(e.get("name", ""))
            if any(gone(str(n)) for n in e.get("nodes", [])) and name.startswith("persona-") and "/" not in name:
                shutil.rmtree(out / name, ignore_errors=True)
                removed.append(name)
            else:
                left.append(e)
        if len(left) != len(entries):
            manifest["adapters"] = left
            manifest["lora_modules"] = [f"{e['name']}={e['path']}" for e in left]
            write_json(out / MANIFEST, manifest)
    return removed


__all__ = ["RemoteRouter", "ServedModels", "export_all", "forget", "mix_name", "models_url", "scope_options",
           "served_name", "start_router"]
