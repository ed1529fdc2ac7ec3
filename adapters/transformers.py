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

Steering: when a ``Decoding`` carries extra prompt ``streams`` with a ``combine`` function, or a
``token_reward``, generation runs the backend's own loop (``_steer``) instead of ``model.generate``:
the answer row and every stream row of every request form ONE left-padded batch with one KV cache
(each row its own keys and values); each step ``combine(main [n, V], streams [n, S, V])`` gives the
answer's scores, logits processors run, the token is chosen and fed to all rows of its group. With a
``token_reward`` the top-k candidates are fed as k rows on the prefix cache (one forward gives their
rewards and their next-token logits), then the cache is reordered to the chosen row.
``steering_cache = False`` re-runs the full forward each step: the naive reference for tests.
``generate_steered`` batches requests that each carry their own decodings.

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
import re
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from persona_mw import models as _models
from persona_mw.adapters.base import Capabilities
from persona_mw.errors import BackendError, ConfigError, PersonaError
from persona_mw.types import Candidate, Decoding, GenerationParams, Message

__all__ = ["DIVERSE_TEMPERATURE", "PLAIN_STOP", "TORCH_THREAD", "TransformersBackend", "create", "top_p_mask"]

# All torch work of every backend in this process runs here (see the module docstring).
TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="persona-mw-torch")

T = TypeVar("T")


async def _on_torch_thread(fn: Callable[..., T], *args: Any) -> T:
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(TORCH_THREAD, functools.partial(ctx.run, fn, *args))


