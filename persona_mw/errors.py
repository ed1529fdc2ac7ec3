"""The exceptions persona-mw raises, one small documented tree.

    PersonaError                  base of everything we raise on purpose
     +-- ConfigError              bad YAML / settings; names file, line and field
     +-- RequestError             a bad chat request or feedback event; names the field
     |    +-- UnknownUserError    an id that the store does not hold
     +-- PluginError              a plugin failed; carries the plugin's name and the hook
     +-- BackendError             the LLM backend failed
     |    +-- BackendTimeout
     |    +-- BackendUnavailable  connection refused, 5xx, rate limit
     |    +-- ModelNotFound       a local model that is not in the registry or cannot be fetched
     |    +-- BackendOverloaded   the local model's request queue is full (503 + Retry-After)
     +-- StoreError               the store could not read or write
      +-- ForgottenError       a write for a user forgotten after the work started (dropped)

Where the pipeline degrades on purpose (a plugin with ``on_error: skip``) it records the
failure in the turn's trace and logs it; nothing is swallowed silently.
"""

from __future__ import annotations


class PersonaError(Exception):
    """Base class. ``hint`` is a one-line suggestion of how to fix the problem."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ConfigError(PersonaError):
    """Invalid configuration: the message names the file, line and field."""


class RequestError(PersonaError):
    """A chat request or feedback event that cannot be processed as given."""

    def __init__(self, message: str, *, field: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field


class UnknownUserError(RequestError):
    """The user (or other node) id is not in the store."""


class PluginError(PersonaError):
    """A plugin raised. ``plugin`` is its pipeline name, ``hook`` the stage that failed."""

    def __init__(self, message: str, *, plugin: str, hook: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.plugin = plugin
        self.hook = hook


class BackendError(PersonaError):
    """The LLM backend failed to answer."""


class BackendTimeout(BackendError):
    """The backend did not answer in time."""


class BackendUnavailable(BackendError):
    """The backend refused, returned a server error, or rate-limited us."""


class ModelNotFound(BackendError):
    """A local model name that the registry does not know or cannot fetch."""


class BackendOverloaded(BackendError):
    """The local backend's queue is full: retry after ``retry_after_s`` seconds (the server's 503 +
    ``Retry-After``). Not retried by the resilience wrapper: retrying at once would only refill it."""

    def __init__(self, message: str, *, retry_after_s: int = 1, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after_s = max(1, int(retry_after_s))


class StoreError(PersonaError):
    """The store failed to read or write."""


class ForgottenError(StoreError):
    """A write for a user who was forgotten after the work doing it started; the write is dropped."""


class StaleVersionError(StoreError):
    """An optimistic update carried a version that is no longer the stored one: re-read and retry."""
