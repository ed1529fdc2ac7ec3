"""``persona-mw`` (its ``main``, every argument as given) with one more backend type, ``echo``: the
instant backend of the multi-worker soak (tests/reliability/soak_pg.py). It answers with the whole
prompt it was given (``probes.echo_prompt``), as the other soaks' ``ScriptedBackend`` does in process,
so another user's data in a prompt shows up in the answer. A real OpenAI-compatible upstream behind
the ``litellm`` backend was the first choice: importing litellm takes 20 s or more on this loaded
machine, longer than the soak's restarts may take.

    python -m tests.reliability.soak_pg_cli serve --no-jobs --config c.yaml --port 8701
"""

from __future__ import annotations

import sys
from typing import Any


def create(**settings: Any) -> Any:
    from persona_mw.testing import ScriptedBackend

    from .probes import echo_prompt

    return ScriptedBackend(script=echo_prompt, name="echo")


def main(argv: list[str] | None = None) -> int:
    from persona_mw import builtins
    from persona_mw.cli import main as cli_main

    builtins.BUILTIN_BACKENDS["echo"] = "tests.reliability.soak_pg_cli"
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
