"""Per-node LoRA adapters (issue #18): the math on toy modules, then the plugin end to end with the real
local model and the real SQLite store (tiny settings: a few steps on the top two layers)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from persona_mw.errors import PersonaError

torch = pytest.importorskip("torch")
from persona_mw.plugins import _lora  # noqa: E402

P = {"max_tokens": 8, "temperature": 0.0}
CHOICES = [
    {"kind": "choice", "user": "ana", "prompt": "Why is the sky blue?", "chosen": "Blue light scatters most. Short answer.",
     "rejected": ["The sky appears blue because of Rayleigh scattering of sunlight by the molecules of the air."]},
    {"kind": "choice", "user": "ana", "prompt": "What is rain?", "chosen": "Water falling from clouds. Short answer.",
     "rejected": ["Rain is liquid precipitation: water droplets that condense from atmospheric vapour and fall."]},
    {"kind": "edit", "user": "ana", "prompt": "What is snow?", "before": "Snow is frozen precipitation made of ice "
     "crystals that form in clouds.", "after": "Frozen rain. Short answer."},
]
YAML = ("pipeline: [{use: lora, background: false, every: 3, steps: 3, top_layers: 2, r: 2, lr: 0.05, "
        "max_response_tokens: 8, max_prompt_tokens: 32, job_seconds: null}]\n")


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = torch.nn.Linear(6, 5)

    def forward(self, x: Any) -> Any:
        return self.q_proj(x)


def toy_adapter(seed: int, r: int = 2) -> _lora.Adapter:
    g = torch.Generator().manual_seed(seed)
    return _lora.Adapter({"q_proj": (torch.randn(r, 6, generator=g), torch.randn(5, r, generator=g))},
                         r=r, alpha=2.0 * r, targets=("q_proj",), meta={"node": f"n{seed}"})


def test_merge_is_the_exact_weighted_sum_of_the_deltas() -> None:
    a, b = toy_adapter(1), toy_adapter(2, r=3)
    m = _lora.merge([(a, 0.25), (b, 0.5)])
    dw = lambda ad: ad.weights["q_proj"][1] @ ad.weights["q_proj"][0]  # noqa: E731
    assert m.r == 5
    assert torch.allclose(dw(m), dw(a) / 3 + dw(b) * 2 / 3, atol=1e-6)
    with pytest.raises(PersonaError):
        _lora.merge([(a, 0.0)])


def test_files_round_trip_and_a_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    a = toy_adapter(3)
    _lora.save(a, tmp_path / "a.safetensors")
    b = _lora.load(tmp_path / "a.safetensors")
    assert torch.allclose(b.weights["q_proj"][0], a.weights["q_proj"][0])
    assert torch.allclose(b.weights["q_proj"][1], a.weights["q_proj"][1])  # scaling folded back in
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PersonaError, match="cannot read adapter bad.safetensors"):
        _lora.load(tmp_path / "bad.safetensors")
    with pytest.raises(PersonaError, match="cannot read adapter"):
        _lora.load(tmp_path / "missing.safetensors")


def test_mixed_batch_rows_get_their_own_adapter_and_no_adapter_is_the_base_exactly() -> None:
    model = Toy()
    x = torch.randn(3, 4, 6)
    base = model(x)
    a, b = toy_adapter(4), toy_adapter(5, r=1)
    hs = _lora.row_hooks(model, [a, None, b])
    try:
        mixed = model(x)
    finally:
        for h in hs:
            h.remove()
    assert torch.equal(mixed[1], base[1])  # token for token: the base row is untouched
    for i, ad in ((0, a), (2, b)):
        hs = _lora.install(model, ad)
        try:
            alone = model(x[i:i + 1])
        finally:
            for h in hs:
                h.remove()
        assert torch.allclose(mixed[i], alone[0], atol=1e-5)
    assert torch.equal(model(x), base)  # every hook removed


def plain(backend: Any, text: str) -> str:
    from persona_mw.types import GenerationParams, Message

    return asyncio.run(backend.generate([Message(role="user", content=text)], params=GenerationParams(**P)))[0].text


def step(reply: Any) -> str:
    return next(s for s in reply.trace.steps if s.hook == "persona_decoding").summary


def adapter_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.safetensors"))


def test_plugin_trains_serves_degrades_and_forget_deletes_the_files(make_mw: Any, local_backend: Any,
                                                                    tmp_path: Path) -> None:
    from persona_mw.cli import _profile_with_reports

    root = tmp_path / "adapters"
    mw = make_mw(YAML.replace("job_seconds: null", f"job_seconds: null, dir: {root}"), backend=local_backend)
    mw.join("ana", "shorties")
    mw.join("bob", "shorties")
    base_reply = mw.chat(user="cy", messages="How do fridges work?", params=P)  # no adapter anywhere
    assert base_reply.text == plain(local_backend, "How do fridges work?")
    assert "no adapter in scope" in step(base_reply)
    for ev in CHOICES:
        mw.feedback(ev)
    st = mw.store.get_profile("user:ana").extra["lora"]
    assert st["version"] == 1 and st["events"]["count"] == 3 and st["events"]["pairs"] == 3
    assert st["events"]["last"] == mw.store.list_feedback(user="ana")[-1].id
    assert st["stats"]["steps"] == 3 and st["users"] == ["ana"]
    group = mw.store.get_profile("group:shorties").extra["lora"]  # pooled members' events
    assert group["users"] == ["ana"] and group["version"] == 1
    files = adapter_files(root)
    assert len(files) == 2 and all(f.startswith("nodes/") for f in files)
    report = _profile_with_reports(mw, "ana", mw.profile("ana"))["lora"]
    assert set(report) == {"user:ana", "group:shorties"} and report["user:ana"]["version"] == 1

    reply = mw.chat(user="ana", messages="How do fridges work?", params=P)
    assert "adapter user:ana:" in step(reply)
    assert mw.chat(user="cy", messages="How do fridges work?", params=P).text == base_reply.text

    mw.forget("ana")
    left = adapter_files(root)
    assert left == [], left  # hers, the group's trained on her events, every merge with them
    assert "lora" not in (mw.store.get_profile("group:shorties") or mw.store.get_profile("global")).extra


def scope_of(mw: Any, user: str) -> Any:
    from persona_mw.types import ChatRequest, Message, Turn

    req = ChatRequest(user=user, messages=[Message(role="user", content="hi")])
    scope, profiles = mw.graph.resolve(req)
    return Turn(request=req, scope=scope, profiles=profiles)


def test_scope_weights_count_the_adapters_events_so_the_group_adapter_is_merged(make_mw: Any, tmp_path: Path) -> None:
    """The group's adapter gets the weight its pooled events earn, though the core counted no evidence
    on the group node (issue #18: it was left out, weight 0, and a new member got no adapter at all)."""
    root = tmp_path / "adapters"
    mw = make_mw(f"pipeline: [{{use: lora, on_error: skip, dir: {root}}}]\n")  # scripted backend: no training
    plugin = mw.plugin("lora")
    mw.join("ana", "shorties")
    mw.join("bob", "shorties")
    for i in range(3):  # the core counts ana's 3 events on user:ana, none on the group
        mw.feedback({"kind": "choice", "user": "ana", "prompt": f"q{i}", "chosen": "a", "rejected": ["b"]})
    for node, seed, n in (("user:ana", 1, 3), ("group:shorties", 2, 6)):
        rel = plugin.files.write(node, 1, toy_adapter(seed))
        mw.profiles.update(node, lambda p, rel=rel, n=n: p.extra.update(
            lora={"file": rel, "model": "m", "version": 1, "evidence": n, "events": {"count": n}}))
    assert [(sn.id, sn.weight) for sn in scope_of(mw, "ana").scope.nodes if sn.kind == "group"] == [("group:shorties", 0.0)]

    adapter, used, notes = plugin.scope_adapter(scope_of(mw, "ana"), "m")
    own, group = 3 / 8, 5 / 8 * 6 / 11  # n / (n + k), k = 5; the rest of ana's weight reaches the group
    assert used == pytest.approx({"user:ana": own / (own + group), "group:shorties": group / (own + group)}, abs=1e-3)
    dw = lambda ad: ad.weights["q_proj"][1] @ ad.weights["q_proj"][0]  # noqa: E731
    expect = dw(toy_adapter(1)) * used["user:ana"] + dw(toy_adapter(2)) * used["group:shorties"]
    assert torch.allclose(dw(adapter), expect, atol=1e-4) and not notes
    assert any(f.startswith("merged/") for f in adapter_files(root))

    adapter, used, notes = plugin.scope_adapter(scope_of(mw, "bob"), "m")  # no adapter of his own
    assert used == {"group:shorties": 1.0} and torch.equal(dw(adapter), dw(toy_adapter(2)))
    assert plugin.scope_adapter(scope_of(mw, "cy"), "m")[0] is None  # in no group: base model
    assert plugin.scope_adapter(scope_of(mw, "ana"), "other-model")[0] is None  # adapters of another model

    (root / mw.store.get_profile("user:ana").extra["lora"]["file"]).write_bytes(b"garbage")
    plugin.files._cache.clear()
    adapter, used, notes = plugin.scope_adapter(scope_of(mw, "ana"), "m")  # degrades to the group's
    assert used == {"group:shorties": 1.0} and "adapter of user:ana unusable" in notes[0]


def test_scope_merges_the_group_adapter_and_a_corrupt_file_degrades_to_it(make_mw: Any, local_backend: Any,
                                                                         tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    mw = make_mw(YAML.replace("job_seconds: null", f"job_seconds: null, dir: {root}"), backend=local_backend)
    mw.join("ana", "shorties")
    mw.join("bob", "shorties")
    for ev in CHOICES:
        mw.feedback(ev)
    st = mw.store.get_profile("user:ana").extra["lora"]
    # ana's scope: her adapter and the group's merged; bob rides on the group's only
    reply = mw.chat(user="ana", messages="How do fridges work?", params=P)
    # 3 events each: ana keeps 3/8, the group 5/8 * 3/8 of what she passes on (renormalized)
    assert "adapter user:ana:0.62, group:shorties:0.38" in step(reply), step(reply)
    assert any(f.startswith("merged/") for f in adapter_files(root))
    bob = mw.chat(user="bob", messages="How do fridges work?", params=P)
    assert "adapter group:shorties:1.00" in step(bob), step(bob)

    # a corrupt user file: the turn still answers, on the group's adapter, flagged in the trace
    (root / st["file"]).write_bytes(b"garbage")
    mw.plugin("lora").files._cache.clear()
    degraded = mw.chat(user="ana", messages="How do fridges work?", params=P)
    assert degraded.text and "lora degraded: adapter of user:ana unusable" in step(degraded)
    assert "adapter group:shorties:1.00" in step(degraded)


def test_stored_adapter_is_a_peft_folder_that_peft_loads_to_the_same_logits(make_mw: Any, local_backend: Any,
                                                                             tmp_path: Path) -> None:
    import copy

    from peft import PeftModel

    from persona_mw.plugins.lora import export_node

    mw = make_mw(YAML.replace("job_seconds: null", f"job_seconds: null, dir: {tmp_path / 'a'}, "
                              "node_kinds: [user]"), backend=local_backend)
    for ev in CHOICES:
        mw.feedback(ev)
    out = export_node(mw, "user:ana", str(tmp_path / "peft"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    ids = torch.tensor([local_backend.tokenizer.encode("Why is the sky blue? Short answer.")])
    model = local_backend.model
    ad = _lora.load(out / "adapter_model.safetensors")
    hs = _lora.install(model, ad)
    try:
        with torch.no_grad():
            ours = model(input_ids=ids).logits
    finally:
        for h in hs:
            h.remove()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(out))
        theirs = peft_model(input_ids=ids).logits
    assert not torch.allclose(ours, base, atol=1e-4)  # the adapter does something
    assert torch.allclose(ours, theirs, atol=1e-4)
    with pytest.raises(PersonaError, match="node"):
        export_node(mw, "user:nobody", str(tmp_path / "x"))


PACK_PAIRS = [  # one prompt with a chosen over two rejected, a repeated pair, a degenerate pair; a second prompt
    ("Why is the sky blue?", "Scattering. Short answer.", "Because sunlight scatters off the molecules of the air."),
    ("Why is the sky blue?", "Scattering. Short answer.", "The oceans reflect their colour into it."),
    ("Why is the sky blue?", "Scattering. Short answer.", "The oceans reflect their colour into it."),
    ("Why is the sky blue?", "Scattering. Short answer.", "Scattering. Short answer."),
    ("What is rain?", "Water from clouds.", "Rain is liquid precipitation: droplets that fall from clouds."),
]


def _chunks_and_loss(model: Any, tok: Any, fmt: Any, pack: bool) -> tuple[list[Any], Any, float]:
    """The prepared chunks, the policy log-probs under a fixed non-zero adapter, and the DPO loss."""
    s = _lora.TrainSettings(top_layers=2, max_response_tokens=12, max_prompt_tokens=32, pack=pack)
    start = _lora.first_trained_layer(model, s.top_layers)
    g = torch.Generator().manual_seed(7)
    ad = _lora.Adapter({n: (torch.randn(4, lin.in_features, generator=g) * 0.05,
                            torch.randn(lin.out_features, 4, generator=g) * 0.05)
                        for n, lin in _lora.target_modules(model, s.targets).items()
                        if _lora._layer_index(n) >= start}, r=4, alpha=4.0, targets=s.targets)
    with _lora._Frozen(model):
        run = _lora._Weights(model, bf16=False)
        chunks = _lora._chunks(model, run, tok, fmt, PACK_PAIRS, s, start)
        hs = _lora.install(model, ad)
        try:
            with torch.no_grad():
                pol = [_lora._policy(model, run, c, start) for c in chunks]
        finally:
            for h in hs:
                h.remove()
    loss = 0.0
    for c, p in zip(chunks, pol):
        w, lo = torch.tensor([i for i, _ in c.pairs]), torch.tensor([j for _, j in c.pairs])
        u = (p[w] - c.ref[w]) - (p[lo] - c.ref[lo])
        loss += float((-torch.nn.functional.logsigmoid(s.beta * u)).mean())
    return chunks, pol, loss / len(chunks)


def test_packed_prompt_rows_score_each_response_as_the_padded_rows_do(local_backend: Any) -> None:
    """One row per prompt (the prompt once, each unique response once, a block-causal mask) gives the
    same reference and policy log-probs, and the same DPO loss, as one padded row per sequence."""
    from persona_mw.types import Message

    model, tok = local_backend.model, local_backend.tokenizer

    def fmt(p: str) -> str:
        return local_backend.format_prompt([Message(role="user", content=p)])

    packed, pol_p, loss_p = _chunks_and_loss(model, tok, fmt, pack=True)
    padded, pol_d, loss_d = _chunks_and_loss(model, tok, fmt, pack=False)
    assert [c.hidden.shape[0] for c in packed] == [1, 1]  # one row per prompt
    assert [c.hidden.shape[0] for c in padded] == [3, 2]  # one row per unique response
    # the repeated pair kept (its weight), the chosen == rejected pair dropped (no preference in it)
    assert packed[0].pairs == [(0, 1), (0, 2), (0, 2)] and packed[1].pairs == [(0, 1)]
    assert packed[0].hidden.shape[1] < sum(len(r) for r in padded[0].hidden)  # the prompt runs once
    for a, b in zip(packed, padded):
        assert torch.allclose(a.ref, b.ref, atol=2e-4), (a.ref, b.ref)
    for a, b, c in zip(pol_p, pol_d, packed):
        assert torch.allclose(a, b, atol=2e-4), (a, b)
        assert not torch.allclose(a, c.ref, atol=1e-3)  # the adapter moved the policy off the reference
    assert abs(loss_p - loss_d) < 1e-5
    assert abs(loss_p - math.log(2)) > 1e-4


def test_simpo_loss_is_the_margin_of_per_token_means_with_no_reference(local_backend: Any) -> None:
    """``loss: simpo``: the loop's loss is ``-log sigmoid(beta (mean_w - mean_l) - gamma)`` with each
    response's mean over ITS OWN scored tokens (counted here from the tokenizer), in both layouts, and
    the base model's reference log-probs do not enter it."""
    from persona_mw.types import Message

    model, tok = local_backend.model, local_backend.tokenizer

    def fmt(p: str) -> str:
        return local_backend.format_prompt([Message(role="user", content=p)])

    responses = []  # per prompt (the chunks' order), its unique responses in the order the chunk indexes them
    for prompt in dict.fromkeys(q for q, _, _ in PACK_PAIRS):
        seen: dict[str, int] = {}
        for q, a, b in PACK_PAIRS:
            if q == prompt:
                seen.setdefault(a, len(seen))
                seen.setdefault(b, len(seen))
        responses.append(list(seen))
    for pack in (True, False):
        chunks, pol, _ = _chunks_and_loss(model, tok, fmt, pack=pack)
        s = _lora.TrainSettings(loss="simpo", beta=2.0, gamma=0.7, steps=1, batch_choices=len(chunks), seconds=None)
        want = nll = 0.0
        for c, p, resps in zip(chunks, pol, responses):
            n = torch.tensor([float(len(tok.encode(r, add_special_tokens=False)[:12])) for r in resps])
            assert torch.equal(c.lens, n), (c.lens, n)
            w, lo = torch.tensor([i for i, _ in c.pairs]), torch.tensor([j for _, j in c.pairs])
            m = p / n
            want += float((-torch.nn.functional.logsigmoid(2.0 * (m[w] - m[lo]) - 0.7)).mean())
            nll += -float(m[sorted({i for i, _ in c.pairs})].mean())  # each chosen answer once
            c.ref = c.ref + torch.arange(len(resps)) * 10.0  # a reference far off: SimPO must not read it
        want, nll = want / len(chunks), nll / len(chunks)
        for weight in (0.0, 0.5):  # RPO's term: the chosen answers' per-token NLL
            s.nll = weight
            by_id = {id(c): p.clone().requires_grad_(True) for c, p in zip(chunks, pol)}
            stats = _lora._loop(chunks, list(by_id.values()), s, lambda c, _d: by_id[id(c)])
            assert abs(stats["loss_first"] - (want + weight * nll)) < 1e-4, (pack, weight, stats["loss_first"], want)
        assert abs(want - math.log(1 + math.exp(0.7))) > 1e-3  # the policy's margins matter


def test_a_simpo_job_stops_its_prepare_pass_at_the_first_trained_layer(local_backend: Any) -> None:
    """SimPO reads no reference, so its prepare pass keeps the first trained layer's input and runs
    neither the layers above nor ``lm_head``; that input is the one a DPO job caches, and the policy's
    log-probs from it are the same."""
    from persona_mw.plugins._steering import decoder_layers
    from persona_mw.types import Message

    model, tok = local_backend.model, local_backend.tokenizer

    def fmt(p: str) -> str:
        return local_backend.format_prompt([Message(role="user", content=p)])

    s = _lora.TrainSettings(top_layers=2, max_response_tokens=12, max_prompt_tokens=32, loss="simpo")
    start = _lora.first_trained_layer(model, s.top_layers)
    calls = {"head": 0, "top": 0}
    hooks = [model.lm_head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1)),
             decoder_layers(model)[start].register_forward_hook(lambda *_: calls.__setitem__("top", calls["top"] + 1))]
    try:
        with _lora._Frozen(model):
            run = _lora._Weights(model, bf16=False)
            fast = _lora._chunks(model, run, tok, fmt, PACK_PAIRS, s, start, ref=False)
            assert calls == {"head": 0, "top": 0}, calls
            full = _lora._chunks(model, run, tok, fmt, PACK_PAIRS, s, start)
            assert calls["head"] == len(full) and calls["top"] == len(full)
            with torch.no_grad():
                for a, b in zip(fast, full):
                    assert a.ref is None and b.ref is not None
                    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.lens, b.lens)
                    assert torch.allclose(_lora._policy(model, run, a, start), b.ref, atol=1e-4)
    finally:
        for h in hooks:
            h.remove()
    heads: list[int] = []  # a simpo job: lm_head runs for the one step's one chunk only, not in the prepare pass
    hook = model.lm_head.register_forward_hook(lambda *_: heads.append(1))
    try:
        _, stats = _lora.train_lora(model, tok, fmt, PACK_PAIRS, _lora.TrainSettings(
            top_layers=2, steps=1, batch_choices=1, loss="simpo", seconds=None, max_response_tokens=12,
            max_prompt_tokens=32))
    finally:
        hook.remove()
    assert len(heads) == 1 and math.isfinite(stats["loss_first"]), (heads, stats)


