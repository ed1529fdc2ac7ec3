"""White-box steering methods for ``persona-mw eval style`` (imported by ``persona_mw.eval.style``).

- ``contrast`` / ``amulet``: the prompt with the user's preferences placed as the ``contrast``
  plugin places them by default (after the user's message), decoded against the same prompt
  without them, with the plugin's defaults (Linear Alignment r = 1, top-p 0.8; Amulet alpha = 1
  with its paper defaults), every (user, prompt) request its own pair of streams, all in batches
  of ``run.batch_size`` requests. The defaults were chosen on ``TRAIN_PROMPTS``, not eval items
  (see ``persona_mw.plugins.contrast``). The ``stated`` baseline is the same preference text as a
  system message.
- ``vectors`` / ``args``: the same system-message prompt plus a per-user CAA vector / reward head.
  Simulated users have no choices, so their training pairs are built honestly and away from the
  eval prompts: for each of ``TRAIN_PROMPTS`` (written for this file, not from the eval data) the
  model answers once plainly and once with the user's statements in the user turn; the pair is
  labelled by the user's own metrics (``persona_mw.eval.style.metric``: for each dimension, did the
  answer move in the user's direction), the answer that wins more dimensions is ``chosen``, ties
  are dropped. Steering strengths are the plugins' defaults (not tuned on eval items).
"""

from __future__ import annotations

from typing import Any

from persona_mw.errors import PersonaError
from persona_mw.eval.style import DIMENSIONS, UP_SIDE, SimUser, StyleRun, method, metric, personal_prompt
from persona_mw.types import Decoding, Message

TRAIN_PROMPTS = [
    "What is the best way to learn a new language?",
    "How do vaccines work?",
    "Why is the sky blue?",
    "What should I consider when buying a used car?",
    "How does compound interest work?",
    "What makes a good night's sleep?",
    "How do airplanes stay in the air?",
    "What are the benefits of regular exercise?",
]


def _system(u: SimUser) -> str:
    return "The user's preferences:\n" + "\n".join(f"- {s}" for s in u.statements())


def _with(u: SimUser, p: str) -> list[Message]:
    return [Message(role="system", content=_system(u)), Message(role="user", content=p)]


def _steered(run: StyleRun, requests: list[tuple[list[Message], list[Decoding]]]) -> list[str]:
    gen = getattr(run.backend, "generate_steered", None)
    if not callable(gen):
        raise PersonaError("steering methods need the local white-box backend (transformers)")
    out: list[str] = []
    params = run.params()
    for start in range(0, len(requests), run.batch_size):
        chunk = requests[start:start + run.batch_size]
        cands = run.run(gen(chunk, params=params))
        out += [c.text for c in sorted(cands, key=lambda c: c.index)]
    return out


def _contrast_with(u: SimUser, p: str) -> list[Message]:
    """The 'with' prompt as the contrast plugin builds it by default (or a system message)."""
    from persona_mw.plugins.contrast import Contrast

    if Contrast.Config().placement == "system":
        return _with(u, p)
    return [Message(role="user", content=p + "\n\n" + _system(u))]


def _contrast(run: StyleRun, combine: Any) -> list[list[str]]:
    reqs = [(_contrast_with(u, p), [Decoding(source="contrast", streams=[[Message(role="user", content=p)]],
                                             combine=combine)]) for u in run.users for p in run.prompts]
    flat = _steered(run, reqs)
    n = len(run.prompts)
    return [flat[i * n:(i + 1) * n] for i in range(len(run.users))]


@method("contrast", white_box=True)
def _contrast_linear(run: StyleRun) -> list[list[str]]:
    """Linear Alignment: s_with + r (s_with - s_without) under the top-p plausibility mask (plugin defaults)."""
    from persona_mw.plugins.contrast import Contrast, linear_combine

    c = Contrast.Config()
    return _contrast(run, linear_combine(c.strength, c.top_p))


@method("amulet", white_box=True)
def _amulet(run: StyleRun) -> list[list[str]]:
    """Amulet: 60 FTRL iterations per token between the with/without distributions."""
    from persona_mw.plugins.contrast import Contrast, amulet_combine

    c = Contrast.Config()
    return _contrast(run, amulet_combine(c.strength, c.amulet_iterations, c.amulet_eta, c.amulet_lambda,
                                         c.amulet_top_p))


