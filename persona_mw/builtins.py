"""Registers the built-in plugin classes and backends, exactly as a third-party plugin would."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from persona_mw.manager import hookimpl

# YAML name -> "module:Class" of the built-in plugins (imported only when registered).
BUILTIN_PLUGINS: dict[str, str] = {
    "stated": "persona_mw.plugins.stated:StatedPreferences",
    "rerank": "persona_mw.plugins.rerank:Rerank",
    "persona": "persona_mw.plugins.persona:PersonaInference",
    "profile": "persona_mw.plugins.profile:ProfilePlugin",
    "contrast": "persona_mw.plugins.contrast:Contrast",
    "experts": "persona_mw.plugins.experts:Experts",
    "args": "persona_mw.plugins.args:RewardGuided",
    "vectors": "persona_mw.plugins.vectors:SteeringVectors",
    "lora": "persona_mw.plugins.lora:LoraAdapters",
    "fermi": "persona_mw.plugins.fermi:Fermi",
    "bpo": "persona_mw.plugins.bpo:BPO",
    "corrector": "persona_mw.plugins.corrector:Corrector",
    "memory": "persona_mw.plugins.memory:MemoryPlugin",
}

# Backend type -> module whose ``create(**settings)`` builds it (imported on first use, so
# neither torch nor litellm loads unless that backend is configured).
BUILTIN_BACKENDS: dict[str, str] = {
    "transformers": "persona_mw.adapters.transformers",
    "litellm": "persona_mw.adapters.litellm",
}


def _lazy_factory(module: str) -> Callable[..., Any]:
    def create(**settings: Any) -> Any:
        return importlib.import_module(module).create(**settings)

    create.__qualname__ = f"create[{module}]"
    return create


@hookimpl
def persona_register_plugins(register: Callable[[str, type], None]) -> None:
    for name, target in BUILTIN_PLUGINS.items():
        modname, _, clsname = target.partition(":")
        register(name, getattr(importlib.import_module(modname), clsname))


# Subcommands of built-in plugins: "module:function(cli)" (imported by name, like the classes).
BUILTIN_COMMANDS: tuple[str, ...] = ("persona_mw.plugins.lora:register_commands",)


@hookimpl
def persona_register_commands(cli: Any) -> None:
    for target in BUILTIN_COMMANDS:
        modname, _, fname = target.partition(":")
        getattr(importlib.import_module(modname), fname)(cli)


@hookimpl
def persona_register_backends(register: Callable[[str, Callable[..., Any]], None]) -> None:
    for name, module in BUILTIN_BACKENDS.items():
        register(name, _lazy_factory(module))


@hookimpl
def persona_register_rewards(register: Callable[[str, Callable[..., Any]], None]) -> None:
    # The latent profile score (persona_mw.plugins.profile.profile_reward).
    from persona_mw.plugins.profile import profile_reward

    register("profile", profile_reward)

