"""A minimal third-party persona-mw plugin, installed through the ``persona_mw`` entry point.

It registers one plugin class, ``shout``: a corrector that upper-cases the answer when the
user stated a preference containing a configurable trigger word. Use it in YAML as
``- use: shout``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from persona_mw import Candidate, Turn, hookimpl

__version__ = "0.1.0"


class Shout:
    """Upper-cases answers for users whose stated preferences mention ``trigger``."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        trigger: str = "shout"

    def __init__(self, config: Config, name: str = "shout") -> None:
        self.config = config
        self.name = name

    @hookimpl
    def persona_correct(self, turn: Turn, candidate: Candidate) -> Candidate | None:
        wants = any(
            self.config.trigger in p.text.lower()
            for prof in turn.profiles.values()
            for p in prof.stated
            if p.polarity == "like"
        )
        if not wants:
            return None
        return candidate.model_copy(update={"text": candidate.text.upper()})


@hookimpl
def persona_register_plugins(register):  # type: ignore[no-untyped-def]
    register("shout", Shout)
