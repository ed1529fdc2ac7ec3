"""The ``litellm`` backend: any provider litellm speaks (OpenAI-compatible servers, Ollama, vLLM,
hosted APIs), translated at the boundary onto persona-mw's ``Backend`` contract and error tree.

litellm is imported on first use, never at module import: it is heavy (seconds) and, unless
``LITELLM_LOCAL_MODEL_COST_MAP`` is set, fetches a price list over the network while importing.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import logging
import os
from typing import Any, AsyncIterator

from persona_mw.adapters.base import Capabilities, estimate_tokens, messages_as_dicts
from persona_mw.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
)
from persona_mw.types import Candidate, Decoding, GenerationParams, Message

log = logging.getLogger(__name__)

__all__ = ["LiteLLMBackend", "create", "import_litellm"]

_litellm: Any = None


def import_litellm() -> Any:
    """Import litellm offline and quiet: no cost-map fetch, no debug banners, no message logging.

    Use this (not a bare ``import litellm``) anywhere persona-mw needs litellm, tests included.
    """
    global _litellm
    if _litellm is not None:
        return _litellm
    # Both must be set before the import: the cost map is fetched while the module loads.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
    try:
        import litellm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'litellm' backend needs the litellm package: pip install 'persona-mw[litellm]'"
        ) from exc
    # Switches that exist in some litellm versions and not others; set the ones that exist.
    for attr, value in (
        ("telemetry", False),
        ("suppress_debug_info", True),
        ("set_verbose", False),
        ("turn_off_message_logging", True),
        ("disable_hf_tokenizer_download", True),
    ):
        if hasattr(litellm, attr):
            setattr(litellm, attr, value)
    _litellm = litellm
    return litellm


async def _aimport_litellm() -> Any:
    # The first import takes seconds: keep it off the event loop (a server thread may be serving).
    return _litellm if _litellm is not None else await asyncio.to_thread(import_litellm)


class LiteLLMBackend:
    """A black-box backend over ``litellm.acompletion``.

    ``model`` is a litellm model string (``openai/gpt-4o-mini``, ``ollama/llama3`` ...);
    ``api_base``/``api_key`` point it at a server; ``extra_headers``/``extra_body`` are sent with
    every request (e.g. ``{"X-Persona-User": ...}`` when the server is another persona-mw).
    """

    name = "litellm"

    def __init__(
        self,
        model: str,
        api_base: str | None = None,
        api_key: str | None = None,
        timeout: float = 60,
        max_retries: int = 0,
        extra_headers: dict[str, str] | None = None,
        extra_body: dict[str, Any] | None = None,
        max_context: int | None = None,
    ) -> None:
        if not model or not isinstance(model, str):
            raise ConfigError("litellm backend: 'model' must be a non-empty string such as 'openai/gpt-4o-mini'")
        if timeout <= 0:
            raise ConfigError(f"litellm backend: 'timeout' must be positive, got {timeout!r}")
        if max_retries < 0:
            raise ConfigError(f"litellm backend: 'max_retries' must be >= 0, got {max_retries!r}")
        self.model = model
        self.api_base = api_base
        self.api_key = api_key
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.extra_headers = dict(extra_headers or {})
        self.extra_body = dict(extra_body or {})
        self.capabilities = Capabilities(
            white_box=False, streaming=True, max_context=max_context, batched_candidates=True, tools=True
        )
        self._warned_decoding = False

    def __repr__(self) -> str:
        return f"LiteLLMBackend(model={self.model!r}, api_base={self.api_base!r})"

    # -------------------------------------------------------------------------- requests

    def _kwargs(self, messages: list[Message], params: GenerationParams | None,
                served: str | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self._litellm_model(served),
            "messages": messages_as_dicts(messages),
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            # A provider that lacks a parameter (n, seed ...) should not fail the turn: missing
            # choices are filled by further calls, and unsupported sampling knobs are best-effort.
            "drop_params": True,
        }
        if self.api_base:
            kwargs["api_base"] = self.api_base
        if self.api_key:
            kwargs["api_key"] = self.api_key
        if self.extra_headers:
            kwargs["extra_headers"] = dict(self.extra_headers)
        if self.extra_body:
            kwargs["extra_body"] = dict(self.extra_body)
        if params is not None:
            for key, value in params.model_dump(exclude_none=True).items():
                kwargs[key] = value
        return kwargs

    def _litellm_model(self, served: str | None) -> str:
        """The litellm model string asking the server for ``served`` (None: the backend's own model):
        the backend's provider prefix (``openai/``, ``hosted_vllm/`` ...) before the served name."""
        if served is None:
            return self.model
        provider = self.model.split("/", 1)[0] if "/" in self.model else "openai"
        return f"{provider}/{served}"

    async def _complete(self, litellm: Any, kwargs: dict[str, Any], route: Decoding | None) -> Any:
        """``litellm.acompletion``; a routed request (``Decoding.model``) that the server answers with
        404 (the model does not exist) is rerouted once (``Decoding.reroute``) and retried once.
        ``kwargs["model"]`` is left at the name that was used."""
        try:
            return await litellm.acompletion(**kwargs)
        except Exception as exc:
            if route is None or route.reroute is None or not _missing_model(exc):
                raise self._map_error(exc) from exc
            failed = exc
        served = await route.reroute(route.model)
        route.model, route.reroute = served, None  # once per request
        kwargs["model"] = self._litellm_model(served)
        try:
            return await litellm.acompletion(**kwargs)
        except Exception as exc:
            raise self._map_error(exc) from failed

    def _check_decoding(self, decoding: list[Decoding] | None) -> None:
        # Black-box: logits processors and activation hooks cannot reach a remote model. The
        # pipeline should not ask (capabilities.white_box is False); say so once if it does.
        if decoding and not self._warned_decoding and any(
            d.logits_processors or d.activation_hooks for d in decoding
        ):
            self._warned_decoding = True
            log.warning(
                "litellm backend %s is black-box: ignoring logits processors / activation hooks from %s",
                self.model,
                ", ".join(sorted({d.source or "?" for d in decoding})),
            )

    async def generate(
        self,
        messages: list[Message],
        *,
        n: int = 1,
        params: GenerationParams | None = None,
        decoding: list[Decoding] | None = None,
    ) -> list[Candidate]:
        """Return ``n`` candidates, asking once with ``n`` and again for any the provider left out."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        litellm = await _aimport_litellm()
        self._check_decoding(decoding)
        route = _route(decoding)
        candidates: list[Candidate] = []
        while len(candidates) < n:
            want = n - len(candidates)
            kwargs = self._kwargs(messages, params, route.model if route is not None else None)
            if want > 1:
                kwargs["n"] = want
            response = await self._complete(litellm, kwargs, route)
            choices = list(getattr(response, "choices", None) or [])
            if not choices:
                raise BackendError(f"litellm backend {self._where()}: the provider returned no choices")
            usage = getattr(response, "usage", None)
            completion_tokens = getattr(usage, "completion_tokens", None) if usage is not None else None
            for choice in choices[:want]:
                message = getattr(choice, "message", None)
                text = getattr(message, "content", None) or ""
                meta: dict[str, Any] = {"response_id": getattr(response, "id", None),
                                        "model": getattr(response, "model", None)}
                tool_calls = getattr(message, "tool_calls", None)
                if tool_calls:  # handed back untouched, as OpenAI dicts
                    meta["tool_calls"] = [tc.model_dump() if hasattr(tc, "model_dump") else dict(tc)
                                          for tc in tool_calls]
                candidates.append(
                    Candidate(
                        text=text,
                        index=len(candidates),
                        finish_reason=getattr(choice, "finish_reason", None) or "stop",
                        # Per-choice counts are not reported; the total is exact only for one choice.
                        tokens=completion_tokens if len(choices) == 1 else None,
                        meta=meta,
                    )
                )
        return candidates

    async def stream(
        self,
        messages: list[Message],
        *,
        params: GenerationParams | None = None,
        decoding: list[Decoding] | None = None,
    ) -> AsyncIterator[str]:
        """Yield text deltas as the provider sends them."""
        litellm = await _aimport_litellm()
        self._check_decoding(decoding)
        route = _route(decoding)
        kwargs = self._kwargs(messages, params, route.model if route is not None else None)
        kwargs["stream"] = True
        response = await self._complete(litellm, kwargs, route)
        try:
            iterator = response.__aiter__()
            while True:
                try:
                    chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    raise self._map_error(exc) from exc
                choices = getattr(chunk, "choices", None) or []
                if not choices:
                    continue
                delta = getattr(choices[0], "delta", None)
                text = getattr(delta, "content", None)
                if text:
                    yield text
        finally:
            await _close_quietly(response)

    def count_tokens(self, text: str) -> int:
        return int(estimate_tokens(text))

    async def aclose(self) -> None:
        # litellm keeps its HTTP clients in a process-wide cache that it owns; nothing of ours to close.
        return None

    # -------------------------------------------------------------------------- errors

    def _where(self) -> str:
        return f"model={self.model!r} api_base={self.api_base or '(provider default)'}"

    def _map_error(self, exc: BaseException) -> BackendError:
        """Translate litellm's (openai-derived) exceptions into ours; the caller chains ``from exc``."""
        detail = f"{type(exc).__name__}: {exc}"
        timeout_types, connection_types, unavailable_types = _error_types()
        # litellm re-wraps transport failures (a refused connection surfaces as a 500
        # InternalServerError "Connection error"), so look at the whole cause chain.
        chain = _cause_chain(exc)
        status = next((s for e in chain if isinstance(s := getattr(e, "status_code", None), int)), None)
        if any(isinstance(e, timeout_types) for e in chain):
            return BackendTimeout(f"litellm backend {self._where()} timed out after {self.timeout:g}s ({detail})")
        if any(isinstance(e, connection_types) for e in chain):
            return BackendUnavailable(
                f"litellm backend {self._where()} could not be reached ({detail})",
                hint="is the server running and is api_base right?",
            )
        if isinstance(exc, unavailable_types) or (status is not None and (status == 429 or status >= 500)):
            return BackendUnavailable(f"litellm backend {self._where()} is unavailable (status {status}; {detail})")
        return BackendError(f"litellm backend {self._where()} failed ({detail})")


def _route(decoding: list[Decoding] | None) -> Decoding | None:
    """The first Decoding that routes the request to a served model name (``Decoding.model``)."""
    return next((d for d in decoding or [] if d.model), None)


def _missing_model(exc: BaseException) -> bool:
    """The server answered 404: the model asked for does not exist (vLLM: ``NotFoundError``)."""
    return any(getattr(e, "status_code", None) == 404 for e in _cause_chain(exc))


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _error_types() -> tuple[tuple[type[BaseException], ...], ...]:
    """(timeout, connection, unavailable) exception types of litellm, openai and httpx."""
    timeout: list[type[BaseException]] = [TimeoutError]
    connection: list[type[BaseException]] = [ConnectionError]
    unavailable: list[type[BaseException]] = []
    if _litellm is not None:
        timeout.append(_litellm.Timeout)
        unavailable += [
            t for t in (getattr(_litellm, n, None) for n in
                        ("RateLimitError", "ServiceUnavailableError", "InternalServerError", "BadGatewayError"))
            if isinstance(t, type)
        ]
    try:
        import openai

        # openai.APITimeoutError (and litellm.Timeout) derive from APIConnectionError: the caller
        # tests for timeouts first.
        timeout.append(openai.APITimeoutError)
        connection.append(openai.APIConnectionError)
    except ImportError:  # pragma: no cover - openai comes with litellm
        pass
    try:
        import httpx

        timeout.append(httpx.TimeoutException)
        connection.append(httpx.TransportError)
    except ImportError:  # pragma: no cover - httpx is a core dependency
        pass
    return tuple(timeout), tuple(connection), tuple(unavailable)


async def _close_quietly(response: Any) -> None:
    """Close a litellm stream wrapper if it can be closed (the attribute varies across versions)."""
    for target in (response, getattr(response, "completion_stream", None)):
        closer = getattr(target, "aclose", None)
        if closer is None:
            continue
        try:
            result = closer()
            if inspect.isawaitable(result):
                await result
        except Exception:  # closing after a failure must not hide the failure itself
            log.debug("closing the litellm stream failed", exc_info=True)
        return


_SETTINGS = ("model", "api_base", "api_key", "timeout", "max_retries", "extra_headers", "extra_body", "max_context")


def create(**settings: Any) -> LiteLLMBackend:
    """Build the backend from the config's ``backend:`` section (``type: litellm`` plus these keys)."""
    unknown = [k for k in settings if k not in _SETTINGS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, _SETTINGS, n=1)
        raise ConfigError(
            f"litellm backend: unknown setting {key!r}",
            hint=f"did you mean {close[0]!r}?" if close else f"valid settings: {', '.join(_SETTINGS)}",
        )
    if "model" not in settings:
        raise ConfigError(
            "litellm backend: 'model' is required", hint="e.g. model: openai/gpt-4o-mini (a litellm model string)"
        )
    return LiteLLMBackend(**settings)
