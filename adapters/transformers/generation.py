"""The ``model.generate`` path of the backend (plain decoding with logits processors and hooks),
the candidates it returns, and the streaming worker. Blocking: runs on the torch thread."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

from persona_mw.errors import BackendError, PersonaError
from persona_mw.types import Candidate, Decoding, GenerationParams, Message

from .decoding import _cut_at_stop, _stop_criterion, _stop_on_text, _token_pipe
from .steering import steer, steers

if TYPE_CHECKING:
    from .backend import TransformersBackend


def generate_kwargs(b: TransformersBackend, s: dict[str, Any], n: int, decoding: list[Decoding],
                    enc: Any) -> dict[str, Any]:
    """``model.generate``'s keyword arguments: generation config, processors, stop criteria."""
    from transformers import (
        GenerationConfig,
        LogitsProcessorList,
        StoppingCriteriaList,
    )

    tok, model = b._tokenizer, b._model
    base = model.generation_config.to_dict()
    cfg = GenerationConfig(  # type: ignore[no-untyped-call]
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
    limit = b.capabilities.max_context
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


def steer_hooked(b: TransformersBackend, requests: list[tuple[list[Message], list[Decoding]]], n: int,
                  params: GenerationParams, on_token: Any) -> list[Candidate]:
    """``steer`` with the first request's activation hooks attached (lock held by the caller)."""
    handles = b._attach_hooks(requests[0][1])
    try:
        return steer(b, requests, n, params, use_cache=b.steering_cache, on_token=on_token)
    finally:
        for h in handles:
            h.remove()


def _generate_hooked(b: TransformersBackend, enc: Any, kwargs: dict[str, Any], s: dict[str, Any],
                     decoding: list[Decoding], cancel: threading.Event, **extra: Any) -> Any:
    """``model.generate`` with the cancel criterion, the seed and the activation hooks (lock held)."""
    import torch

    kwargs["stopping_criteria"].append(_stop_criterion(cancel))
    if s["seed"] is not None:
        torch.manual_seed(s["seed"])
    handles = b._attach_hooks(decoding)
    try:
        with torch.inference_mode():
            return b._model.generate(**enc, **kwargs, **extra)
    finally:
        for h in handles:
            h.remove()


def run(b: TransformersBackend, batch: list[list[Message]], n: int, params: GenerationParams,
        decoding: list[Decoding], cancel: threading.Event | None = None) -> list[Candidate]:
    """Blocking: generate ``n`` answers for each prompt in ``batch`` (worker thread); a set
    ``cancel`` ends generation at the next step (the caller no longer waits for the answer)."""
    cancel = cancel or threading.Event()
    try:
        if cancel.is_set():  # abandoned while queued for the torch thread
            raise BackendError(f"{b.name}: generation cancelled")
        b._prepare()
        if steers(decoding):
            with b._lock:
                return steer_hooked(b, [(m, decoding) for m in batch], n, params,
                                     on_token=lambda g, t: cancel.is_set())
        prompts = [b.format_prompt(m) for m in batch]
        s = b._settings(params, n)
        with b._lock:
            enc = b._encode(prompts)
            kwargs = generate_kwargs(b, s, n, decoding, enc)
            out = _generate_hooked(b, enc, kwargs, s, decoding, cancel)
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        max_new = kwargs["generation_config"].max_new_tokens
        return candidates(b, out, enc["input_ids"].shape[1], prompt_tokens, n, s, max_new)
    except PersonaError:
        raise
    except ImportError:
        raise
    except Exception as exc:
        raise BackendError(f"{b.name} failed to generate: {type(exc).__name__}: {exc}") from exc


def candidates(
    b: TransformersBackend, out: Any, prompt_len: int, prompt_tokens: list[int], n: int, s: dict[str, Any],
    max_new: int,
) -> list[Candidate]:
    """The generated rows ``out[:, prompt_len:]`` as candidates (eos and stop strings cut)."""
    eos = b._eos_ids()
    result = []
    for row_index, row in enumerate(out[:, prompt_len:].tolist()):
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        ids = row if cut is None else row[:cut]
        raw = b._tokenizer.decode(ids, skip_special_tokens=True)
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
                    "backend": b.name,
                    "prompt_tokens": int(prompt_tokens[row_index // n]),
                    "sampled": s["sample"],
                    "temperature": s["temperature"],
                    "seed": s["seed"],
                },
            )
        )
    return result


def stream_worker(
    b: TransformersBackend,
    messages: list[Message],
    params: GenerationParams,
    decoding: list[Decoding],
    s: dict[str, Any],
    loop: asyncio.AbstractEventLoop,
    queue: asyncio.Queue[tuple[str, Any]],
    cancelled: threading.Event,
) -> None:
    """Blocking: generate one answer, sending ``("text", piece)``, then ``("end", None)`` or
    ``("error", exc)`` to ``queue`` on ``loop``."""

    def send(kind: str, value: Any = None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    try:
        b._prepare()
        from transformers import TextIteratorStreamer

        class _Pipe(TextIteratorStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    send("text", text)

        streamer = _Pipe(b._tokenizer, skip_prompt=True, skip_special_tokens=True)
        with b._lock:
            if cancelled.is_set():
                return
            if steers(decoding):
                steer_hooked(b, [(messages, decoding)], 1, params,
                              on_token=_token_pipe(b._tokenizer, send, cancelled))
            else:
                enc = b._encode([b.format_prompt(messages)])
                kwargs = generate_kwargs(b, s, 1, decoding, enc)
                _generate_hooked(b, enc, kwargs, s, decoding, cancelled, streamer=streamer)
        send("end")
    except PersonaError as exc:
        send("error", exc)
    except Exception as exc:
        err = BackendError(f"{b.name} failed to stream: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        send("error", err)
