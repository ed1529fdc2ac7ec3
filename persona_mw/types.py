"""Pydantic models shared by the core, plugins, adapters and interfaces.

Chat types are shaped like OpenAI chat completions so that the HTTP API and the litellm
integration convert trivially; everything else is the vocabulary of DESIGN.md §3.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

# Node ids in the preference graph / store: "global", "user:ana", "group:acme",
# "context:coding", "user:ana@context:coding".
NodeId = str
# No ":" so "user:X@context:Y" stays unambiguous, and no leading "@" (the store refuses "user:@...").
ID_PATTERN = r"^[A-Za-z0-9_.\-+][A-Za-z0-9_.@\-+]{0,127}$"

Role = Literal["system", "user", "assistant", "tool", "developer"]
Polarity = Literal["like", "avoid"]


ID_RULE = "letters, digits and _ . - + @ (1 to 128 characters, not starting with @)"


def validation_message(err: dict[str, Any]) -> str:
    """A pydantic error as a user can act on it: an id that fails ``ID_PATTERN`` says what ids may
    hold and what was given, instead of printing the regular expression."""
    if err.get("type") == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == ID_PATTERN:
        return f"invalid id {err.get('input')!r}: use {ID_RULE}"
    return str(err.get("msg", "invalid value"))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


def now() -> float:
    return time.time()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- chat


class Message(BaseModel):
    """One chat message. Extra OpenAI fields (tool_calls, name, ...) pass through untouched."""

    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        """The message's text, with multi-part content's text parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")

    def with_text(self, text: str) -> Message:
        return self.model_copy(update={"content": text})


class GenerationParams(_Strict):
    """Sampling parameters a backend honours (None means the backend's default)."""

    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    # int64, as OpenAI documents it (and what torch.manual_seed takes without overflowing).
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: list[str] | None = None
    # OpenAI tool calling, passed untouched to backends that support it (litellm); others ignore it.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class ChatRequest(BaseModel):
    """A request from a known user. ``user`` is required: personalization needs someone to serve."""

    model_config = ConfigDict(extra="forbid")

    user: str = Field(pattern=ID_PATTERN, description="the end user's id")
    messages: list[Message] = Field(min_length=1)
    context: str | None = Field(default=None, pattern=ID_PATTERN, description="a tag such as 'coding'")
    groups: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(default_factory=list)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    params: GenerationParams = Field(default_factory=GenerationParams)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("messages")
    @classmethod
    def _needs_user_message(cls, v: list[Message]) -> list[Message]:
        if not any(m.role == "user" for m in v):
            raise ValueError("at least one message with role 'user' is required")
        return v


class Candidate(BaseModel):
    """One generated answer."""

    text: str
    index: int = 0
    finish_reason: str | None = "stop"
    tokens: int | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# --------------------------------------------------------------------------- trace


class TraceStep(BaseModel):
    """What one plugin did at one stage."""

    plugin: str
    hook: str
    ms: float
    changed: bool = False
    summary: str = ""
    error: str | None = None
    skipped: bool = False


