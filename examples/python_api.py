"""Use persona-mw from Python: state preferences for two users and ask the same question.

Run: python examples/python_api.py [--store PATH]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from persona_mw import Middleware, load_config

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=str(Path(tempfile.mkdtemp()) / "example.db"))
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    config = load_config(HERE / "pipeline.yaml")
    config.store.path = args.store
    config.backend.max_new_tokens = args.max_new_tokens  # type: ignore[attr-defined]

    with Middleware(config) as mw:
        # zoe is declared a member of "dietitians" in pipeline.yaml; sam is on his own.
        mw.feedback(kind="stated", user="sam", text="Answer in one short sentence.")
        for user in ("zoe", "sam"):
            reply = mw.chat(user=user, messages=[{"role": "user", "content": "What should I have for lunch?"}])
            print(f"--- {user}: {reply.text}")
            print(reply.trace.render())
        print("sam's profile:", mw.profile("sam")["profiles"]["user:sam"]["stated"])


if __name__ == "__main__":
    main()
