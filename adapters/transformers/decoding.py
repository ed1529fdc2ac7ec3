"""Decoding helpers shared by the generate, steering and reward-guided paths: settings constants,
stop strings, logits-processor application, nucleus masks and token choice."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from persona_mw.logits import top_p_mask

DIVERSE_TEMPERATURE = 0.7
PLAIN_STOP = "\nUser:"
_ROLE_LABEL = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def _stop_criterion(cancel: threading.Event) -> Any:
    """A stopping criterion that ends every row once ``cancel`` is set (checked after each step)."""
    import torch
    from transformers import StoppingCriteria

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return _Cancelled()


def _apply(procs: list[Any], ids: Any, scores: Any) -> Any:
    for proc in procs:
        scores = proc(ids, scores)
    return scores



def choose(scores: Any, s: dict[str, Any]) -> Any:
    """The next token of each row: argmax when greedy, else a temperature / nucleus sample."""
    import torch

    if not s["sample"]:
        return scores.argmax(dim=-1)
    logits = scores / s["temperature"]
    if s["top_p"] is not None and s["top_p"] < 1:
        logits = logits.masked_fill(~top_p_mask(logits, s["top_p"]), float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1)[:, 0]


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
