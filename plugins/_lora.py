"""LoRA adapters and learned steering vectors for the local model: the math, one preference-training
loop shared by DPO-on-LoRA and BiPO, PEFT-format files, and exact weight-space merging.

No model is modified: an adapter acts through forward hooks on its target ``nn.Linear`` modules
(``out + x @ A^T @ B^T``, the LoRA scaling folded into ``B``), installed for a call and removed after,
so the shared cached model stays the base model and a request without an adapter runs it unchanged.

- ``Adapter``: per target module name ``(A [r, in], B [out, r])``; ``merge`` combines several with
  weights exactly (``sum_i w_i B_i A_i`` written as one LoRA of rank ``sum r_i``: the ``A`` stacked,
  the ``B`` scaled by ``w_i`` and concatenated), which is ``Delta W`` averaging, not P-Soups' separate
  averaging of ``A`` and ``B`` (ALGORITHMS.md §9.1).
- ``row_hooks``: several adapters in one batch, one per row (zero-padded ranks; a row with no adapter
  adds an exact zero, so its tokens are the base model's).
- ``train``: the DPO loss (Rafailov et al. 2023) ``-log sigmoid(beta * [(pi_w - ref_w) - (pi_l - ref_l)])``
  on summed response log-probs, the reference being the base model (computed once, no grad), or
  SimPO's (Meng et al. 2024) ``-log sigmoid(beta * [pi_w / |y_w| - pi_l / |y_l|] - gamma)``: no
  reference, the per-token mean log-prob (what the held-out scoring ranks answers by); BiPO
  (ALGORITHMS.md §8.2) is the same loop with a steering vector ``v`` at one layer as the only
  parameter, a random direction ``d in {-1, +1}`` per step and ``-log sigmoid(d * beta * u)``.
- Files: ``save``/``load`` write a safetensors file with PEFT's key names
  (``base_model.model.<module>.lora_A.weight``), so ``export_peft`` only adds ``adapter_config.json``
  for PEFT, vLLM (``--enable-lora --lora-modules name=DIR``) and other PEFT-aware servers.

Every function taking ``model`` runs on the torch thread (``backend.call``).
"""

from __future__ import annotations

import json
import math
import random
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_mw.errors import PersonaError

PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class Adapter:
    """A LoRA adapter: ``{module name: (A [r, in], B [out, r])}`` with the scaling folded into B."""

    weights: dict[str, tuple[Any, Any]]
    r: int
    alpha: float
    targets: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def delta_norm(self) -> float:
        total = 0.0
        for a, b in self.weights.values():
            total += float((b @ a).norm()) ** 2
        return math.sqrt(total)


@dataclass
class TrainSettings:
    """One job's training settings (the plugin's config fills them)."""

    r: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 2e-3
    beta: float = 0.1
    loss: str = "dpo"  # "dpo" (reference-relative, summed) or "simpo" (reference-free, per-token mean, margin gamma)
    gamma: float = 0.0  # SimPO's target reward margin
    nll: float = 0.0  # weight of the chosen answers' per-token negative log-likelihood added to the loss (RPO)
    steps: int = 40
    batch_choices: int = 2
    max_prompt_tokens: int = 64
    max_response_tokens: int = 32
    seconds: float | None = 60.0
    top_layers: int | None = 4
    seed: int = 0
    pack: bool = True  # one row per prompt (block-causal mask); False: one padded row per sequence
    bf16: bool = False
    threads: int | None = None  # torch threads for the job (restored after); None: leave as set


def bf16_fast() -> bool:
    """Whether this CPU has bfloat16 matmuls (AVX512-BF16 or AMX): there a job through bfloat16 weight
    copies measured about 2x faster than float32 (docs/notes/lora3.md); elsewhere it is emulated."""
    import torch

    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(f()) for f in checks if f is not None)
    except Exception:  # a torch without these probes
        return False


