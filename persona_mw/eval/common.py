"""Shared pieces of the benchmarks: the frozen config, a middleware for simulated users, output."""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import sys
import tempfile
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from persona_mw.errors import PersonaError
from persona_mw.features import FeatureSpec, Featurizer

# Frozen on the dev slices; the same settings run on held-out slices. {} = the plugin defaults.
PROFILE_SETTINGS: dict[str, Any] = {}


class SharedFeaturizer(Featurizer):
    """A featurizer whose cache is not split per party: the harness is the only party in its process.

    In serving, the profile plugin's feature rows (and embeddings) are cached per tenant and user
    (issue #17), and per Middleware without a tenant. The benchmarks simulate tens of users who see
    the same responses, over hundreds of throwaway middlewares (one per CV trial), so that split made
    every trial re-embed every response once per user: 96% of a nested-CV trial's time. Here each text
    is featurized once per process, with the same code and the same rows (``Featurizer.transform``
    under the shared scope ``""``, the one work outside any party already uses).
    """

    def transform(self, texts: Sequence[str]) -> Any:
        from persona_mw.embeddings import cache_scope

        with cache_scope(""):
            return super().transform(texts)


_SHARED: dict[str, SharedFeaturizer] = {}
_SHARE: ContextVar[bool] = ContextVar("persona_mw_eval_share_features", default=True)


def shared_featurizer(spec: FeatureSpec) -> SharedFeaturizer:
    """The process's shared-cache featurizer of ``spec`` (kept across trials, so its cache is too)."""
    f = _SHARED.get(spec.key())
    if f is None:
        f = _SHARED[spec.key()] = SharedFeaturizer(spec)
    return f


@contextmanager
def per_party_features() -> Iterator[None]:
    """Inside, ``eval_middleware`` keeps serving's per-party feature cache (the slow way; for timing it)."""
    token = _SHARE.set(False)
    try:
        yield
    finally:
        _SHARE.reset(token)


class _NoBackend:
    """The benchmarks never generate text: feedback and scoring only."""

    name = "none"
    capabilities = None

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)

    async def generate(self, *a: Any, **k: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("the eval harness does not generate")


# Stores left by a replay of simulated feedback (see ``eval_middleware``), by the replay's key: the
# nested CV scores every setting of its grid on the same inner splits, i.e. on the same events.
_REPLAYS: OrderedDict[str, Path] = OrderedDict()
_REPLAY_DIR: list[str] = []
_MAX_REPLAYS = 16


def replay_key(*parts: Any) -> str:
    """A key naming a replay by its content (the events and declarations it feeds)."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode("utf-8"), digest_size=16).hexdigest()


def _copy_db(src: Path, dst: Path) -> None:
    import sqlite3

    a, b = sqlite3.connect(str(src)), sqlite3.connect(str(dst))
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def _keep_replay(key: str, db: Path) -> None:
    if not _REPLAY_DIR:
        _REPLAY_DIR.append(tempfile.mkdtemp(prefix="persona-mw-eval-replays-"))
        atexit.register(shutil.rmtree, _REPLAY_DIR[0], True)
    snap = Path(_REPLAY_DIR[0]) / f"{key}.db"
    _copy_db(db, snap)
    _REPLAYS[key] = snap
    while len(_REPLAYS) > _MAX_REPLAYS:
        _, old = _REPLAYS.popitem(last=False)
        old.unlink(missing_ok=True)


@contextmanager
def eval_middleware(replay: tuple[str, Callable[[Any], None]] | None = None,
                    **overrides: Any) -> Iterator[tuple[Any, Any]]:
    """A Middleware with only the profile plugin, on a throwaway SQLite store; yields (mw, plugin).

    Feature rows are cached for the whole process (``SharedFeaturizer``) unless inside ``per_party_features``.
    ``replay = (key, feed)``: ``feed(mw)`` replays the simulated users' feedback; the store it leaves is kept
    by ``key`` (``replay_key`` of what ``feed`` sends), and a later call with the same key starts from a copy
    of it instead of replaying (not inside ``per_party_features``). The callers refit every node from the
    stored events after the replay, which overwrites all that the plugin's online updates wrote, so the
    store a replay leaves is the same whatever the plugin's settings: only the refit and scoring differ.

    Keys ``graph.<name>`` set the graph section (e.g. ``graph.prior_strength``); the others the plugin's.
    """
    from persona_mw.config import parse_config
    from persona_mw.middleware import Middleware

    settings = {**PROFILE_SETTINGS, **overrides}
    graph = {k.split(".", 1)[1]: v for k, v in settings.items() if k.startswith("graph.")}
    plugin = {k: v for k, v in settings.items() if not k.startswith("graph.")}
    share = _SHARE.get()
    with tempfile.TemporaryDirectory(prefix="persona-mw-eval-") as tmp:
        db = Path(tmp) / "eval.db"
        kept = _REPLAYS.get(replay[0]) if replay is not None and share else None
        if kept is not None:
            _copy_db(kept, db)
        cfg = parse_config(json.dumps({"pipeline": [{"use": "profile", **plugin}], "graph": graph}), "<eval>")
        cfg.store.path = str(db)
        cfg.trace.store = False
        mw = Middleware(cfg, backend=_NoBackend(), autoload=False)
        try:
            profile = mw.plugin("profile")
            with ExitStack() as stack:
                if share:
                    from persona_mw.plugins.profile import use_featurizer

                    stack.enter_context(use_featurizer(shared_featurizer(profile.spec)))
                if replay is not None and kept is None:
                    replay[1](mw)
                    if share:
                        _keep_replay(replay[0], db)
                yield mw, profile
        finally:
            mw.close()


def resolve(mw: Any, user: str, groups: list[str] | None = None) -> tuple[Any, Any]:
    from persona_mw.types import ChatRequest, Message

    req = ChatRequest(user=user, groups=groups or [], messages=[Message(role="user", content="-")])
    mw.graph.ensure_user(req)
    resolved: tuple[Any, Any] = mw.graph.resolve(req)
    return resolved


def print_table(benchmark: str, metrics: dict[str, float], file: Any = None) -> None:
    file = file or sys.stdout
    rows: dict[str, dict[str, float]] = {}
    for name, v in metrics.items():
        base, _, variant = name.partition(":")
        rows.setdefault(base, {})[variant or "persona-mw"] = v
    cols: list[str] = []
    for r in rows.values():
        cols += [c for c in r if c not in cols]
    print(f"{benchmark}: " + "  ".join(f"{c:>12}" for c in cols), file=file)
    for base, r in rows.items():
        print(f"{base:>{len(benchmark) + 1}} " + "  ".join(
            f"{r[c]:>12.3f}" if c in r else f"{'-':>12}" for c in cols), file=file)


def write_result(path: str | None, benchmark: str, data: str, config: dict[str, Any],
                 metrics: dict[str, float], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``extra``: more top-level keys (per-fold figures, the misses behind a recall) after ``metrics``."""
    result = {"benchmark": benchmark, "data": str(data), "config": config,
              "metrics": {k: round(float(v), 4) for k, v in metrics.items()}, **(extra or {})}
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def read_json(path: Path) -> Any:
    """A benchmark file, plain or gzip-compressed JSON; a clear error names the file otherwise."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise PersonaError(f"{path}: not readable JSON ({type(exc).__name__}: {exc})") from exc
