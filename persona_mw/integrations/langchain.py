"""``PersonaChatModel``: a LangChain ``BaseChatModel`` backed by a ``Middleware`` (extra ``[langchain]``).

Every call is a full persona-mw turn (prompt stages, the middleware's backend, post-call stages),
so LangChain chains and LangGraph agents get personalized answers::

    model = PersonaChatModel(middleware=mw, user="ana")
    model.invoke("hi")                                              # or per call:
    model.invoke("hi", config={"metadata": {"persona_user": "ben", "persona_context": "work"}})
    model.invoke("hi", user="ben")

Sync, async and streaming (``stream``/``astream``) are all supported; the last streamed chunk
carries the trace id in ``response_metadata``.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

try:
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from pydantic import ConfigDict, Field
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the LangChain integration needs langchain-core: pip install 'persona-mw[langchain]'") from exc

from persona_mw.errors import RequestError

__all__ = ["PersonaChatModel"]


class PersonaChatModel(BaseChatModel):  # type: ignore[misc]
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
        return {
            "user": user, "context": kwargs.get("context") or meta.get("persona_context") or self.context,
            "groups": list(kwargs.get("groups") or self.groups),
            "messages": convert_to_openai_messages(messages), "params": params,
        }

    @staticmethod
    def _result(response: Any) -> ChatResult:
        usage = response.usage
        gens = [
            ChatGeneration(
                message=AIMessage(
                    content=c.text,
                    response_metadata={"persona_trace_id": response.trace.id, "finish_reason": c.finish_reason},
                    usage_metadata={"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                                    "total_tokens": usage.total_tokens},
                ),
                generation_info={"finish_reason": c.finish_reason},
            )
            for c in response.choices
        ]
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

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for piece in self.middleware.stream(self._request(messages, stop, run_manager, kwargs)):
            chunk = self._chunk(piece)
            if run_manager is not None and piece.delta:
                run_manager.on_llm_new_token(piece.delta, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for piece in self.middleware.astream(self._request(messages, stop, run_manager, kwargs)):
            chunk = self._chunk(piece)
            if run_manager is not None and piece.delta:
                await run_manager.on_llm_new_token(piece.delta, chunk=chunk)
            yield chunk
