"""A LangGraph agent (a StateGraph: model node, tool node, loop) whose chat model is persona-mw's ``PersonaChatModel``.

The agent's model calls go through persona-mw's pipeline (the user's stated preference is added to
every prompt) to a tool-capable OpenAI-compatible server, reached through the ``litellm`` backend.
Then it answers a structured question with ``with_structured_output``.

Run: python examples/langgraph_agent.py                      # a tiny deterministic tool-calling server
     python examples/langgraph_agent.py --base-url http://127.0.0.1:8000/v1 --model my-model   # vLLM, Ollama...

Without ``--base-url`` the model is ``persona_mw.testing.tool_calling_llm`` on loopback: a stand-in
that calls the first tool with arguments taken from the question and then reports the tool's result
(no weights needed). The local ``transformers`` backend has no tool calling: ``bind_tools`` refuses it.
Needs the extras ``[langchain,litellm,server]`` and ``langgraph``.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from pydantic import BaseModel, Field

from persona_mw import Middleware, parse_config
from persona_mw.integrations.langchain import PersonaChatModel

PREFERENCE = "Use metric units."


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"18 degrees C and sunny in {city}"


class Trip(BaseModel):
    """A trip the user asked about."""

    destination: str = Field(description="the city")
    days: int = Field(description="how many days")


def build_agent(model: PersonaChatModel, tools: list[Any]) -> Any:
    """The ReAct loop: the model answers or calls tools; tool results go back to the model."""
    bound = model.bind_tools(tools)

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [bound.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)  # tool calls -> "tools", else the end
    graph.add_edge("tools", "agent")
    return graph.compile()


@contextlib.contextmanager
def upstream(base_url: str | None) -> Iterator[tuple[str, Any]]:
    """The OpenAI-compatible server the agent's model calls: the given one, or the stand-in on loopback."""
    if base_url:
        yield base_url, None
        return
    from persona_mw.server import serve_in_thread
    from persona_mw.testing import tool_calling_llm

    app = tool_calling_llm()
    with serve_in_thread(app) as url:
        yield url + "/v1", app.state.requests


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", help="a tool-capable OpenAI-compatible server (default: the stand-in)")
    ap.add_argument("--model", default="tool-llm", help="its model name")
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()
    with upstream(args.base_url) as (base, requests):
        cfg = parse_config(f"backend:\n  type: litellm\n  model: openai/{args.model}\n  api_base: {base}\n"
                           f"  api_key: {args.api_key}\n  max_retries: 0\n"
                           "pipeline:\n  - use: stated\n    placement: system\n")
        cfg.store.path = str(Path(tempfile.mkdtemp()) / "persona.db")
        with Middleware(cfg) as mw:
            mw.feedback(kind="stated", user="ana", text=PREFERENCE)
            model = PersonaChatModel(middleware=mw, user="ana")
            agent = build_agent(model, [get_weather])
            state = agent.invoke({"messages": [("user", "What's the weather in Lisbon?")]})
            for m in state["messages"]:
                calls = [f"{c['name']}({c['args']})" for c in getattr(m, "tool_calls", None) or []]
                print(f"{m.type}:", m.content or "", *calls)
            print("answer:", state["messages"][-1].content)
            trip = model.with_structured_output(Trip).invoke("Plan 3 days in Porto")
            print("structured:", trip.model_dump_json())
            if requests is not None:
                personalized = [r for r in requests if PREFERENCE in r["messages"][0].get("content", "")]
                print(f"model calls: {len(requests)}, with the preference in the system prompt: {len(personalized)}")


if __name__ == "__main__":
    main()
