"""Every hook persona-mw calls: the table of contents of the system.

Each spec says when it runs, what it receives, what it returns (and what ``None`` means), how
results from several plugins combine, and whether it may raise. Hooks take keyword arguments
only and a plugin declares just the ones it needs, so specs can grow without breaking plugins.

Every hook is run by one runner, the pipeline's (``persona_mw.pipeline``), except the
registration hooks: it walks the implementations in YAML order, passes each only the arguments
it declares, awaits coroutines, and applies the hook's combine rule. So ``async def``
implementations work everywhere (startup and forget included), and an async firstresult
implementation that returns ``None`` passes the turn on to the next plugin as a sync one would.
The registration hooks (``persona_register_*``) run while the plugin manager is built, before
any event loop exists: they are sync only, and an ``async def`` one is refused when registered.
How each hook is run (its combine rule, its entry paths, the check of its result) is one row of
``persona_mw.stages.STAGES``; this module's specs take their ``firstresult`` marker from there.

Combine rules:
  collect      every implementation runs; the non-None results are gathered in order
  chain        every implementation runs; each receives the previous one's result and may
               return a replacement (None = unchanged)
  firstresult  implementations run in order until one returns non-None
  broadcast    every implementation runs; results are ignored

Failure policy: a plugin that raises fails the turn with ``PluginError`` naming it
(``on_error: fail``, the default), or is skipped with the error recorded in the trace and the
log (``on_error: skip``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, TypeVar

import pluggy

from persona_mw import stages

if TYPE_CHECKING:
    import argparse

    from persona_mw.context import PluginContext
    from persona_mw.types import (
        Candidate,
        ChatResponse,
        ContextItem,
        Decoding,
        Feedback,
        Message,
        Scope,
        Turn,
    )

hookspec = pluggy.HookspecMarker("persona_mw")
F = TypeVar("F", bound=Callable[..., Any])


def spec(fn: F) -> F:
    """Mark ``fn`` a hookspec, its pluggy options taken from its row in ``persona_mw.stages``.

    A spec without a docstring or without a row is an error at import, naming it.
    """
    if not (fn.__doc__ or "").strip():
        raise TypeError(f"hookspec {fn.__name__} has no docstring: say when it runs, what it gets and returns")
    row = stages.stage(fn.__name__)
    return hookspec(firstresult=row.firstresult, warn_on_impl_args=DEPRECATED_ARGS.get(fn.__name__))(fn)


# Arguments kept one release for old plugins: declaring one warns when the plugin is registered.
DEPRECATED_ARGS: dict[str, dict[str, Warning]] = {
    "persona_startup": {"middleware": DeprecationWarning(
        "persona_startup(middleware) is deprecated: declare persona_startup(ctx) and use the PluginContext "
        "(persona_mw.context); the middleware argument goes in the next release")},
}

# Derived from the stage table, for callers of the older names.
TURN_STAGES: dict[str, str] = dict(stages.of_phase("turn"))
LEARNING_STAGES: dict[str, str] = {h: stages.stage(h).combine for h in stages.on_path("feedback")}


# ---------------------------------------------------------------------------------------------
# Startup: called once when a Middleware is built (or the CLI starts), in registration order.
# ---------------------------------------------------------------------------------------------


@spec
def persona_register_plugins(register: Callable[[str, type], None]) -> None:
    """Make plugin classes available to the YAML ``pipeline:`` list.

    When: once per Middleware, before the pipeline is built from the config.
    ``register(name, cls)``: ``name`` is what ``use:`` refers to; ``cls`` is a class whose
    nested ``Config`` pydantic model validates its YAML section and whose ``__init__`` takes
    ``(config, name)``. Registering a name twice is an error naming both classes.
    Returns: nothing (collect). May raise: only for programming errors.
    """


@spec
def persona_register_backends(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Make backend types available to the config's ``backend: {type: ...}``.

    When: once per Middleware, before any backend is built.
    ``register(type_name, factory)``: ``factory(**settings)`` returns a ``Backend``
    (``persona_mw.adapters.base.Backend``); settings are the config section minus ``type``.
    Returns: nothing (collect).
    """


