"""A litellm ``CustomLogger`` that personalizes every litellm call: SDK and proxy, sync, async, streaming.

Pre-call it runs the pipeline's prompt stages (scope, gather, rewrite) and replaces the messages;
post-call it finishes the turn (trace stored, ``persona_after_turn`` scheduled). Use it in-process::

    litellm.callbacks = [PersonaCallback(Middleware.from_yaml("pipeline.yaml"))]
    litellm.completion(model=..., messages=..., user="ana")        # or metadata={"persona_user": "ana"}

or in the LiteLLM proxy's ``config.yaml``: ``litellm_settings: {callbacks:
persona_mw.integrations.litellm.proxy_handler}`` (the pipeline YAML comes from ``$PERSONA_MW_CONFIG``).

Where litellm 1.110 lets a callback change a request (read from its source, each path tested):

============================  =====================================================================
proxy                         ``async_pre_call_hook``: the returned ``data`` replaces the request
SDK ``acompletion``           ``async_pre_call_deployment_hook``: the returned kwargs replace the call's
(stream or not)               (runs on every async call, after function setup, before the provider)
SDK ``completion``            no hook can replace the request; ``log_pre_api_call`` sees the provider
(stream or not)               body (``additional_args.complete_input_dict``) before it is sent, and
                              the rewrite replaces its ``messages`` (re-applied on each retry). litellm
                              swallows exceptions there, so on this path only a failing pipeline lets
                              the call through unpersonalized (logged as an error).
post-call, every path         ``log_success_event`` (sync calls) / ``async_log_success_event`` (async
                              calls, proxy): once per call, after the whole stream for streaming ones
============================  =====================================================================

Per-request state (the ``Turn``) is kept from pre to post in a bounded map keyed by
``litellm_call_id``, and the rewritten request is marked in its metadata so a later hook on the
same call (the proxy's pre-call hook, then the router's deployment hook) does not rewrite it twice.
The post-call stages need the answer's text, which litellm redacts for *every* callback while
``litellm.turn_off_message_logging`` is on (``import_litellm`` turns it on): for the calls it
personalizes, the callback sets that call's own ``turn_off_message_logging`` to False unless the
caller set it for the call (then the after-turn stages see litellm's placeholder text).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import OrderedDict
from typing import Any, Mapping

from persona_mw.adapters.litellm import import_litellm
from persona_mw.errors import RequestError
from persona_mw.integrations._common import USER_HEADER, plain_messages, prompt_dicts, who
from persona_mw.types import Turn

import_litellm()  # before litellm's own modules: no cost-map fetch, quiet

from litellm.integrations.custom_logger import CustomLogger  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["PersonaCallback", "MARK"]

MARK = "persona_mw_call"
_COMPLETION_CALLS = {"completion", "acompletion"}


TRACE_HEADER = "X-Persona-Trace-Id"  # as persona-mw serve sends it
_PROXY_ADMIN = "default_user_id"  # litellm's user id for master-key calls: everyone's, so nobody's


def _key_user(auth: Any) -> str | None:
    """The end user / internal user the LiteLLM proxy attached to the call's key, if any."""
    for attr in ("end_user_id", "user_id"):
        value = getattr(auth, attr, None)
        if value and str(value) != _PROXY_ADMIN:
            return str(value)
    return None


def _http_error(status: int, message: str, param: str | None) -> Exception:
    from fastapi import HTTPException  # the proxy's own dependency

    return HTTPException(status_code=status, detail={"error": message, **({"param": param} if param else {})})


