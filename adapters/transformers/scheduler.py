"""Continuous batching across requests on the torch thread.

Requests that arrive while others decode join the running batch at the next step and leave when
they finish. The batch is ONE left-padded ``DynamicCache``: each request owns rows of it (its
answer row, plus one row per extra prompt stream of a contrast/experts ``Decoding``), with per-row
positions from the attention mask. A new request is prefilled on its own cache, in chunks of at
most ``prefill_chunk`` tokens per step (so a long prompt cannot stall the requests already
decoding); requests admitted together whose whole prompts fit in that budget (and that install no
hooks for their prompt alone) are prefilled in one left-padded forward, each then taking its row of
that cache. Its rows are then left-padded to the batch's length and appended; a finished or
cancelled request's rows are dropped before the next step. Each request keeps its own sampling
settings (its own seeded ``torch.Generator``), stop strings, logits processors, ``combine``
functions, steering vectors (activation hooks marked ``residual``: added to that request's rows only)
and LoRA adapters (hooks marked ``lora``: each request's deltas on its own rows, so requests with
different adapters share one forward); a steered or adapted request's prompt is encoded with its hooks
installed. A reward-guided request (ARGS, a ``Decoding`` with ``token_reward``) holds ``k`` rows: each
step they are fed its ``k`` candidate tokens, the candidates' hidden states give their rewards, the
chosen one is its token, that row's logits give the next candidates, and its ``k`` rows of the cache
become copies of the chosen row (the loop of ``reward.py``, inside the batch). A request for ``n > 1``
sampled answers (best-of-n reranking) holds ``n`` rows on copies of its prompt's cache (the prompt is
encoded once) and draws its rows' tokens together from its own seeded generator, as ``model.generate``
with ``num_return_sequences`` does, so a seed gives the same answers on either path.

The scheduler runs in slices on ``TORCH_THREAD``: a slice steps the batch until it is empty, or
until other torch work is queued on the thread (``backend.call``, the paths that cannot share a
batch: unmarked activation hooks, contrast streams or reward-guided search with ``n > 1``); it then
resubmits itself behind that
work, so both make progress. At most ``max_queue`` requests wait for a row; one more raises
``BackendOverloaded`` (the server answers 503 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from persona_mw.errors import BackendError, BackendOverloaded, PersonaError
from persona_mw.logits import top_p_mask
from persona_mw.types import Candidate, Decoding, Message

from .steering import forward_last, loop_limits, new_cache, row_adapter_hooks
from .torch_thread import TORCH_THREAD

if TYPE_CHECKING:
    from .backend import TransformersBackend

OnText = Callable[[int], None]


_SERIAL = itertools.count()  # a job's identity for per-batch caches (``id()`` is reused once a job is freed)


@dataclass
class Job:
    """One request in the scheduler: its prompt rows, settings and progress (torch thread only)."""

    messages: list[Message]
    decoding: list[Decoding]
    s: dict[str, Any]
    done: Future[list[Candidate]]
    cancel: threading.Event
    on_token: OnText | None = None
    adds: list[tuple[int, Any]] = field(default_factory=list)  # (decoder layer, vector) added to its rows
    loras: list[Any] = field(default_factory=list)  # adapters (``weights``: name -> (A, B)) on its rows
    row_loras: list[Any] | None = None  # an adapter (or None) per row: its streams' ``stream_adapters``
    serial: int = field(default_factory=lambda: next(_SERIAL))
    n: int = 1  # sampled answers: n > 1 holds n rows on copies of its prompt's cache (``samples``)
    reward: Decoding | None = None  # reward-guided search: the rewarder (its rows: ``k`` candidates)
    k: int = 0
    top: Any = None  # the current candidates' logits [k] and ids [k]
    cand: Any = None
    # set at admission
    enc: Any = None
    spans: list[tuple[Decoding, int, int]] = field(default_factory=list)
    procs: list[Any] = field(default_factory=list)
    lim: Any = None
    generator: Any = None
    prompt_ids: Any = None  # the answer row's prompt ids [1, P] (no padding), for logits processors
    # prefill progress: own cache and the columns encoded so far
    cache: Any = None
    filled: int = 0
    gen: list[int] = field(default_factory=list)
    samples: list[list[int]] = field(default_factory=list)  # n > 1: each row's tokens (a row stops at its end)
    ended: list[bool] = field(default_factory=list)
    finished: bool = False

    @property
    def rows(self) -> int:
        if self.reward is not None:
            return self.k
        return self.n if self.n > 1 else int(self.enc["input_ids"].shape[0])

    @property
    def progress(self) -> int:
        """Tokens decoded so far (per row)."""
        return max((len(g) for g in self.samples), default=0) if self.n > 1 else len(self.gen)


class Scheduler:
    """The continuous batch of one backend (see the module docstring)."""

    def __init__(self, b: TransformersBackend, max_batch: int, max_queue: int, prefill_chunk: int) -> None:
        self.b = b
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._pending: collections.deque[Job] = collections.deque()
        self._guard = threading.Lock()  # _pending and _scheduled, shared with request threads
        self._scheduled = False
        # torch-thread state: the running jobs (row-major order), the batch cache and its mask
        self.active: list[Job] = []
        self.prefilling: list[Job] = []
        self.cache: Any = None
        self.mask: Any = None
        self.next_ids: Any = None
        self.steps = 0
        self.peak_batch = 0  # most requests that shared one step (a figure for tests and benchmarks)
        self.grouped_prefills = 0  # prompts encoded together with others in one forward
        self.step_seconds = 0.05  # running estimate of one decode step, for Retry-After
        self._row_adds: tuple[tuple[int, ...], dict[int, list[Any]]] | None = None  # per batch composition
        self._row_lora: tuple[tuple[int, ...], dict[str, list[Any]]] | None = None

    # ----------------------------------------------------------------- request side

    def submit(self, job: Job) -> None:
        """Queue ``job`` (any thread); raises ``BackendOverloaded`` when ``max_queue`` requests wait."""
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue ``jobs``, one caller's batch (``generate_batch``), as ONE request against the bound:
        refused (``BackendOverloaded``) only when ``max_queue`` requests already wait, so a batch larger
        than the bound is still served."""
        with self._guard:
            if len(self._pending) >= self.max_queue:
                raise BackendOverloaded(
                    f"{self.b.name}: {len(self._pending)} requests are already waiting for the local model "
                    f"(max_queue {self.max_queue})",
                    retry_after_s=self._retry_after(),
                    hint="retry after the Retry-After delay, or raise backend.max_queue",
                )
            self._pending.extend(jobs)
            start = not self._scheduled
            self._scheduled = True
        if start:
            TORCH_THREAD.submit(self._slice)

    def _retry_after(self) -> int:
        """Whole seconds until a queue place is likely to free: the batch's remaining steps, roughly."""
        left: list[int] = [int(j.s["max_new_tokens"]) - j.progress for j in self.active] or [self.b.max_new_tokens]
        return max(1, math.ceil(min(left) * float(self.step_seconds)))

    @property
    def waiting(self) -> int:
        return len(self._pending)

    # ----------------------------------------------------------------- torch thread

    def _slice(self) -> None:
        """Step the batch until it is empty or other torch work is queued, then yield to it."""
        try:
            self.b._prepare()
            with self.b._lock:
                while self._has_work():
                    self.step()
                    if _others_waiting():
                        break
        except BaseException as exc:  # a broken step fails every job, never the thread
            self._fail_all(exc)
        with self._guard:
            if self._has_work():
                TORCH_THREAD.submit(self._slice)
            else:
                self._scheduled = False

    def _has_work(self) -> bool:
        return bool(self.active or self.prefilling or self._pending)

    def _fail_all(self, exc: BaseException) -> None:
        err = self._error(exc)
        with self._guard:
            jobs = self.active + self.prefilling + list(self._pending)
            self._pending.clear()
        for job in jobs:
            if not job.done.done():
                job.done.set_exception(err)
        self.active, self.prefilling = [], []
        self.cache = self.mask = self.next_ids = None

    def step(self) -> None:
        """Admit waiting jobs, prefill one chunk, decode one token for every running row."""
        self._drop_finished()
        self._admit()
        budget = self.prefill_chunk  # prompt tokens encoded per step, shared by the joining jobs
        group = self._prefill_group(budget)
        if group:
            budget -= self._prefill_together(group)
        for job in list(self.prefilling):
            if budget <= 0:
                break
            budget -= self._prefill_chunk(job, budget)
        if self.active:
            started = time.perf_counter()
            self.peak_batch = max(self.peak_batch, len(self.active))
            self._decode()
            self.step_seconds = 0.8 * self.step_seconds + 0.2 * (time.perf_counter() - started)
            self.steps += 1
            self._drop_finished()  # an idle batch holds no cache

    def _admit(self) -> None:
        from .steering import _layout, stream_adapters

        while len(self.active) + len(self.prefilling) < self.max_batch:
            with self._guard:
                if not self._pending:
                    return
                job = self._pending.popleft()
            if job.cancel.is_set():
                job.done.set_exception(BackendError(f"{self.b.name}: generation cancelled"))
                continue
            try:
                prompts, layout, _ = _layout(self.b, [(job.messages, job.decoding)], 1)
                job.enc = self.b._encode(prompts)
                job.row_loras = stream_adapters(layout, len(prompts))
            except Exception as exc:  # a prompt too long for the model fails that request alone
                job.done.set_exception(self._error(exc))
                continue
            _, job.spans, job.procs = layout[0]
            marks = hook_marks(job.decoding) or ([], [])
            job.adds, job.loras = marks
            job.reward = next((d for d in job.decoding if d.token_reward is not None), None)
            if job.reward is not None:
                job.k = int(min(job.reward.reward_top_k, self.b._model.config.vocab_size))
            job.lim = loop_limits(self.b, job.s, int(job.enc["input_ids"].shape[1]))
            mask0 = job.enc["attention_mask"][0].bool()
            job.prompt_ids = job.enc["input_ids"][0][mask0][None]
            if job.n > 1:
                job.samples, job.ended = [[] for _ in range(job.n)], [False] * job.n
            if job.s["seed"] is not None:
                import torch

                job.generator = torch.Generator().manual_seed(int(job.s["seed"]))
            job.cache = new_cache(self.b)
            self.prefilling.append(job)

    def _prefill_chunk(self, job: Job, budget: int) -> int:
        """Encode up to ``budget`` more prompt columns of ``job`` (returns how many); after the last,
        choose its first token and join the batch."""
        import torch

        ids, mask = job.enc["input_ids"], job.enc["attention_mask"]
        start = job.filled
        end: int = min(int(ids.shape[1]), start + budget)
        try:
            handles = self.b._attach_hooks(job.decoding) if job.adds or job.loras else []  # this prompt alone
            handles += row_adapter_hooks(self.b, job.row_loras)  # its streams' own adapters
            try:
                with torch.inference_mode():
                    logits = forward_last(self.b, ids[:, start:end], mask[:, :end], job.cache)
            finally:
                for h in handles:
                    h.remove()
            job.filled = end
            if end < ids.shape[1]:
                return end - start
        except Exception as exc:  # this request's prompt or plugin failed: it alone ends
            self._fail(job, exc)
            return end - start
        self._prefilled(job, logits)
        return end - start

    def _prefilled(self, job: Job, logits: Any) -> None:
        """``job``'s prompt is encoded (``logits``: its last position's): choose its first token(s) and
        join the batch."""
        self.prefilling.remove(job)
        tokens: list[int] = []
        try:
            if job.reward is not None:
                self._candidates(job, logits)
            elif job.n > 1:  # the n rows' first tokens, from the one prompt's logits
                tokens = self._sample_rows(job, logits.expand(job.n, -1))
            else:
                tokens = [self._choose(job, logits)]
        except Exception as exc:  # this request's plugin failed: it alone ends
            self._fail(job, exc)
            return
        self._join(job, tokens)

    def _prefill_group(self, budget: int) -> list[Job]:
        """Waiting jobs whose whole prompts fit in one padded forward of at most ``budget`` tokens:
        not started, one prompt row, no hooks to install for their prompt alone. None unless two or more
        (one job alone takes the chunked path), or while a prompt is part-way encoded."""
        if any(job.filled for job in self.prefilling):
            return []  # a prompt part-way encoded goes first: a stream of short ones cannot starve it
        group: list[Job] = []
        longest = 0
        for job in self.prefilling:
            if job.filled or job.adds or job.loras or int(job.enc["input_ids"].shape[0]) != 1:
                continue
            length = int(job.enc["input_ids"].shape[1])
            if max(longest, length) * (len(group) + 1) > budget:
                break
            group.append(job)
            longest = max(longest, length)
        if len(group) < 2 or not all(type(layer).__name__ == "DynamicLayer" for layer in group[0].cache.layers):
            return []
        return group

    def _prefill_together(self, group: list[Job]) -> int:
        """Encode ``group``'s prompts in ONE left-padded forward (a float32 model's products run at least
        1.7x faster on 8 prompts at once than one by one here: ``benchmarks/batch_bound.py``), then give
        each job its row of the cache and its padded mask, and let it join. Returns the padded tokens."""
        import torch

        length = max(int(job.enc["input_ids"].shape[1]) for job in group)
        pad = group[0].lim.pad
        ids = torch.cat([_left_pad(job.enc["input_ids"], length, 1, pad) for job in group])
        mask = torch.cat([_left_pad(job.enc["attention_mask"], length, 1) for job in group])
        cache = new_cache(self.b)
        try:
            with torch.inference_mode():
                logits = forward_last(self.b, ids, mask, cache)
        except Exception:  # one prompt may be at fault: each job takes the chunked path, alone
            return 0
        self.grouped_prefills += len(group)
        for r, job in enumerate(group):
            for mine, whole in zip(job.cache.layers, cache.layers, strict=True):
                mine.lazy_initialization(whole.keys, whole.values)
                mine.keys, mine.values = whole.keys[r:r + 1], whole.values[r:r + 1]
            job.enc = {**job.enc, "input_ids": ids[r:r + 1], "attention_mask": mask[r:r + 1]}
            job.filled = length
            self._prefilled(job, logits[r:r + 1])
        return length * len(group)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if job in self.prefilling:
            self.prefilling.remove(job)
        job.finished = True
        job.cache = None
        if not job.done.done():
            job.done.set_exception(self._error(exc))

    def _error(self, exc: BaseException) -> BaseException:
        """``exc`` as the error a caller gets: persona errors as they are, others as a ``BackendError``."""
        if isinstance(exc, PersonaError):
            return exc
        err = BackendError(f"{self.b.name} failed to generate: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err

    def _join(self, job: Job, tokens: list[int]) -> None:
        """Left-pad ``job``'s cache and the batch's to one length and append its rows."""
        import torch

        rows = job.rows
        job_mask = job.enc["attention_mask"]
        if job.reward is not None or job.n > 1:  # rows on copies of its prompt's cache
            job.cache.batch_repeat_interleave(rows)
            job_mask = job_mask.repeat(rows, 1)
        if job.reward is not None:  # fed its k candidates
            new_ids = job.cand.reshape(rows, 1).clone()
        elif job.n > 1:
            new_ids = torch.tensor(self._record_rows(job, tokens), dtype=torch.long).view(rows, 1)
            if job.finished:
                return  # every row ended on its first token: never enters the batch
        else:
            new_ids = torch.full((rows, 1), tokens[0], dtype=torch.long)
            if self._record(job, tokens[0]):
                return  # finished on its first token: never enters the batch
        if self.cache is None:
            self.cache, self.mask, self.next_ids = job.cache, job_mask, new_ids
        else:
            length = max(self.mask.shape[1], job_mask.shape[1])
            for mine, theirs in zip(self.cache.layers, job.cache.layers, strict=True):
                mine.keys = torch.cat([_left_pad(mine.keys, length, 2), _left_pad(theirs.keys, length, 2)])
                mine.values = torch.cat([_left_pad(mine.values, length, 2), _left_pad(theirs.values, length, 2)])
            self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(job_mask, length, 1)])
            self.next_ids = torch.cat([self.next_ids, new_ids])
        job.cache = None
        self.active.append(job)

    def _drop_finished(self) -> None:
        """Remove finished and cancelled jobs' rows (and columns no row attends to any more)."""
        import torch

        for job in self.prefilling:
            if job.cancel.is_set():
                self._finish(job)
        self.prefilling = [j for j in self.prefilling if not j.finished]
        for job in self.active:
            if job.cancel.is_set() and not job.finished:
                self._finish(job)
        if all(not j.finished for j in self.active):
            return
        keep: list[int] = []
        row = 0
        for job in self.active:
            if not job.finished:
                keep.extend(range(row, row + job.rows))
            row += job.rows
        self.active = [j for j in self.active if not j.finished]
        if not keep:
            self.cache = self.mask = self.next_ids = None
            return
        index = torch.tensor(keep, dtype=torch.long)
        mask = self.mask[index]
        first = int(mask.any(dim=0).long().argmax())  # leading columns that are padding in every row
        self.mask, self.next_ids = mask[:, first:], self.next_ids[index]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index][:, :, first:]
            layer.values = layer.values[index][:, :, first:]

    def _decode(self) -> None:
        """One forward over every running row; each job chooses its token from its own rows."""
        import torch

        step_mask = torch.cat([self.mask, torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype)], dim=1)
        hidden = any(job.reward is not None for job in self.active)
        with torch.inference_mode():
            out = forward_last(self.b, self.next_ids, step_mask, self.cache, hidden=hidden,
                               row_adds=self._adds(), row_lora=self._lora())
        logits, hid = out if hidden else (out, None)
        self.mask = step_mask
        row = 0
        chosen: list[tuple[int, int, int]] = []  # reward-guided jobs: (first row, rows, chosen row)
        for job in self.active:
            rows = slice(row, row + job.rows)
            try:
                tokens: list[int] = []
                if job.reward is not None:
                    assert hid is not None
                    pick = self._reward_pick(job, hid[rows])
                    token = int(job.cand[pick])
                elif job.n > 1:
                    tokens = self._sample_rows(job, logits[rows])
                else:
                    token = self._choose(job, logits[rows])
            except Exception as exc:  # a plugin's processor, combine or reward failed: only its request ends
                self._fail(job, exc)
            else:
                if job.n > 1:
                    self.next_ids[rows, 0] = torch.tensor(self._record_rows(job, tokens), dtype=torch.long)
                elif job.reward is None:
                    self.next_ids[rows] = token
                    self._record(job, token)
                elif not self._record(job, token):
                    try:
                        self._candidates(job, logits[row + pick : row + pick + 1])
                    except Exception as exc:
                        self._fail(job, exc)
                    else:
                        self.next_ids[rows, 0] = job.cand
                        chosen.append((row, job.rows, row + pick))
            row += job.rows
        if chosen:
            self._keep_chosen(chosen)

    def _candidates(self, job: Job, logits: Any) -> None:
        """A reward-guided job's next ``k`` candidates (ids and logits) from its chosen row's logits."""
        import torch

        with torch.inference_mode():
            scores = logits
            if job.procs:
                ids = torch.cat([job.prompt_ids, torch.tensor([job.gen], dtype=torch.long).view(1, -1)], dim=1)
                for proc in job.procs:
                    scores = proc(ids, scores)
            top, cand = scores.topk(job.k, dim=-1)
        job.top, job.cand = top[0], cand[0]

    def _reward_pick(self, job: Job, hid: Any) -> int:
        """Which of a reward-guided job's candidates it takes: logit + weight * reward, greedy or sampled."""
        import torch

        from .reward import _rewards

        assert job.reward is not None
        with torch.inference_mode():
            w = torch.tensor([[float(job.reward.reward_weight)]])
            total = job.top[None] + w * _rewards([job.reward], hid.view(1, job.k, -1), 1, job.k)
            if job.s["sample"]:
                probs = torch.softmax(total / job.s["temperature"], dim=-1)
                return int(torch.multinomial(probs, 1, generator=job.generator)[0, 0])
            return int(total.argmax(dim=-1)[0])

    def _keep_chosen(self, chosen: list[tuple[int, int, int]]) -> None:
        """Make each reward-guided job's rows copies of its chosen row in the cache."""
        import torch

        index = torch.arange(int(self.next_ids.shape[0]))
        for first, rows, pick in chosen:
            index[first:first + rows] = pick
        for layer in self.cache.layers:
            layer.keys = layer.keys[index]
            layer.values = layer.values[index]

    def _adds(self) -> dict[int, list[Any]] | None:
        """Per decoder layer, ``[rows, 1, d]`` tensors with each steered request's vectors in its rows
        (zeros elsewhere); None when no running request is steered. Rebuilt when the batch changes."""
        if not any(job.adds for job in self.active):
            return None
        key = tuple(job.serial for job in self.active)
        if self._row_adds is not None and self._row_adds[0] == key:
            return self._row_adds[1]
        import torch

        rows = sum(job.rows for job in self.active)
        by_layer: dict[int, list[Any]] = {}
        row = 0
        for job in self.active:
            seen: dict[int, int] = {}
            for layer, vector in job.adds:
                k = seen.get(layer, 0)
                seen[layer] = k + 1
                tensors = by_layer.setdefault(layer, [])
                while len(tensors) <= k:
                    tensors.append(torch.zeros(rows, 1, vector.shape[-1], dtype=torch.float32))
                tensors[k][row:row + job.rows, 0] = vector
            row += job.rows
        self._row_adds = (key, by_layer)
        return by_layer

    def _lora(self) -> dict[str, list[Any]] | None:
        """Per module name, ``(first row, end row, A, B)`` for every adapted request's rows; None when no
        running request carries an adapter. Rebuilt when the batch changes."""
        if not any(job.loras or job.row_loras for job in self.active):
            return None
        key = tuple(job.serial for job in self.active)
        if self._row_lora is not None and self._row_lora[0] == key:
            return self._row_lora[1]
        by_name: dict[str, list[Any]] = {}
        row = 0
        for job in self.active:
            for adapter in job.loras:
                for name, (a, b) in adapter.weights.items():
                    by_name.setdefault(name, []).append((row, row + job.rows, a, b))
            for i, adapter in enumerate(job.row_loras or []):  # a stream's rows: its own adapter
                if adapter is not None:
                    for name, (a, b) in adapter.weights.items():
                        by_name.setdefault(name, []).append((row + i, row + i + 1, a, b))
            row += job.rows
        self._row_lora = (key, by_name)
        return by_name

    def _choose(self, job: Job, logits: Any) -> int:
        """``job``'s next token from its rows' logits: combine streams, processors, then greedy / sample."""
        import torch

        with torch.inference_mode():
            main = logits[0:1]
            for d, a, b in job.spans:
                if d.combine is not None:
                    main = d.combine(main, logits[a:b][None])
            if job.procs:
                ids = torch.cat([job.prompt_ids, torch.tensor([job.gen], dtype=torch.long).view(1, -1)], dim=1)
                for proc in job.procs:
                    main = proc(ids, main)
            return self._pick(job, main)[0]

    def _sample_rows(self, job: Job, logits: Any) -> list[int]:
        """An ``n > 1`` job's next token for each of its rows (``logits`` [n, V]): its processors see
        every row's tokens so far (an ended row's padded), then one draw for all rows, as
        ``model.generate`` with ``num_return_sequences`` makes it (so a seed gives its samples)."""
        import torch

        with torch.inference_mode():
            if job.procs:
                width = job.progress
                done = torch.tensor([g + [job.lim.pad] * (width - len(g)) for g in job.samples], dtype=torch.long)
                ids = torch.cat([job.prompt_ids.expand(job.n, -1), done.view(job.n, width)], dim=1)
                for proc in job.procs:
                    logits = proc(ids, logits)
            return self._pick(job, logits)

    @staticmethod
    def _pick(job: Job, scores: Any) -> list[int]:
        """One token per row of ``scores`` [rows, V]: greedy, or temperature / nucleus sampling with the
        job's generator (one draw for all rows)."""
        import torch

        s = job.s
        if not s["sample"]:
            return [int(t) for t in scores.argmax(dim=-1)]
        scaled = scores / s["temperature"]
        if s["top_p"] is not None and s["top_p"] < 1:
            scaled = scaled.masked_fill(~top_p_mask(scaled, s["top_p"]), float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        return [int(t) for t in torch.multinomial(probs, 1, generator=job.generator)[:, 0]]

    def _record(self, job: Job, token: int) -> bool:
        """Append ``token`` to ``job``; finish it on EOS, a stop string, its length limit or a cancel."""
        job.gen.append(token)
        lim = job.lim
        if job.on_token is not None and token not in lim.eos:
            job.on_token(token)
        ended = token in lim.eos or len(job.gen) >= lim.max_new or job.cancel.is_set()
        if not ended and lim.stops:
            tail = self.b._tokenizer.decode(job.gen[-lim.window:], skip_special_tokens=True)
            ended = any(x in tail for x in lim.stops)
        if ended:
            self._finish(job)
        return ended

    def _record_rows(self, job: Job, tokens: list[int]) -> list[int]:
        """Append each running row's token to an ``n > 1`` job (a row ends on EOS or a stop string; the
        job on its last row's end, its length limit or a cancel); returns the tokens to feed: a row that
        had ended gets the pad token, as ``model.generate`` feeds it."""
        lim = job.lim
        fed = []
        for row, token in enumerate(tokens):
            if job.ended[row]:
                fed.append(lim.pad)
                continue
            gen = job.samples[row]
            gen.append(token)
            fed.append(token)
            ended = token in lim.eos
            if not ended and lim.stops:
                tail = self.b._tokenizer.decode(gen[-lim.window:], skip_special_tokens=True)
                ended = any(x in tail for x in lim.stops)
            job.ended[row] = ended
        if all(job.ended) or job.progress >= lim.max_new or job.cancel.is_set():
            self._finish(job)
        return fed

    def _finish(self, job: Job) -> None:
        from .generation import candidates

        job.finished = True
        job.cache = None
        if job.done.done():
            return
        if job.cancel.is_set():
            job.done.set_exception(BackendError(f"{self.b.name}: generation cancelled"))
            return
        import torch

        try:
            rows = job.samples if job.n > 1 else [job.gen]
            width = max(len(g) for g in rows)
            out = torch.tensor([g + [job.lim.pad] * (width - len(g)) for g in rows], dtype=torch.long)
            prompt_tokens = [int(job.enc["attention_mask"][0].sum())]
            cands = candidates(self.b, out, 0, prompt_tokens, job.n, job.s, job.lim.max_new)
            for c in cands:
                if job.spans:
                    c.meta["steered"] = [d.source for d in job.decoding if d.streams or d.combine is not None]
                    c.meta["streams"] = sum(len(d.streams) for d in job.decoding)
                if job.reward is not None:
                    c.meta["steered"] = [job.reward.source]
                    c.meta["reward_top_k"] = job.k
                c.meta["batched"] = True
            job.done.set_result(cands)
        except Exception as exc:
            job.done.set_exception(BackendError(f"{self.b.name} failed to generate: {exc}"))


def _left_pad(t: Any, length: int, dim: int, value: int = 0) -> Any:
    """``t`` with ``value`` (zeros) prepended along ``dim`` up to ``length``."""
    import torch

    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.full(shape, value, dtype=t.dtype), t], dim=dim)


