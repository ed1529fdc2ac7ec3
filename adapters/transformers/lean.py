"""A lean decode step for Llama-family models: the same numbers as transformers' forward, fewer operations.

One decode step (one new token per row, a ``DynamicCache`` filled by transformers' own forward) spends
as much time in transformers' Python (module calls, mask building, dtype round trips) as in the
products once the weights are small (``int8``/``int4``). :class:`LeanDecoder` runs that step with the
model's own parameters, op for op as transformers' SDPA path computes it, so the logits are
bit-identical (tested against the model's forward for float32, int8 and int4, with and without left
padding). For quantized weights it also runs q/k/v as one product and gate/up as one: the kernels
compute each output row from that row's weights alone, so the fused products equal the separate ones
bit for bit (tested too), and the fused weights are the modules' own storage (no second copy).

It is used only where it cannot change a result: a Llama-architecture model with the SDPA attention,
default RoPE, no biases, plain or quantized Linear layers, and, at the time of the step, no forward
hooks or pre-hooks on any module (capture hooks use hooks, so they get transformers' forward; the
output-capturing hooks transformers itself leaves installed count only while a capture runs), no
autograd and no training mode. Anything else takes the usual forward (:func:`decoder_for`
returns None). The one kind of hook it computes itself is a *residual add*: a forward hook on a decoder
layer that carries its vector as ``hook.residual`` and adds it to the layer's output (the ``vectors``
plugin's steering, :func:`persona_mw.logits.residual_hook`): the step adds the same vector at the same
place. Per-row LoRA deltas (the scheduler's, for requests carrying adapters) are passed in the same way:
the step adds ``(x @ A.T) @ B.T`` to each named projection's output for the given rows, the operation
the ``lora`` plugin's hook performs.
"""

from __future__ import annotations

from typing import Any

