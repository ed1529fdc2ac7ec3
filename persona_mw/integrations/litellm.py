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
from persona_mw.integrations._common import plain_messages, prompt_dicts, who
from persona_mw.types import Turn

import_litellm()  # before litellm's own modules: no cost-map fetch, quiet

from litellm.integrations.custom_logger import CustomLogger  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["PersonaCallback", "MARK"]

MARK = "persona_mw_call"
_COMPLETION_CALLS = {"completion", "acompletion"}


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


class PersonaCallback(CustomLogger):  # type: ignore[misc]
    """Personalizes litellm calls through ``middleware``'s pipeline (see the module docstring).

    ``user`` / ``context`` are defaults for calls that name none; a call names its user with
    ``user=``, ``metadata={"persona_user": ...}`` or an ``X-Persona-User`` header. Calls with no
    user pass through untouched.
    """

    def __init__(self, middleware: Any, *, user: str | None = None, context: str | None = None,
                 max_pending: int = 4096) -> None:
        super().__init__()
        self.mw = middleware
        self.user = user
        self.context = context
        self.max_pending = max_pending
        self._pending: OrderedDict[str, Turn] = OrderedDict()
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

    def _request(self, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
        user, context = who(kwargs, user=None, context=None)
        user = user or self.user
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

    async def _arewrite(self, data: dict[str, Any]) -> dict[str, Any] | None:
        if self._marked(data):
            return None
        req = self._request(data)
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
        """Proxy: rewrite the request body's messages before the proxy routes it."""
        if _call_type(call_type) not in _COMPLETION_CALLS:
            return None
        out = await self._arewrite(data)
        return out if out is not None else data

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
            if getattr(self.mw.config.trace, "store", False):
                self.mw.store.save_trace(turn.trace)

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
        _proxy_handler = PersonaCallback(Middleware.from_yaml(path) if path else Middleware())
    return _proxy_handler