class Trace(BaseModel):
    """The record of one turn: plugins run, what changed, timings, granularity chosen."""

    id: str = Field(default_factory=lambda: new_id("trace"))
    user: str = ""
    granularity: str | None = None
    evidence: dict[str, int] = Field(default_factory=dict)
    steps: list[TraceStep] = Field(default_factory=list)
    items_used: list[dict[str, Any]] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(default_factory=dict)
    flags: list[str] = Field(default_factory=list)
    scores: dict[str, list[float]] = Field(default_factory=dict, description="reward -> one score per candidate")
    selected: int | None = Field(default=None, description="index of the served candidate when several were scored")
    aux_calls: list[dict[str, Any]] = Field(
        default_factory=list, description="auxiliary LLM calls of this turn: role, plugin, seconds, ok, error")
    prompt: list[dict[str, str]] = Field(
        default_factory=list, description="the messages sent to the backend (role, content), as the pipeline "
        "left them; recorded when the web console is served (persona_mw.console.record)")

    @property
    def errors(self) -> list[TraceStep]:
        return [s for s in self.steps if s.error]

    def render(self) -> str:
        """A short human-readable form, for the CLI and the demo."""
        lines = [f"trace {self.id}  user={self.user}  granularity={self.granularity}  evidence={self.evidence}"]
        for s in self.steps:
            mark = "ERROR " + (s.error or "") if s.error else ("changed" if s.changed else "-")
            lines.append(f"  {s.hook:<22} {s.plugin:<18} {s.ms:8.2f} ms  {mark}  {s.summary}".rstrip())
        if self.timings_ms:
            lines.append("  timings: " + ", ".join(f"{k}={v:.1f}ms" for k, v in self.timings_ms.items()))
        if self.scores:
            lines.append("  scores: " + "; ".join(f"{k}=[{', '.join(f'{x:.3g}' for x in v)}]"
                                                  for k, v in self.scores.items())
                         + f"  selected={self.selected}")
        if self.aux_calls:
            lines.append("  aux calls: " + "; ".join(
                f"{c.get('plugin')}/{c.get('role')} {float(c.get('seconds') or 0):.2f}s "
                + ("ok" if c.get("ok") else f"FAILED {c.get('error') or ''}".rstrip()) for c in self.aux_calls))
        if self.flags:
            lines.append("  flags: " + ", ".join(self.flags))
        return "\n".join(lines)


class ChatResponse(BaseModel):
    """The pipeline's answer: OpenAI-shaped choices plus the trace."""

    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str = ""
    choices: list[Candidate]
    usage: Usage = Field(default_factory=Usage)
    trace: Trace
    messages: list[Message] = Field(default_factory=list, description="the prompt sent to the backend")

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""


class StreamChunk(BaseModel):
    """One piece of a streamed answer; the last chunk has ``done`` set and carries the trace."""

    delta: str = ""
    index: int = 0
    trace_id: str | None = None
    done: bool = False
    finish_reason: str | None = None
    trace: Trace | None = None


# --------------------------------------------------------------------------- graph / profile


Granularity = Literal["user+context", "user", "group", "context", "global"]


class ScopeNode(BaseModel):
    """A graph node that applies to this request, with the weight it carries."""

    id: NodeId
    kind: Literal["global", "group", "context", "user", "user_context"]
    weight: float = Field(ge=0.0)
    evidence: int = Field(default=0, ge=0)


class Scope(BaseModel):
    """Which nodes apply to a request and how much each counts (weights sum to 1)."""

    user: str
    nodes: list[ScopeNode]
    granularity: Granularity
    evidence: dict[str, int] = Field(default_factory=dict)

    def weight_of(self, node_id: NodeId) -> float:
        return next((n.weight for n in self.nodes if n.id == node_id), 0.0)

    @property
    def node_ids(self) -> list[NodeId]:
        return [n.id for n in self.nodes]


class StatedPreference(BaseModel):
    """A preference the user (or an admin for a group) stated in words."""

    id: str = Field(default_factory=lambda: new_id("pref"))
    text: str = Field(min_length=1, max_length=2000)
    polarity: Polarity = "like"
    created_at: float = Field(default_factory=now)
    source_event: str | None = None


class Profile(BaseModel):
    """What the system believes about one graph node."""

    node: NodeId
    weights: list[float] = Field(default_factory=list, description="latent preference vector")
    uncertainty: list[float] = Field(default_factory=list)
    evidence: int = Field(default=0, ge=0, description="feedback events behind this profile")
    persona: list[str] = Field(default_factory=list, description="verbal persona statements")
    stated: list[StatedPreference] = Field(default_factory=list)
    prompt: str | None = Field(default=None, description="per-node optimized system prompt")
    extra: dict[str, Any] = Field(default_factory=dict, description="plugin-owned state, keyed by plugin")
    applied: dict[str, list[str]] = Field(
        default_factory=dict, description="feedback events already folded in, per writer ('core' or a plugin): "
        "their store sequence numbers, the newest few hundred; an event replayed after a crash is applied once")
    updated_at: float = Field(default_factory=now)


