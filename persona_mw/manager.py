"""The plugin manager of one Middleware: built-ins, entry points, and the YAML pipeline.

Built-in plugin modules are listed in ``DEFAULT_PLUGINS`` and registered exactly like
third-party ones (which arrive through the ``persona_mw`` entry-point group). Setting
``PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD=1`` (or ``autoload_plugins: false``) skips entry points.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable

import pluggy
from pydantic import BaseModel, ValidationError

from persona_mw import hookspecs, stages
from persona_mw.config import Config, PluginEntry
from persona_mw.errors import ConfigError, PersonaError, PluginError
from persona_mw.reward_set import unknown_reward_error

hookimpl = pluggy.HookimplMarker("persona_mw")

# Modules whose module-level hookimpls register the built-in plugin classes and backends.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "persona_mw.builtins",
    "persona_mw.plugins.rewards",
    "persona_mw.plugins.preference_fit",
)

ENTRY_POINT_GROUP = "persona_mw"
AUTOLOAD_ENV = "PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD"
PIPELINE_PREFIX = "pipeline:"


def display_name(pluggy_name: str) -> str:
    """The name a user knows a plugin by (its YAML name for pipeline instances)."""
    return pluggy_name[len(PIPELINE_PREFIX):] if pluggy_name.startswith(PIPELINE_PREFIX) else pluggy_name


@dataclass
class PipelinePlugin:
    """One instantiated ``pipeline:`` entry."""

    name: str
    use: str
    instance: Any
    on_error: str
    index: int


class PluginHost:
    """A fresh pluggy PluginManager plus the registries filled by the startup hooks."""

    def __init__(self, autoload: bool = True, plugin_types: dict[str, type] | None = None) -> None:
        self.pm = pluggy.PluginManager("persona_mw")
        self.pm.add_hookspecs(hookspecs)
        for modname in DEFAULT_PLUGINS:
            self.pm.register(importlib.import_module(modname), name=modname)
        self.autoloaded = False
        if autoload and not os.environ.get(AUTOLOAD_ENV):
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            self.autoloaded = True
        self._check_pending()
        self.plugin_types: dict[str, type] = {}
        self.backend_types: dict[str, Callable[..., Any]] = {}
        self.reward_fns: dict[str, Callable[..., Any]] = {}
        self.pm.hook.persona_register_plugins(register=self._registrar(self.plugin_types, "plugin"))
        register = self._registrar(self.plugin_types, "plugin")
        for name, cls in (plugin_types or {}).items():
            register(name, cls)
        self.pm.hook.persona_register_backends(register=self._registrar(self.backend_types, "backend"))
        self.pm.hook.persona_register_rewards(register=self._registrar(self.reward_fns, "reward"))
        self.detectors: dict[str, Callable[..., Any]] = {}
        self.pm.hook.persona_register_detectors(register=self._registrar(self.detectors, "PII detector"))
        self.pipeline: list[PipelinePlugin] = []

    # -- registries -------------------------------------------------------------------------

    @staticmethod
    def _registrar(table: dict[str, Any], what: str) -> Callable[[str, Any], None]:
        def register(name: str, obj: Any) -> None:
            if name in table and table[name] is not obj:
                raise PluginError(
                    f"{what} name {name!r} registered twice ({table[name]!r} and {obj!r})", plugin=name
                )
            table[name] = obj

        return register

    def _check_pending(self) -> None:
        self._check_sync_only()
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = getattr(exc, "plugin", None)
            pname = self.pm.get_name(name) if name is not None else "?"
            raise PluginError(
                f"plugin {pname!r} implements a hook that does not exist: {exc}",
                plugin=str(pname),
                hint="hook names are listed by `persona-mw plugins --hooks`",
            ) from None

    def _check_sync_only(self) -> None:
        """Hooks the stage table runs ``sync`` (registration) cannot await: refuse an ``async def`` one
        now, naming it, rather than let pluggy call it and drop the coroutine unawaited."""
        for row in stages.STAGES:
            if row.runner != "sync":
                continue
            for impl in getattr(self.pm.hook, row.hook).get_hookimpls():
                if inspect.iscoroutinefunction(impl.function):
                    name = display_name(impl.plugin_name)
                    raise PluginError(f"plugin {name!r}: {row.hook} must be a plain def (it runs while plugins are "
                                      "registered, before any event loop); async def is not supported",
                                      plugin=name, hook=row.hook)

    # -- the YAML pipeline ------------------------------------------------------------------

    def build_pipeline(self, config: Config) -> list[PipelinePlugin]:
        source = config.source
        seen: dict[str, int] = {}
        built: list[PipelinePlugin] = []
        for i, entry in enumerate(config.pipeline):
            loc = ("pipeline", i)
            cls = self.plugin_types.get(entry.use)
            if cls is None:
                close = difflib.get_close_matches(entry.use, list(self.plugin_types), n=1)
                hint = f"did you mean {close[0]!r}?" if close else "see `persona-mw plugins`"
                raise ConfigError(
                    f"{source.where(loc + ('use',))}: pipeline[{i}].use: unknown plugin {entry.use!r} "
                    f"(known: {', '.join(sorted(self.plugin_types)) or 'none'})",
                    hint=hint,
                )
            name = entry.instance_name
            if name in seen:
                raise ConfigError(
                    f"{source.where(loc)}: pipeline[{i}]: the name {name!r} is already used by pipeline[{seen[name]}]",
                    hint="give one of them a distinct `name:`",
                )
            seen[name] = i
            instance = self._instantiate(cls, entry, name, config, loc)
            built.append(PipelinePlugin(name=name, use=entry.use, instance=instance, on_error=entry.on_error, index=i))
        # pluggy calls implementations last-registered first: register in reverse so its own
        # loop (and ours, walking reversed(get_hookimpls())) follow the YAML order.
        for p in reversed(built):
            try:
                # Namespaced, so an instance never collides with an entry-point module's name.
                self.pm.register(p.instance, name=PIPELINE_PREFIX + p.name)
            except ValueError as exc:
                raise ConfigError(f"{source.where(('pipeline', p.index))}: cannot register {p.name!r}: {exc}") from None
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin {p.name!r} has an invalid hook: {exc}", plugin=p.name) from None
        self._check_pending()
        self.pipeline = built
        return built

    def _instantiate(self, cls: type, entry: PluginEntry, name: str, config: Config, loc: tuple[Any, ...]) -> Any:
        cfg_model: type[BaseModel] | None = getattr(cls, "Config", None)
        settings = entry.settings
        cfg: Any = None
        if cfg_model is not None:
            try:
                cfg = cfg_model.model_validate(settings)
            except ValidationError as exc:
                raise config.source.error(exc, prefix=loc, model=cfg_model) from None
        elif settings:
            raise ConfigError(
                f"{config.source.where(loc)}: plugin {entry.use!r} takes no settings, got {', '.join(settings)}"
            )
        params = inspect.signature(cls).parameters
        kwargs: dict[str, Any] = {}
        if "config" in params:
            kwargs["config"] = cfg
        if "name" in params:
            kwargs["name"] = name
        try:
            return cls(**kwargs)
        except Exception as exc:
            raise PluginError(f"plugin {name!r} failed to start: {exc}", plugin=name) from exc

    def check_names(self, config: Config) -> None:
        """What ``build_pipeline`` cannot see and startup would fail on: reward names of plugins with a
        ``rewards`` setting, and backend types and model names (each backend is constructed, which
        checks a registry model name without loading anything). Raises ConfigError naming file and line."""
        source = config.source
        for p in self.pipeline:
            rewards = getattr(getattr(p.instance, "config", None), "rewards", None)
            if not isinstance(rewards, dict):
                continue
            for reward in rewards:
                if reward not in self.reward_fns:
                    raise unknown_reward_error(reward, self.reward_fns,
                                               source.where(("pipeline", p.index, "rewards", reward)), p.index, p.name)
        sections = [(("backend",), config.backend), *((("roles", r), b) for r, b in config.roles.items())]
        for loc, section in sections:
            factory = self.backend_types.get(section.type)
            where = source.where(loc + ("type",))
            if factory is None:
                close = difflib.get_close_matches(section.type, list(self.backend_types), n=1)
                raise ConfigError(f"{where}: {'.'.join(loc)}.type: unknown backend type {section.type!r} "
                                  f"(known: {', '.join(sorted(self.backend_types))})",
                                  hint=f"did you mean {close[0]!r}?" if close else None)
            try:
                factory(**section.settings)  # construction only: nothing is loaded or connected
            except PersonaError as exc:
                raise ConfigError(f"{source.where(loc + ('model',))}: {'.'.join(loc)}: {exc.message}",
                                  hint=exc.hint) from None
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source.where(loc)}: {'.'.join(loc)}: invalid settings for backend "
                                  f"{section.type!r}: {exc}") from None

    def policy_of(self, plugin_name: str) -> str:
        for p in self.pipeline:
            if p.name == plugin_name:
                return p.on_error
        return "fail"

    def describe(self) -> list[dict[str, Any]]:
        """Every registered plugin (modules and pipeline instances) with version and hooks."""
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            dist = None
            for p, d in self.pm.list_plugin_distinfo():
                if p is plugin:
                    dist = d
            version = getattr(dist, "version", None) if dist else None
            if version is None:
                mod = inspect.getmodule(plugin)
                version = getattr(mod, "__version__", None)
            if version is None:
                from persona_mw import __version__

                version = __version__
            rows.append({"name": name, "version": version, "hooks": hooks,
                         "source": dist.project_name if dist else "builtin"})
        return rows
