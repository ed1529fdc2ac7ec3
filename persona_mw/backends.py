"""``BackendRegistry``: builds and owns the backends of one Middleware.

The main backend (``backend:``), one per ``roles:`` entry (built once and shared by every plugin
asking for the role), the ``resilience:`` wrappers with their fallback roles, and second local
models for white-box plugins (``local_model(name)``, of the main backend's type). ``close``
closes each of them once.
"""

from __future__ import annotations

from typing import Any

from persona_mw.config import Config
from persona_mw.errors import ConfigError
from persona_mw.manager import PluginHost


class BackendRegistry:
    """The backends of one Middleware, by role and by local model name."""

    def __init__(self, config: Config, host: PluginHost, main: Any = None) -> None:
        self.config = config
        self.host = host
        self._roles: dict[str, Any] = {}
        self._models: dict[tuple[str, str], Any] = {}
        self.main: Any = main if main is not None else self.build("backend")
        if "backend" in config.resilience and not hasattr(self.main, "policy"):  # tenants share a wrapped one
            self.main = self._resilient("backend", self.main)

    def role(self, role: str = "backend") -> Any:
        """The backend of a role (``backend`` is the main one; roles not configured default to it)."""
        section = self.config.roles.get(role) if role != "backend" else None
        if section is None:
            return self.main
        if role not in self._roles:
            built = self._build(role, section)
            self._roles[role] = self._resilient(role, built) if role in self.config.resilience else built
        return self._roles[role]

    def build(self, role: str = "backend") -> Any:
        """A fresh backend from the config (the main one for ``backend``; shared for other roles)."""
        if role != "backend":
            return self.role(role)
        return self._build(role, self.config.backend)

    def local_model(self, model: str) -> Any:
        """Another local model of the main backend's type (``transformers`` by default), built once."""
        kind = self.config.backend.type if self.config.backend.type in self.host.backend_types else "transformers"
        key = (kind, model)
        if key not in self._models:
            factory = self.host.backend_types.get(kind)
            if factory is None:
                raise ConfigError(f"no backend type {kind!r} is registered to load the local model {model!r}")
            self._models[key] = factory(model=model)
        return self._models[key]

    def _resilient(self, role: str, backend: Any) -> Any:
        """``backend`` under the role's ``resilience:`` policy, its fallback roles built as well."""
        from persona_mw.resilience import ResilientBackend

        policy = self.config.resilience[role]
        fallbacks = []
        for fb in policy.fallback:
            if fb == role or (fb != "backend" and fb not in self.config.roles):
                raise ConfigError(f"{self.config.source.where(('resilience', role))}: resilience.{role}.fallback: "
                                  f"{fb!r} is not another role (roles: {', '.join(sorted(self.config.roles)) or 'none'})")
            fb_backend = self.main if fb == "backend" else self.role(fb)
            fallbacks.append((fb, getattr(fb_backend, "inner", fb_backend)))
        return ResilientBackend(backend, policy, role=role, fallbacks=fallbacks)

    def _build(self, role: str, section: Any) -> Any:
        factory = self.host.backend_types.get(section.type)
        where = self.config.source.where((role,) if role == "backend" else ("roles", role))
        if factory is None:
            known = ", ".join(sorted(self.host.backend_types))
            raise ConfigError(f"{where}: unknown backend type {section.type!r} (known: {known})")
        try:
            return factory(**section.settings)
        except ConfigError as exc:
            raise ConfigError(f"{where}: backend {section.type!r}: {exc.message}", hint=exc.hint) from None
        except TypeError as exc:
            raise ConfigError(f"{where}: invalid settings for backend {section.type!r}: {exc}") from None

    async def aclose(self) -> None:
        """Close every backend built (each once)."""
        for backend in self.all():
            closer = getattr(backend, "aclose", None)
            if closer is not None:
                await closer()

    def all(self) -> list[Any]:
        """The main backend, every role backend and local model built, each once."""
        out: list[Any] = []
        for b in [self.main, *self._roles.values(), *self._models.values()]:
            if all(b is not o for o in out):
                out.append(b)
        return out


__all__ = ["BackendRegistry"]
