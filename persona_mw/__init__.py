"""persona-mw: middleware that personalizes any LLM through a pipeline of pluggy hooks.

The public API: ``Middleware``, the ``hookimpl`` marker for plugins, the shared types and
``load_config``. Importing this package loads neither torch nor litellm and opens no socket.
"""

from __future__ import annotations

__version__ = "0.1.0"

from persona_mw.config import Config, load_config, parse_config
from persona_mw.errors import (
    BackendError,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    ForgottenError,
    ModelNotFound,
    PersonaError,
    PluginError,
    RequestError,
    StoreError,
    UnknownUserError,
)
from persona_mw.context import PluginContext
from persona_mw.manager import hookimpl
from persona_mw.middleware import Middleware
from persona_mw.types import (
    Candidate,
    ChatRequest,
    ChatResponse,
    ChoiceFeedback,
    ContextItem,
    Decoding,
    EditFeedback,
    Feedback,
    GenerationParams,
    Memory,
    Message,
    Profile,
    RatingFeedback,
    Scope,
    ScopeNode,
    StashKey,
    StatedFeedback,
    StatedPreference,
    StreamChunk,
    Trace,
    TraceStep,
    Turn,
)

__all__ = [
    "__version__",
    "BackendError",
    "BackendOverloaded",
    "BackendTimeout",
    "BackendUnavailable",
    "Candidate",
    "ChatRequest",
    "ChatResponse",
    "ChoiceFeedback",
    "Config",
    "ConfigError",
    "ForgottenError",
    "ContextItem",
    "Decoding",
    "EditFeedback",
    "Feedback",
    "GenerationParams",
    "Memory",
    "Message",
    "Middleware",
    "ModelNotFound",
    "PersonaError",
    "PluginContext",
    "PluginError",
    "Profile",
    "RatingFeedback",
    "RequestError",
    "Scope",
    "ScopeNode",
    "StashKey",
    "StatedFeedback",
    "StatedPreference",
    "StoreError",
    "StreamChunk",
    "Trace",
    "TraceStep",
    "Turn",
    "UnknownUserError",
    "hookimpl",
    "load_config",
    "parse_config",
    "wrap",
]


def __getattr__(name: str) -> object:
    # ``wrap`` lives with the integrations; imported on first use so ``import persona_mw`` stays light.
    if name == "wrap":
        from persona_mw.integrations.openai import wrap

        return wrap
    raise AttributeError(f"module 'persona_mw' has no attribute {name!r}")
