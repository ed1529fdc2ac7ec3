"""``TransformersBackend``: loading (weights shared through ``persona_mw.models``' cache), the
tokenizers, prompts, activation hooks and the public async API. The decoding itself lives in
``generation`` (``model.generate``), ``steering`` (the own loop) and ``reward`` (ARGS)."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from persona_mw import models as _models
from persona_mw.adapters.base import Capabilities
from persona_mw.errors import BackendError, PersonaError
from persona_mw.types import Candidate, Decoding, GenerationParams, Message

from . import generation
from .scheduler import Job, Scheduler, schedulable, wait_job
from .decoding import _ROLE_LABEL, DIVERSE_TEMPERATURE, PLAIN_STOP, _cut_at_stop, _token_pipe, _unsafe_suffix
from .torch_thread import TORCH_THREAD, _cancellable, _on_torch_thread

T = TypeVar("T")


class TransformersBackend:
    """A local causal LM with batched candidates, logits processors and activation hooks."""

    def __init__(
        self,
        model: str = _models.DEFAULT_MODEL,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float | None = None,
        threads: int | None = None,
        dtype: str = "float32",
        batching: bool = True,
        max_batch: int = 8,
        max_queue: int = 16,
        prefill_chunk: int = 256,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        for key, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            if value < 1:
                raise ValueError(f"{key} must be at least 1")
        if dtype not in _models.DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_models.DTYPES)}, not {dtype!r}")
        # A registry name is checked now (ModelNotFound with a suggestion); a path at load time.
        spec = None if _models.is_local_path(model) else _models.get_spec(model)
        self.model_name = spec.name if spec else model
        self.name = f"transformers:{self.model_name}"
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.threads = threads
        self.dtype = dtype
        self._spec = spec
        self._model: Any = None
        self._tokenizer: Any = None
        self._load_lock = threading.Lock()
        self._lock = threading.Lock()  # one generation at a time
        # count_tokens runs on request threads while the torch thread encodes padded batches. A
        # fast tokenizer keeps its padding/truncation settings in shared Rust state that every call
        # resets, so the two must not share one: a concurrent count could strip a batch's padding
        # ("Unable to create tensor ...") or fail with "Already borrowed". Counting has its own copy.
        self._count_tokenizer: Any = None
        self._count_lock = threading.Lock()
        self._special: tuple[str, ...] | None = None
        # Steering keeps one KV cache per stream; False re-encodes everything each step (the
        # naive reference that tests compare against; never faster).
        self.steering_cache = True
        # The lean decode step (``lean.py``) for one-token steps of a Llama-architecture model nothing
        # hooks: the same logits as transformers' forward with fewer operations. False runs
        # transformers' forward on every step (the reference that benchmarks time as "today").
        self.lean_step = True
        # Continuous batching (``scheduler``): requests that can share a batch join it at the next step.
        self.batching = batching
        self._scheduler: Scheduler | None = None
        self._scheduler_args = (max_batch, max_queue, prefill_chunk)

    @property
    def scheduler(self) -> Scheduler:
        """This backend's continuous batch (created on first use)."""
        if self._scheduler is None:
            with self._load_lock:
                if self._scheduler is None:
                    self._scheduler = Scheduler(self, *self._scheduler_args)
        return self._scheduler

    # ----------------------------------------------------------------- model access

    @property
    def capabilities(self) -> Capabilities:
        ctx = self._spec.context_length if self._spec else None
        if self._model is not None:
            ctx = getattr(self._model.config, "max_position_embeddings", ctx)
        return Capabilities(white_box=True, streaming=True, max_context=ctx, batched_candidates=True)

    def _ensure_loaded(self) -> None:
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            try:
                model, tok = _models.load(self.model_name, dtype=self.dtype)
            except (PersonaError, ImportError):
                raise
            except Exception as exc:
                raise BackendError(f"could not load local model {self.model_name!r}: {exc}") from exc
            self._tokenizer = tok
            self._model = model

    def _prepare(self) -> None:
        """Load if needed and apply ``threads`` (OpenMP's thread count is per calling thread)."""
        self._ensure_loaded()
        if self.threads:
            import torch

            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)

    @property
    def model(self) -> Any:
        """The ``transformers`` model (loaded on first access; blocks while it loads)."""
        self._ensure_loaded()
        return self._model

    @property
    def tokenizer(self) -> Any:
        self._ensure_loaded()
        return self._tokenizer

    async def load(self) -> None:
        """Load the model now, off the event loop (optional: first use loads it too)."""
        await _on_torch_thread(self._ensure_loaded)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(model, tokenizer, *args)`` on the torch thread, holding the backend's lock.

        For white-box plugins that need their own forward passes (log-probs, hidden states).
        """

        def job() -> T:
            self._prepare()
            with self._lock:
                return fn(self._model, self._tokenizer, *args)

        return await _on_torch_thread(job)

    def count_tokens(self, text: str) -> int:
        """Exact token count under this model's tokenizer (no special tokens added)."""
        if not text:
            return 0
        with self._count_lock:
            return len(self._own_tokenizer().encode(text, add_special_tokens=False))

    def _own_tokenizer(self) -> Any:
        """The request threads' copy of the tokenizer (call with ``_count_lock`` held)."""
        if self._count_tokenizer is None:
            import copy

            self._count_tokenizer = copy.deepcopy(self.tokenizer)
        return self._count_tokenizer

    def special_tokens(self) -> tuple[str, ...]:
        """Every control token of this tokenizer, for ``quote_data`` to defuse in stored text.

        ``all_special_tokens`` is not enough: SmolLM2 lists 3 there, while 17 of its added tokens are
        special (``<repo_name>``, ``<file_sep>``, ``<jupyter_code>`` ...). Non-special added tokens that are
        markup (Qwen's ``<tool_call>``) are included too; an added plain word is not.
        """
        if self._special is None:
            # Read from the request threads' copy: the torch thread may be encoding with the original,
            # and a fast tokenizer's Rust state must not be borrowed twice.
            with self._count_lock:
                tok = self._own_tokenizer()
                found = [str(t) for t in getattr(tok, "all_special_tokens", ())]
                for added in getattr(tok, "added_tokens_decoder", {}).values():
                    content = str(getattr(added, "content", added))
                    if getattr(added, "special", False) or re.search(r"[^\w\s]", content):
                        found.append(content)
            self._special = tuple(dict.fromkeys(t for t in found if len(t.strip()) >= 2))
        return self._special

    async def aclose(self) -> None:
        # The weights stay in persona_mw.models' in-process cache for other backends to share.
        self._model = None
        self._tokenizer = None
        self._count_tokenizer = None

    # ----------------------------------------------------------------- prompts

    def format_prompt(self, messages: Sequence[Message]) -> str:
        """The prompt text: the chat template, or ``Role: text`` lines for models without one."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            chat = [{"role": m.role, "content": m.text} for m in messages]
            return str(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
        lines = [f"{_ROLE_LABEL.get(m.role, m.role.title())}: {m.text}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"

    def _uses_plain_prompt(self) -> bool:
        return not getattr(self.tokenizer, "chat_template", None)

    # ----------------------------------------------------------------- generation

    async def generate(
        self,
        messages: list[Message],
        *,
        n: int = 1,
        params: GenerationParams | None = None,
        decoding: list[Decoding] | None = None,
    ) -> list[Candidate]:
        if n < 1:
            raise BackendError(f"n must be at least 1, got {n}")
        params, decoding = params or GenerationParams(), decoding or []
        if schedulable(self, decoding, n):
            return await self._batched([(messages, decoding)], params, n)
        return await _cancellable(generation.run, self, [messages], n, params, decoding)

    def _job(self, messages: list[Message], decoding: list[Decoding], params: GenerationParams,
             n: int = 1, position: int = 0) -> Job:
        """A scheduler job; a seed is offset by the request's ``position`` in its call, so requests of
        one batch that share a prompt still get different samples (each job has its own generator)."""
        from concurrent.futures import Future

        s = self._settings(params, n)
        if s["seed"] is not None:
            s["seed"] = int(s["seed"]) + position
        return Job(messages, decoding, s, Future(), threading.Event(), n=n)

    async def _batched(self, requests: list[tuple[list[Message], list[Decoding]]],
                       params: GenerationParams, n: int = 1) -> list[Candidate]:
        """Each request as one job of the continuous batch; candidates in request order
        (``index = request * n + i``)."""
        await _on_torch_thread(self._ensure_loaded)
        jobs = [self._job(m, d, params, n, i) for i, (m, d) in enumerate(requests)]
        self.scheduler.submit_all(jobs)  # one call, one request against max_queue
        answers = await asyncio.gather(*(wait_job(job) for job in jobs))
        out = []
        for i, cands in enumerate(answers):
            for c in cands:
                c.index = i * n + c.index
                out.append(c)
        return out

    async def generate_batch(
        self,
        batch: list[list[Message]],
        params: GenerationParams | None = None,
        decoding: list[Decoding] | None = None,
    ) -> list[Candidate]:
        """One answer per prompt, all prompts in one left-padded batch (``index`` = prompt's position)."""
        if not batch:
            return []
        params, decoding = params or GenerationParams(), decoding or []
        if schedulable(self, decoding, 1):
            return await self._batched([(m, decoding) for m in batch], params)
        return await _cancellable(generation.run, self, batch, 1, params, decoding)

    async def generate_steered(
        self,
        requests: list[tuple[list[Message], list[Decoding]]],
        params: GenerationParams | None = None,
        n: int = 1,
    ) -> list[Candidate]:
        """Steered answers for several requests, each with its own decoding contributions, as
        ONE batch (``index = request * n + i``). Requests the continuous batch takes (steering vectors
        and LoRA adapters among them) may each carry their own; otherwise activation hooks act on the
        whole batch, so requests that carry any must all carry the same ones."""
        if not requests:
            return []
        given = params or GenerationParams()
        if all(schedulable(self, dec, n) for _, dec in requests):  # marked hooks act per request's rows
            return await self._batched(requests, given, n)
        hooks = [tuple(id(h) for d in dec for h in d.activation_hooks) for _, dec in requests]
        if len(set(hooks)) > 1:
            raise BackendError("requests in one steered batch carry different activation hooks",
                               hint="batch requests with the same activation edits together, or use hooks "
                                    "the continuous batch applies per request (steering vectors, LoRA adapters)")

        def job(cancel: threading.Event) -> list[Candidate]:
            self._prepare()
            with self._lock:
                return generation.steer_hooked(self, requests, n, given, on_token=lambda g, t: cancel.is_set())

        try:
            return await _cancellable(job)
        except (PersonaError, ImportError):
            raise
        except Exception as exc:
            raise BackendError(f"{self.name} failed to generate: {type(exc).__name__}: {exc}") from exc

    def _settings(self, params: GenerationParams, n: int) -> dict[str, Any]:
        temperature = self.temperature if params.temperature is None else params.temperature
        top_p = self.top_p if params.top_p is None else params.top_p
        sample = temperature > 0 or n > 1
        used_temperature = (temperature if temperature > 0 else DIVERSE_TEMPERATURE) if sample else 0.0
        stops = list(params.stop or [])
        if self._uses_plain_prompt() and PLAIN_STOP not in stops:
            stops.append(PLAIN_STOP)
        return {
            "max_new_tokens": params.max_tokens or self.max_new_tokens,
            "sample": sample,
            "temperature": used_temperature,
            "top_p": top_p,
            "stops": [s for s in stops if s],
            "seed": params.seed,
        }

    def _attach_hooks(self, decoding: list[Decoding]) -> list[Any]:
        handles: list[Any] = []
        for d in decoding:
            for hook in d.activation_hooks:
                if isinstance(hook, tuple) and len(hook) == 2 and isinstance(hook[0], str):
                    handles.append(self._model.get_submodule(hook[0]).register_forward_hook(hook[1]))
                elif callable(hook):
                    got = hook(self._model)
                    if got is not None:
                        handles.extend(got if isinstance(got, (list, tuple)) else [got])
                else:
                    raise BackendError(
                        f"activation hook from {d.source or 'a plugin'} is neither callable nor "
                        "a (submodule_name, forward_hook) pair"
                    )
        return handles

    def _eos_ids(self) -> set[int]:
        eos = self._model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tokenizer.eos_token_id is not None:
            ids.add(self._tokenizer.eos_token_id)
        if self._tokenizer.pad_token_id is not None:
            ids.add(self._tokenizer.pad_token_id)
        return ids

    def _encode(self, prompts: list[str]) -> Any:
        tok = self._tokenizer
        # A chat template already carries its special tokens; a plain prompt gets the usual ones.
        special = self._uses_plain_prompt()
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=special)
        limit = self.capabilities.max_context
        if limit is not None and enc["input_ids"].shape[1] >= limit:
            raise BackendError(
                f"the prompt has {enc['input_ids'].shape[1]} tokens; {self.model_name} holds {limit}",
                hint="shorten the conversation or the injected context",
            )
        return enc

    # ----------------------------------------------------------------- streaming

    def _stream_job(self, messages: list[Message], decoding: list[Decoding], params: GenerationParams,
                    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[str, Any]],
                    cancelled: threading.Event) -> asyncio.Future[Any]:
        """Submit a streaming job to the batch: its tokens go to ``queue`` as text, then end or error.
        Raises ``BackendOverloaded`` at once when the queue is full."""
        from concurrent.futures import Future

        def send(kind: str, value: Any = None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

        pipe = _token_pipe(self._tokenizer, send, cancelled)

        def on_token(token: int) -> None:
            pipe(0, token)

        job = Job(messages, decoding, self._settings(params, 1), Future(), cancelled, on_token=on_token)

        def finished(f: Future[list[Candidate]]) -> None:
            exc = f.exception()
            send("error", exc) if exc is not None else send("end")

        job.done.add_done_callback(finished)
        self.scheduler.submit(job)
        return asyncio.wrap_future(job.done, loop=loop)

    async def stream(
        self,
        messages: list[Message],
        *,
        params: GenerationParams | None = None,
        decoding: list[Decoding] | None = None,
    ) -> AsyncIterator[str]:
        """Text pieces as they are generated; their concatenation equals ``generate``'s text."""
        params = params or GenerationParams()
        decoding = decoding or []
        await _on_torch_thread(self._ensure_loaded)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()
        s = self._settings(params, 1)
        # Generation runs on the torch thread and feeds the queue; this side only awaits it.
        if schedulable(self, decoding, 1):
            worker = self._stream_job(messages, decoding, params, loop, queue, cancelled)
        else:
            worker = loop.run_in_executor(
                TORCH_THREAD, generation.stream_worker, self, messages, params, decoding, s, loop, queue, cancelled
            )
        held = ""  # text not yet safe to emit: a possible stop-string prefix or trailing space
        started = False
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    break
                held += value
                text, stopped = _cut_at_stop(held, s["stops"])
                if stopped:
                    held = text.rstrip()
                    break
                keep = _unsafe_suffix(held, s["stops"])
                emit, held = held[: len(held) - keep], held[len(held) - keep :]
                if not started:
                    emit = emit.lstrip()
                    if not emit:
                        held = "" if not held.strip() else held
                        continue
                    started = True
                if emit:
                    yield emit
            tail = held.rstrip() if started else held.strip()
            if tail:
                yield tail
        finally:
            cancelled.set()  # an abandoned stream stops generating at the next token
            if worker.done():
                worker.exception()  # errors were already delivered through the queue
            else:
                worker.add_done_callback(lambda f: f.exception())