class Memory(BaseModel):
    """A long-term memory item owned by one node."""

    id: str = Field(default_factory=lambda: new_id("mem"))
    owner: NodeId
    text: str = Field(min_length=1)
    kind: Literal["fact", "preference", "episode"] = "fact"
    polarity: Literal["like", "avoid", "constraint"] | None = None
    provenance: list[str] = Field(default_factory=list, description="ids of the source messages")
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)
    superseded_by: str | None = None
    embedding: list[float] | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


class ContextItem(BaseModel):
    """Something a gather plugin wants the prompt to know (a memory, a preference, the persona)."""

    kind: Literal["stated", "memory", "persona", "profile", "instruction", "other"]
    text: str
    source: str = Field(description="plugin name")
    node: NodeId | None = None
    polarity: Literal["like", "avoid", "constraint"] | None = None
    weight: float = 1.0
    provenance: list[str] = Field(default_factory=list)
    pinned: bool = False


# --------------------------------------------------------------------------- feedback


# Event ids are keys, stored and returned as sent (never redacted): an opaque token, so an email, a
# "+49 ..." number or a sentence cannot become one (a digits-only id that is a valid phone number is
# refused by Middleware.afeedback when phones are redacted).
EVENT_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}$"


class _FeedbackBase(_Strict):
    id: str = Field(default_factory=lambda: new_id("fb"), pattern=EVENT_ID_PATTERN,
                    description="the event's id: letters, digits, '_', '.', ':', '-' (at most 128)")
    user: str = Field(pattern=ID_PATTERN)
    context: str | None = Field(default=None, pattern=ID_PATTERN)
    created_at: float = Field(default_factory=now)
    trace_id: str | None = Field(default=None, pattern=EVENT_ID_PATTERN)


class ChoiceFeedback(_FeedbackBase):
    """The user picked ``chosen`` over each of ``rejected`` for ``prompt``."""

    kind: Literal["choice"] = "choice"
    prompt: str
    chosen: str = Field(min_length=1)
    rejected: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)


class RatingFeedback(_FeedbackBase):
    """A scalar rating of one response, on a scale the app chooses (normalized to [0, 1])."""

    kind: Literal["rating"] = "rating"
    prompt: str
    response: str = Field(min_length=1)
    rating: float = Field(ge=0.0, le=1.0)


class EditFeedback(_FeedbackBase):
    """The user edited ``before`` into ``after`` (an implicit choice of after over before)."""

    kind: Literal["edit"] = "edit"
    prompt: str = ""
    before: str = Field(min_length=1)
    after: str = Field(min_length=1)

    @model_validator(mode="after")
    def _differs(self) -> EditFeedback:
        if self.before == self.after:
            raise ValueError("an edit must change the text: 'before' equals 'after'")
        return self


class StatedFeedback(_FeedbackBase):
    """A preference stated in words, with polarity (group-wide ones are set with ``Middleware.state``)."""

    kind: Literal["stated"] = "stated"
    text: str = Field(min_length=1, max_length=2000)
    polarity: Polarity = "like"


Feedback = Annotated[
    Union[ChoiceFeedback, RatingFeedback, EditFeedback, StatedFeedback], Field(discriminator="kind")
]


# --------------------------------------------------------------------------- turn


T = TypeVar("T")


class StashKey(Generic[T]):
    """A typed key for plugin-private per-turn state (pytest's StashKey idea)."""

    __slots__ = ("name",)

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """Per-turn storage keyed by ``StashKey`` objects, so plugins never collide."""

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return self._data[key]  # type: ignore[no-any-return]

    def get(self, key: StashKey[T], default: T) -> T:
        return self._data.get(key, default)  # type: ignore[no-any-return]

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return self._data.setdefault(key, default)  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __delitem__(self, key: StashKey[Any]) -> None:
        del self._data[key]