def target_modules(model: Any, targets: Sequence[str]) -> dict[str, Any]:
    """``{name: module}`` for every linear module (``nn.Linear``, or the backend's int8/int4 ones) whose last
    name part is in ``targets``."""
    import torch

    from persona_mw import models

    found = {n: m for n, m in model.named_modules()
             if (isinstance(m, torch.nn.Linear) or models.is_quantized(m))
             and n.rsplit(".", 1)[-1] in set(targets)}
    if not found:
        raise PersonaError(f"no linear modules named {list(targets)} in {type(model).__name__}")
    return found


def _add_delta(a: Any, b: Any) -> Callable[..., Any]:
    from persona_mw.logits import lora_delta

    def hook(_mod: Any, inp: Any, out: Any) -> Any:
        return out + lora_delta(inp[0], a, b, out.dtype)

    return hook


def install(model: Any, adapter: Adapter) -> list[Any]:
    """Forward hooks applying ``adapter`` to every row; returns the handles (``h.remove()``)."""
    mods = dict(model.named_modules())
    handles = []
    for name, (a, b) in adapter.weights.items():
        if name not in mods:
            raise PersonaError(f"adapter module {name!r} is not in the model")
        handles.append(mods[name].register_forward_hook(_add_delta(a, b)))
    return handles


def adapter_hook(adapter: Adapter) -> Callable[[Any], list[Any]]:
    """An activation hook for ``Decoding.activation_hooks``: installs ``adapter`` on the model.

    Marked ``hook.lora = adapter``: the local backend then decodes the request in its continuous batch,
    with the adapter's deltas on that request's rows only (beside requests with other adapters or none)."""

    def hook(model: Any) -> list[Any]:
        return install(model, adapter)

    hook.lora = adapter  # type: ignore[attr-defined]  # read by the backend's scheduler
    return hook


def row_hooks(model: Any, adapters: Sequence[Adapter | None]) -> list[Any]:
    """Hooks applying ``adapters[i]`` to batch row ``i`` (``None``: the base model); one batched
    matmul per module (``bmm`` over rows with ranks zero-padded to the largest)."""
    import torch

    names = sorted({n for ad in adapters if ad is not None for n in ad.weights})
    mods = dict(model.named_modules())
    handles = []
    for name in names:
        lin = mods[name]
        rmax = max(ad.weights[name][0].shape[0] for ad in adapters if ad is not None and name in ad.weights)
        a_rows = torch.zeros(len(adapters), rmax, lin.in_features)
        b_rows = torch.zeros(len(adapters), lin.out_features, rmax)
        for i, ad in enumerate(adapters):
            if ad is not None and name in ad.weights:
                a, b = ad.weights[name]
                a_rows[i, : a.shape[0]] = a
                b_rows[i, :, : b.shape[1]] = b

        def hook(_mod: Any, inp: Any, out: Any, a_rows: Any = a_rows, b_rows: Any = b_rows) -> Any:
            x = inp[0]
            n = x.shape[0]
            reps = n // a_rows.shape[0]  # num_return_sequences > 1 repeats each prompt's row
            ar = a_rows.repeat_interleave(reps, 0) if reps > 1 else a_rows
            br = b_rows.repeat_interleave(reps, 0) if reps > 1 else b_rows
            delta = torch.bmm(torch.bmm(x.to(ar.dtype), ar.transpose(1, 2)), br.transpose(1, 2))
            return out + delta.to(out.dtype)

        handles.append(lin.register_forward_hook(hook))
    return handles


