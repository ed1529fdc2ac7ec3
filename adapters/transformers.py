"""The local, white-box backend: a Hugging Face transformers causal LM on this machine.

Models come from ``persona_mw.models`` (registry names such as ``smollm2-135m-instruct``, a
Hugging Face model directory, or a ``.gguf`` file) and load lazily on first use.

Decoding:

- ``n`` candidates are ONE batch (``num_return_sequences=n``) sharing the prompt's KV cache.
- Temperature 0 and ``n == 1`` is greedy. Temperature 0 with ``n > 1`` samples at
  ``DIVERSE_TEMPERATURE`` (0.7) instead, since n greedy copies of one answer are useless to a
  reranker; the temperature used is recorded in each candidate's ``meta``.
- ``params.seed`` seeds torch's global RNG just before generating, under the backend's lock,
  so a seeded sampled call is reproducible.
- ``params.stop`` strings end generation (transformers' ``stop_strings``) and are cut from the
  text. A model without a chat template gets a plain ``User: ...\\nAssistant:`` prompt and an
  implicit ``"\\nUser:"`` stop.
- Logits processors from every ``Decoding`` go into one ``LogitsProcessorList``; they see
  ``(input_ids, scores)`` with a batch of ``n`` rows. Activation hooks are either a callable
  ``hook(model) -> handle | list[handle] | None`` (it registers torch hooks and returns their
  handles) or a ``(submodule_name, forward_hook)`` pair; every handle is removed afterwards.

torch runs off the event loop, on ONE dedicated worker thread per process (``TORCH_THREAD``,
used like ``asyncio.to_thread``) while holding a per-backend lock: on a few CPU cores one
generation at a time is fastest. The thread is always the same one because each OS thread that
runs torch gets its own OpenMP pool, and pools on several threads compete for the cores: on 2
cores, generating from a second thread measured ~25% slower. White-box plugins that run their
own forward passes should do it through ``await backend.call(fn)`` for the same reason. Code
running on the torch thread (a logits processor, a hook, ``fn``) must not wait for another
generation: it would wait for itself.
``threads`` calls ``torch.set_num_threads`` (process-wide).

A candidate's ``tokens`` counts the completion tokens generated (eos excluded, a cut stop string
included); ``finish_reason`` is ``"length"`` when ``max_tokens`` cut it short, else ``"stop"``.
"""

from __future__ import annotations

import asyncio
import contextvars
import difflib
import functools
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from persona_mw import models as _models
from persona_mw.adapters.base import Capabilities
from persona_mw.errors import BackendError, ConfigError, PersonaError
from persona_mw.types import Candidate, Decoding, GenerationParams, Message

__all__ = ["DIVERSE_TEMPERATURE", "PLAIN_STOP", "TORCH_THREAD", "TransformersBackend", "create"]

# All torch work of every backend in this process runs here (see the module docstring).
TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="persona-mw-torch")

T = TypeVar("T")


async def _on_torch_thread(fn: Callable[..., T], *args: Any) -> T:
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(TORCH_THREAD, functools.partial(ctx.run, fn, *args))