@spec
def persona_register_rewards(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Make reward functions available by name to scoring plugins (e.g. ``rerank``).

    When: once per Middleware, before the pipeline is built, so only modules (built-ins and
    entry points) register rewards, not pipeline instances. ``register(name, fn)``: ``fn`` is
    sync or async and declares the keyword arguments it needs from ``turn``, ``candidates``,
    ``backend_for`` (``backend_for(role)`` -> the backend of a ``roles:`` entry, defaulting to
    the main one) and ``options`` (its settings from the scoring plugin's config, a dict).
    Returns (from ``fn``): one float per candidate, higher is better, ideally in [0, 1] or
    [-1, 1]; or ``{node_id: [one float per candidate]}`` for a reward evaluated per graph node,
    which the scoring plugin combines with the scope's node weights. ``fn`` may raise; the
    scoring plugin's ``on_error`` decides. This hook returns nothing (collect).
    """


@spec
def persona_register_detectors(register: Callable[[str, Callable[[str], Any]], None]) -> None:
    """Make PII detectors available to the config's ``privacy: {redact: [...]}``.

    When: once per Middleware, before the pipeline is built. ``register(kind, fn)``: ``fn(text)``
    returns the ``(start, end)`` spans of that kind of PII in ``text``; matches are replaced by
    ``[KIND]`` before feedback, traces and jobs are stored. Built-ins: email, phone, card, address, iban.
    Returns: nothing (collect). Registering a kind twice is an error naming both.
    """


@spec
def persona_startup(ctx: PluginContext, middleware: Any) -> None:
    """Let a plugin reach what it may use: role backends, rewards, profiles, background jobs.

    When: once per Middleware, after the pipeline is built and before the first turn; pipeline
    instances in YAML order, then modules. ``ctx`` is this plugin's ``PluginContext``
    (``persona_mw.context``): ``ctx.backend(role)``, ``ctx.local_model(name)``, ``ctx.rewards``,
    ``ctx.update_profile(node, change)``, ``ctx.profile_lock(node)``, ``ctx.schedule(coro)``,
    ``ctx.job_budget()``, ``ctx.store``, ``ctx.graph``, ``ctx.memory``, ``ctx.policy`` and
    ``ctx.config_error(message, *path)``. Keep it cheap (no model loading); ``async def`` works.
    ``middleware`` (the whole ``Middleware``) is deprecated: declaring it warns when the plugin is
    registered, and it goes in the next release.
    Returns: nothing (broadcast). May raise ``ConfigError`` (e.g. an unknown reward name), which
    fails construction with that message whatever the plugin's policy; other errors follow it.
    """


@spec
def persona_register_commands(cli: argparse._SubParsersAction[Any]) -> None:
    """Add subcommands to the ``persona-mw`` CLI.

    When: once, when the CLI builds its parser. ``cli`` is the argparse subparsers object:
    ``p = cli.add_parser("mycmd", help=...)`` then ``p.set_defaults(func=callable)``; the
    callable receives the parsed ``argparse.Namespace`` and returns an exit code.
    Returns: nothing (collect).
    """


# ---------------------------------------------------------------------------------------------
# Per turn, in this order. Every hook receives ``turn`` (persona_mw.types.Turn) if declared.
# ---------------------------------------------------------------------------------------------


@spec
def persona_resolve_scope(turn: Turn, graph: Any) -> Scope | None:
    """Decide which graph nodes apply to this request and with what weight.

    When: first, before anything is gathered. ``graph`` is the ``PreferenceGraph``.
    Returns: a ``Scope``, or None to let the next plugin (finally the built-in hierarchical
    shrinkage of ``persona_mw.graph``) decide. Combine: firstresult.
    May raise: yes (policy applies). Must not mutate ``turn``.
    """


@spec
def persona_gather(turn: Turn, store: Any) -> list[ContextItem] | None:
    """Contribute context items: stated preferences, memories, persona, profile facts.

    When: after the scope is resolved (``turn.scope``, ``turn.profiles`` are set).
    Returns: a list of ``ContextItem`` (appended to ``turn.items`` in YAML order) or None.
    Combine: collect. Must only use nodes in ``turn.scope``: never another user's data.
    """


@spec
def persona_rewrite(turn: Turn, messages: list[Message]) -> list[Message] | None:
    """Edit the prompt: assemble gathered items within a token budget, optimize, rewrite.

    When: after gather, in YAML order. ``messages`` is the previous plugin's output (the
    request's messages for the first plugin). Returns: the full replacement list, or None for
    unchanged. Combine: chain. Must not mutate ``messages`` in place (return a new list).
    """


@spec
def persona_decoding(turn: Turn, backend: Any) -> Decoding | None:
    """Contribute logits processors or activation edits (white-box backends only).

    When: after rewrite, before generate. ``backend`` exposes ``capabilities``; a plugin that
    needs a white-box backend should raise ``PluginError`` when it gets a black-box one.
    A ``Decoding`` may also carry extra prompt ``streams`` with a ``combine`` function, or a
    ``token_reward`` (reward-guided search): the transformers backend then runs its steering loop
    (all streams in one batch, each with its own KV cache; README "White-box steering").
    Returns: a ``Decoding`` or None. Combine: collect (all contributions are applied).
    """


@spec
def persona_generate(
    turn: Turn, backend: Any, messages: list[Message], n: int, decoding: list[Decoding]
) -> list[Candidate] | None:
    """Produce candidates; a plugin may own decoding (e.g. reward-guided search).

    When: after decoding. Returns: a list of ``n`` candidates, or None to let the next plugin
    (finally the backend itself, as one batch) generate. Combine: firstresult.
    """


@spec
def persona_score(turn: Turn, candidates: list[Candidate]) -> dict[str, list[float]] | None:
    """Score candidates with reward functions.

    When: after generate, only when there is more than one candidate.
    Returns: ``{reward_name: [one float per candidate]}`` or None. Combine: collect (merged
    into ``turn.scores``; a later plugin reusing a name overrides it).
    """


@spec
def persona_select(turn: Turn, candidates: list[Candidate], scores: dict[str, list[float]]) -> int | None:
    """Pick the candidate to serve.

    When: after score. Returns: the index into ``candidates`` or None (next plugin; finally
    the mean of the scores, or the first candidate when nothing scored). Combine: firstresult.
    """


@spec
def persona_correct(turn: Turn, candidate: Candidate) -> Candidate | None:
    """Edit the selected answer (Aligner-style residual correction).

    When: after select, in YAML order. Returns: a replacement ``Candidate`` or None for
    unchanged. Combine: chain. A corrector should only return an edit it judged better.
    """


@spec
def persona_after_turn(turn: Turn, response: ChatResponse, store: Any) -> None:
    """Learn from the finished turn: extract memories, log, update statistics.

    When: after the response is returned (after the last streamed chunk too), off the request
    path, in the background. Returns: nothing. Combine: collect. Failures are logged and
    recorded in the stored trace, never raised to the caller.
    """


# ---------------------------------------------------------------------------------------------
# Learning.
# ---------------------------------------------------------------------------------------------


@spec
def persona_feedback(event: Feedback, store: Any, graph: Any) -> None:
    """React to a feedback event (choice, rating, edit, stated).

    When: after the event has been appended to the store (so it is never lost), in YAML
    order. Plugins update profiles, graph evidence, prompts or memories from it. A plain ``def``
    implementation runs on its plugin's own thread (one event at a time, in order), so blocking
    store work does not stall the event loop; an ``async def`` one runs on the loop.
    Returns: nothing. Combine: collect. Failures follow the plugin's policy; the stored
    event stays either way, so profiles can be rebuilt.
    """


@spec
def persona_forget(user: str, nodes: list[str], store: Any, graph: Any) -> None:
    """Remove what a plugin derived from a user who was just forgotten.

    When: inside ``Middleware.forget(user)``, after the store deleted the user's rows (events,
    memories, profiles, nodes, edges, traces, jobs). ``nodes`` are the nodes the user was linked
    to (groups, contexts) before deletion: plugins that pool members into those nodes (group
    statistics) recompute them without the user; plugins keeping data outside the store delete it.
    Returns: nothing (collect). May raise: the error fails ``forget`` after the store rows are gone,
    so a retry of ``forget`` is safe.
    """


@hookspec
def persona_profile_report(user: str, profiles: dict[str, Any]) -> dict[str, Any] | None:
    """Add a plugin's part to ``persona-mw profile show USER``.

    When: once per ``profile show``, after the CLI read the user's profile. ``profiles`` maps each
    node id of the user's scope to its profile as stored (``Profile.model_dump()``: ``extra``
    holds what plugins keep there). A plugin instance knows its own settings and, through the
    ``PluginContext`` it got at startup, the other entries (``ctx.plugins()``). Read only.
    Returns: a dict of top-level sections to add to the printed JSON (e.g.
    ``{"prompts": {node: report}}``), or None when the plugin has nothing for this user.
    Combine: collect; the sections of all plugins are merged into the output. Sync only.
    """


__doc__ = (__doc__ or "") + "\n" + stages.paths_doc() + "\n"