def merge(parts: Sequence[tuple[Adapter, float]], normalize: bool = True) -> Adapter:
    """``sum_i w_i Delta W_i`` exactly, as one adapter of rank ``sum r_i`` (weights renormalized to sum to 1
    unless ``normalize`` is false: ``merge([(base, 1), (residual, 1)], normalize=False)`` is their sum)."""
    import torch

    parts = [(ad, w) for ad, w in parts if w > 0]
    if not parts:
        raise PersonaError("nothing to merge: no adapter with a positive weight")
    total = sum(w for _, w in parts) if normalize else 1.0
    names = sorted({n for ad, _ in parts for n in ad.weights})
    weights: dict[str, tuple[Any, Any]] = {}
    for name in names:
        As, Bs = [], []
        for ad, w in parts:
            if name in ad.weights:
                a, b = ad.weights[name]
                As.append(a)
                Bs.append(b * (w / total))
        weights[name] = (torch.cat(As, 0), torch.cat(Bs, 1))
    first = parts[0][0]
    return Adapter(weights, r=sum(ad.r for ad, _ in parts), alpha=float(sum(ad.r for ad, _ in parts)),
                   targets=tuple(sorted({t for ad, _ in parts for t in ad.targets})),
                   meta={"merged": [ad.meta.get("node") for ad, _ in parts], "model": first.meta.get("model")})


# ------------------------------------------------------------------------- files


def save(adapter: Adapter, path: Path) -> None:
    """A safetensors file with PEFT's key names (scaling un-folded so ``lora_alpha / r`` restores it)."""
    from safetensors.torch import save_file

    scale = adapter.alpha / adapter.r
    tensors = {}
    for name, (a, b) in adapter.weights.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().contiguous().clone()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (b.detach() / scale).contiguous().clone()
    meta = {"r": str(adapter.r), "alpha": str(adapter.alpha), "targets": ",".join(adapter.targets),
            "meta": json.dumps(adapter.meta)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load(path: Path) -> Adapter:
    """The adapter in ``path``; a missing or unreadable file raises ``PersonaError``."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
        r, alpha = int(md["r"]), float(md["alpha"])
        meta = json.loads(md.get("meta") or "{}")
    except Exception as exc:  # missing, truncated, not safetensors, bad metadata
        raise PersonaError(f"cannot read adapter {path.name}: {type(exc).__name__}: {exc}") from exc
    scale = alpha / r
    weights: dict[str, tuple[Any, Any]] = {}
    for key in raw:
        if key.endswith(".lora_A.weight"):
            name = key[len(PEFT_PREFIX): -len(".lora_A.weight")]
            b_key = f"{PEFT_PREFIX}{name}.lora_B.weight"
            if b_key not in raw:
                raise PersonaError(f"adapter {path.name}: {name} has lora_A but no lora_B")
            weights[name] = (raw[key], raw[b_key] * scale)
    if not weights:
        raise PersonaError(f"adapter {path.name} holds no LoRA weights")
    return Adapter(weights, r=r, alpha=alpha, targets=tuple(md.get("targets", "").split(",")), meta=meta)


def export_peft(adapter_file: Path, out: Path, base_model: str) -> Path:
    """A PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) for vLLM and PEFT."""
    import shutil

    from peft import LoraConfig

    ad = load(adapter_file)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LoraConfig(r=ad.r, lora_alpha=round(ad.alpha), target_modules=list(ad.targets), lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    cfg.save_pretrained(str(out))
    shutil.copyfile(adapter_file, out / "adapter_model.safetensors")
    return out


# ------------------------------------------------------------------------- training


def _tokens(tok: Any, fmt: Callable[[str], str], prompt: str, responses: Sequence[str],
            s: TrainSettings) -> tuple[list[int], list[list[int]]]:
    """The prompt's token ids (the end kept) and each response's (the start kept), as the settings say."""
    special = not getattr(tok, "chat_template", None)
    prefix = tok.encode(fmt(prompt), add_special_tokens=special)[-s.max_prompt_tokens:]
    return prefix, [tok.encode(r, add_special_tokens=False)[: s.max_response_tokens] or [tok.eos_token_id]
                    for r in responses]


@dataclass
class _Cached:
    """One prompt's sequences with the input of the first trained layer kept (no grad)."""

    hidden: Any  # [rows, T, d]: the input of decoder layer ``start``
    kwargs: dict[str, Any]  # what the model passed that layer (mask, positions, rotary embeddings)
    rows: Any  # [n] row and column of the position predicting each response token
    cols: Any
    targets: Any  # [n] the response tokens
    seq: Any  # [n] the sequence (response) each token belongs to
    lens: Any  # [sequences] response tokens scored per sequence
    ref: Any  # [sequences] the base model's summed response log-probs (None: the loss needs no reference)
    pairs: list[tuple[int, int]]  # (chosen, rejected) sequence indices