def test_fluency_guard_scales_an_adapter_back_until_its_answers_read_as_the_base_models(local_backend: Any,
                                                                                        monkeypatch: Any) -> None:
    """The guard's measure is eval lora's ``ppl_ratio``: the base model's perplexity of the greedy answers
    (here equal to the backend's own greedy decoding), and an adapter whose answers are too perplexing is
    scaled down through ``GUARD_SCALES`` to the first that passes; none passing gives the smallest, flagged."""
    from persona_mw.plugins._fermi_score import response_logprobs
    from persona_mw.types import GenerationParams, Message

    model, tok = local_backend.model, local_backend.tokenizer
    prompts = ["How should a small company plan its budget?", "What makes a novel memorable?"]
    texts = [local_backend.format_prompt([Message(role="user", content=p)]) for p in prompts]
    start = _lora.first_trained_layer(model, 4)
    g = torch.Generator().manual_seed(3)
    ad = _lora.Adapter({n: (torch.randn(4, lin.in_features, generator=g) * 0.3,
                            torch.randn(lin.out_features, 4, generator=g) * 0.3)
                        for n, lin in _lora.target_modules(model, ("q_proj", "v_proj")).items()
                        if _lora._layer_index(n) >= start}, r=4, alpha=8.0, targets=("q_proj", "v_proj"))
    cands = asyncio.run(local_backend.generate_batch([[Message(role="user", content=p)] for p in prompts],
                                                     params=GenerationParams(max_tokens=12, temperature=0.0)))
    answers = [c.text or "." for c in sorted(cands, key=lambda c: c.index)]
    lps = response_logprobs(model, tok, texts, [[a] for a in answers], max_response_tokens=12)
    want = math.exp(-sum(r[0] for r in lps) / len(lps))
    assert abs(_lora.answer_perplexity(model, tok, texts, None, 12) - want) < 1e-6 * want

    real, base_runs = _lora.answer_perplexity, []
    monkeypatch.setattr(_lora, "answer_perplexity",
                        lambda m, t, x, a, n=32: base_runs.append(a is None) or real(m, t, x, a, n))
    low, info = _lora.fluency_guard(model, tok, texts, ad, 1e-3, max_tokens=12)  # nothing passes
    assert not info["passed"] and [sc for sc, _ in info["tried"]] == list(_lora.GUARD_SCALES)
    ratios = dict(info["tried"])
    assert ratios[1.0] > 1.2 and ratios[1.0] > ratios[0.125], ratios  # this adapter does break the answers
    for name, (a, b) in ad.weights.items():
        assert torch.equal(low.weights[name][0], a) and torch.allclose(low.weights[name][1], b * 0.125)
    kept, info = _lora.fluency_guard(model, tok, texts, ad, 1e6, max_tokens=12)
    assert kept is ad and info["scale"] == 1.0 and info["passed"] and len(info["tried"]) == 1
    first = next(sc for sc in _lora.GUARD_SCALES if ratios[sc] < ratios[1.0])  # a limit between scale 1 and that one
    mid, info = _lora.fluency_guard(model, tok, texts, ad, (ratios[1.0] + ratios[first]) / 2, max_tokens=12)
    assert info["passed"] and info["scale"] == first and info["ppl_ratio"] == ratios[first], (info, ratios)
    name, (a, b) = next(iter(ad.weights.items()))
    assert torch.allclose(mid.weights[name][1], b * first)
    assert base_runs.count(True) == 1  # the base model's answers to these prompts are decoded once, then kept