def _call_type(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


def _texts(response: Any) -> list[str]:
    out = []
    for choice in getattr(response, "choices", None) or []:
        message = getattr(choice, "message", None) or getattr(choice, "delta", None)
        out.append(str(getattr(message, "content", None) or ""))
    return out or [""]


def _finish_reason(response: Any) -> str | None:
    choices = getattr(response, "choices", None) or []
    return getattr(choices[0], "finish_reason", None) if choices else None


class PersonaCallback(CustomLogger):
    """Personalizes litellm calls through ``middleware``'s pipeline (see the module docstring).

    ``user`` / ``context`` are defaults for calls that name none; a call names its user with
    ``user=``, ``metadata={"persona_user": ...}`` or an ``X-Persona-User`` header. Calls with no
    user pass through untouched.
    """

    def __init__(self, middleware: Any, *, user: str | None = None, context: str | None = None,
                 max_pending: int = 4096, require_user: bool = False) -> None:
        super().__init__()
        self.mw = middleware
        self.user = user
        self.context = context
        self.max_pending = max_pending
        # Proxy only: a chat call naming no user is refused (400) instead of passed through.
        self.require_user = require_user
        self._pending: OrderedDict[str, Turn] = OrderedDict()
        self._traces: OrderedDict[str, Any] = OrderedDict()  # proxy: call id -> trace, for the response
        self._lock = threading.Lock()
        self.completed: int = 0  # post-call stages run (for tests and metrics)

    # -- state from pre to post ------------------------------------------------------------------

    def _remember(self, call_id: str, turn: Turn) -> None:
        with self._lock:
            self._pending[call_id] = turn
            while len(self._pending) > self.max_pending:  # calls whose post-call never came
                old_id, old = self._pending.popitem(last=False)
                log.warning("litellm call %s never finished; dropping its turn (trace %s)", old_id, old.trace.id)

    def _peek(self, call_id: str | None) -> Turn | None:
        with self._lock:
            return self._pending.get(call_id) if call_id else None

    def _pop(self, call_id: str | None) -> Turn | None:
        with self._lock:
            return self._pending.pop(call_id, None) if call_id else None

    def turn_for(self, call_id: str) -> Turn | None:
        """The pending turn of an unfinished call (None once its post-call stages ran)."""
        return self._peek(call_id)

    # -- pre-call ----------------------------------------------------------------------------------

    def _request(self, kwargs: Mapping[str, Any], key_user: str | None = None) -> dict[str, Any] | None:
        user, context = who(kwargs, user=None, context=None)
        user = user or key_user or self.user
        if not user or not kwargs.get("messages"):
            return None
        n = kwargs.get("n")
        return {"user": user, "context": context or self.context, "messages": plain_messages(kwargs["messages"]),
                "n": n if isinstance(n, int) and n > 0 else 1, "model": kwargs.get("model")}

    @staticmethod
    def _marked(kwargs: Mapping[str, Any]) -> str | None:
        for key in ("metadata", "litellm_metadata"):
            meta = kwargs.get(key)
            if isinstance(meta, Mapping) and meta.get(MARK):
                return str(meta[MARK])
        return None

    @staticmethod
    def _mark(data: dict[str, Any], call_id: str, turn: Turn) -> None:
        meta = dict(data.get("metadata") or {})
        meta[MARK] = call_id
        meta["persona_trace_id"] = turn.trace.id
        data["metadata"] = meta

    async def _arewrite(self, data: dict[str, Any], key_user: str | None = None) -> dict[str, Any] | None:
        if self._marked(data):
            return None
        req = self._request(data, key_user)
        if req is None:
            return None
        call_id = str(data.get("litellm_call_id") or uuid.uuid4())
        turn = await self.mw.aprepare(req)
        self._remember(call_id, turn)
        out = dict(data)
        out["litellm_call_id"] = call_id
        out["messages"] = prompt_dicts(turn)
        self._mark(out, call_id, turn)
        return out

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict[str, Any],
                                  call_type: Any) -> dict[str, Any] | None:
        """Proxy: rewrite the request body's messages before the proxy routes it.

        The user: the body's ``user``, ``metadata.persona_user``, an ``X-Persona-User`` header, then
        the end user / internal user litellm attached to the key (never the proxy admin's own id).
        The resolved user is also sent upstream in an ``X-Persona-User`` header (litellm drops the
        ``user`` field for models outside OpenAI's catalog; a persona-mw server upstream needs one).
        With ``require_user`` a call naming nobody gets a 400 saying how to name one."""
        if _call_type(call_type) not in _COMPLETION_CALLS:
            return None
        key_user = _key_user(user_api_key_dict)
        try:
            out = await self._arewrite(data, key_user)
        except RequestError as exc:  # bad input (an invalid user id...): the client's 400, not a 500
            raise _http_error(400, f"persona-mw: {exc}", getattr(exc, "field", None)) from None
        if out is None:
            if self.require_user and not self._marked(data) and data.get("messages"):
                raise _http_error(400, "persona-mw: no end user to personalize for: send the OpenAI 'user' field "
                                       f"(or metadata.persona_user, or an {USER_HEADER} header), or use a key "
                                       "that belongs to a user", "user")
            return data
        user = self._pending_user(out)
        if user:  # litellm drops `user` for non-OpenAI models: the header reaches any upstream
            out["extra_headers"] = {**(out.get("extra_headers") or {}), USER_HEADER: user}
        with self._lock:
            turn = self._pending.get(str(out["litellm_call_id"]))
            if turn is not None:
                self._traces[str(out["litellm_call_id"])] = turn.trace
                while len(self._traces) > self.max_pending:
                    self._traces.popitem(last=False)
        return out

    def _pending_user(self, data: Mapping[str, Any]) -> str | None:
        turn = self._peek(str(data.get("litellm_call_id")))
        return turn.request.user if turn is not None else None

    def _trace_of(self, data: Mapping[str, Any]) -> Any:
        call_id = self._marked(data) or data.get("litellm_call_id")
        with self._lock:
            return self._traces.get(str(call_id)) if call_id else None

    async def async_post_call_success_hook(self, data: dict[str, Any], user_api_key_dict: Any,
                                           response: Any) -> Any:
        """Proxy, non-streamed answers: the response's ``persona_trace`` is this callback's trace (as
        ``persona-mw serve`` answers), replacing any an upstream sent."""
        trace = self._trace_of(data)
        if trace is not None and response is not None:
            try:
                setattr(response, "persona_trace", trace.model_dump(mode="json"))
            except Exception:  # a response type that takes no extra fields: the header still says it
                log.debug("could not attach persona_trace to %s", type(response).__name__)
        return response

    async def async_post_call_response_headers_hook(self, data: dict[str, Any], user_api_key_dict: Any,
                                                    response: Any, request_headers: Any = None,
                                                    litellm_call_info: Any = None) -> dict[str, str] | None:
        """Proxy, streamed or not: the ``X-Persona-Trace-Id`` response header names the turn's trace."""
        trace = self._trace_of(data)  # kept (bounded, like the pending turns): the two hooks' order varies
        return {TRACE_HEADER: trace.id} if trace is not None else None

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> dict[str, Any] | None:
        """SDK ``acompletion`` (and the proxy's router call, already marked): rewrite the messages."""
        if _call_type(call_type) not in _COMPLETION_CALLS:
            return None
        return await self._arewrite(kwargs)

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: dict[str, Any]) -> None:
        """SDK ``completion``: rewrite the provider body just before it is sent (see the module doc)."""
        body = (kwargs.get("additional_args") or {}).get("complete_input_dict")
        call_id = kwargs.get("litellm_call_id")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not call_id:
            return
        turn = self._peek(call_id)
        if turn is None:
            if _call_type(kwargs.get("call_type")) != "completion":
                return  # async calls were rewritten by the deployment hook (or had no user)
            req = self._request({**kwargs, "messages": body["messages"]})
            if req is None:
                return
            try:
                turn = self.mw.prepare(req)
            except Exception:
                # litellm would swallow it anyway: say so loudly, and let the call go unpersonalized.
                log.exception("persona-mw pre-call stages failed for litellm call %s; sent unpersonalized", call_id)
                return
            self._remember(call_id, turn)
        body["messages"] = prompt_dicts(turn)
        # litellm redacts answers for every callback when turn_off_message_logging is on (which
        # import_litellm sets); the post-call stages need this call's answer, so unless the caller
        # set it for this call, redaction is lifted for this call only.
        dyn = kwargs.get("standard_callback_dynamic_params")
        if not isinstance(dyn, dict):
            dyn = kwargs["standard_callback_dynamic_params"] = {}
        dyn.setdefault("turn_off_message_logging", False)

    # -- post-call ---------------------------------------------------------------------------------

    async def async_log_success_event(self, kwargs: dict[str, Any], response_obj: Any,
                                      start_time: Any, end_time: Any) -> None:
        turn = self._pop(kwargs.get("litellm_call_id"))
        if turn is not None:
            await self.mw.acomplete(turn, _texts(response_obj), finish_reason=_finish_reason(response_obj))
            self.completed += 1

    def log_success_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        turn = self._pop(kwargs.get("litellm_call_id"))
        if turn is not None:
            self.mw.complete(turn, _texts(response_obj), finish_reason=_finish_reason(response_obj))
            self.completed += 1

    def _failed(self, kwargs: dict[str, Any]) -> None:
        turn = self._pop(kwargs.get("litellm_call_id"))
        if turn is not None:
            turn.trace.flags.append(f"llm_call_failed: {kwargs.get('exception') or 'error'}")
            # through the Middleware's trace writer: bounded and redacted like every other stored trace
            self.mw.jobs.save_trace(turn.trace)

    async def async_log_failure_event(self, kwargs: dict[str, Any], response_obj: Any,
                                      start_time: Any, end_time: Any) -> None:
        self._failed(kwargs)

    def log_failure_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._failed(kwargs)


_proxy_handler: PersonaCallback | None = None


def __getattr__(name: str) -> Any:
    """``proxy_handler``: the instance a LiteLLM proxy config names, built on first access from
    ``$PERSONA_MW_CONFIG`` (or the embedded defaults)."""
    global _proxy_handler
    if name != "proxy_handler":
        raise AttributeError(name)
    if _proxy_handler is None:
        from persona_mw.middleware import Middleware

        path = os.environ.get("PERSONA_MW_CONFIG")
        # In the proxy a call naming no user is refused (400); PERSONA_MW_REQUIRE_USER=0 lets it through.
        require = os.environ.get("PERSONA_MW_REQUIRE_USER", "1").strip().lower() not in ("0", "false", "no", "")
        _proxy_handler = PersonaCallback(Middleware.from_yaml(path) if path else Middleware(), require_user=require)
    return _proxy_handler