def _label(u: SimUser, a: str, b: str) -> int:
    """+1 if ``a`` suits the user better than ``b`` on more dimensions, -1 if worse, 0 on a tie."""
    score = 0
    for d in DIMENSIONS:
        move = metric(d, a) - metric(d, b)
        want = 1 if u.sides[d] == UP_SIDE[d] else -1
        score += (move * want > 0) - (move * want < 0)
    return (score > 0) - (score < 0)


def training_pairs(run: StyleRun) -> dict[str, list[tuple[str, str, str]]]:
    """Per user id: (prompt, chosen, rejected) from TRAIN_PROMPTS, labelled by the user's metrics."""
    cached = getattr(run, "_steering_pairs", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    plain = run.generate([[Message(role="user", content=p)] for p in TRAIN_PROMPTS])
    stated = run.generate([[Message(role="user", content=personal_prompt(u, p))]
                           for u in run.users for p in TRAIN_PROMPTS])
    pairs: dict[str, list[tuple[str, str, str]]] = {}
    n = len(TRAIN_PROMPTS)
    for i, u in enumerate(run.users):
        got = []
        for j, p in enumerate(TRAIN_PROMPTS):
            a, b = stated[i * n + j], plain[j]
            lab = _label(u, a, b)
            if lab > 0:
                got.append((p, a, b))
            elif lab < 0:
                got.append((p, b, a))
        pairs[u.id] = got
    run._steering_pairs = pairs  # type: ignore[attr-defined]
    run.notes.append("steering training pairs per user: " + ", ".join(f"{k}={len(v)}" for k, v in pairs.items()))
    return pairs


@method("vectors", white_box=True)
def _vectors(run: StyleRun) -> list[list[str]]:
    """The stated system message plus the user's CAA vector (from metric-labelled training pairs)."""
    from persona_mw.plugins.vectors import SteeringVectors, add_vector_hook, default_layer, pair_differences

    if not run.white_box:
        raise PersonaError("the vectors method needs the local white-box backend")
    pairs = training_pairs(run)
    strength = SteeringVectors.Config().strength
    layer = default_layer(run.backend.model)
    out = []
    for u in run.users:
        if not pairs[u.id]:
            out.append(run.generate([_with(u, p) for p in run.prompts]))
            continue
        diffs = run.run(run.backend.call(lambda m, t: pair_differences(m, t, run.backend, pairs[u.id], layer)))
        vec = diffs.mean(dim=0).tolist()
        dec = Decoding(source="vectors", activation_hooks=[add_vector_hook(layer, vec, strength)])
        out.append(run.generate([_with(u, p) for p in run.prompts], decoding=[dec]))
    return out


@method("args", white_box=True)
def _args(run: StyleRun) -> list[list[str]]:
    """The stated system message, decoded ARGS-style (top-10) with the user's linear reward head."""
    import numpy as np

    from persona_mw.plugins.args import RewardGuided, fit_head, head_reward, response_features

    if not run.white_box:
        raise PersonaError("the args method needs the local white-box backend")
    pairs = training_pairs(run)
    cfg = RewardGuided.Config()
    reqs = []
    for u in run.users:
        decs: list[Decoding] = []
        if pairs[u.id]:
            def feats(m: Any, t: Any, ps: list[tuple[str, str, str]] = pairs[u.id]) -> tuple[Any, Any]:
                pos, neg = [], []
                for prompt, c, r in ps:
                    fc, fr = response_features(m, t, run.backend, prompt, [c, r])
                    pos.append(fc)
                    neg.append(fr)
                return np.concatenate(pos), np.concatenate(neg)

            pos, neg = run.run(run.backend.call(feats))
            theta, bias = fit_head(pos, neg, l2=cfg.l2)
            decs = [Decoding(source="args", token_reward=head_reward(theta, bias), reward_top_k=cfg.top_k,
                             reward_weight=cfg.weight)]
        else:
            decs = [Decoding(source="args", token_reward=lambda h: h[:, 0] * 0.0, reward_top_k=cfg.top_k,
                             reward_weight=0.0)]
        reqs += [(_with(u, p), decs) for p in run.prompts]
    flat = _steered(run, reqs)
    n = len(run.prompts)
    return [flat[i * n:(i + 1) * n] for i in range(len(run.users))]