class Turn(BaseModel):
    """The per-request object that flows through the pipeline.

    Plugins read it freely; they change the prompt only by returning values from their hooks
    (the pipeline applies them and records the change), and keep private state in ``stash``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    request: ChatRequest
    scope: Scope | None = None
    profiles: dict[NodeId, Profile] = Field(default_factory=dict)
    items: list[ContextItem] = Field(default_factory=list)
    messages: list[Message] = Field(default_factory=list)
    candidates: list[Candidate] = Field(default_factory=list)
    scores: dict[str, list[float]] = Field(default_factory=dict)
    selected: int = 0
    trace: Trace = Field(default_factory=Trace)
    stash: Stash = Field(default_factory=Stash, exclude=True)

    _notes: list[str] = PrivateAttr(default_factory=list)
    _counter: Any = PrivateAttr(default=None)
    _specials: Any = PrivateAttr(default=None)  # the backend's ``special_tokens`` method, when it has one
    _special_cache: tuple[str, ...] | None = PrivateAttr(default=None)

    def note(self, text: str) -> None:
        """Say what the current plugin did; the pipeline puts it in the trace step's summary."""
        self._notes.append(text)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for this turn's backend (an estimate when it has no tokenizer)."""
        if self._counter is not None:
            return int(self._counter(text))
        return max(1, (len(text) + 3) // 4) if text else 0

    def special_tokens(self) -> tuple[str, ...]:
        """The special tokens of this turn's backend tokenizer (``()`` when it lists none)."""
        if self._special_cache is None:
            self._special_cache = tuple(str(t) for t in self._specials()) if self._specials is not None else ()
        return self._special_cache

    def quote(self, text: str, limit: int = 400) -> str:
        """Stored text as quoted data for this turn's prompt (``persona_mw.privacy.quote_data``), with the
        backend tokenizer's own special tokens defused as well as the built-in turn markers."""
        from persona_mw.privacy import quote_data

        return quote_data(text, limit, self.special_tokens())

    @property
    def user(self) -> str:
        return self.request.user

    @property
    def user_node(self) -> NodeId:
        from persona_mw.nodes import user_node

        return user_node(self.request.user)


class Decoding(BaseModel):
    """What white-box plugins contribute to decoding (collected from ``persona_decoding``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: str = ""
    logits_processors: list[Any] = Field(default_factory=list)
    activation_hooks: list[Any] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)
    # Steering (white-box backends; see persona_mw.adapters.transformers, "Steering"):
    # extra prompts decoded in the same batch as the answer, each with its own KV cache, fed the
    # answer's tokens; ``combine(main, streams) -> main`` sees the answer's next-token scores
    # ``[n, V]`` and those of this Decoding's streams ``[n, S, V]`` at every step.
    streams: list[list[Message]] = Field(default_factory=list)
    combine: Any = None
    # A LoRA adapter (``persona_mw.plugins._lora.Adapter``) or None for each of ``streams``, in order: that
    # stream's rows decode with the adapter's deltas (the ``lora`` plugin's ``mixing: logits``). Empty: none.
    stream_adapters: list[Any] = Field(default_factory=list)
    # Reward-guided decoding (ARGS-style): ``token_reward(hidden [k, d]) -> [k]`` scores the
    # top-``reward_top_k`` next tokens from the policy's last hidden state after each candidate;
    # the token maximizing ``logit + reward_weight * reward`` is chosen.
    token_reward: Any = None
    reward_top_k: int = Field(default=10, ge=1, le=256)
    reward_weight: float = 1.0
    # Model routing (black-box backends whose server serves several models, e.g. vLLM multi-LoRA):
    # ask the server for the served model ``model`` instead of the backend's own. If the server
    # answers that it does not exist (404), ``reroute(missing)`` (async, returns another served
    # name or None for the backend's own model) is awaited once and the request retried once.
    model: str | None = None
    reroute: Any = None