_LLAMA = ("LlamaForCausalLM", "LlamaModel", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm")
_ATTR = "_persona_mw_lean"


Adds = dict[int, list[Any]]  # decoder layer -> vectors added to its output, in hook order
RowLora = dict[str, list[tuple[int, int, Any, Any]]]  # module name -> (first row, end row, A, B)



def decoder_for(model: Any) -> tuple[LeanDecoder, Adds] | None:
    """The model's lean decoder (built once per model object) and the residual adds its hooks make
    now, or None where the lean step does not apply now."""
    if _ATTR not in model.__dict__:
        model.__dict__[_ATTR] = LeanDecoder.build(model)
    lean: LeanDecoder | None = model.__dict__[_ATTR]
    if lean is None:
        return None
    adds = lean.usable()
    return None if adds is None else (lean, adds)


def _inert_capture(hook: Any) -> bool:
    """Whether ``hook`` is transformers' output-capturing hook with no capture running. transformers
    installs these on the decoder layers and attention modules the first time a forward is asked for
    hidden states or attentions, and leaves them for good; outside such a forward they return at once.
    Without this, one such forward (a reward-guided search's reference, a plugin reading hidden states)
    switched the lean step off for the process."""
    if getattr(hook, "__name__", None) != "output_capturing_hook":
        return False
    if getattr(hook, "__module__", None) != "transformers.utils.output_capturing":
        return False
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    return _active_collector.get() is None  # type: ignore[no-untyped-call]  # untyped in transformers


def _kind(module: Any) -> str | None:
    """'float' for a plain ``nn.Linear`` without bias, the quantized kind for ours, else None."""
    import torch

    if getattr(module, "bias", None) is not None:
        return None
    if type(module) is torch.nn.Linear:
        return "float"
    from persona_mw.models import is_quantized

    return is_quantized(module)


class LeanDecoder:
    """The decode step of one loaded Llama-architecture model (see the module docstring)."""

    def __init__(self, model: Any) -> None:
        import torch

        inner = model.model
        config = model.config
        self.model = model
        self.embed = inner.embed_tokens
        self.head = model.lm_head
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.inv_freq = inner.rotary_emb.inv_freq
        self.rope_scaling = inner.rotary_emb.attention_scaling
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.scale = self.head_dim**-0.5
        self.layers: list[tuple[Any, ...]] = []
        self.fused: list[tuple[Any, Any] | None] = []
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                att.q_proj, att.k_proj, att.v_proj, att.o_proj,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                mlp.gate_proj, mlp.up_proj, mlp.down_proj,
            ))
            self.fused.append(_fuse(torch, [att.q_proj, att.k_proj, att.v_proj], [mlp.gate_proj, mlp.up_proj]))
        self._modules = list(model.modules())
        self._layer_index = {id(layer): i for i, layer in enumerate(inner.layers)}
        slots = {}
        for i, layer in enumerate(inner.layers):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                slots[id(getattr(layer.self_attn, proj))] = (i, proj)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                slots[id(getattr(layer.mlp, proj))] = (i, proj)
        # module name -> (layer, projection): where a per-row LoRA delta goes
        self.slots = {name: slots[id(m)] for name, m in model.named_modules() if id(m) in slots}
        self._projections = [(layer.self_attn, layer.mlp, row) for layer, row in zip(inner.layers, self.layers,
                                                                                   strict=True)]

    @classmethod
    def build(cls, model: Any) -> LeanDecoder | None:
        """A decoder for ``model`` if its architecture is the one this step computes, else None."""
        return cls(model) if cls.eligible(model) else None

    @staticmethod
    def eligible(model: Any) -> bool:
        """Whether ``model``'s architecture is the one this step computes (reads it, changes nothing)."""
        if _ATTR in model.__dict__:
            return model.__dict__[_ATTR] is not None
        try:
            names = {type(model).__name__, type(model.model).__name__}
            layers = list(model.model.layers)
            names |= {type(m).__name__ for layer in layers
                      for m in (layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm)}
            names.add(type(model.model.norm).__name__)
            config = model.config
            rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
            return bool(
                names <= set(_LLAMA)
                and config.hidden_act == "silu"
                and rope == "default"
                and not getattr(config, "attention_bias", False)
                and not getattr(config, "mlp_bias", False)
                and getattr(config, "_attn_implementation", None) == "sdpa"
                and getattr(config, "pretraining_tp", 1) == 1
                and _kind(model.lm_head) is not None
                and all(_kind(m) is not None for layer in layers
                        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                  layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
            )
        except AttributeError:
            return False

    def accepts(self, cache: Any) -> bool:
        """Whether ``cache`` is the plain per-layer key/value cache this step appends to."""
        layers = getattr(cache, "layers", None)
        return (layers is not None and len(layers) == len(self.layers)
                and all(type(layer).__name__ == "DynamicLayer" for layer in layers))

    def usable(self) -> Adds | None:
        """The residual adds of the hooks on the model now, or None unless: no other hook anywhere, no
        autograd, eval mode, and the model's modules are still the ones built on."""
        import torch
        from torch.nn.modules import module as torch_module

        if torch.is_grad_enabled() or self.model.training:
            return None
        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return None
        adds: Adds = {}
        for m in self._modules:
            if m._forward_pre_hooks:
                return None
            if m._forward_hooks:
                hooks = [h for h in m._forward_hooks.values() if not _inert_capture(h)]
                if not hooks:
                    continue
                layer = self._layer_index.get(id(m))
                if layer is None or m._forward_hooks_with_kwargs or m._forward_hooks_always_called:
                    return None
                for hook in hooks:
                    vector = getattr(hook, "residual", None)
                    if vector is None:
                        return None
                    adds.setdefault(layer, []).append(vector)
        for att, mlp, row in self._projections:
            if (att.q_proj is not row[2] or att.k_proj is not row[3] or att.v_proj is not row[4]
                    or att.o_proj is not row[5] or mlp.gate_proj is not row[8] or mlp.up_proj is not row[9]
                    or mlp.down_proj is not row[10]):
                return None
        return adds

    @staticmethod
    def _rms(x: Any, weight: Any, eps: float) -> Any:
        import torch

        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x.to(dtype)

    def lora_slots(self, row_lora: RowLora) -> dict[int, dict[str, list[tuple[int, int, Any, Any]]]] | None:
        """``row_lora`` by decoder layer and projection, or None if a name is not one of this model's
        projections (then transformers' forward with hooks computes it)."""
        out: dict[int, dict[str, list[tuple[int, int, Any, Any]]]] = {}
        for name, groups in row_lora.items():
            slot = self.slots.get(name)
            if slot is None:
                return None
            out.setdefault(slot[0], {})[slot[1]] = groups
        return out

    def step(self, ids: Any, mask: Any, positions: Any, cache: Any, adds: Adds | None = None,
             hidden: bool = False, lora: dict[int, dict[str, list[tuple[int, int, Any, Any]]]] | None = None) -> Any:
        """Next-token logits ``[rows, V]`` (float32) for ``ids`` ``[rows, 1]``; ``mask`` ``[rows, T]``
        covers the cached columns and the new one; appends the new keys/values to ``cache``. ``adds``:
        vectors added to decoder layers' outputs (as their hooks would). ``lora``: per layer and
        projection, ``(first row, end row, A, B)`` deltas (:meth:`lora_slots`). With ``hidden``, also the
        last hidden state after the final norm ``[rows, d]`` (transformers' ``hidden_states[-1]``)."""
        import torch
        import torch.nn.functional as F

        rows = ids.shape[0]
        hd, heads, kv = self.head_dim, self.heads, self.kv_heads
        h = self.embed(ids)
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(h.dtype).unsqueeze(1)
        sin = (emb.sin() * self.rope_scaling).to(h.dtype).unsqueeze(1)
        # As transformers' SDPA path: no mask (and GQA in the kernel) when no column is padding,
        # else a boolean mask with the query heads packed per key/value head.
        attn_mask = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        half = hd // 2
        for i, (n1, e1, _q, _k, _v, o, n2, e2, _gate, _up, _down) in enumerate(self.layers):
            lo = lora.get(i) if lora else None
            qk, vs = self._qkv(i, self._rms(h, n1, e1), rows, lo)
            # RoPE on the query and key heads together (element-wise: the same numbers as one by one).
            qk = qk.reshape(rows, 1, heads + kv, hd).transpose(1, 2)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            qs, ks = qk[:, :heads], qk[:, heads:]
            vs = vs.reshape(rows, 1, kv, hd).transpose(1, 2)
            layer = cache.layers[i]
            layer.keys = torch.cat([layer.keys, ks], dim=-2)
            layer.values = torch.cat([layer.values, vs], dim=-2)
            if attn_mask is None:
                out = F.scaled_dot_product_attention(qs, layer.keys, layer.values, scale=self.scale, enable_gqa=True)
            else:
                packed = qs.reshape(rows, kv, heads // kv, hd)
                out = F.scaled_dot_product_attention(packed, layer.keys, layer.values, attn_mask=attn_mask,
                                                     scale=self.scale)
            # One query position: the heads are already in (head, dim) order, a plain reshape.
            out = out.reshape(rows, heads * hd)
            projected = _project(o, out)
            if lo:
                _lora_into(projected.view(rows, -1), out, lo.get("o_proj"), 0)
            h = h + projected.reshape(rows, 1, -1)
            h = h + self._mlp(i, self._rms(h, n2, e2), rows, lo).reshape(rows, 1, -1)
            if adds and i in adds:
                for vector in adds[i]:
                    h = h + vector.to(h.dtype)
        h = self._rms(h, *self.norm)
        logits = self.head(h[:, -1:, :])[:, -1, :].to(torch.float32)
        if hidden:
            return logits, h[:, -1, :].to(torch.float32)
        return logits


    def _qkv(self, i: int, x: Any, rows: int, lo: dict[str, Any] | None) -> tuple[Any, Any]:
        """Layer ``i``'s query and key heads ``[rows, (heads + kv) * hd]`` and values, LoRA deltas added."""
        import torch

        _, _, q, k, v = self.layers[i][:5]
        fused = self.fused[i]
        n_q, n_qk = self.heads * self.head_dim, (self.heads + self.kv_heads) * self.head_dim
        if fused is not None:
            qkv = fused[0](x.reshape(rows, -1).to(torch.bfloat16))
            if lo:
                flat = x.reshape(rows, -1)
                _lora_into(qkv, flat, lo.get("q_proj"), 0)
                _lora_into(qkv, flat, lo.get("k_proj"), n_q)
                _lora_into(qkv, flat, lo.get("v_proj"), n_qk)
            return qkv[:, :n_qk], qkv[:, n_qk:]
        qs, ks, vs = q(x), k(x), v(x)
        if lo:
            for y, proj in ((qs, "q_proj"), (ks, "k_proj"), (vs, "v_proj")):
                _lora_into(y.view(rows, -1), x.reshape(rows, -1), lo.get(proj), 0)
        return torch.cat([qs, ks], dim=-1), vs

    def _mlp(self, i: int, x: Any, rows: int, lo: dict[str, Any] | None) -> Any:
        """Layer ``i``'s MLP output ``[rows, d]`` for its normed input ``x``, LoRA deltas added."""
        import torch
        import torch.nn.functional as F

        gate, up, down = self.layers[i][8:]
        fused = self.fused[i]
        if fused is not None:
            gu = fused[1](x.reshape(rows, -1).to(torch.bfloat16))
            inner = gu.shape[1] // 2
            if lo:
                flat = x.reshape(rows, -1)
                _lora_into(gu, flat, lo.get("gate_proj"), 0)
                _lora_into(gu, flat, lo.get("up_proj"), inner)
            act = F.silu(gu[:, :inner]) * gu[:, inner:]
        else:
            g, u = gate(x), up(x)
            if lo:
                _lora_into(g.view(rows, -1), x.reshape(rows, -1), lo.get("gate_proj"), 0)
                _lora_into(u.view(rows, -1), x.reshape(rows, -1), lo.get("up_proj"), 0)
            act = (F.silu(g) * u).reshape(rows, -1)
        projected = _project(down, act)
        if lo:
            _lora_into(projected.view(rows, -1), act, lo.get("down_proj"), 0)
        return projected


def _lora_into(y: Any, x: Any, groups: list[tuple[int, int, Any, Any]] | None, col: int) -> None:
    """Add each group's LoRA delta ``(x @ A.T) @ B.T`` to rows ``[start, end)`` of ``y`` (2-D, in place),
    columns from ``col`` on: the ``lora`` plugin's hook, row by row."""
    if not groups:
        return
    from persona_mw.logits import lora_delta

    for start, end, a, b in groups:
        delta = lora_delta(x[start:end], a, b, y.dtype)
        y[start:end, col:col + delta.shape[1]] += delta


def _project(module: Any, flat: Any) -> Any:
    """``module(flat)`` for ``flat`` [rows, in] (float32): a quantized layer's kernel without its
    module call and reshapes (the same operations on the same values), else the module itself."""
    matmul = getattr(module, "matmul", None)
    if matmul is None:
        return module(flat)
    import torch

    return matmul(flat.to(torch.bfloat16).contiguous())


def _fuse(torch: Any, qkv: list[Any], gate_up: list[Any]) -> tuple[Any, Any] | None:
    """One product for q/k/v and one for gate/up when all are quantized alike; the modules' weights
    become row slices of the fused tensors (row-major: each slice is contiguous), so memory is unchanged."""
    kinds = {_kind(m) for m in qkv + gate_up}
    if len(kinds) != 1 or kinds.pop() not in ("int8", "int4"):
        return None
    if len({getattr(m, "group", None) for m in qkv + gate_up}) != 1:
        return None
    return _fused_product(torch, qkv), _fused_product(torch, gate_up)


def _fused_product(torch: Any, mods: list[Any]) -> Any:
    weight = torch.cat([m.qweight for m in mods]).contiguous()
    start = 0
    for m in mods:
        m.qweight = weight[start:start + m.out_features]  # a contiguous view: one copy of the weights
        start += m.out_features
    if mods[0].quant == "int8":
        scale = torch.cat([m.scale for m in mods]).contiguous()
        return lambda flat: torch._weight_int8pack_mm(flat, weight, scale).float()
    scale_zero = torch.cat([m.scale_zero for m in mods], dim=1).contiguous()  # [k / group, n, 2]: small
    group = mods[0].group
    return lambda flat: torch._weight_int4pack_mm_for_cpu(flat, weight, group, scale_zero).float()