def test_plugin_job_with_the_fluency_guard_stores_the_adapter_at_the_scale_that_passed(make_mw: Any, local_backend: Any,
                                                                                       tmp_path: Path) -> None:
    """``fluency_guard``: the job checks the configured prompts, its stats carry the verdict, and the stored
    adapter is the trained one (the same job run again by hand) times the scale that passed."""
    from persona_mw.plugins.lora import AdapterFiles, all_pairs
    from persona_mw.types import Message

    def fmt(p: str) -> str:
        return local_backend.format_prompt([Message(role="user", content=p)])

    root = tmp_path / "a"
    mw = make_mw(YAML.replace("job_seconds: null", f"job_seconds: null, dir: {root}, node_kinds: [user], "
                              "fluency_guard: 1000000, guard_prompts: ['How do bees fly?', 'What is a loan?']"),
                 backend=local_backend)
    for ev in CHOICES:
        mw.feedback(ev)
    plugin = mw.plugin("lora")
    st = mw.store.get_profile("user:ana").extra["lora"]
    first = st["stats"]["guard"]
    assert first["passed"] and first["scale"] == 1.0 and len(first["tried"]) == 1 and first["prompts"] == 2
    events, _, _ = plugin.events_of("user:ana")
    fresh, _ = _lora.train_lora(local_backend.model, local_backend.tokenizer, fmt, all_pairs(events), plugin.settings(0))
    files = AdapterFiles(root)
    for name, (a, b) in fresh.weights.items():
        assert torch.allclose(files.read(st["file"]).weights[name][1], b, atol=1e-6)
    _, probe = _lora.fluency_guard(local_backend.model, local_backend.tokenizer,
                                   [fmt("How do bees fly?"), fmt("What is a loan?")], fresh, 1.0000001,
                                   max_tokens=plugin.settings(0).max_response_tokens)  # the job's answer length
    ratios = dict(probe["tried"])
    assert ratios[1.0] == first["ppl_ratio"]  # the job checked the configured prompts, not the node's own
    scale = next(sc for sc in _lora.GUARD_SCALES[1:] if ratios.get(sc, math.inf) < ratios[1.0])
    plugin.config.fluency_guard = (ratios[1.0] + ratios[scale]) / 2  # passes at `scale`, not before
    entry = mw.runtime.run(plugin.train_node("user:ana"))
    guard = entry["stats"]["guard"]
    assert entry["version"] == 2 and guard["passed"] and guard["scale"] == scale, (guard, ratios)
    stored = files.read(entry["file"])
    assert set(stored.weights) == set(fresh.weights)
    for name, (a, b) in fresh.weights.items():
        assert torch.allclose(stored.weights[name][0], a, atol=1e-6)
        assert torch.allclose(stored.weights[name][1], b * scale, atol=1e-6)