def _batch(seqs: list[tuple[list[int], int]], pad: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(ids) for ids, _ in seqs)
    ids_t = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    resp = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (ids, start) in enumerate(seqs):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        resp[i, start: len(ids)] = True
    return ids_t, mask, resp[:, 1:]


def _padded(prefix: list[int], resps: list[list[int]], pad: int) -> dict[str, Any]:
    """One row per sequence (prompt + response), right-padded: the prompt is encoded once per response."""
    ids, mask, resp = _batch([(prefix + r, len(prefix)) for r in resps], pad)
    rows, cols = resp.nonzero(as_tuple=True)
    return {"inputs": {"input_ids": ids, "attention_mask": mask}, "rows": rows, "cols": cols,
            "targets": ids[:, 1:][rows, cols], "seq": rows}


def _packed(prefix: list[int], resps: list[list[int]]) -> dict[str, Any]:
    """ONE row: the prompt once, then every response, each response attending to the prompt and to
    itself only (a block-causal mask) and positioned right after the prompt, so each response's
    log-probs are those of ``prompt + response`` alone while the prompt's tokens run once."""
    import torch

    n = len(prefix)
    ids, pos, seg = list(prefix), list(range(n)), [0] * n
    cols: list[int] = []
    targets: list[int] = []
    seq: list[int] = []
    for k, r in enumerate(resps):
        at = len(ids)
        for t, tok_id in enumerate(r):
            if t == 0 and n == 0:
                continue  # nothing predicts the first token (as in the padded rows)
            cols.append(n - 1 if t == 0 else at + t - 1)
            targets.append(tok_id)
            seq.append(k)
        ids += r
        pos += range(n, n + len(r))
        seg += [k + 1] * len(r)
    i = torch.arange(len(ids))
    sg = torch.tensor(seg)
    mask = (i[None, :] <= i[:, None]) & ((sg[None, :] == 0) | (sg[None, :] == sg[:, None]))
    return {"inputs": {"input_ids": torch.tensor([ids]), "attention_mask": mask[None, None],
                       "position_ids": torch.tensor([pos])},
            "rows": torch.zeros(len(cols), dtype=torch.long), "cols": torch.tensor(cols, dtype=torch.long),
            "targets": torch.tensor(targets, dtype=torch.long), "seq": torch.tensor(seq, dtype=torch.long)}


class _Weights:
    """How the frozen model's modules run during one job: as loaded (float32), or, when ``s.bf16``,
    through ``torch.func.functional_call`` with bfloat16 copies of their weights (made once per job;
    the shared model is never changed, and autocast would re-cast every frozen weight on every call)."""

    def __init__(self, model: Any, bf16: bool) -> None:
        import torch

        self.low = {id(p): p.detach().to(torch.bfloat16) for p in model.parameters()} if bf16 else None
        self.per: dict[int, dict[str, Any]] = {}

    def __call__(self, mod: Any, *args: Any, **kwargs: Any) -> Any:
        if self.low is None:
            return mod(*args, **kwargs)
        import torch

        if id(mod) not in self.per:
            self.per[id(mod)] = {n: self.low[id(p)] for n, p in mod.named_parameters(remove_duplicate=False)}
        return torch.func.functional_call(mod, self.per[id(mod)], args, kwargs)


def _resp_logps(model: Any, run: _Weights, h: Any, c: Any, nseq: int) -> Any:
    """Summed log-probs of each sequence's response tokens from the last hidden states ``h``
    (lm_head only where a response token is predicted: most positions are the prompt)."""
    import torch

    logits = run(model.lm_head, h[c.rows, c.cols]).float()
    lp = torch.log_softmax(logits, -1).gather(-1, c.targets[:, None])[:, 0]
    return torch.zeros(nseq, dtype=lp.dtype).index_add(0, c.seq, lp)


