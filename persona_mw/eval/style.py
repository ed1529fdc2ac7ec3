"""``persona-mw eval style``: do answers follow a user's stated style, and at what cost?

Simulated users each prefer one side of three dimensions — reading level (simple vs expert),
length (concise vs detailed), tone (warm and playful vs formal) — and state it in words
(``SimUser.statements``). Prompts are the queries of a DSP-layout folder, in file order. For every
user and prompt a method's answer is compared with the unpersonalized answer (method ``none``)
of the same backend and seed, and a dimension is *satisfied* when its metric moves in the
user's direction by at least the margin in ``MARGINS``:

- reading: Flesch-Kincaid grade (``persona_mw.text``: own syllable heuristic, offline), a
  move of at least 1.0 grade;
- length: word count, a ratio of at least 1.2 (detailed) or at most 1/1.2 (concise);
- tone: the ``TONE_LEXICON`` score (warm minus formal markers per 100 words), a move of at
  least 1.0.

``satisfaction:<method>`` is the mean over users x prompts x dimensions (``satisfaction_<dim>:``
per dimension); ``against:<method>`` counts moves of the margin the other way, the chance level
of any change (a method that only perturbs answers scores about as high on both). Quality guard: ``ppl:<method>`` (perplexity of the answer under the base model
given the plain prompt, geometric mean over answers: an answer that does change its style to suit the
user is itself less likely under the plain prompt, so this counts the personalization as surprise too),
``ppl_personal:<method>`` (the same given the request as this user would send it, the prompt followed by
their statements: every method's answers for a user under the same context, a fluency measure that
does not penalise the style change itself) and ``repetition:<method>`` (the share of
word 3-grams that repeat an earlier one in the same answer). Cost: ``seconds_per_answer:`` and
``tokens_per_second:`` (answer tokens over the method's wall time).

Methods are plain functions ``fn(run) -> answers[user_index][prompt_index]`` registered with
``@method(name)``; other modules (``EXTRA_METHOD_MODULES``) register theirs on import. All
generation is greedy (``seed`` fixed) with ``max_new_tokens`` (default 96: long enough that a
"detailed" answer can outgrow the ~75-token unpersonalized one, short enough for 2 CPU cores),
batched across users: on 2 cores SmolLM2-135M gives ~12 tok/s alone and ~35 tok/s in batches.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Coroutine, Sequence, TypeVar

import numpy as np

from persona_mw.errors import PersonaError
from persona_mw.text import flesch_kincaid_grade, latin_words
from persona_mw.types import GenerationParams, Message

T = TypeVar("T")

DIMENSIONS: tuple[str, ...] = ("reading", "length", "tone")
SIDES: dict[str, tuple[str, str]] = {
    "reading": ("simple", "expert"),
    "length": ("concise", "detailed"),
    "tone": ("warm", "formal"),
}
# What each simulated user says, per side: plain sentences a person would write, which the
# ``style`` reward (persona_mw.text.style_targets) also reads.
STATEMENTS: dict[str, str] = {
    "simple": "Explain things in simple, plain words that a beginner can follow.",
    "expert": "Give me an expert, technical answer with precise terminology.",
    "concise": "Keep your answers short and concise.",
    "detailed": "Give me detailed, thorough answers.",
    "warm": "Use a warm, friendly and playful tone.",
    "formal": "Use a formal, professional tone.",
}
# The side that raises the dimension's metric (+1); the other side wants it lower.
UP_SIDE = {"reading": "expert", "length": "detailed", "tone": "warm"}
# Minimum move in the user's direction for a dimension to count as satisfied.
MARGINS: dict[str, float] = {"reading": 1.0, "length": math.log(1.2), "tone": 1.0}

# Tone lexicon. Warm/playful markers are what friendly writing adds — exclamations, emoji,
# contractions, direct address and enthusiasm words; formal markers are the connectives and
# Latinate vocabulary of professional prose. Both are counted per 100 words, so the score is
# comparable across lengths. Rationale: the same cues style-transfer work on formality (GYAFC)
# reports as most discriminative, restricted to ones that cannot be gamed by a single word.
TONE_LEXICON: dict[str, tuple[str, ...]] = {
    "warm": (
        "fun", "love", "loved", "lovely", "enjoy", "enjoyable", "happy", "glad", "great", "awesome", "amazing",
        "wonderful", "fantastic", "exciting", "excited", "cool", "super", "hey", "hi", "wow", "yay", "friend",
        "friends", "buddy", "imagine", "delight", "delightful", "magic", "magical", "smile", "cheer", "cheerful",
        "adventure", "oh", "fun-filled", "yummy", "sweet", "hooray", "playful", "awesome", "totally",
    ),
    "formal": (
        "therefore", "furthermore", "moreover", "however", "consequently", "thus", "hence", "additionally",
        "accordingly", "whereas", "nevertheless", "regarding", "pertaining", "utilize", "utilizes", "facilitate",
        "facilitates", "subsequently", "respectively", "individuals", "approximately", "demonstrate",
        "demonstrates", "ensure", "significant", "significantly", "conclusion", "notably", "furthermore",
        "comprehensive", "essential", "appropriate", "considerations", "objective", "objectives", "primarily",
        "professional", "optimal", "implement", "implementation",
    ),
}
_WARM = frozenset(TONE_LEXICON["warm"])
_FORMAL = frozenset(TONE_LEXICON["formal"])
_CONTRACTION = re.compile(r"\b\w+'(?:s|re|ve|ll|d|m|t)\b", re.IGNORECASE)
_EMOJI = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF]")


def tone_score(text: str) -> float:
    """Warm minus formal markers per 100 words (0 for an empty text).

    Warm: lexicon words, "!", emoji, contractions. Formal: lexicon words. Counted per 100 words
    with a floor of 20 words, so a two-word answer cannot swing the score.
    """
    ws = [w.lower() for w in latin_words(text)]
    if not ws:
        return 0.0
    warm = sum(w in _WARM for w in ws) + text.count("!") + len(_EMOJI.findall(text)) + len(_CONTRACTION.findall(text))
    formal = sum(w in _FORMAL for w in ws)
    return 100.0 * (warm - formal) / max(len(ws), 20)


def metric(dim: str, text: str) -> float:
    """The dimension's metric: FK grade, log word count, or the tone score."""
    if dim == "reading":
        return flesch_kincaid_grade(text)
    if dim == "length":
        return math.log(max(1, len(latin_words(text))))
    if dim == "tone":
        return tone_score(text)
    raise PersonaError(f"unknown style dimension {dim!r} (known: {', '.join(DIMENSIONS)})")


