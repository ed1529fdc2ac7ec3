"""A LangChain chain turn with persona-mw as the chat model (extra `[langchain]`), on the embedded model.

Run: python examples/langchain_agent.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from persona_mw import Middleware, parse_config
from persona_mw.integrations.langchain import PersonaChatModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    cfg = parse_config(f"backend:\n  type: transformers\n  max_new_tokens: {args.max_new_tokens}\n"
                       "pipeline:\n  - use: stated\n    placement: user_suffix\n")
    cfg.store.path = str(Path(tempfile.mkdtemp()) / "persona.db")
    with Middleware(cfg) as mw:
        mw.feedback(kind="stated", user="ana", text="Answer in one short sentence.")
        model = PersonaChatModel(middleware=mw, user="ana")
        chain = ChatPromptTemplate.from_messages([("system", "You are a helpful assistant."),
                                                  ("human", "{question}")]) | model | StrOutputParser()
        print("answer:", chain.invoke({"question": "Why is the sky blue?"}))
        print("streamed:", "".join(chain.stream({"question": "Name a planet."})))


if __name__ == "__main__":
    main()