async def _cancellable(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args, cancel)`` on the torch thread; if the awaiting task is cancelled (a client that went
    away, a timeout), ``cancel`` is set and the generation loop stops at its next step instead of
    running to ``max_new_tokens`` while every later request waits for the thread."""
    cancel = threading.Event()
    try:
        return await _on_torch_thread(fn, *args, cancel)
    except asyncio.CancelledError:
        cancel.set()
        raise


def _stop_criterion(cancel: threading.Event) -> Any:
    """A stopping criterion that ends every row once ``cancel`` is set (checked after each step)."""
    import torch
    from transformers import StoppingCriteria

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return _Cancelled()


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
        return await _cancellable(self._run, [messages], n, params or GenerationParams(), decoding or [])

    async def generate_batch(
        self,
        batch: list[list[Message]],
        params: GenerationParams | None = None,
        decoding: list[Decoding] | None = None,
    ) -> list[Candidate]:
        """One answer per prompt, all prompts in one left-padded batch (``index`` = prompt's position)."""
        if not batch:
            return []
        return await _cancellable(self._run, batch, 1, params or GenerationParams(), decoding or [])

    async def generate_steered(
        self,
        requests: list[tuple[list[Message], list[Decoding]]],
        params: GenerationParams | None = None,
        n: int = 1,
    ) -> list[Candidate]:
        """Steered answers for several requests, each with its own decoding contributions, as
        ONE batch (``index = request * n + i``). Activation hooks act on the whole batch, so
        requests that carry any must all carry the same ones."""
        if not requests:
            return []
        hooks = [tuple(id(h) for d in dec for h in d.activation_hooks) for _, dec in requests]
        if len(set(hooks)) > 1:
            raise BackendError("requests in one steered batch carry different activation hooks",
                               hint="batch requests with the same activation edits together")
        params = params or GenerationParams()

        def job(cancel: threading.Event) -> list[Candidate]:
            self._prepare()
            with self._lock:
                handles = self._attach_hooks(requests[0][1])
                try:
                    return self._steer(requests, n, params, use_cache=self.steering_cache,
                                       on_token=lambda g, t: cancel.is_set())
                finally:
                    for h in handles:
                        h.remove()

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
        self, batch: list[list[Message]], n: int, params: GenerationParams, decoding: list[Decoding],
        cancel: threading.Event | None = None,
    ) -> list[Candidate]:
        """Blocking: generate ``n`` answers for each prompt in ``batch`` (worker thread); a set
        ``cancel`` ends generation at the next step (the caller no longer waits for the answer)."""
        cancel = cancel or threading.Event()
        try:
            if cancel.is_set():  # abandoned while queued for the torch thread
                raise BackendError(f"{self.name}: generation cancelled")
            self._prepare()
            import torch

            if self._steers(decoding):
                with self._lock:
                    handles = self._attach_hooks(decoding)
                    try:
                        return self._steer([(m, decoding) for m in batch], n, params,
                                           use_cache=self.steering_cache, on_token=lambda g, t: cancel.is_set())
                    finally:
                        for h in handles:
                            h.remove()
            prompts = [self.format_prompt(m) for m in batch]
            s = self._settings(params, n)
            with self._lock:
                enc = self._encode(prompts)
                kwargs = self._generate_kwargs(s, n, decoding, enc)
                kwargs["stopping_criteria"].append(_stop_criterion(cancel))
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

    # ----------------------------------------------------------------- steering

    @staticmethod
    def _steers(decoding: list[Decoding]) -> bool:
        return any(d.streams or d.combine is not None or d.token_reward is not None for d in decoding)

    def _steer(
        self,
        requests: list[tuple[list[Message], list[Decoding]]],
        n: int,
        params: GenerationParams,
        use_cache: bool = True,
        on_token: Callable[[int, int], bool] | None = None,
    ) -> list[Candidate]:
        """Blocking, lock held: the steering loop (streams, combine functions, reward-guided search).

        Each request (its prompt and its own decoding contributions) gets ``n`` groups of rows:
        the answer row, then each of its Decodings' extra streams. All rows of all requests are
        ONE left-padded batch with one KV cache (each row its own keys and values); every step
        feeds each group's chosen token to all its rows, so nothing is re-encoded.
        ``use_cache=False`` re-runs the full forward each step instead: the naive reference the
        tests compare against. Candidates come back request-major (``index = request * n + i``).
        """
        import torch

        s = self._settings(params, n)
        rewarded = [any(d.token_reward is not None for d in dec) for _, dec in requests]
        if any(rewarded):
            if not all(rewarded):
                raise BackendError("a batch mixes reward-guided and other requests; send them separately")
            for _, dec in requests:
                rds = [d for d in dec if d.token_reward is not None]
                if len(rds) > 1:
                    raise BackendError("only one plugin may contribute a token reward (reward-guided decoding)")
                if any(d.streams for d in dec):
                    raise BackendError(
                        f"reward-guided decoding ({rds[0].source or 'a plugin'}) cannot be combined "
                        "with extra prompt streams in one request",
                        hint="configure either the contrast/experts plugins or args, not both",
                    )
            return self._reward_guided(requests, n, s, use_cache, on_token)

        # Row layout: for each request, n groups of [answer, stream_1, ..., stream_S].
        prompts: list[str] = []
        layout: list[tuple[int, list[tuple[Decoding, int, int]], list[Any]]] = []  # (first row, spans, procs)
        group_prompt: list[int] = []
        for r_i, (messages, dec) in enumerate(requests):
            texts = [self.format_prompt(messages)]
            spans: list[tuple[Decoding, int, int]] = []
            for d in dec:
                spans.append((d, len(texts), len(texts) + len(d.streams)))
                texts += [self.format_prompt(m) for m in d.streams]
            procs = [p for d in dec for p in d.logits_processors]
            for _ in range(n):
                layout.append((len(prompts), spans, procs))
                group_prompt.append(r_i)
                prompts.extend(texts)
        enc = self._encode(prompts)
        groups = len(layout)
        rows = len(prompts)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        prompt_len = ids.shape[1]
        max_new = s["max_new_tokens"]
        limit = self.capabilities.max_context
        if limit is not None:
            max_new = min(max_new, limit - prompt_len)
        main_rows = torch.tensor([first for first, _, _ in layout], dtype=torch.long)
        # Which group each row belongs to (to feed it the group's token).
        owner = torch.zeros(rows, dtype=torch.long)
        for g, (first, _, _) in enumerate(layout):
            end = layout[g + 1][0] if g + 1 < groups else rows
            owner[first:end] = g
        eos = self._eos_ids()
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else min(eos)
        stops = s["stops"]
        window = (max(len(x) for x in stops) + 8) if stops else 0
        if s["seed"] is not None:
            torch.manual_seed(s["seed"])

        cache = self._new_cache() if use_cache else None
        gen = torch.empty((groups, 0), dtype=torch.long)
        done = torch.zeros(groups, dtype=torch.bool)
        full_ids, full_mask = ids, mask
        step_ids = ids
        with torch.inference_mode():
            for t in range(max_new):
                logits = self._forward_last(step_ids, full_mask, cache)  # [rows, V]
                main = logits[main_rows]
                if any(spans or procs for _, spans, procs in layout):
                    main_ids = torch.cat([ids[main_rows], gen], dim=1)
                    parts = []
                    for g, (first, spans, procs) in enumerate(layout):
                        row = main[g : g + 1]
                        for d, a, b in spans:
                            if d.combine is not None:
                                row = d.combine(row, logits[first + a : first + b][None])
                        for proc in procs:
                            row = proc(main_ids[g : g + 1], row)
                        parts.append(row)
                    main = torch.cat(parts, dim=0)
                token = self._choose(main, s)
                token = torch.where(done, torch.full_like(token, pad), token)
                gen = torch.cat([gen, token[:, None]], dim=1)
                self._mark_done(token, done, gen, eos, on_token, stops, window)
                if bool(done.all()):
                    break
                row_tokens = token[owner][:, None]
                full_mask = torch.cat([full_mask, torch.ones((rows, 1), dtype=full_mask.dtype)], dim=1)
                if use_cache:
                    step_ids = row_tokens
                else:
                    full_ids = torch.cat([full_ids, row_tokens], dim=1)
                    step_ids = full_ids
        prompt_tokens = mask[main_rows].sum(dim=1).tolist()
        per_prompt = [int(prompt_tokens[i * n]) for i in range(len(requests))]
        cands = self._candidates(gen, 0, per_prompt, n, s, max_new)
        for c in cands:
            dec = requests[group_prompt[c.index]][1]
            c.meta["steered"] = [d.source for d in dec if d.streams or d.combine is not None]
            c.meta["streams"] = sum(len(d.streams) for d in dec)
        return cands

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self._model.config)

    def _forward_last(self, step_ids: Any, full_mask: Any, cache: Any, hidden: bool = False) -> Any:
        """Next-token logits ``[rows, V]`` (float32) for left-padded rows; with ``hidden``, also the
        last hidden state ``[rows, d]``. ``cache`` None: ``step_ids`` is the whole sequence."""
        import torch

        positions = (full_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
        out = self._model(
            input_ids=step_ids,
            attention_mask=full_mask,
            position_ids=positions,
            cache=cache,
            use_cache=cache is not None,
            logits_to_keep=1,
            output_hidden_states=hidden,
        )
        logits = out.logits[:, -1, :].to(torch.float32)
        if hidden:
            return logits, out.hidden_states[-1][:, -1, :].to(torch.float32)
        return logits

    def _mark_done(self, token: Any, done: Any, gen: Any, eos: Any, on_token: Any, stops: Any, window: int) -> None:
        """After a step of a steered loop: mark each stream finished on EOS, when ``on_token`` says
        stop (a streaming consumer went away), or when a stop string appears in its recent tokens."""
        for g in range(len(done)):
            if done[g]:
                continue
            tok_id = int(token[g])
            if tok_id in eos or (on_token is not None and on_token(g, tok_id)):
                done[g] = True
            elif stops:
                tail = self._tokenizer.decode(gen[g, -window:].tolist(), skip_special_tokens=True)
                if any(x in tail for x in stops):
                    done[g] = True

    @staticmethod
    def _choose(scores: Any, s: dict[str, Any]) -> Any:
        import torch

        if not s["sample"]:
            return scores.argmax(dim=-1)
        logits = scores / s["temperature"]
        if s["top_p"] is not None and s["top_p"] < 1:
            logits = logits.masked_fill(~top_p_mask(logits, s["top_p"]), float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1)[:, 0]

    def _reward_guided(
        self,
        requests: list[tuple[list[Message], list[Decoding]]],
        n: int,
        s: dict[str, Any],
        use_cache: bool,
        on_token: Callable[[int, int], bool] | None,
    ) -> list[Candidate]:
        """ARGS with a reward on the policy's own hidden states, one batched forward per token.

        Each step the ``k`` top next tokens of every answer are fed as ``k`` rows sharing that
        answer's prefix cache; that one forward gives each candidate's hidden state (its reward)
        AND its next-token logits, so the chosen row's logits are the next step's and no further
        policy forward is needed. The cache is then reordered to ``k`` copies of the chosen row.
        """
        import torch

        prompts = [self.format_prompt(m) for m, _ in requests for _ in range(n)]
        group_dec = [dec for _, dec in requests for _ in range(n)]
        rewarders = [next(d for d in dec if d.token_reward is not None) for dec in group_dec]
        procs = [[p for d in dec for p in d.logits_processors] for dec in group_dec]
        enc = self._encode(prompts)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        groups = ids.shape[0]
        prompt_len = ids.shape[1]
        max_new = s["max_new_tokens"]
        limit = self.capabilities.max_context
        if limit is not None:
            max_new = min(max_new, limit - prompt_len)
        eos = self._eos_ids()
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else min(eos)
        stops = s["stops"]
        window = (max(len(x) for x in stops) + 8) if stops else 0
        k = min(rewarders[0].reward_top_k, self._model.config.vocab_size)
        if any(min(rd.reward_top_k, self._model.config.vocab_size) != k for rd in rewarders):
            raise BackendError("reward-guided requests in one batch must use the same top-k")
        w = torch.tensor([[float(rd.reward_weight)] for rd in rewarders])
        if s["seed"] is not None:
            torch.manual_seed(s["seed"])
        cache = self._new_cache() if use_cache else None
        gen = torch.empty((groups, 0), dtype=torch.long)
        done = torch.zeros(groups, dtype=torch.bool)
        rows_mask = mask.repeat_interleave(k, dim=0)
        arange = torch.arange(groups)
        with torch.inference_mode():
            logits = self._forward_last(ids, mask, cache)  # [G, V]
            if use_cache:
                cache.batch_repeat_interleave(k)
            for t in range(max_new):
                scores = logits
                if any(procs):
                    cur = torch.cat([ids, gen], dim=1)
                    scores = torch.cat([_apply(procs[g], cur[g : g + 1], scores[g : g + 1])
                                        for g in range(groups)], dim=0)
                top, cand = scores.topk(k, dim=-1)  # [G, k]
                rows_mask = torch.cat([rows_mask, torch.ones((groups * k, 1), dtype=rows_mask.dtype)], dim=1)
                if use_cache:
                    step = cand.reshape(-1, 1)
                else:
                    prefix = torch.cat([ids, gen], dim=1).repeat_interleave(k, dim=0)
                    step = torch.cat([prefix, cand.reshape(-1, 1)], dim=1)
                cand_logits, hid = self._forward_last(step, rows_mask, cache, hidden=True)
                hid = hid.view(groups, k, -1)
                if all(rd.token_reward is rewarders[0].token_reward for rd in rewarders):
                    reward = torch.as_tensor(rewarders[0].token_reward(hid.reshape(groups * k, -1)),
                                             dtype=torch.float32).reshape(groups, k)
                else:
                    reward = torch.stack([torch.as_tensor(rd.token_reward(hid[g]), dtype=torch.float32).reshape(k)
                                          for g, rd in enumerate(rewarders)])
                total = top + w * reward
                if s["sample"]:
                    pick = torch.multinomial(torch.softmax(total / s["temperature"], dim=-1), 1)[:, 0]
                else:
                    pick = total.argmax(dim=-1)
                token = cand[arange, pick]
                token = torch.where(done, torch.full_like(token, pad), token)
                gen = torch.cat([gen, token[:, None]], dim=1)
                self._mark_done(token, done, gen, eos, on_token, stops, window)
                if bool(done.all()):
                    break
                chosen = arange * k + pick
                logits = cand_logits[chosen]
                if use_cache:
                    cache.reorder_cache(chosen.repeat_interleave(k))
        per_prompt = [int(x) for x in mask.sum(dim=1).tolist()[::n]]
        cands = self._candidates(gen, 0, per_prompt, n, s, max_new)
        for c in cands:
            c.meta["steered"] = [rewarders[c.index].source]
            c.meta["reward_top_k"] = k
        return cands

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
            from transformers import TextIteratorStreamer

            class _Pipe(TextIteratorStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                    if text:
                        send("text", text)

            streamer = _Pipe(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
            if self._steers(decoding):
                with self._lock:
                    if cancelled.is_set():
                        return
                    handles = self._attach_hooks(decoding)
                    try:
                        self._steer([(messages, decoding)], 1, params, use_cache=self.steering_cache,
                                    on_token=_token_pipe(self._tokenizer, send, cancelled))
                    finally:
                        for h in handles:
                            h.remove()
                send("end")
                return
            with self._lock:
                if cancelled.is_set():
                    return
                enc = self._encode([self.format_prompt(messages)])
                kwargs = self._generate_kwargs(s, 1, decoding, enc)
                kwargs["stopping_criteria"].append(_stop_criterion(cancelled))
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


def _apply(procs: list[Any], ids: Any, scores: Any) -> Any:
    for proc in procs:
        scores = proc(ids, scores)
    return scores


def top_p_mask(scores: Any, top_p: float) -> Any:
    """Boolean mask of the smallest set of tokens whose probability reaches ``top_p`` (per row;
    the most likely token is always kept)."""
    import torch

    probs = torch.softmax(scores.to(torch.float32), dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
    keep_sorted = before < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _token_pipe(tokenizer: Any, send: Callable[[str, Any], None], cancelled: threading.Event) -> Callable[[int, int], bool]:
    """An ``on_token`` callback for the steering loop that streams decoded text; True = stop."""
    ids: list[int] = []
    sent = [0]

    def on_token(group: int, token: int) -> bool:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return cancelled.is_set()
        if len(text) > sent[0]:
            send("text", text[sent[0]:])
            sent[0] = len(text)
        return cancelled.is_set()

    return on_token


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