DIVERSE_TEMPERATURE = 0.7
PLAIN_STOP = "\nUser:"
_ROLE_LABEL = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


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
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
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
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    async def aclose(self) -> None:
        # The weights stay in persona_mw.models' in-process cache for other backends to share.
        self._model = None
        self._tokenizer = None

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
        return await _on_torch_thread(self._run, [messages], n, params or GenerationParams(), decoding or [])

    async def generate_batch(
        self,
        batch: list[list[Message]],
        params: GenerationParams | None = None,
        decoding: list[Decoding] | None = None,
    ) -> list[Candidate]:
        """One answer per prompt, all prompts in one left-padded batch (``index`` = prompt's position)."""
        if not batch:
            return []
        return await _on_torch_thread(self._run, batch, 1, params or GenerationParams(), decoding or [])

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

    def _generate_kwargs(self, s: dict[str, Any], n: int, decoding: list[Decoding], enc: Any) -> dict[str, Any]:
        from transformers import (
            GenerationConfig,
            LogitsProcessorList,
            StoppingCriteriaList,
        )

        tok, model = self._tokenizer, self._model
        base = model.generation_config.to_dict()
        cfg = GenerationConfig(
            bos_token_id=base.get("bos_token_id"),
            eos_token_id=base.get("eos_token_id", tok.eos_token_id),
            pad_token_id=tok.pad_token_id,
            max_new_tokens=s["max_new_tokens"],
            do_sample=s["sample"],
            num_return_sequences=n,
            use_cache=True,
        )
        if s["sample"]:
            cfg.temperature = s["temperature"]
            cfg.top_k = 0  # plain temperature / nucleus sampling
            if s["top_p"] is not None:
                cfg.top_p = s["top_p"]
        prompt_len = enc["input_ids"].shape[1]
        limit = self.capabilities.max_context
        if limit is not None:
            cfg.max_new_tokens = min(cfg.max_new_tokens, limit - prompt_len)
        kwargs: dict[str, Any] = {"generation_config": cfg, "stopping_criteria": StoppingCriteriaList()}
        processors = [p for d in decoding for p in d.logits_processors]
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        if s["stops"]:
            # Not transformers' stop_strings: its per-vocabulary tables take seconds to build
            # for a 262k vocabulary, on every call. Decoding a short tail per step is cheap.
            kwargs["stopping_criteria"].append(_stop_on_text(tok, s["stops"], prompt_len))
        return kwargs

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

    def _run(
        self, batch: list[list[Message]], n: int, params: GenerationParams, decoding: list[Decoding]
    ) -> list[Candidate]:
        """Blocking: generate ``n`` answers for each prompt in ``batch`` (worker thread)."""
        try:
            self._prepare()
            import torch

            prompts = [self.format_prompt(m) for m in batch]
            s = self._settings(params, n)
            with self._lock:
                enc = self._encode(prompts)
                kwargs = self._generate_kwargs(s, n, decoding, enc)
                if s["seed"] is not None:
                    torch.manual_seed(s["seed"])
                handles = self._attach_hooks(decoding)
                try:
                    with torch.inference_mode():
                        out = self._model.generate(**enc, **kwargs)
                finally:
                    for h in handles:
                        h.remove()
            prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
            max_new = kwargs["generation_config"].max_new_tokens
            return self._candidates(out, enc["input_ids"].shape[1], prompt_tokens, n, s, max_new)
        except PersonaError:
            raise
        except ImportError:
            raise
        except Exception as exc:
            raise BackendError(f"{self.name} failed to generate: {type(exc).__name__}: {exc}") from exc

    def _candidates(
        self, out: Any, prompt_len: int, prompt_tokens: list[int], n: int, s: dict[str, Any], max_new: int
    ) -> list[Candidate]:
        eos = self._eos_ids()
        result = []
        for row_index, row in enumerate(out[:, prompt_len:].tolist()):
            cut = next((i for i, t in enumerate(row) if t in eos), None)
            ids = row if cut is None else row[:cut]
            raw = self._tokenizer.decode(ids, skip_special_tokens=True)
            text, stopped = _cut_at_stop(raw, s["stops"])
            if cut is not None or stopped:
                reason = "stop"
            else:
                reason = "length" if len(ids) >= max_new else "stop"
            result.append(
                Candidate(
                    text=text.strip(),
                    index=row_index,
                    finish_reason=reason,
                    tokens=len(ids),
                    meta={
                        "backend": self.name,
                        "prompt_tokens": int(prompt_tokens[row_index // n]),
                        "sampled": s["sample"],
                        "temperature": s["temperature"],
                        "seed": s["seed"],
                    },
                )
            )
        return result

    # ----------------------------------------------------------------- streaming

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
        worker = loop.run_in_executor(
            TORCH_THREAD, self._stream_worker, messages, params, decoding, s, loop, queue, cancelled
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

    def _stream_worker(
        self,
        messages: list[Message],
        params: GenerationParams,
        decoding: list[Decoding],
        s: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[tuple[str, Any]],
        cancelled: threading.Event,
    ) -> None:
        def send(kind: str, value: Any = None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

        try:
            self._prepare()
            import torch
            from transformers import StoppingCriteria, TextIteratorStreamer

            class _Pipe(TextIteratorStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                    if text:
                        send("text", text)

            class _Cancelled(StoppingCriteria):
                def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                    return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

            streamer = _Pipe(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
            with self._lock:
                if cancelled.is_set():
                    return
                enc = self._encode([self.format_prompt(messages)])
                kwargs = self._generate_kwargs(s, 1, decoding, enc)
                kwargs["stopping_criteria"].append(_Cancelled())
                if s["seed"] is not None:
                    torch.manual_seed(s["seed"])
                handles = self._attach_hooks(decoding)
                try:
                    with torch.inference_mode():
                        self._model.generate(**enc, **kwargs, streamer=streamer)
                finally:
                    for h in handles:
                        h.remove()
            send("end")
        except PersonaError as exc:
            send("error", exc)
        except Exception as exc:
            err = BackendError(f"{self.name} failed to stream: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            send("error", err)


def _stop_on_text(tokenizer: Any, stops: list[str], prompt_len: int) -> Any:
    """A stopping criterion: a row is done once its generated text contains a stop string."""
    import torch
    from transformers import StoppingCriteria

    window = max(len(s) for s in stops) + 8  # tokens: enough to cover the longest stop string

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            tails = input_ids[:, prompt_len:][:, -window:].tolist()
            texts = tokenizer.batch_decode(tails, skip_special_tokens=True)
            hits = [any(stop in text for stop in stops) for text in texts]
            return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)

    return StopOnText()


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _unsafe_suffix(text: str, stops: list[str]) -> int:
    """How many trailing characters to hold back: trailing whitespace, or a stop string's prefix."""
    keep = len(text) - len(text.rstrip())
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = max(keep, k)
                break
    return keep


_SETTINGS = ("model", "max_new_tokens", "temperature", "top_p", "threads", "dtype")


def create(**settings: Any) -> TransformersBackend:
    """Build the backend from the config's ``backend:`` section (``type: transformers`` plus these keys)."""
    unknown = [k for k in settings if k not in _SETTINGS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, _SETTINGS, n=1)
        raise ConfigError(
            f"transformers backend: unknown setting {key!r}",
            hint=f"did you mean {close[0]!r}?" if close else f"valid settings: {', '.join(_SETTINGS)}",
        )
    try:
        return TransformersBackend(**settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"transformers backend: {exc}", hint=f"valid settings: {', '.join(_SETTINGS)}") from exc
