"""litellm with persona-mw's callback in-process: every litellm call (sync, async, streamed) is
personalized before it leaves and remembered after it returns. Here litellm calls a local
OpenAI-compatible server that this script starts on loopback, serving the embedded model.

Run: python examples/litellm_callback.py
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from persona_mw import Middleware, parse_config
from persona_mw.adapters.transformers import create as local_model
from persona_mw.integrations.litellm import PersonaCallback, import_litellm
from persona_mw.server import create_app, serve_in_thread

PIPELINE = "pipeline:\n  - use: stated\n    placement: user_suffix\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = local_model(max_new_tokens=args.max_new_tokens)

    # "The LLM": a plain OpenAI-compatible endpoint (no plugins) over the local model.
    llm_cfg = parse_config("{}")
    llm_cfg.store.path = str(tmp / "llm.db")
    cfg = parse_config(PIPELINE)
    cfg.store.path = str(tmp / "persona.db")
    with Middleware(llm_cfg, backend=model) as llm, Middleware(cfg, backend=model) as mw, \
            serve_in_thread(create_app(llm)) as url:
        mw.feedback(kind="stated", user="ana", text="Answer in one short sentence.")
        litellm = import_litellm()
        callback = PersonaCallback(mw)
        litellm.callbacks = [callback]
        # The upstream is itself a persona-mw server, which wants a user: the header carries one.
        common = dict(model="openai/local", api_base=f"{url}/v1", api_key="unused", user="ana",
                      extra_headers={"X-Persona-User": "upstream"})
        question = [{"role": "user", "content": "What is the sun?"}]
        r = litellm.completion(messages=question, **common)
        print("sync:", r.choices[0].message.content)

        async def streamed() -> str:
            s = await litellm.acompletion(messages=question, stream=True, **common)
            text = "".join([c.choices[0].delta.content or "" async for c in s])
            while callback.completed < 2:  # the post-call stage runs as a task on this loop
                await asyncio.sleep(0.05)
            return text

        print("async stream:", asyncio.run(streamed()))
        print("post-call stages run:", callback.completed)


if __name__ == "__main__":
    main()