class _Stop(Exception):
    """Raised by the grab hook to end a no-reference pass once the first trained layer's input is kept."""


def _prepare(model: Any, run: _Weights, layout: dict[str, Any], pairs: list[tuple[int, int]], nseq: int,
             start: int, ref: bool = True) -> _Cached:
    """One no-grad pass: the input of layer ``start`` and, when ``ref``, the reference log-probs (the
    base model's; a loss without a reference, SimPO, stops the pass at layer ``start`` instead)."""
    import torch

    from persona_mw.plugins._steering import decoder_layers

    got: dict[str, Any] = {}

    def grab(_mod: Any, args: Any, kwargs: Any) -> None:
        got["h"] = args[0] if args else kwargs["hidden_states"]
        got["kw"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")}
        if not ref:
            raise _Stop

    handle = decoder_layers(model)[start].register_forward_pre_hook(grab, with_kwargs=True)
    lens = torch.bincount(layout["seq"], minlength=nseq).clamp(min=1).float()
    c = _Cached(None, {}, layout["rows"], layout["cols"], layout["targets"], layout["seq"], lens, None, pairs)
    try:
        with torch.no_grad():
            try:
                out = run(model.model, **layout["inputs"], use_cache=False)
            except _Stop:
                pass
            else:
                c.ref = _resp_logps(model, run, out.last_hidden_state, c, nseq)
    finally:
        handle.remove()
    c.hidden = got["h"].detach()
    c.kwargs = dict(got["kw"])
    c.kwargs["use_cache"] = False
    return c


def _policy(model: Any, run: _Weights, c: _Cached, start: int, shift: Any = None) -> Any:
    """The response log-probs running only layers ``start..`` from the cached input (+ ``shift``)."""
    from persona_mw.plugins._steering import decoder_layers

    h = c.hidden if shift is None else c.hidden + shift.to(c.hidden.dtype)
    for layer in decoder_layers(model)[start:]:
        out = run(layer, h, **c.kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return _resp_logps(model, run, run(model.model.norm, h), c, len(c.lens))


def _chunks(model: Any, run: _Weights, tok: Any, fmt: Callable[[str], str],
            pairs: Sequence[tuple[str, str, str]], s: TrainSettings, start: int, ref: bool = True) -> list[_Cached]:
    """Pairs grouped by prompt, each unique response of a prompt scored once (pairs index into them),
    each group prepared once (with the reference log-probs when ``ref``)."""
    by: dict[str, dict[str, int]] = {}
    idx: dict[str, list[tuple[int, int]]] = {}
    for p, c, r in pairs:
        seen = by.setdefault(p, {})
        ic = seen.setdefault(c, len(seen))
        ir = seen.setdefault(r, len(seen))
        if ic != ir:
            idx.setdefault(p, []).append((ic, ir))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for p, prs in idx.items():
        prefix, resps = _tokens(tok, fmt, p, list(by[p]), s)
        layout = _packed(prefix, resps) if s.pack else _padded(prefix, resps, pad)
        out.append(_prepare(model, run, layout, prs, len(resps), start, ref))
    return out


def _loop(chunks: list[_Cached], params: list[Any], s: TrainSettings,
          forward: Callable[[_Cached, float], Any], bipo: bool = False) -> dict[str, Any]:
    """The shared optimisation loop: AdamW over ``params``; ``forward(chunk, d)`` is the policy's
    log-probs (``d``: BiPO's random direction, 1.0 for DPO); loss ``-log sigmoid(d beta u)`` (DPO, BiPO)
    or ``-log sigmoid(beta u - gamma)`` with ``u`` the per-token mean log-prob margin (SimPO); ``s.nll``
    adds that weight times the chosen answers' per-token negative log-likelihood (RPO, Pang et al. 2024)."""
    import torch

    rng = random.Random(s.seed)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    t0 = time.perf_counter()
    losses: list[float] = []
    order: list[int] = []
    steps = 0
    phase = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for step in range(1, s.steps + 1):
        if s.seconds is not None and time.perf_counter() - t0 > s.seconds:
            break
        sign = rng.choice((-1.0, 1.0)) if bipo else 1.0
        total: Any = 0.0
        t1 = time.perf_counter()
        for _ in range(min(s.batch_choices, len(chunks))):
            if not order:
                order = list(range(len(chunks)))
                rng.shuffle(order)
            c = chunks[order.pop()]
            pol = forward(c, sign)
            w = torch.tensor([i for i, _ in c.pairs])
            lo = torch.tensor([j for _, j in c.pairs])
            if s.loss == "simpo" and not bipo:
                mean = pol / c.lens
                z = s.beta * (mean[w] - mean[lo]) - s.gamma
            else:
                z = sign * s.beta * ((pol[w] - c.ref[w]) - (pol[lo] - c.ref[lo]))
            total = total + (-torch.nn.functional.logsigmoid(z)).mean()
            if s.nll and not bipo:
                chosen = torch.unique(w)
                total = total - s.nll * (pol[chosen] / c.lens[chosen]).mean()
        loss = total / min(s.batch_choices, len(chunks))
        t2 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        phase["forward"] += t2 - t1
        phase["backward"] += t3 - t2
        phase["optimizer"] += t4 - t3
        losses.append(float(loss.detach()))
        steps = step
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 2),
            **{f"{k}_seconds": round(v, 2) for k, v in phase.items()},
            "loss_first": round(losses[0], 4) if losses else None,
            "loss_last": round(sum(losses[-5:]) / len(losses[-5:]), 4) if losses else None,
            "pairs": sum(len(c.pairs) for c in chunks), "choices": len(chunks)}


