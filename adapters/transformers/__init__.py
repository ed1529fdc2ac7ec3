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
``token_reward``, generation runs the backend's own loop (``steering.steer``) instead of ``model.generate``:
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

Layout of this package: ``backend`` (the class: loading, tokenizers, prompts, hooks, the async
API), ``generation`` (the ``model.generate`` path, candidates, the stream worker), ``steering``
(the own loop with streams), ``reward`` (reward-guided decoding), ``decoding`` (stop strings,
nucleus masks, token choice) and ``torch_thread``.
"""

from __future__ import annotations

import difflib
from typing import Any

from persona_mw.errors import ConfigError
from persona_mw.logits import top_p_mask

from .backend import TransformersBackend
from .decoding import (
    _ROLE_LABEL,
    DIVERSE_TEMPERATURE,
    PLAIN_STOP,
    _apply,
    _cut_at_stop,
    _stop_criterion,
    _stop_on_text,
    _token_pipe,
    _unsafe_suffix,
)
from .torch_thread import TORCH_THREAD, _cancellable, _on_torch_thread

__all__ = ["DIVERSE_TEMPERATURE", "PLAIN_STOP", "TORCH_THREAD", "TransformersBackend", "create", "top_p_mask"]
# The helpers of the former single module stay importable from here.
_HELPERS = (_ROLE_LABEL, _apply, _cancellable, _cut_at_stop, _on_torch_thread, _stop_criterion, _stop_on_text,
            _token_pipe, _unsafe_suffix)

_SETTINGS = ("model", "max_new_tokens", "temperature", "top_p", "threads", "dtype", "batching", "max_batch",
             "max_queue", "prefill_chunk")


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
