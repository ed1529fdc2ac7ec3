"""ARGS-style reward-guided decoding with a personalized linear reward head (ALGORITHMS.md §6.1, §6.4-6.5).

Each step the ``k`` most likely next tokens are rescored ``logit + w * reward`` and the best is
taken (greedy; sampled over the k at the request's temperature). The reward of candidate ``v`` is
a linear head on the policy's own last hidden state after ``[x, y_<t, v]``: ``r = theta . h + b``.
The backend computes it for all k candidates in ONE batched forward that reuses the prefix's KV
cache, and that same forward yields the chosen candidate's next-token logits, so a step costs one
k-row forward instead of ARGS' 1 + k (nothing is re-encoded).

The head is trained GenARM/PAD-style from the node's choices (``choice`` and ``edit`` feedback):
every response position of a chosen answer is a positive, of a rejected one a negative (RAD's
per-prefix labels, so the head scores partial answers); L2-regularized logistic regression by
Newton's method in numpy (a few ms for hundreds of pairs). It is stored per graph node in
``Profile.extra["args"]`` (model, weights, bias, pairs seen); heads in scope are combined with the
scope's weights (renormalized over nodes that have one). ``forget`` removes it with the profile.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from persona_mw import hookimpl
from persona_mw.context import PluginContext
from persona_mw.errors import RequestError
from persona_mw.nodes import user_node
from persona_mw.types import Decoding, Feedback, Turn
from persona_mw.plugins._steering import (
    chat_texts,
    check_white_box,
    event_pairs,
    require_white_box,
    scope_value,
)

KEY = "args"


def response_features(model: Any, tok: Any, backend: Any, prompt: str, responses: list[str],
                      max_tokens: int = 128) -> list[Any]:
    """For each response, ``[tokens, d]`` last hidden states at its positions (torch thread)."""
    import torch

    special = not getattr(tok, "chat_template", None)
    prefix, texts = chat_texts(backend, prompt, responses)
    start = len(tok.encode(prefix, add_special_tokens=special))
    out = []
    with torch.inference_mode():
        for text in texts:
            ids = tok.encode(text, add_special_tokens=special)[: start + max_tokens]
            res = model(input_ids=torch.tensor([ids]), use_cache=False, output_hidden_states=True,
                        logits_to_keep=1)
            h = res.hidden_states[-1][0, min(start, len(ids) - 1):, :].to(torch.float32)
            out.append(h.numpy())
    return out


def fit_head(pos: np.ndarray, neg: np.ndarray, l2: float = 1.0, iters: int = 25) -> tuple[np.ndarray, float]:
    """L2 logistic regression (Newton) separating positive from negative rows; raw-scale (theta, b)."""
    x = np.concatenate([pos, neg]).astype(np.float64)
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    # Balance the classes so a longer rejected answer does not shift the head.
    sw = np.where(y == 1, 0.5 / max(len(pos), 1), 0.5 / max(len(neg), 1)) * len(y)
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = np.hstack([(x - mu) / sd, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30)))
        grad = z.T @ (sw * (p - y)) + reg * w
        hess = (z * (sw * p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    theta = w[:-1] / sd
    bias = float(w[-1] - (w[:-1] * mu / sd).sum())
    return theta, bias


async def train_head(middleware: Any, node: str, pairs: list[tuple[str, str, str]], *, backend: Any = None,
                     l2: float = 1.0) -> dict[str, Any]:
    """Fit ``node``'s reward head on (prompt, chosen, rejected) pairs and store it; returns the state."""
    backend = backend or middleware.backend
    if not pairs:
        raise RequestError("no chosen/rejected pairs to train a reward head from", field="pairs")
    model_name = getattr(backend, "model_name", getattr(backend, "name", ""))

    def work(model: Any, tok: Any) -> tuple[np.ndarray, np.ndarray]:
        pos, neg = [], []
        for prompt, chosen, rejected in pairs:
            c, r = response_features(model, tok, backend, prompt, [chosen, rejected])
            pos.append(c)
            neg.append(r)
        return np.concatenate(pos), np.concatenate(neg)

    pos, neg = await backend.call(work)
    theta, bias = fit_head(pos, neg, l2=l2)
    acc = float(((np.concatenate([pos, neg]) @ theta + bias > 0) == np.r_[np.ones(len(pos)), np.zeros(len(neg))]).mean())
    state = {"model": model_name, "theta": theta.tolist(), "bias": bias, "pairs": len(pairs),
             "train_accuracy": acc}

    def change(prof: Any) -> None:
        prof.extra[KEY] = state

    middleware.update_profile(node, change)
    return state


