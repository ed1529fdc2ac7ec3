"""``PluginContext``: the typed surface a plugin may use, handed to ``persona_startup(ctx)``.

A plugin used to receive the whole ``Middleware`` and reach into it. The context is what it may
rely on across releases: role backends (and a second local model for white-box plugins), the
reward registry, profile updates under the core's per-node lock, off-path scheduling with the
job budget, the store, the graph, long-term memory, its own failure policy and config errors that
name the plugin's place in the YAML file. Each plugin gets its own context (its name, policy and
position are its own); everything else is shared with the Middleware that built it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Coroutine, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from persona_mw.errors import ConfigError
from persona_mw.types import Profile

if TYPE_CHECKING:
    from persona_mw.budget import AuxBudget
    from persona_mw.config import LimitsConfig
    from persona_mw.graph import PreferenceGraph
    from persona_mw.store import Store


class PluginContext:
    """What one plugin may use of the Middleware that runs it."""

    def __init__(self, core: Any, plugin: str) -> None:
        # ``core`` is the Middleware; only this class touches it, so plugins depend on the methods below.
        self._core = core
        self.plugin = plugin
        entry = next((p for p in core.host.pipeline if p.name == plugin), None)
        self.index: int | None = entry.index if entry is not None else None

    # -- who am I ------------------------------------------------------------------------------

    @property
    def policy(self) -> str:
        """This plugin's ``on_error`` (``fail`` or ``skip``; ``fail`` for modules)."""
        return str(self._core.host.policy_of(self.plugin))

    def where(self, *path: str | int) -> str:
        """``file:line`` of this plugin's YAML entry (or a key under it), for messages."""
        loc: tuple[str | int, ...] = ("pipeline", self.index) if self.index is not None else ("pipeline",)
        return str(self._core.config.source.where(loc + tuple(path)))

    def config_error(self, message: str, *path: str | int, hint: str | None = None) -> ConfigError:
        """A ``ConfigError`` located at this plugin's entry (``raise ctx.config_error(...)`` at startup)."""
        return ConfigError(f"{self.where(*path)}: {message}", hint=hint)

    def plugins(self) -> list[tuple[str, Any]]:
        """``(name, instance)`` of every ``pipeline:`` entry, in YAML order."""
        return [(p.name, p.instance) for p in self._core.host.pipeline]

    # -- backends and rewards ------------------------------------------------------------------

    def backend(self, role: str | None = None) -> Any:
        """The main backend (no ``role``), or the backend of a ``roles:`` entry (built once, shared,
        closed with the Middleware; a role the config does not name is the main backend). As
        ``Middleware.make_backend``: the role ``"backend"`` builds a fresh main backend from the config."""
        if role is None:
            return self._core.backend
        return self._core.backends.build(role)

    def local_model(self, model: str) -> Any:
        """A second local (white-box) model by name, of the main backend's type, built once and shared."""
        return self._core.backends.local_model(model)

    @property
    def rewards(self) -> Mapping[str, Callable[..., Any]]:
        """The reward functions registered by name (``persona_register_rewards``), read-only."""
        return MappingProxyType(self._core.host.reward_fns)

    # -- profiles, store, graph, memory --------------------------------------------------------

    @property
    def store(self) -> Store:
        return self._core.store  # type: ignore[no-any-return]

    @property
    def graph(self) -> PreferenceGraph:
        return self._core.graph  # type: ignore[no-any-return]

    @property
    def limits(self) -> LimitsConfig:
        return self._core.config.limits  # type: ignore[no-any-return]

    def update_profile(self, node: str, change: Callable[[Profile], None]) -> Profile:
        """Read-modify-write ``node``'s profile under its lock (created if missing)."""
        return self._core.profiles.update(node, change)  # type: ignore[no-any-return]

    def profile_lock(self, node: str) -> threading.Lock:
        """The lock every read-modify-write of ``node``'s profile holds (core and plugins alike)."""
        return self._core.profiles.lock(node)  # type: ignore[no-any-return]

    def redact(self, text: str) -> str:
        """``text`` with the configured PII kinds replaced (as stored traces and memories are)."""
        return str(self._core.redactor.redact(text))

    @property
    def memory(self) -> Any:
        """Long-term memory (``persona_mw.memory.MemoryManager``), created with defaults on first use."""
        return self._core.memory

    def provide_memory(self, manager: Any) -> None:
        """Install ``manager`` as the Middleware's memory, unless one is installed already."""
        self._core.provide_memory(manager)

    # -- background work -----------------------------------------------------------------------

    def schedule(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` off the request path on the background loop; ``drain()`` waits for it."""
        self._core.schedule(coro)

    def job_budget(self) -> AuxBudget:
        """A fresh budget for one background job (``budget.aux_calls_per_job``)."""
        return self._core.job_budget()  # type: ignore[no-any-return]


class PerPlugin:
    """A hook argument built for each plugin (the runner calls ``make(plugin_name)``)."""

    def __init__(self, make: Callable[[str], Any]) -> None:
        self.make = make


__all__ = ["PerPlugin", "PluginContext"]
