"""``PersonaChatModel``: a LangChain ``BaseChatModel`` backed by a ``Middleware`` (extra ``[langchain]``).

Every call is a full persona-mw turn (prompt stages, the middleware's backend, post-call stages),
so LangChain chains and LangGraph agents get personalized answers::

    model = PersonaChatModel(middleware=mw, user="ana")
    model.invoke("hi")                                              # or per call:
    model.invoke("hi", config={"metadata": {"persona_user": "ben", "persona_context": "work"}})
    model.invoke("hi", user="ben")

Sync, async and streaming (``stream``/``astream``) are all supported; the last streamed chunk
carries the trace id in ``response_metadata``.

Tools and structured output (``bind_tools``, ``with_structured_output``, so LangGraph agents such as
``create_react_agent`` work) go through the middleware's backend's own tool calling: the tools
reach the model as OpenAI ``tools`` / ``tool_choice`` and its tool calls come back as the
``AIMessage``'s ``tool_calls``. Backends whose ``capabilities.tools`` is true have it (the
``litellm`` backend, so any OpenAI-compatible server with tool calling); on the others (the local
``transformers`` model has no tool calling) both methods raise ``ConfigError`` at bind time, saying
so, instead of an agent that silently never calls a tool. A call with tools bound and ``stream``
yields the whole answer as one chunk (the tool call is not streamed in pieces).
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Iterator, Sequence

try:
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
    from langchain_core.messages.tool import tool_call_chunk
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from pydantic import ConfigDict, Field
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the LangChain integration needs langchain-core: pip install 'persona-mw[langchain]'") from exc

from persona_mw.errors import ConfigError, RequestError

__all__ = ["PersonaChatModel"]


class PersonaChatModel(BaseChatModel):
    """A chat model that answers through persona-mw's pipeline for ``user`` (in ``context``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    middleware: Any = Field(description="the persona_mw.Middleware answering")
    user: str | None = Field(default=None, description="default end user; per call: user= or metadata.persona_user")
    context: str | None = None
    groups: list[str] = Field(default_factory=list)
    max_tokens: int | None = None
    temperature: float | None = None

    @property
    def _llm_type(self) -> str:
        return "persona-mw"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": getattr(self.middleware, "model_name", "persona-mw"), "user": self.user,
                "context": self.context}

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, run_manager: Any,
                 kwargs: dict[str, Any]) -> dict[str, Any]:
        meta = dict(getattr(run_manager, "metadata", None) or {})
        user = kwargs.get("user") or meta.get("persona_user") or self.user
        if not user:
            raise RequestError("PersonaChatModel needs a user: PersonaChatModel(user=...), invoke(..., user=...) "
                               "or config={'metadata': {'persona_user': ...}}", field="user")
        params: dict[str, Any] = {}
        for key in ("max_tokens", "temperature"):
            value = kwargs.get(key, getattr(self, key))
            if value is not None:
                params[key] = value
        if stop:
            params["stop"] = list(stop)
        for key in ("tools", "tool_choice"):
            if kwargs.get(key) is not None:
                params[key] = kwargs[key]
        return {
            "user": user, "context": kwargs.get("context") or meta.get("persona_context") or self.context,
            "groups": list(kwargs.get("groups") or self.groups),
            "messages": convert_to_openai_messages(messages), "params": params,
        }

    # -- tools -------------------------------------------------------------------------------------

    def _require_tools(self, what: str) -> None:
        backend = getattr(self.middleware, "backend", None)
        if not getattr(getattr(backend, "capabilities", None), "tools", False):
            name = getattr(backend, "name", None) or type(backend).__name__
            raise ConfigError(
                f"PersonaChatModel.{what}: the middleware's backend ({name}) has no tool calling, so tools and "
                "structured output cannot reach the model. Use a backend with tool calling: `backend: {type: "
                "litellm, model: openai/..., api_base: ...}` (any OpenAI-compatible server that supports tools).")

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | bool | dict[str, Any] | None = None,
                   **kwargs: Any) -> Any:
        """Bind LangChain tools (``@tool`` functions, pydantic models, OpenAI tool dicts) for the
        backend's tool calling; ``tool_choice``: a tool name, ``"auto"``, ``"none"``, ``"any"`` /
        ``"required"`` / ``True`` (some tool must be called), or an OpenAI dict."""
        self._require_tools("bind_tools")
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is True or tool_choice == "any":
            tool_choice = "required"
        elif isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
            tool_choice = {"type": "function", "function": {"name": tool_choice}}
        elif tool_choice is False:
            tool_choice = None
        return super().bind(tools=formatted, **({"tool_choice": tool_choice} if tool_choice else {}), **kwargs)

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Any:
        """Structured output through a forced tool call (LangChain's ``function_calling`` method);
        refused with ``ConfigError`` on a backend without tool calling (see the module doc)."""
        self._require_tools("with_structured_output")
        return super().with_structured_output(schema, include_raw=include_raw, **kwargs)

    @staticmethod
    def _tool_calls(raw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The backend's OpenAI tool calls as LangChain ``tool_calls`` / ``invalid_tool_calls``."""
        good: list[dict[str, Any]] = []
        bad: list[dict[str, Any]] = []
        for call in raw or []:
            fn = call.get("function") or {}
            name, args, call_id = fn.get("name"), fn.get("arguments"), call.get("id")
            try:
                parsed = json.loads(args) if isinstance(args, str) and args.strip() else (args or {})
                if not isinstance(parsed, dict):
                    raise ValueError(f"arguments are a JSON {type(parsed).__name__}, not an object")
                good.append({"name": name, "args": parsed, "id": call_id, "type": "tool_call"})
            except ValueError as exc:
                bad.append({"name": name, "args": args if isinstance(args, str) else json.dumps(args), "id": call_id,
                            "error": f"invalid tool arguments: {exc}", "type": "invalid_tool_call"})
        return good, bad

    @classmethod
    def _result(cls, response: Any) -> ChatResult:
        usage = response.usage
        gens = []
        for c in response.choices:
            raw = c.meta.get("tool_calls") if isinstance(getattr(c, "meta", None), dict) else None
            good, bad = cls._tool_calls(raw)
            gens.append(ChatGeneration(
                message=AIMessage(
                    content=c.text, tool_calls=good, invalid_tool_calls=bad,
                    additional_kwargs={"tool_calls": raw} if raw else {},
                    response_metadata={"persona_trace_id": response.trace.id, "finish_reason": c.finish_reason},
                    usage_metadata={"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                                    "total_tokens": usage.total_tokens},
                ),
                generation_info={"finish_reason": c.finish_reason},
            ))
        return ChatResult(generations=gens, llm_output={"persona_trace_id": response.trace.id})

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return self._result(self.middleware.chat(self._request(messages, stop, run_manager, kwargs)))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return self._result(await self.middleware.achat(self._request(messages, stop, run_manager, kwargs)))

    @staticmethod
    def _chunk(piece: Any) -> ChatGenerationChunk:
        if piece.done:
            trace_id = piece.trace_id or (piece.trace.id if piece.trace is not None else None)
            return ChatGenerationChunk(
                message=AIMessageChunk(content="", response_metadata={
                    "persona_trace_id": trace_id, "finish_reason": piece.finish_reason}),
                generation_info={"finish_reason": piece.finish_reason})
        return ChatGenerationChunk(message=AIMessageChunk(content=piece.delta))

    @staticmethod
    def _whole(result: ChatResult) -> ChatGenerationChunk:
        """A tool-calling answer as one stream chunk (tool calls are not streamed in pieces)."""
        msg = result.generations[0].message
        assert isinstance(msg, AIMessage)  # _generate answers with an AIMessage
        chunks = [tool_call_chunk(name=t["name"], args=json.dumps(t["args"]), id=t["id"], index=i)
                  for i, t in enumerate(msg.tool_calls)]
        return ChatGenerationChunk(
            message=AIMessageChunk(content=msg.content, tool_call_chunks=chunks, response_metadata=msg.response_metadata,
                                   usage_metadata=msg.usage_metadata),
            generation_info=result.generations[0].generation_info)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        if kwargs.get("tools"):
            yield self._whole(self._generate(messages, stop, run_manager, **kwargs))
            return
        for piece in self.middleware.stream(self._request(messages, stop, run_manager, kwargs)):
            chunk = self._chunk(piece)
            if run_manager is not None and piece.delta:
                run_manager.on_llm_new_token(piece.delta, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        if kwargs.get("tools"):
            yield self._whole(await self._agenerate(messages, stop, run_manager, **kwargs))
            return
        async for piece in self.middleware.astream(self._request(messages, stop, run_manager, kwargs)):
            chunk = self._chunk(piece)
            if run_manager is not None and piece.delta:
                await run_manager.on_llm_new_token(piece.delta, chunk=chunk)
            yield chunk