def test_an_adapter_failing_the_guard_at_every_scale_is_not_stored_and_forget_clears_the_record(
        make_mw: Any, local_backend: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """A job whose adapter fails the fluency guard at every scale stores nothing: the node keeps its
    previous adapter (served as before), its profile records the rejection, and forgetting a user whose
    events only the rejected job read drops the record but not the adapter trained on someone else's."""
    from persona_mw.cli import _profile_with_reports

    root = tmp_path / "a"
    mw = make_mw(YAML.replace("job_seconds: null", f"job_seconds: null, dir: {root}, node_kinds: [group], "
                              "fluency_guard: 3"), backend=local_backend)
    mw.join("ana", "shorties")
    mw.join("bob", "shorties")
    for ev in CHOICES:
        mw.feedback({**ev, "user": "bob"})
    first = mw.store.get_profile("group:shorties").extra["lora"]
    assert first["version"] == 1 and first["users"] == ["bob"] and first["stats"]["guard"]["passed"]
    before = adapter_files(root)
    real = _lora.answer_perplexity
    monkeypatch.setattr(_lora, "answer_perplexity",  # every adapter's answers 10x as perplexing as the base's
                        lambda m, t, texts, ad, n=32: real(m, t, texts, None, n) * (1 if ad is None else 10))
    for ev in CHOICES:
        mw.feedback(ev)  # ana's: the group's second job reads them
    st = mw.store.get_profile("group:shorties").extra["lora"]
    assert st["version"] == 1 and st["file"] == first["file"] and st["pending"] == 0
    rej = st["rejected"]
    assert not rej["guard"]["passed"] and [t[0] for t in rej["guard"]["tried"]] == list(_lora.GUARD_SCALES)
    assert rej["users"] == ["ana", "bob"] and rej["events"]["count"] == 6
    assert adapter_files(root) == before  # nothing new written
    report = _profile_with_reports(mw, "ana", mw.profile("ana"))["lora"]["group:shorties"]
    assert report["version"] == 1 and report["rejected"]["guard"]["passed"] is False
    assert "adapter group:shorties:" in step(mw.chat(user="ana", messages="How do fridges work?", params=P))
    mw.forget("ana")
    st = mw.store.get_profile("group:shorties").extra["lora"]
    assert "rejected" not in st and st["version"] == 1 and st["users"] == ["bob"]
    assert adapter_files(root) == before  # bob's group adapter stays


def test_a_member_forgotten_while_the_group_job_trains_leaves_nothing_learned_from_them(
        make_mw: Any, local_backend: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """The store's forget epoch guards a user's own nodes; a group's job pools members' events. A member
    forgotten while it trains (their rows deleted mid-job) means the job's result is dropped: no group
    adapter file, no state naming them."""
    root = tmp_path / "a"
    mw = make_mw(YAML.replace("job_seconds: null", f"job_seconds: null, dir: {root}, node_kinds: [group]"),
                 backend=local_backend)
    mw.join("ana", "shorties")
    mw.join("bob", "shorties")
    real = _lora.train_lora

    def forgotten_mid_job(*args: Any, **kw: Any) -> Any:
        out = real(*args, **kw)
        mw.store.forget_user("ana")  # what forget does first, while this job still runs
        return out

    monkeypatch.setattr(_lora, "train_lora", forgotten_mid_job)
    for ev in CHOICES:
        mw.feedback(ev)
    prof = mw.store.get_profile("group:shorties")
    assert "file" not in ((prof.extra if prof is not None else {}).get("lora") or {})
    assert adapter_files(root) == []
    monkeypatch.setattr(_lora, "train_lora", real)
    for ev in CHOICES:  # a member still here: the group learns from them as before
        mw.feedback({**ev, "user": "bob"})
    st = mw.store.get_profile("group:shorties").extra["lora"]
    assert st["users"] == ["bob"] and len(adapter_files(root)) == 1


RESIDUAL = "job_seconds: null, residual: true, node_kinds: [user, group], dir: "


def test_a_residual_user_adapter_is_her_groups_plus_her_own_and_goes_when_a_member_it_learned_from_does(
        make_mw: Any, local_backend: Any, tmp_path: Path) -> None:
    """``residual: true``: a user's job trains over what her group's adapter serves a new member, frozen,
    and stores their exact sum. Forgetting a member that group adapter learned from deletes her adapter
    too (its files and record; her waiting events stay counted); forgetting another member does not."""
    root = tmp_path / "a"
    mw = make_mw(YAML.replace("job_seconds: null", RESIDUAL + str(root)), backend=local_backend)
    plugin = mw.plugin("lora")
    for u in ("ana", "bob", "dan"):
        mw.join(u, "shorties")
    for ev in CHOICES:  # bob first: his job has no group adapter under it; then the group's (bob's events)
        mw.feedback({**ev, "user": "bob"})
    bob = mw.store.get_profile("user:bob").extra["lora"]
    g1 = mw.store.get_profile("group:shorties").extra["lora"]
    assert "base" not in bob and bob["r"] == 2 and g1["users"] == ["bob"]
    group_v1 = plugin.files.read(g1["file"])
    for ev in CHOICES:
        mw.feedback(ev)
    ana = mw.store.get_profile("user:ana").extra["lora"]
    assert ana["base"] == {"group:shorties": 1} and ana["users"] == ["ana"]
    mine = plugin.files.read(ana["file"])
    assert mine.r == 4
    for name, (a, b) in group_v1.weights.items():  # the base, exactly, then her residual
        assert torch.equal(mine.weights[name][0][:2], a) and torch.equal(mine.weights[name][1][:, :2], b)
    assert any(float(b[:, 2:].abs().sum()) > 0 for _, b in mine.weights.values())
    assert mw.store.get_profile("group:shorties").extra["lora"]["version"] == 2
    side = json.loads((plugin.files.node_dir("user:ana") / "node.json").read_text())
    assert side == {"node": "user:ana", "learned_from": ["bob"]}  # beside the files, not in her profile
    assert "bob" not in json.dumps(mw.store.get_profile("user:ana").extra)

    mw.forget("dan")  # in the group, but nothing learned from him: her adapter stays
    assert mw.store.get_profile("user:ana").extra["lora"]["file"] == ana["file"] and (root / ana["file"]).exists()
    mw.feedback(CHOICES[0])  # one event waiting for her next job
    mw.forget("bob")
    assert not (root / ana["file"]).exists()
    assert mw.store.get_profile("user:ana").extra["lora"] == {"pending": 1}
    assert len(mw.store.list_feedback(user="ana")) == 4
    assert adapter_files(root) == [], adapter_files(root)  # his, the group's (learned from him), hers over it


def test_a_residual_job_whose_base_changed_while_it_trained_writes_nothing(
        make_mw: Any, local_backend: Any, tmp_path: Path, monkeypatch: Any) -> None:
    root = tmp_path / "a"
    mw = make_mw(YAML.replace("job_seconds: null", RESIDUAL + str(root)), backend=local_backend)
    mw.join("ana", "shorties")
    mw.join("bob", "shorties")
    for ev in CHOICES:
        mw.feedback({**ev, "user": "bob"})
    real = _lora.train_lora

    def retrained_mid_job(*args: Any, **kw: Any) -> Any:
        out = real(*args, **kw)
        if kw.get("base") is not None:  # the group's record moves on (a retrain, or a forget) meanwhile
            mw.profiles.update("group:shorties", lambda p: p.extra["lora"].update(version=7))
        return out

    monkeypatch.setattr(_lora, "train_lora", retrained_mid_job)
    for ev in CHOICES:
        mw.feedback(ev)
    st = mw.store.get_profile("user:ana").extra["lora"]
    assert "file" not in st and st["pending"] == 3  # nothing written; the events still wait
    assert not list(mw.plugin("lora").files.node_dir("user:ana").glob("*.safetensors"))


def test_eval_lora_member_is_trained_over_the_groups_adapter_and_served_with_it(make_mw: Any, local_backend: Any,
                                                                                tmp_path: Path) -> None:
    """``eval lora --residual``'s ``lora_member``: the plugin's residual job for one node, the config restored."""
    from persona_mw.eval.lora import _member_hook

    yaml = YAML.replace("every: 3", "every: 1000").replace("job_seconds: null", "job_seconds: null, dir: " + str(tmp_path))
    mw = make_mw(yaml, backend=local_backend)
    plugin = mw.plugin("lora")
    mw.join("bob", "shorties")
    for ev in CHOICES:
        mw.feedback({**ev, "user": "bob"})
    asyncio.run(plugin.train_node("group:shorties"))
    group = plugin.files.read(mw.store.get_profile("group:shorties").extra["lora"]["file"])
    hook = _member_hook(mw, plugin, "mem", "shorties", [{**e, "user": "ana"} for e in CHOICES], 0, lambda m: None)
    assert plugin.config.residual is False
    assert mw.store.get_profile("user:mem").extra["lora"]["base"] == {"group:shorties": 1}
    served = hook.lora  # the scope's merge: the member's (group + residual) and the group's
    assert served.r == 2 * group.r + 2 and sorted(served.meta["merged"]) == ["group:shorties", "user:mem"]


def test_bf16_job_trains_float32_weights_restores_threads_and_leaves_the_model_unchanged(local_backend: Any) -> None:
    from persona_mw.types import Message

    model, tok = local_backend.model, local_backend.tokenizer
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "layers.29." in n or n == "lm_head.weight"}
    dtypes = {p.dtype for p in model.parameters()}
    threads = torch.get_num_threads()
    want = 2 if threads != 2 else 1
    seen: list[int] = []
    hook = model.model.norm.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        s = _lora.TrainSettings(top_layers=1, steps=2, lr=0.05, bf16=True, threads=want, seconds=None,
                                max_response_tokens=8, max_prompt_tokens=32)
        ad, stats = _lora.train_lora(model, tok, lambda p: local_backend.format_prompt([Message(role="user", content=p)]),
                                     [(p, c, r) for p, c, r in PACK_PAIRS], s)
    finally:
        hook.remove()
    assert stats["steps"] == 2 and set(seen) == {want}
    assert torch.get_num_threads() == threads
    assert {p.dtype for p in model.parameters()} == dtypes
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    assert all(a.dtype == torch.float32 and b.dtype == torch.float32 for a, b in ad.weights.values())
    assert ad.delta_norm() > 0


def test_a_pair_with_the_same_answer_twice_is_left_out_and_none_left_is_a_clear_error() -> None:
    from persona_mw.plugins.lora import all_pairs
    from persona_mw.types import ChoiceFeedback

    ev = ChoiceFeedback(user="ana", prompt="p?", chosen="same", rejected=["same", "other"])
    assert all_pairs([ev]) == [("p?", "same", "other")]
    with pytest.raises(PersonaError, match="with different answers"):
        _lora.train_lora(None, None, str, [("p?", "same", "same")], _lora.TrainSettings())


def test_bipo_vector_moves_the_margin_toward_the_chosen_answers_and_its_negation_away(local_backend: Any) -> None:
    """BiPO (the vectors plugin's ``mode: bipo``, trained by the lora loop): after a few steps on the
    pairs, adding the vector raises the chosen-over-rejected log-prob margin over the base model and
    subtracting it lowers it (the objective is bi-directional); the model itself is left unchanged."""
    from persona_mw.plugins._fermi_score import response_logprobs
    from persona_mw.plugins.vectors import add_vector_hook
    from persona_mw.types import Message

    model, tok = local_backend.model, local_backend.tokenizer
    pairs = [(p, c, r) for p, c, r in PACK_PAIRS if c != r]
    fmt = lambda p: local_backend.format_prompt([Message(role="user", content=p)])  # noqa: E731
    layer = 20
    before = model.model.layers[layer].mlp.down_proj.weight.detach().clone()
    s = _lora.TrainSettings(steps=12, lr=0.05, seconds=None, max_response_tokens=12, max_prompt_tokens=32)
    vec, stats = _lora.train_bipo(model, tok, fmt, pairs, layer, s)
    assert stats["steps"] == 12 and len(vec) == model.config.hidden_size and any(vec)
    assert torch.equal(model.model.layers[layer].mlp.down_proj.weight, before)

    def margin(strength: float) -> float:
        handle = add_vector_hook(layer, vec, strength)(model) if strength else None
        try:
            lp = response_logprobs(model, tok, [fmt(p) for p, _, _ in pairs], [[c, r] for _, c, r in pairs],
                                   max_response_tokens=12)
        finally:
            if handle is not None:
                handle.remove()
        return float(sum(a - b for a, b in lp))

    plus, base, minus = margin(1.0), margin(0.0), margin(-1.0)
    assert plus > base > minus, (plus, base, minus)


def test_a_quantized_backend_trains_on_its_float32_weights_and_serves_the_adapter_at_int4() -> None:
    """The int4/int8 kernels have no gradient: training on a quantized model uses the float32 model of the
    same weights (the same trained numbers as training on it directly), and the adapter then applies to
    the int4 model through its hooks by module name."""
    from persona_mw import models

    m4, tok = models.load("smollm2-135m-instruct", dtype="int4")
    m32, _ = models.load("smollm2-135m-instruct", dtype="float32")
    assert _lora.trainable(m4, tok)[0] is m32 and _lora.trainable(m32, tok)[0] is m32
    s = _lora.TrainSettings(top_layers=1, steps=2, lr=0.05, seconds=None, max_response_tokens=8, max_prompt_tokens=32)

    def fmt(p: str) -> str:
        return p + "\n"

    pairs = [(p, c, r) for p, c, r in PACK_PAIRS]
    ad4, stats = _lora.train_lora(m4, tok, fmt, pairs, s)
    ad32, _ = _lora.train_lora(m32, tok, fmt, pairs, s)
    assert stats["steps"] == 2 and ad4.delta_norm() > 0
    assert all(torch.equal(ad4.weights[n][1], ad32.weights[n][1]) for n in ad32.weights)
    ids = tok(fmt("Tell me about tea."), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        plain = m4(input_ids=ids).logits[0, -1]
        handles = _lora.install(m4, ad4)
        try:
            adapted = m4(input_ids=ids).logits[0, -1]
        finally:
            for h in handles:
                h.remove()
    assert not torch.equal(plain, adapted)


def test_mixing_at_the_logits_decodes_one_stream_per_node_adapter(make_mw: Any, local_backend: Any,
                                                                  tmp_path: Path, monkeypatch: Any) -> None:
    root = tmp_path / "adapters"
    mw = make_mw(YAML.replace("job_seconds: null", f"job_seconds: null, dir: {root}, mixing: logits"),
                 backend=local_backend)
    mw.join("ana", "shorties")
    mw.join("bob", "shorties")
    for ev in CHOICES:
        mw.feedback(ev)
    plugin = mw.plugin("lora")
    made: list[Any] = []
    real = local_backend.generate

    async def record(*a: Any, decoding: Any = None, **k: Any) -> Any:  # what the backend is asked to decode
        made.append((a[0] if a else k["messages"], [d for d in decoding or [] if d.source == "lora"]))
        return await real(*a, decoding=decoding, **k)

    monkeypatch.setattr(local_backend, "generate", record)
    reply = mw.chat(user="ana", messages="How do fridges work?", params=P)
    assert reply.text and "adapter user:ana:0.62, group:shorties:0.38" in step(reply), step(reply)
    assert "mixed at the logits: 2 adapter streams" in step(reply), step(reply)
    assert not any(f.startswith("merged/") for f in adapter_files(root))  # nothing merged in this mode
    sent, (d,) = made[-1]
    assert list(d.meta["nodes"]) == ["user:ana", "group:shorties"] and d.activation_hooks == []
    assert d.streams == [list(sent)] * 2  # each stream: the answer's own prompt
    for node, ad in zip(d.meta["nodes"], d.stream_adapters):  # each stream: that node's stored adapter
        stored = plugin.files.read(mw.store.get_profile(node).extra["lora"]["file"])
        assert all(torch.equal(ad.weights[k][1], stored.weights[k][1]) for k in stored.weights)
    scores = torch.randn(1, 2, 50)
    w = list(d.meta["nodes"].values())
    expect = w[0] * scores[:, 0].log_softmax(-1) + w[1] * scores[:, 1].log_softmax(-1)
    assert torch.allclose(d.combine(torch.zeros(1, 50), scores), expect)
    bob = mw.chat(user="bob", messages="How do fridges work?", params=P)
    assert "adapter group:shorties:1.00" in step(bob) and "mixed at the logits" not in step(bob)