def satisfied(dim: str, side: str, answer: str, baseline: str) -> bool:
    """Whether ``answer`` moved ``dim``'s metric toward ``side`` by the margin, vs ``baseline``."""
    sign = 1.0 if side == UP_SIDE[dim] else -1.0
    return sign * (metric(dim, answer) - metric(dim, baseline)) >= MARGINS[dim] - 1e-9


def repetition(text: str, n: int = 3) -> float:
    """The share of word n-grams that repeat an earlier n-gram of the same text (0 if too short)."""
    ws = [w.lower() for w in latin_words(text)]
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


# --------------------------------------------------------------------------- users


@dataclass(frozen=True)
class SimUser:
    """One simulated user: a side of each dimension."""

    id: str
    sides: dict[str, str]

    def statements(self) -> list[str]:
        """The user's stated preferences as short texts, one per dimension."""
        return [STATEMENTS[self.sides[d]] for d in DIMENSIONS]


def make_users(m: int, seed: int = 0) -> list[SimUser]:
    """``m`` users from a fixed seed: distinct side combinations first (8 exist), then repeats."""
    rng = np.random.default_rng(seed)
    combos = [{d: SIDES[d][(k >> i) & 1] for i, d in enumerate(DIMENSIONS)} for k in range(8)]
    order = list(rng.permutation(8))
    picked = [combos[order[i % 8]] for i in range(m)]
    return [SimUser(id=f"sim-{i}", sides=dict(s)) for i, s in enumerate(picked)]


def load_prompts(data: str | Path, n: int) -> list[str]:
    """The first ``n`` queries of a DSP-layout folder (``*.json.gz`` / ``*.json``), in file order."""
    from persona_mw.eval.dsp import load

    items = load(data)
    prompts = [str(it["query"]).strip() for it in items if str(it.get("query", "")).strip()]
    if n < 1:
        raise PersonaError("--prompts must be at least 1")
    return prompts[:n]


