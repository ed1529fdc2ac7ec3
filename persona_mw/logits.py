"""Tensor helpers on next-token scores, shared by the local backend and the white-box plugins (so a
plugin needs no import from a concrete backend). torch is imported when a helper runs."""

from __future__ import annotations

from typing import Any


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


def residual_hook(vector: Any) -> Any:
    """A forward hook for a decoder layer that adds ``vector`` (a tensor ``[d]``) to the layer's output.

    It carries the vector as ``hook.residual``: the local backend's lean decode step recognizes such a
    hook and adds the vector itself at the same place (same numbers), instead of falling back to
    transformers' slower forward as it does for any other hook."""

    def add(_mod: Any, _inp: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (out[0] + vector.to(out[0].dtype),) + tuple(out[1:])
        return out + vector.to(out.dtype)

    add.residual = vector  # type: ignore[attr-defined]  # the mark the lean step reads
    return add


def lora_delta(x: Any, a: Any, b: Any, dtype: Any) -> Any:
    """A LoRA adapter's delta ``(x @ A.T) @ B.T`` for rows ``x``, computed in ``A``'s dtype and returned
    in ``dtype``: the one formula the ``lora`` plugin's hook, the continuous batch's per-row hook and
    the lean decode step share, so their answers agree bit for bit."""
    return ((x.to(a.dtype) @ a.t()) @ b.t()).to(dtype)


__all__ = ["lora_delta", "residual_hook", "top_p_mask"]
