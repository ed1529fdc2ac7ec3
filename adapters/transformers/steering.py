"""The backend's own decoding loop for steering: extra prompt streams mixed by ``combine``
functions, one left-padded batch with one KV cache (see the package docstring, "Steering").

Functions here run on the torch thread with the backend's lock held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from persona_mw.errors import BackendError
from persona_mw.types import Candidate, Decoding, GenerationParams, Message

from .decoding import choose

if TYPE_CHECKING:
    from .backend import TransformersBackend

Requests = list[tuple[list[Message], list[Decoding]]]
OnToken = Callable[[int, int], bool]
# One group of rows: (its first row, each Decoding's span of stream rows, its logits processors).
Group = tuple[int, list[tuple[Decoding, int, int]], list[Any]]


def steers(decoding: list[Decoding]) -> bool:
    """Whether ``decoding`` needs the own loop (streams, a combine function or a token reward)."""
    return any(d.streams or d.combine is not None or d.token_reward is not None for d in decoding)


@dataclass
class LoopLimits:
    """How long an own loop may run and when its rows end."""

    max_new: int
    eos: set[int]
    pad: int
    stops: list[str]
    window: int  # tokens decoded to look for a stop string


def loop_limits(b: TransformersBackend, s: dict[str, Any], prompt_len: int) -> LoopLimits:
    max_new = s["max_new_tokens"]
    limit = b.capabilities.max_context
    if limit is not None:
        max_new = min(max_new, limit - prompt_len)
    eos = b._eos_ids()
    pad = b._tokenizer.pad_token_id if b._tokenizer.pad_token_id is not None else min(eos)
    stops = s["stops"]
    window = (max(len(x) for x in stops) + 8) if stops else 0
    return LoopLimits(max_new, eos, pad, stops, window)


def new_cache(b: TransformersBackend) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=b._model.config)


def forward_last(b: TransformersBackend, step_ids: Any, full_mask: Any, cache: Any, hidden: bool = False,
                 row_adds: dict[int, list[Any]] | None = None,
                 row_lora: dict[str, list[tuple[int, int, Any, Any]]] | None = None) -> Any:
    """Next-token logits ``[rows, V]`` (float32) for left-padded rows; with ``hidden``, also the
    last hidden state ``[rows, d]``. ``cache`` None: ``step_ids`` is the whole sequence. ``row_adds``:
    per decoder layer, ``[rows, 1, d]`` tensors added to its output (the scheduler's per-request
    steering vectors; zero rows for requests without). ``row_lora``: per module name, LoRA deltas
    ``(first row, end row, A, B)`` (the scheduler's per-request adapters)."""
    import torch

    from .lean import decoder_for

    positions = (full_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
    if b.lean_step and cache is not None and step_ids.shape[1] == 1 and cache.get_seq_length() > 0:
        lean = decoder_for(b._model)  # the same logits with fewer operations (see lean.py)
        slots = lean[0].lora_slots(row_lora) if lean is not None and row_lora else None
        if lean is not None and lean[0].accepts(cache) and (slots is not None or not row_lora):
            adds = lean[1]
            if row_adds:
                adds = {k: list(v) for k, v in adds.items()}
                for layer, vectors in row_adds.items():
                    adds.setdefault(layer, []).extend(vectors)
            return lean[0].step(step_ids, full_mask, positions, cache, adds=adds, hidden=hidden, lora=slots)
    if row_adds or row_lora:  # transformers' forward: the same adds and deltas as hooks, for this call
        from persona_mw.logits import residual_hook

        layers = b._model.model.layers  # row adds come only for models the lean step can compute
        handles = [layers[layer].register_forward_hook(residual_hook(v))
                   for layer, vectors in sorted((row_adds or {}).items()) for v in vectors]
        handles += [b._model.get_submodule(name).register_forward_hook(_row_lora_hook(groups))
                    for name, groups in sorted((row_lora or {}).items())]
        try:
            return forward_last(b, step_ids, full_mask, cache, hidden=hidden)
        finally:
            for h in handles:
                h.remove()
    out = b._model(
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


def _row_lora_hook(groups: list[tuple[int, int, Any, Any]]) -> Any:
    """A forward hook adding each group's LoRA delta to its rows (the lean step's ``_lora_into``)."""

    from persona_mw.logits import lora_delta

    def hook(_mod: Any, inp: Any, out: Any) -> Any:
        x, out = inp[0], out.clone()
        for start, end, a, b in groups:
            out[start:end] = out[start:end] + lora_delta(x[start:end], a, b, out.dtype)
        return out

    return hook


def mark_done(b: TransformersBackend, token: Any, done: Any, gen: Any, lim: LoopLimits,
              on_token: OnToken | None) -> None:
    """After a step of an own loop: mark each stream finished on EOS, when ``on_token`` says
    stop (a streaming consumer went away), or when a stop string appears in its recent tokens."""
    for g in range(len(done)):
        if done[g]:
            continue
        tok_id = int(token[g])
        if tok_id in lim.eos or (on_token is not None and on_token(g, tok_id)):
            done[g] = True
        elif lim.stops:
            tail = b._tokenizer.decode(gen[g, -lim.window:].tolist(), skip_special_tokens=True)
            if any(x in tail for x in lim.stops):
                done[g] = True


def _is_reward_guided(requests: Requests) -> bool:
    """Whether the batch is reward-guided; raises if it mixes that with anything it cannot."""
    rewarded = [any(d.token_reward is not None for d in dec) for _, dec in requests]
    if not any(rewarded):
        return False
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
    return True


def _layout(b: TransformersBackend, requests: Requests, n: int) -> tuple[list[str], list[Group], list[int]]:
    """Row layout: for each request, ``n`` groups of [answer, stream_1, ..., stream_S].

    Returns the prompts (one per row), the groups, and each group's request."""
    prompts: list[str] = []
    layout: list[Group] = []
    group_prompt: list[int] = []
    for r_i, (messages, dec) in enumerate(requests):
        texts = [b.format_prompt(messages)]
        spans: list[tuple[Decoding, int, int]] = []
        for d in dec:
            spans.append((d, len(texts), len(texts) + len(d.streams)))
            texts += [b.format_prompt(m) for m in d.streams]
        procs = [p for d in dec for p in d.logits_processors]
        for _ in range(n):
            layout.append((len(prompts), spans, procs))
            group_prompt.append(r_i)
            prompts.extend(texts)
    return prompts, layout, group_prompt


def stream_adapters(layout: list[Group], rows: int) -> list[Any] | None:
    """The LoRA adapter of each row (``Decoding.stream_adapters``: a stream's rows get their stream's; the
    answer rows none), or None when no stream carries one."""
    out: list[Any] = [None] * rows
    for first, spans, _ in layout:
        for d, a, b in spans:
            if d.stream_adapters and len(d.stream_adapters) != b - a:
                raise BackendError(f"{d.source or 'a plugin'}: {len(d.stream_adapters)} stream adapters for "
                                   f"{b - a} streams")
            for i, adapter in enumerate(d.stream_adapters):
                out[first + a + i] = adapter
    return out if any(a is not None for a in out) else None


def row_adapter_hooks(b: TransformersBackend, per_row: list[Any] | None) -> list[Any]:
    """Hooks giving each row its adapter of ``per_row`` (``stream_adapters``); none for None."""
    if per_row is None:
        return []
    from persona_mw.plugins._lora import row_hooks

    return row_hooks(b._model, per_row)


def _row_owners(layout: list[Group], rows: int) -> Any:
    """Which group each row belongs to (to feed it the group's token)."""
    import torch

    owner = torch.zeros(rows, dtype=torch.long)
    for g, (first, _, _) in enumerate(layout):
        end = layout[g + 1][0] if g + 1 < len(layout) else rows
        owner[first:end] = g
    return owner


def _combined(layout: list[Group], logits: Any, main: Any, main_ids: Any) -> Any:
    """Each group's answer scores after its combine functions and logits processors."""
    import torch

    parts = []
    for g, (first, spans, procs) in enumerate(layout):
        row = main[g : g + 1]
        for d, a, b in spans:
            if d.combine is not None:
                row = d.combine(row, logits[first + a : first + b][None])
        for proc in procs:
            row = proc(main_ids[g : g + 1], row)
        parts.append(row)
    return torch.cat(parts, dim=0)


def _stream_loop(b: TransformersBackend, layout: list[Group], enc: Any, s: dict[str, Any], lim: LoopLimits,
                 use_cache: bool, on_token: OnToken | None) -> tuple[Any, Any]:
    """Decode every group's answer; returns the generated ids ``[groups, T]`` and the answer rows."""
    import torch

    ids, mask = enc["input_ids"], enc["attention_mask"]
    groups, rows = len(layout), ids.shape[0]
    main_rows = torch.tensor([first for first, _, _ in layout], dtype=torch.long)
    owner = _row_owners(layout, rows)
    mixes = any(spans or procs for _, spans, procs in layout)
    if s["seed"] is not None:
        torch.manual_seed(s["seed"])
    cache: Any = new_cache(b) if use_cache else None
    gen = torch.empty((groups, 0), dtype=torch.long)
    done = torch.zeros(groups, dtype=torch.bool)
    full_ids, full_mask = ids, mask
    step_ids = ids
    with torch.inference_mode():
        for _ in range(lim.max_new):
            logits = forward_last(b, step_ids, full_mask, cache)  # [rows, V]
            main = logits[main_rows]
            if mixes:
                main = _combined(layout, logits, main, torch.cat([ids[main_rows], gen], dim=1))
            token = choose(main, s)
            token = torch.where(done, torch.full_like(token, lim.pad), token)
            gen = torch.cat([gen, token[:, None]], dim=1)
            mark_done(b, token, done, gen, lim, on_token)
            if bool(done.all()):
                break
            row_tokens = token[owner][:, None]
            full_mask = torch.cat([full_mask, torch.ones((rows, 1), dtype=full_mask.dtype)], dim=1)
            if use_cache:
                step_ids = row_tokens
            else:
                full_ids = torch.cat([full_ids, row_tokens], dim=1)
                step_ids = full_ids
    return gen, main_rows


def steer(
    b: TransformersBackend,
    requests: Requests,
    n: int,
    params: GenerationParams,
    use_cache: bool = True,
    on_token: OnToken | None = None,
) -> list[Candidate]:
    """Blocking, lock held: the steering loop (streams, combine functions, reward-guided search).

    Each request (its prompt and its own decoding contributions) gets ``n`` groups of rows:
    the answer row, then each of its Decodings' extra streams. All rows of all requests are
    ONE left-padded batch with one KV cache (each row its own keys and values); every step
    feeds each group's chosen token to all its rows, so nothing is re-encoded.
    ``use_cache=False`` re-runs the full forward each step instead: the naive reference the
    tests compare against. Candidates come back request-major (``index = request * n + i``).
    """
    from .generation import candidates
    from .reward import reward_guided

    s = b._settings(params, n)
    if _is_reward_guided(requests):
        return reward_guided(b, requests, n, s, use_cache, on_token)
    prompts, layout, group_prompt = _layout(b, requests, n)
    enc = b._encode(prompts)
    lim = loop_limits(b, s, enc["input_ids"].shape[1])
    # each stream row its own adapter, prompt and steps alike
    handles = row_adapter_hooks(b, stream_adapters(layout, int(enc["input_ids"].shape[0])))
    try:
        gen, main_rows = _stream_loop(b, layout, enc, s, lim, use_cache, on_token)
    finally:
        for h in handles:
            h.remove()
    prompt_tokens = enc["attention_mask"][main_rows].sum(dim=1).tolist()
    per_prompt = [int(prompt_tokens[i * n]) for i in range(len(requests))]
    cands = candidates(b, gen, 0, per_prompt, n, s, lim.max_new)
    for c in cands:
        dec = requests[group_prompt[c.index]][1]
        c.meta["steered"] = [d.source for d in dec if d.streams or d.combine is not None]
        c.meta["streams"] = sum(len(d.streams) for d in dec)
    return cands
