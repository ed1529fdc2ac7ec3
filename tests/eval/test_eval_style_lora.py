"""``persona-mw eval style --methods lora``: per-user adapters from choices, decoded in mixed batches
(the real local model and the real SQLite store; tiny training settings)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")

from persona_mw.eval.style import METHODS, StyleRun, load_methods, make_users  # noqa: E402
from persona_mw.types import Message  # noqa: E402

PROMPTS = ["How do fridges work?", "What is rain?"]
SHORT = [("Why is the sky blue?", "Blue light scatters most. Short answer.",
          "The sky appears blue because of Rayleigh scattering of sunlight by the molecules of the air."),
         ("What is snow?", "Frozen rain. Short answer.",
          "Snow is frozen precipitation made of ice crystals that form in clouds."),
         ("What is wind?", "Moving air. Short answer.",
          "Wind is the movement of air from areas of high pressure to areas of low pressure across the surface.")]


def test_lora_method_is_registered_as_white_box() -> None:
    from persona_mw.eval.style import WHITE_BOX_METHODS

    assert "lora" in load_methods() and "lora" in WHITE_BOX_METHODS


@pytest.mark.slow
def test_lora_method_trains_each_users_adapter_and_decodes_mixed_batches(local_backend: Any,
                                                                        monkeypatch: Any) -> None:
    from persona_mw.eval import style_lora
    from persona_mw.plugins import _lora
    from persona_mw.types import Decoding

    monkeypatch.setattr(style_lora, "LORA_SETTINGS", {**style_lora.LORA_SETTINGS, "steps": 4, "top_layers": 2,
                                                      "r": 2, "lr": 0.01, "max_response_tokens": 8,
                                                      "max_prompt_tokens": 32, "job_seconds": None})
    users = make_users(2, seed=0)
    # batch_size 3: rows (u0 p0, u0 p1, u1 p0) decode as one mixed batch, then (u1 p1) alone
    run = StyleRun(PROMPTS, users, max_new_tokens=8, backend=local_backend, batch_size=3)
    run._steering_pairs = {users[0].id: SHORT, users[1].id: []}  # type: ignore[attr-defined]  # the choices
    try:
        got = METHODS["lora"](run)
        mw = run._mws[-1]
        entry = mw.store.get_profile(f"user:{users[0].id}").extra["lora"]  # trained on exactly her choices
        other = mw.store.get_profile(f"user:{users[1].id}")
        base = run.generate([[Message(role="user", content=p)] for p in (PROMPTS[0], PROMPTS[1], PROMPTS[0])])
        alone = run.generate([[Message(role="user", content=PROMPTS[1])]])
        adapter = mw.plugin("lora").files.read(entry["file"])
        whole = run.generate([[Message(role="user", content=p)] for p in (PROMPTS[0], PROMPTS[1], PROMPTS[0])],
                             decoding=[Decoding(source="t", activation_hooks=[_lora.adapter_hook(adapter)])])
    finally:
        run.close()
    assert entry["events"]["count"] == 3 and entry["events"]["pairs"] == 3 and entry["users"] == [users[0].id]
    assert other is None or "lora" not in other.extra
    assert any(f"{users[0].id}: 3 choices" in n for n in run.notes), run.notes
    # The user without an adapter: the base model token for token, also in the batch with adapter rows.
    assert got[1] == [base[2], alone[0]]
    # The adapter rows are decoded with the user's adapter: as the whole batch under it, not as the base.
    assert got[0] == whole[:2] and got[0] != base[:2] and all(got[0]), (got[0], base[:2])