class _Frozen:
    """Base weights without gradients, and ``threads`` torch threads if given, for the duration of a
    training job (restored after; the job runs on the backend's torch thread, which holds its lock)."""

    def __init__(self, model: Any, threads: int | None = None) -> None:
        self.model = model
        self.threads = threads
        self.was: list[tuple[Any, bool]] = []
        self.was_threads = 0

    def __enter__(self) -> None:
        import torch

        self.was = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.was:
            p.requires_grad_(False)
        self.training = self.model.training
        self.model.eval()
        self.was_threads = torch.get_num_threads()
        if self.threads and self.threads != self.was_threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: Any) -> None:
        import torch

        for p, g in self.was:
            p.requires_grad_(g)
        self.model.train(self.training)
        if torch.get_num_threads() != self.was_threads:
            torch.set_num_threads(self.was_threads)


def first_trained_layer(model: Any, top_layers: int | None) -> int:
    from persona_mw.plugins._steering import decoder_layers

    n = len(decoder_layers(model))
    return 0 if not top_layers else max(0, n - top_layers)


def trainable(model: Any, tok: Any) -> tuple[Any, Any]:
    """``(model, tok)`` to train on: the model itself, or, when its weights are quantized (``dtype: int8``
    or ``int4``, whose kernels have no gradient), the float32 model of the same weights (loaded once and
    kept by ``persona_mw.models``). Adapters and vectors apply to either: they hook modules by name."""
    from persona_mw import models

    if not any(models.is_quantized(m) for m in model.modules()):
        return model, tok

    path = getattr(model.config, "_name_or_path", None)
    if not path:
        raise PersonaError("cannot train on a quantized model whose float weights are unknown",
                           hint="use dtype: float32 for the backend that trains adapters")
    return models.load(str(path), dtype="float32")