def _others_waiting() -> bool:
    """Whether other work is queued on the torch thread (a slice then yields to it)."""
    queue = getattr(TORCH_THREAD, "_work_queue", None)
    return queue is not None and not queue.empty()


def hook_marks(decoding: list[Decoding]) -> tuple[list[tuple[int, Any]], list[Any]] | None:
    """The steering vectors ``(decoder layer, vector)`` and LoRA adapters of ``decoding``'s activation
    hooks when every hook is marked (``hook.residual``: the ``vectors`` plugin's; ``hook.lora``: the
    ``lora`` plugin's), else None."""
    adds: list[tuple[int, Any]] = []
    loras: list[Any] = []
    for d in decoding:
        for hook in d.activation_hooks:
            mark = getattr(hook, "residual", None)
            adapter = getattr(hook, "lora", None)
            if isinstance(mark, tuple) and len(mark) == 2 and isinstance(mark[0], int):
                adds.append(mark)
            elif adapter is not None and isinstance(getattr(adapter, "weights", None), dict):
                loras.append(adapter)
            else:
                return None
    return adds, loras


def schedulable(b: TransformersBackend, decoding: list[Decoding], n: int) -> bool:
    """Whether a request can share the continuous batch: the cached loop; ``n > 1`` sampled answers
    only without extra streams or a rewarder; a reward-guided search only alone in its request (one
    rewarder, no streams or hooks); and no activation hooks (they act on every row of a forward) unless
    all are steering vectors or LoRA adapters on a model the lean step computes (then they are applied
    per row)."""
    if not b.batching or not b.steering_cache:
        return False
    if n != 1 and any(d.streams or d.combine is not None or d.token_reward is not None for d in decoding):
        return False  # n sampled answers hold n copies of one plain prompt's rows
    rewarded = [d for d in decoding if d.token_reward is not None]
    if rewarded:  # alone on its rows: one rewarder, no extra streams or hooks (as the own loop requires)
        return (len(rewarded) == 1 and not any(d.streams or d.combine is not None or d.activation_hooks
                                                for d in decoding))
    if not any(d.activation_hooks for d in decoding):
        return True
    from .lean import LeanDecoder

    return (b.lean_step and b._model is not None and hook_marks(decoding) is not None
            and LeanDecoder.eligible(b._model))


async def wait_job(job: Job) -> list[Candidate]:
    """Await a submitted ``job``'s candidates; a cancelled wait frees its rows at the next step."""
    try:
        return await asyncio.wrap_future(job.done)
    except asyncio.CancelledError:
        job.cancel.set()
        raise