# --------------------------------------------------------------------------- the run


class _SharedBackend:
    """The run's backend lent to a Middleware: closing is a no-op, and concurrent calls batch.

    Plain ``generate`` calls that arrive together (the turns of several users run with
    ``asyncio.gather``) are queued and sent as one ``generate_batch`` of up to ``batch_size``
    sequences; a call for ``n`` candidates counts as ``n`` sequences (sampled at the backend's
    diverse temperature, as ``generate`` would). Calls with decoding contributions, and backends
    without ``generate_batch``, pass straight through.
    """

    def __init__(self, inner: Any, batch_size: int = 8, seed: int = 0) -> None:
        self._inner = inner
        self._batch_size = batch_size
        self._seed = seed
        self._queue: list[tuple[list[Message], int, GenerationParams, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._flushes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def aclose(self) -> None:
        return None

    async def generate(self, messages: list[Message], *, n: int = 1, params: GenerationParams | None = None,
                       decoding: list[Any] | None = None) -> list[Any]:
        if decoding or not callable(getattr(self._inner, "generate_batch", None)):
            return list(await self._inner.generate(messages, n=n, params=params, decoding=decoding))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((list(messages), n, params or GenerationParams(), fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_soon())
        return list(await fut)

    async def _flush_soon(self) -> None:
        await asyncio.sleep(0.02)  # let the other users' turns reach their generate call
        while self._queue:
            # Take calls with the same params, up to batch_size sequences.
            key = self._queue[0][2].model_dump_json() + str(self._queue[0][1] > 1)
            take: list[tuple[list[Message], int, GenerationParams, asyncio.Future[Any]]] = []
            size = 0
            for item in list(self._queue):
                if item[2].model_dump_json() + str(item[1] > 1) != key:
                    continue
                if take and size + item[1] > self._batch_size:
                    break
                take.append(item)
                size += item[1]
            for item in take:
                self._queue.remove(item)
            params = take[0][2]
            sampled = take[0][1] > 1
            if sampled and not params.temperature:
                from persona_mw.adapters.transformers import DIVERSE_TEMPERATURE

                params = params.model_copy(update={"temperature": DIVERSE_TEMPERATURE})
            if params.seed is not None:
                params = params.model_copy(update={"seed": params.seed + self._flushes})
            self._flushes += 1
            flat = [m for m, k, _, _ in take for _ in range(k)]
            try:
                cands = await self._inner.generate_batch(flat, params=params)
                cands = sorted(cands, key=lambda c: c.index)
            except Exception as exc:
                for *_, fut in take:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            pos = 0
            for _, k, _, fut in take:
                got = [c.model_copy(update={"index": i}) for i, c in enumerate(cands[pos:pos + k])]
                pos += k
                if not fut.done():
                    fut.set_result(got)


def make_backend(spec: str | None, max_new_tokens: int) -> Any:
    """A registry name or local path -> the transformers backend; anything else -> litellm."""
    from persona_mw import models

    spec = spec or models.DEFAULT_MODEL
    local = models.is_local_path(spec)
    if not local:
        try:
            models.get_spec(spec)
            local = True
        except PersonaError:
            local = False
    if local:
        from persona_mw.adapters.transformers import TransformersBackend

        return TransformersBackend(model=spec, max_new_tokens=max_new_tokens)
    from persona_mw.adapters.litellm import create

    return create(model=spec)


def _default_pipeline() -> list[dict[str, Any]]:
    import yaml

    text = (Path(__file__).resolve().parent.parent / "default.yaml").read_text(encoding="utf-8")
    return list(yaml.safe_load(text).get("pipeline") or [])


class StyleRun:
    """Shared state of one eval run: prompts, users, the loaded backend, generation helpers."""

    def __init__(self, prompts: Sequence[str], users: Sequence[SimUser], *, seed: int = 0,
                 max_new_tokens: int = 96, backend: Any = None, backend_spec: str | None = None,
                 pipeline_config: dict[str, Any] | None = None, batch_size: int = 32) -> None:
        if not prompts:
            raise PersonaError("no prompts to evaluate")
        if not users:
            raise PersonaError("--users must be at least 1")
        self.prompts = list(prompts)
        self.users = list(users)
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.backend_spec = backend_spec
        self.backend = backend if backend is not None else make_backend(backend_spec, max_new_tokens)
        self.pipeline_config = pipeline_config
        self.batch_size = batch_size
        self._tmp = tempfile.TemporaryDirectory(prefix="persona-mw-style-")
        self._mws: list[Any] = []
        self._loop = asyncio.new_event_loop()
        self._none: list[str] | None = None
        self._stated: set[int] = set()
        self.notes: list[str] = []

    # -- async plumbing -------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the run's private event loop (methods are sync functions)."""
        return self._loop.run_until_complete(coro)

    @property
    def white_box(self) -> bool:
        caps = getattr(self.backend, "capabilities", None)
        return bool(getattr(caps, "white_box", False))

    # -- middleware -------------------------------------------------------------------------

    def middleware(self, config: dict[str, Any] | None = None) -> Any:
        """A Middleware on a fresh temporary store that reuses the loaded backend.

        ``config`` is a config mapping (``pipeline:``, ``roles:``, ``budget:`` ...); its
        ``backend:`` section is ignored: the run's backend answers. Closed by ``close()``.
        """
        from persona_mw.config import parse_config
        from persona_mw.middleware import Middleware

        data = dict(config or {})
        data.pop("backend", None)
        data.pop("store", None)
        cfg = parse_config(json.dumps(data), "<eval style>")
        cfg.store.path = str(Path(self._tmp.name) / f"style-{len(self._mws)}.db")
        mw = Middleware(cfg, backend=_SharedBackend(self.backend, self.batch_size, self.seed), autoload=False)
        self._mws.append(mw)
        return mw

    def pipeline_middleware(self) -> Any:
        """The configured pipeline (``--config``, default: the embedded default.yaml pipeline)."""
        cfg = self.pipeline_config if self.pipeline_config is not None else {"pipeline": _default_pipeline()}
        return self.middleware(cfg)

    def state_all(self, mw: Any) -> None:
        """Every user states their preferences through the Middleware API (once per Middleware)."""
        if id(mw) in self._stated:
            return
        self._stated.add(id(mw))
        for u in self.users:
            for text in u.statements():
                mw.state(text, user=u.id)

    # -- generation -------------------------------------------------------------------------

    def params(self, *, temperature: float | None = None, max_new_tokens: int | None = None,
               seed: int | None = None) -> GenerationParams:
        return GenerationParams(max_tokens=max_new_tokens or self.max_new_tokens,
                                temperature=0.0 if temperature is None else temperature,
                                seed=self.seed if seed is None else seed)

    async def agenerate(self, batch: Sequence[Sequence[Message]], *, temperature: float | None = None,
                        max_new_tokens: int | None = None, decoding: list[Any] | None = None) -> list[str]:
        """One answer per message list, in batches of ``batch_size`` (greedy unless a temperature)."""
        out: list[str] = []
        batch = [list(m) for m in batch]
        gen_batch = getattr(self.backend, "generate_batch", None)
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            # Each chunk reseeds, so sampled answers do not depend on what ran before.
            params = self.params(temperature=temperature, max_new_tokens=max_new_tokens,
                                 seed=self.seed + start)
            if callable(gen_batch):
                kw: dict[str, Any] = {"params": params}
                if decoding:
                    kw["decoding"] = decoding
                cands = await gen_batch(chunk, **kw)
                texts = [c.text for c in sorted(cands, key=lambda c: c.index)]
            else:
                got = await asyncio.gather(*(self.backend.generate(m, n=1, params=params, decoding=decoding)
                                             for m in chunk))
                texts = [g[0].text if g else "" for g in got]
            out += texts
        return out

    def generate(self, batch: Sequence[Sequence[Message]], **kw: Any) -> list[str]:
        """Sync ``agenerate``."""
        return self.run(self.agenerate(batch, **kw))

    def none_answers(self) -> list[str]:
        """The unpersonalized answer to each prompt (computed once, cached)."""
        if self._none is None:
            self._none = self.generate([[Message(role="user", content=p)] for p in self.prompts])
        return self._none

    def per_user(self, make: Callable[[SimUser, str], list[Message]], **kw: Any) -> list[list[str]]:
        """Answers to ``make(user, prompt)`` for every user and prompt, batched across all of them."""
        batch = [make(u, p) for u in self.users for p in self.prompts]
        flat = self.generate(batch, **kw)
        n = len(self.prompts)
        return [flat[i * n:(i + 1) * n] for i in range(len(self.users))]

    def count_tokens(self, text: str) -> int:
        try:
            return int(self.backend.count_tokens(text))
        except Exception:
            return max(1, len(text) // 4) if text else 0

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        for mw in self._mws:
            try:
                mw.close()
            except PersonaError:
                pass
        self._mws.clear()
        self._loop.close()
        self._tmp.cleanup()


# --------------------------------------------------------------------------- methods

METHODS: dict[str, Callable[[StyleRun], list[list[str]]]] = {}
WHITE_BOX_METHODS: set[str] = set()
# Modules of other plugins' methods, imported if present so they register here.
EXTRA_METHOD_MODULES: tuple[str, ...] = ("persona_mw.eval.style_fermi", "persona_mw.eval.style_steering",
                                         "persona_mw.eval.style_lora")


def method(name: str, *, white_box: bool = False) -> Callable[[Callable[[StyleRun], list[list[str]]]],
                                                             Callable[[StyleRun], list[list[str]]]]:
    """Register ``fn(run) -> answers[user][prompt]`` as eval method ``name``."""

    def deco(fn: Callable[[StyleRun], list[list[str]]]) -> Callable[[StyleRun], list[list[str]]]:
        METHODS[name] = fn
        if white_box:
            WHITE_BOX_METHODS.add(name)
        else:
            WHITE_BOX_METHODS.discard(name)
        return fn

    return deco


def load_methods() -> dict[str, Callable[[StyleRun], list[list[str]]]]:
    """The registry, after importing ``EXTRA_METHOD_MODULES`` that exist."""
    for mod in EXTRA_METHOD_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            if exc.name != mod:  # the module exists but something it needs does not: say so
                raise
    return METHODS


@method("none")
def _none(run: StyleRun) -> list[list[str]]:
    """The plain prompt, no personalization (computed once per prompt)."""
    answers = run.none_answers()
    return [list(answers) for _ in run.users]


@method("stated")
def _stated(run: StyleRun) -> list[list[str]]:
    """The preferences as a system message: the chat-API convention."""
    def make(u: SimUser, p: str) -> list[Message]:
        system = "The user's preferences:\n" + "\n".join(f"- {s}" for s in u.statements())
        return [Message(role="system", content=system), Message(role="user", content=p)]

    return run.per_user(make)


def run_middleware(run: StyleRun, mw: Any) -> list[list[str]]:
    """Every user asks every prompt through ``mw.achat`` (preferences stated with ``mw.state``).

    The turns run concurrently (at most ``4 * batch_size`` at a time), so the lent backend
    batches their generate calls across users: whole turns, every stage, as a chat call runs.
    """
    run.state_all(mw)
    params = run.params()
    limit = asyncio.Semaphore(4 * run.batch_size)

    outcomes: dict[str, int] = {}

    async def one(u: SimUser, p: str) -> str:
        async with limit:
            resp = await mw.achat(user=u.id, messages=[{"role": "user", "content": p}], params=params)
        for step in resp.trace.steps:  # what the rewriting/correcting plugins decided, tallied
            if step.hook in ("persona_rewrite", "persona_correct") and (step.summary or step.error):
                text = step.error or step.summary
                head = "original served: " if text.startswith("original served: ") else ""
                rest = re.split(r"[;(']", text[len(head):])[0]
                parts = [x.strip() for x in rest.split(":")]
                # "corrector failed: TimeoutError: ..." keeps the error type; others their first clause
                what = head + (": ".join(parts[:2]) if parts[0].endswith("failed") else parts[0])
                key = f"{step.plugin}: {re.sub(r'[0-9.]+', 'N', what)[:70]}"
                outcomes[key] = outcomes.get(key, 0) + 1
        return str(resp.text)

    async def everything() -> list[str]:
        return list(await asyncio.gather(*(one(u, p) for u in run.users for p in run.prompts)))

    flat = run.run(everything())
    if outcomes:
        run.notes.append("; ".join(f"{k} x{v}" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1])))
    n = len(run.prompts)
    return [flat[i * n:(i + 1) * n] for i in range(len(run.users))]


@method("pipeline")
def _pipeline(run: StyleRun) -> list[list[str]]:
    """The configured pipeline through the Middleware, preferences stated with ``mw.state``."""
    return run_middleware(run, run.pipeline_middleware())


# The pipelines behind the plugin methods; every user's preferences are stated through mw.state.
METHOD_PIPELINES: dict[str, list[dict[str, Any]]] = {
    # BPO rewriting (the rewriter role = the main model), template fallback when it drops content.
    "bpo": [{"use": "bpo", "max_tokens": 96, "timeout_s": 3600}],
    # Best-of-4 on the plain prompt, picked by the personalized reward (style + stated).
    "rerank4": [{"use": "rerank", "n": 4}],
    # Aligner-style: the plain answer, edited toward the profile by the corrector role.
    "corrector": [{"use": "corrector", "timeout_s": 3600}],
}


# Batched auxiliary calls of all users' turns take minutes on a loaded CPU; the eval measures what the
# rewriter/corrector do, so it lifts their time bounds (a deployment keeps them).
EVAL_BUDGET: dict[str, Any] = {"aux_seconds_per_request": None}


def _pipeline_method(name: str) -> Callable[[StyleRun], list[list[str]]]:
    def fn(run: StyleRun) -> list[list[str]]:
        return run_middleware(run, run.middleware({"pipeline": METHOD_PIPELINES[name], "budget": EVAL_BUDGET}))

    fn.__name__ = f"_{name}"
    fn.__doc__ = f"The {name!r} plugin through the Middleware: {METHOD_PIPELINES[name]}."
    return fn


for _name in METHOD_PIPELINES:
    method(_name)(_pipeline_method(_name))


# --------------------------------------------------------------------------- scoring


def opposite(dim: str, side: str) -> str:
    a, b = SIDES[dim]
    return b if side == a else a


def satisfaction(users: Sequence[SimUser], answers: list[list[str]], baseline: list[str],
                 *, against: bool = False) -> dict[str, float]:
    """Mean satisfaction over users x prompts x dimensions, and per dimension.

    ``against=True`` counts moves of at least the margin the *other* way: the rate at which any
    change to the answer lands on a side by chance, the control for satisfaction.
    """
    per_dim: dict[str, list[float]] = {d: [] for d in DIMENSIONS}
    for ui, u in enumerate(users):
        for pi, base in enumerate(baseline):
            for d in DIMENSIONS:
                side = opposite(d, u.sides[d]) if against else u.sides[d]
                per_dim[d].append(1.0 if satisfied(d, side, answers[ui][pi], base) else 0.0)
    out = {d: float(np.mean(v)) if v else 0.0 for d, v in per_dim.items()}
    out["all"] = float(np.mean([x for v in per_dim.values() for x in v])) if per_dim["reading"] else 0.0
    return out


def personal_prompt(u: SimUser, prompt: str) -> str:
    """The request as this user would send it: the prompt, then their statements (``ppl_personal``)."""
    return prompt + "\n\n" + " ".join(u.statements())


def _chat_prefix(tok: Any, prompt: str) -> str:
    if getattr(tok, "chat_template", None):
        return str(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True))
    return f"User: {prompt}\nAssistant:"


def _nll_batch(model: Any, tok: Any, pairs: list[tuple[str, str]]) -> list[tuple[float, int]]:
    """Summed negative log-likelihood and token count of each answer given its plain prompt."""
    import torch

    rows = []
    for prompt, answer in pairs:
        pre = tok.encode(_chat_prefix(tok, prompt), add_special_tokens=not getattr(tok, "chat_template", None))
        ans = tok.encode(" " + answer if not answer.startswith(" ") else answer, add_special_tokens=False)
        rows.append((pre, ans))
    width = max(len(p) + len(a) for p, a in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        seq = p + a
        ids[i, width - len(seq):] = torch.tensor(seq)  # left padding, like generation
        mask[i, width - len(seq):] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = ids[:, 1:]
    tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    out = []
    for i, (p, a) in enumerate(rows):
        n = len(a)
        if n == 0:
            out.append((0.0, 0))
            continue
        out.append((float(-tok_lp[i, width - 1 - n:].sum()), n))
    return out


class Perplexity:
    """Answer perplexity under a white-box base model (the run's, else the packaged local one)."""

    def __init__(self, run: StyleRun) -> None:
        if run.white_box:
            self.backend = run.backend
        else:
            from persona_mw.adapters.transformers import TransformersBackend

            self.backend = TransformersBackend()
        self.cache: dict[tuple[str, str], tuple[float, int]] = {}
        self.run = run

    def score(self, pairs: list[tuple[str, str]], batch: int = 8) -> list[tuple[float, int]]:
        todo = sorted({p for p in pairs if p not in self.cache and p[1].strip()}, key=lambda p: len(p[0]) + len(p[1]))
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            got = self.run.run(self.backend.call(_nll_batch, chunk))
            self.cache.update(zip(chunk, got))
        return [self.cache.get(p, (0.0, 0)) for p in pairs]

    def ppl(self, pairs: list[tuple[str, str]]) -> float:
        """exp(total NLL / total tokens) over the non-empty answers (token-weighted geometric mean)."""
        got = [x for x in self.score(pairs) if x[1] > 0]
        if not got:
            return float("nan")
        return float(math.exp(sum(n for n, _ in got) / sum(c for _, c in got)))


# --------------------------------------------------------------------------- the harness


def evaluate(run: StyleRun, methods: Sequence[str], *, log: Callable[[str], None] | None = None,
             quality: bool = True, progress: Callable[[dict[str, float]], None] | None = None,
             ) -> tuple[dict[str, float], dict[str, list[list[str]]]]:
    """Run ``methods`` (``none`` always first) and compute every metric. Returns (metrics, answers).

    ``progress(metrics)`` is called after each method with everything measured so far.
    """
    registry = load_methods()
    unknown = [m for m in methods if m not in registry]
    if unknown:
        raise PersonaError(f"unknown eval style method(s): {', '.join(unknown)} "
                           f"(known: {', '.join(sorted(registry))})")
    order = ["none"] + [m for m in methods if m != "none"]
    metrics: dict[str, float] = {}
    answers: dict[str, list[list[str]]] = {}
    ppl = Perplexity(run) if quality else None
    n_users, n_prompts = len(run.users), len(run.prompts)
    loader = getattr(run.backend, "load", None)
    if loader is not None:  # the model load is not any method's time
        run.run(loader())
    for name in order:
        if name in WHITE_BOX_METHODS and not run.white_box:
            run.notes.append(f"{name}: skipped (needs a white-box backend)")
            continue
        t0 = time.perf_counter()
        try:
            got = registry[name](run)
        except Exception as exc:  # one broken method must not lose the others' results
            if name == "none":
                raise
            run.notes.append(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            if log:
                log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            continue
        seconds = time.perf_counter() - t0
        if len(got) != n_users or any(len(row) != n_prompts for row in got):
            raise PersonaError(f"eval style method {name!r} returned answers of the wrong shape "
                               f"(want {n_users} users x {n_prompts} prompts)")
        answers[name] = got
        distinct = n_prompts if name == "none" else n_users * n_prompts
        flat = got[0] if name == "none" else [a for row in got for a in row]
        tokens = sum(run.count_tokens(a) for a in flat)
        metrics[f"seconds_per_answer:{name}"] = seconds / distinct
        metrics[f"tokens_per_second:{name}"] = tokens / seconds if seconds > 0 else 0.0
        metrics.update(_quality(run, name, got, answers["none"][0], ppl))
        if log:
            log(f"{name}: {distinct} answer(s) in {seconds:.1f} s; satisfaction {metrics[f'satisfaction:{name}']:.3f}")
        if progress:
            progress(_ordered(metrics))
    return _ordered(metrics), answers


def _quality(run: StyleRun, name: str, got: list[list[str]], base: list[str],
             ppl: Perplexity | None) -> dict[str, float]:
    out: dict[str, float] = {}
    sat = satisfaction(run.users, got, base)
    out[f"satisfaction:{name}"] = sat["all"]
    for d in DIMENSIONS:
        out[f"satisfaction_{d}:{name}"] = sat[d]
    out[f"against:{name}"] = satisfaction(run.users, got, base, against=True)["all"]
    flat = [a for row in got for a in row]
    out[f"words:{name}"] = float(np.mean([len(latin_words(a)) for a in flat]))
    out[f"repetition:{name}"] = float(np.mean([repetition(a) for a in flat]))
    out[f"empty_rate:{name}"] = float(np.mean([0.0 if a.strip() else 1.0 for a in flat]))
    if ppl is not None:
        pairs = [(run.prompts[pi], got[ui][pi]) for ui in range(len(run.users)) for pi in range(len(run.prompts))]
        out[f"ppl:{name}"] = ppl.ppl(pairs)
        personal = [(personal_prompt(u, run.prompts[pi]), got[ui][pi])
                    for ui, u in enumerate(run.users) for pi in range(len(run.prompts))]
        out[f"ppl_personal:{name}"] = ppl.ppl(personal)
    return out


def _ordered(metrics: dict[str, float]) -> dict[str, float]:
    rank = ["satisfaction", *[f"satisfaction_{d}" for d in DIMENSIONS], "against", "ppl", "ppl_personal", "repetition", "words",
            "empty_rate", "seconds_per_answer", "tokens_per_second"]
    return dict(sorted(metrics.items(), key=lambda kv: (rank.index(kv[0].split(":")[0])
                                                        if kv[0].split(":")[0] in rank else 99)))


def run_style(data: str, *, prompts: int = 24, users: int = 6, methods: Sequence[str] | None = None,
              backend: str | None = None, config: str | None = None, seed: int = 0,
              max_new_tokens: int = 96, out: str | None = None, batch_size: int = 32,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The ``persona-mw eval style`` command: returns the result written to ``out``."""
    from persona_mw.eval.common import write_result

    if max_new_tokens < 8:
        raise PersonaError("--max-new-tokens must be at least 8")
    ps = load_prompts(data, prompts)
    us = make_users(users, seed)
    pipeline_config = None
    if config:
        from persona_mw.config import load_config

        cfg = load_config(config)  # validated; the run passes the mapping on
        import yaml

        pipeline_config = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
        del cfg
    registry = load_methods()
    preferred = ["none", "stated", "bpo", "fermi", "rerank4", "corrector", "pipeline"]
    chosen = list(methods) if methods else sorted(registry, key=lambda m: (preferred.index(m) if m in preferred
                                                                            else len(preferred), m))
    t0 = time.perf_counter()
    run = StyleRun(ps, us, seed=seed, max_new_tokens=max_new_tokens, backend_spec=backend,
                   pipeline_config=pipeline_config, batch_size=batch_size)

    def conf(done: bool) -> dict[str, Any]:
        return {
            "prompts": len(ps), "users": len(us), "seed": seed, "max_new_tokens": max_new_tokens,
            "backend": backend or "smollm2-135m-instruct", "methods": ["none"] + [m for m in chosen if m != "none"],
            "pipeline": pipeline_config.get("pipeline") if pipeline_config else _default_pipeline(),
            "method_pipelines": METHOD_PIPELINES,
            "margins": {"reading_fk_grade": MARGINS["reading"], "length_word_ratio": 1.2,
                        "tone_per_100_words": MARGINS["tone"]},
            "user_sides": [u.sides for u in us], "batch_size": batch_size, "notes": list(run.notes),
            "complete": done, "total_seconds": round(time.perf_counter() - t0, 1),
        }

    try:  # the file is rewritten after every method, so a long run that is stopped keeps its rows
        def progress(m: dict[str, float]) -> None:
            write_result(out, "style", data, conf(False), m)

        metrics, answers = evaluate(run, chosen, log=log, progress=progress)
    finally:
        run.close()
    if out:  # the answers themselves, to read what each method did
        Path(out).with_suffix(".answers.json").write_text(json.dumps(
            {"prompts": ps, "users": [{"id": u.id, "sides": u.sides} for u in us], "answers": answers},
            indent=1, ensure_ascii=False), encoding="utf-8")
    return write_result(out, "style", data, conf(True), metrics)


__all__ = ["DIMENSIONS", "EXTRA_METHOD_MODULES", "MARGINS", "METHODS", "STATEMENTS", "SimUser", "StyleRun",
           "TONE_LEXICON", "evaluate", "load_methods", "make_users", "method", "metric", "repetition",
           "run_middleware", "run_style", "satisfaction", "satisfied", "tone_score"]