def train_lora(model: Any, tok: Any, fmt: Callable[[str], str], pairs: Sequence[tuple[str, str, str]],
               s: TrainSettings, base: Adapter | None = None) -> tuple[Adapter, dict[str, Any]]:
    """A LoRA adapter on the top ``s.top_layers`` decoder layers, trained with ``s.loss`` (DPO or SimPO) on
    ``(prompt, chosen, rejected)`` pairs (torch thread). The layers below are run once per sequence
    (their output is the cached input of the first trained layer), so a step costs the top layers only.

    ``base``: a frozen adapter applied throughout (the reference pass too); the new adapter is trained as
    a residual on top of it and the result is their exact sum (rank ``base.r + s.r``), as HYDRA's
    per-user heads over a shared base: a user's adapter learned over their groups' adapter."""
    import torch

    pairs = [p for p in pairs if p[1] != p[2]]  # the same answer twice: no preference
    if not pairs:
        raise PersonaError("no chosen/rejected pairs (with different answers) to train an adapter on")
    model, tok = trainable(model, tok)
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    start = first_trained_layer(model, s.top_layers)
    mods = {n: m for n, m in target_modules(model, s.targets).items() if _layer_index(n) >= start}
    scale = s.alpha / s.r
    params: dict[str, tuple[Any, Any]] = {}
    for name, lin in mods.items():
        a = torch.empty(s.r, lin.in_features)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's init: A random, B zero
        params[name] = (a.requires_grad_(True), torch.zeros(lin.out_features, s.r, requires_grad=True))
    under = install(model, base) if base is not None else []
    try:
        with _Frozen(model, s.threads):
            run = _Weights(model, s.bf16)
            chunks = _chunks(model, run, tok, fmt, pairs, s, start, ref=s.loss != "simpo")  # SimPO: no reference
            prep = time.perf_counter() - t0
            handles = [mods[n].register_forward_hook(_scaled(a, b, scale)) for n, (a, b) in params.items()]
            try:
                stats = _loop(chunks, [t for ab in params.values() for t in ab], s,
                              lambda c, _d: _policy(model, run, c, start))
            finally:
                for h in handles:
                    h.remove()
    finally:
        for h in under:
            h.remove()
    stats.update(prepare_seconds=round(prep, 2), total_seconds=round(time.perf_counter() - t0, 2))
    weights = {n: (a.detach().clone(), (b.detach() * scale).clone()) for n, (a, b) in params.items()}
    out = Adapter(weights, r=s.r, alpha=s.alpha, targets=tuple(s.targets))
    if base is None:
        return out, stats
    total = merge([(base, 1.0), (out, 1.0)], normalize=False)
    total.meta = {}
    stats["base_rank"] = base.r
    return total, stats


def scaled(adapter: Adapter, scale: float) -> Adapter:
    """``adapter`` with its update times ``scale`` (between the base model, 0, and the adapter, 1)."""
    return Adapter({n: (a, b * scale) for n, (a, b) in adapter.weights.items()}, r=adapter.r, alpha=adapter.alpha,
                   targets=adapter.targets, meta=dict(adapter.meta))