def combined_head(turn: Turn, model_name: str) -> tuple[np.ndarray | None, float, dict[str, float]]:
    if turn.scope is None:
        return None, 0.0, {}
    acc: np.ndarray | None = None
    bias = 0.0
    used: dict[str, float] = {}
    for node in turn.scope.nodes:
        prof = turn.profiles.get(node.id)
        st = (prof.extra.get(KEY) if prof is not None else None) or {}
        if not st or st.get("model") != model_name or node.weight <= 0:
            continue
        th = np.asarray(st["theta"], dtype=np.float32)
        acc = node.weight * th if acc is None else acc + node.weight * th
        bias += node.weight * float(st.get("bias", 0.0))
        used[node.id] = node.weight
    if acc is None:
        return None, 0.0, {}
    total = sum(used.values())
    return acc / total, bias / total, used


def head_reward(theta: np.ndarray, bias: float) -> Any:
    """``token_reward(hidden [k, d]) -> [k]`` for the backend."""
    cache: dict[str, Any] = {}

    def reward(hidden: Any) -> Any:
        import torch

        if "t" not in cache:
            cache["t"] = torch.as_tensor(theta, dtype=torch.float32)
        return hidden.to(torch.float32) @ cache["t"] + bias

    return reward


class RewardGuided:
    """Reward-guided decoding with the scope's personalized reward head."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        top_k: int = Field(default=10, ge=1, le=256, description="candidate next tokens rescored per step")
        weight: float = Field(default=1.0, ge=0.0, le=100.0,
                              description="w in logit + w * reward, where no node in scope sets its own")
        learn_on_feedback: bool = Field(default=True, description="refit the user's head after choice/edit events")
        max_pairs: int = Field(default=200, ge=1, description="most recent pairs used for a refit")
        l2: float = Field(default=1.0, gt=0.0, description="L2 penalty of the reward head's logistic regression")

    def __init__(self, config: Config | None = None, name: str = "args") -> None:
        self.config = config or self.Config()
        self.name = name
        self._middleware: Any = None
        self._pending: set[str] = set()

    @hookimpl
    def persona_startup(self, ctx: PluginContext) -> None:
        check_white_box(self, ctx, "args")
        self._middleware = ctx

    @hookimpl
    def persona_decoding(self, turn: Turn, backend: Any) -> Decoding | None:
        require_white_box(self, backend, "args")
        theta, bias, used = combined_head(turn, getattr(backend, "model_name", getattr(backend, "name", "")))
        if theta is None:
            turn.note("no reward head in scope: plain decoding")
            return None
        w = scope_value(turn, KEY, "weight", self.config.weight)
        turn.note(f"top-{self.config.top_k}, w={w:.3g}, heads " + ", ".join(f"{k}:{v:.2f}" for k, v in used.items()))
        return Decoding(source=self.name, token_reward=head_reward(theta, bias), reward_top_k=self.config.top_k,
                        reward_weight=w, meta={"nodes": used, "weight": w})

    @hookimpl
    async def persona_feedback(self, event: Feedback, store: Any) -> None:
        if not self.config.learn_on_feedback or self._middleware is None or not event_pairs([event]):
            return
        backend = self._middleware.backend()
        if not hasattr(backend, "call"):
            return
        events = store.list_feedback(user=event.user, kinds=["choice", "edit"])
        pairs = event_pairs(events)[-self.config.max_pairs:]
        await train_head(self._middleware, user_node(event.user), pairs, backend=backend, l2=self.config.l2)