def _greedy(model: Any, tok: Any, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Greedy answers (at most ``max_tokens``) to the formatted ``texts``, batched, left-padded."""
    import torch

    enc = [tok.encode(t, add_special_tokens=False) or [tok.eos_token_id] for t in texts]
    width = max(len(e) for e in enc)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id)
    return [tok.decode(row, skip_special_tokens=True).strip() or "." for row in out[:, width:].tolist()]


def answer_perplexity(model: Any, tok: Any, texts: Sequence[str], adapter: Adapter | None,
                      max_tokens: int = 32) -> float:
    """Perplexity under the base model of the greedy answers to ``texts`` decoded with ``adapter``
    (None: the base model's own answers): the fluency guard's measure (the ``ppl_ratio`` of ``eval lora``)."""
    from persona_mw.plugins._fermi_score import response_logprobs

    hs = install(model, adapter) if adapter is not None else []
    try:
        answers = _greedy(model, tok, texts, max_tokens)
    finally:
        for h in hs:
            h.remove()
    lps = response_logprobs(model, tok, list(texts), [[a] for a in answers], max_response_tokens=max_tokens)
    return math.exp(-sum(row[0] for row in lps) / len(lps))


GUARD_SCALES = (1.0, 0.5, 0.25, 0.125)
# The base model's own perplexity per guard prompt set: the same for every job on that model (greedy, frozen
# weights; the prompts are configuration, not anyone's data), so each job decodes only the adapter's answers.
_BASE_PPL: weakref.WeakKeyDictionary[Any, dict[tuple[tuple[str, ...], int], float]] = weakref.WeakKeyDictionary()


def fluency_guard(model: Any, tok: Any, texts: Sequence[str], adapter: Adapter, limit: float,
                  max_tokens: int = 32, threads: int | None = None) -> tuple[Adapter, dict[str, Any]]:
    """The adapter at the largest of ``GUARD_SCALES`` whose greedy answers to ``texts`` (formatted prompts,
    ordinary requests: the plugin's ``guard_prompts``) are at most ``limit`` times as perplexing to the base
    model as the base model's own answers; the smallest scale when none is (``passed: false``: the plugin
    then stores nothing)."""
    t0 = time.perf_counter()
    model, tok = trainable(model, tok)
    with _Frozen(model, threads):
        memo = _BASE_PPL.setdefault(model, {})
        key = (tuple(texts), max_tokens)
        if key not in memo:
            memo[key] = answer_perplexity(model, tok, texts, None, max_tokens)
        base = memo[key]
        tried: list[tuple[float, float]] = []
        for sc in GUARD_SCALES:
            out = scaled(adapter, sc) if sc != 1.0 else adapter
            ratio = answer_perplexity(model, tok, texts, out, max_tokens) / max(base, 1e-9)
            tried.append((sc, round(ratio, 3)))
            if ratio <= limit:
                break
    info = {"limit": limit, "scale": tried[-1][0], "ppl_ratio": tried[-1][1], "passed": tried[-1][1] <= limit,
            "tried": [list(t) for t in tried], "prompts": len(texts), "seconds": round(time.perf_counter() - t0, 2)}
    return out, info


def _layer_index(name: str) -> int:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return -1


def _scaled(a: Any, b: Any, scale: float) -> Callable[..., Any]:
    def hook(_mod: Any, inp: Any, out: Any) -> Any:  # the trained A and B stay float32
        return out + (scale * ((inp[0].to(a.dtype) @ a.t()) @ b.t())).to(out.dtype)

    return hook


def train_bipo(model: Any, tok: Any, fmt: Callable[[str], str], pairs: Sequence[tuple[str, str, str]],
               layer: int, s: TrainSettings) -> tuple[list[float], dict[str, Any]]:
    """BiPO: a steering vector added to decoder layer ``layer``'s output (every position), trained
    bi-directionally with the same loop (torch thread)."""
    import torch

    pairs = [p for p in pairs if p[1] != p[2]]  # the same answer twice: no preference
    if not pairs:
        raise PersonaError("no chosen/rejected pairs (with different answers) to train a steering vector on")
    model, tok = trainable(model, tok)
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    v = torch.zeros(model.config.hidden_size, requires_grad=True)
    with _Frozen(model, s.threads):
        run = _Weights(model, s.bf16)
        chunks = _chunks(model, run, tok, fmt, pairs, s, layer + 1)
        prep = time.perf_counter() - t0
        stats = _loop(chunks, [v], s, lambda c, d: _policy(model, run, c, layer + 1, d * v), bipo=True)
    stats.update(prepare_seconds=round(prep, 2), total_seconds=round(time.perf_counter() - t0, 2))
    return v.detach().tolist(), stats


__all__ = ["DEFAULT_TARGETS", "GUARD_SCALES", "Adapter", "TrainSettings", "adapter_hook", "answer_perplexity", "bf16_fast",
           "export_peft", "fluency_guard", "install", "load", "merge", "row_hooks", "save", "scaled", "target_modules",
           "train_bipo", "train_lora", "trainable"]
