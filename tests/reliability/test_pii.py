"""PII redaction before storage: the detector corpus, the stored rows and file, per-tenant rules,
pluggable detectors (hook and config patterns), and clear errors for unknown kinds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from persona_mw import ConfigError, parse_config
from persona_mw.privacy import Redactor, iban_ok, luhn_ok

from tests.conftest import store_bytes

from .corpus_pii import NEGATIVES, POSITIVES

ALL = ["email", "phone", "card", "address", "iban"]


@pytest.mark.parametrize(("text", "kinds"), POSITIVES)
def test_corpus_positives(text: str, kinds: set[str]) -> None:
    r = Redactor(ALL)
    assert {k for *_, k in r.find(text)} == kinds
    out = r.redact(text)
    assert all(f"[{k.upper()}]" in out for k in kinds)


@pytest.mark.parametrize("text", NEGATIVES)
def test_corpus_negatives(text: str) -> None:
    assert Redactor(ALL).redact(text) == text


def test_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE88 3704 0044 0532 0130 00")


def test_nothing_configured_redacts_nothing() -> None:
    r = Redactor([])
    assert not r and r.redact("mail ana@example.com") == "mail ana@example.com"


def test_unknown_kind_is_a_config_error(make_mw: Any) -> None:
    with pytest.raises(ConfigError, match=r"privacy.*unknown PII kind 'passport'.*known kinds"):
        make_mw("privacy: {redact: [email, passport]}")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        parse_config("privacy: {patterns: {x: '('}}")


PII = {"email": "ana.secret@example.org", "phone": "+44 7911 123456", "card": "4111 1111 1111 1111",
       "address": "221B Baker Street"}


def test_redacted_before_storage(make_mw: Any, store_url: Any) -> None:
    db = store_url()
    mw = make_mw("privacy: {redact: [email, phone, card, address]}\npipeline: [{use: stated}]\n", db=db)
    mw.feedback(kind="stated", user="ana", text=f"write to me at {PII['email']} or call {PII['phone']}")
    mw.feedback(kind="choice", user="ana", prompt=f"card {PII['card']}?", chosen=f"ok {PII['address']}",
                rejected=["no"])
    r = mw.chat(user="ana", messages=f"my card is {PII['card']}, I live at {PII['address']}")
    # The live request still goes to the model as sent; the stored preference is redacted in the prompt.
    assert PII["card"] in r.text and "[EMAIL]" in r.text and PII["email"] not in r.text
    mw.drain()
    exported = json.dumps(mw.export_user("ana"))
    assert "[EMAIL]" in exported and "[PHONE]" in exported and "[CARD]" in exported and "[ADDRESS]" in exported
    mw.close()
    raw = store_bytes(db)
    for value in PII.values():
        assert value.encode() not in raw, value


def test_per_tenant_rules_and_plugin_detectors(make_mw: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from persona_mw import manager
    from persona_mw.server import create_app, serve_in_thread

    monkeypatch.setattr(manager, "DEFAULT_PLUGINS", (*manager.DEFAULT_PLUGINS, "tests.reliability.detector_plugin"))
    mw = make_mw("""
privacy:
  redact: [email, badge, ticket]
  patterns: {ticket: 'TCK-[0-9]+'}
  tenants:
    acme: {redact: []}
server:
  api_keys: {acme: [acme-key-123], globex: [globex-key-456]}
""")
    app = create_app(mw)
    text = "mail ana@example.org about BADGE-1234 and TCK-99"
    with serve_in_thread(app) as url:
        for key in ("acme-key-123", "globex-key-456"):
            r = httpx.post(f"{url}/v1/feedback", json={"kind": "stated", "user": "ana", "text": text},
                           headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 201, r.text
        acme = httpx.get(f"{url}/v1/users/ana", headers={"Authorization": "Bearer acme-key-123"}).text
        globex = httpx.get(f"{url}/v1/users/ana", headers={"Authorization": "Bearer globex-key-456"}).text
    assert "ana@example.org" in acme and "BADGE-1234" in acme  # acme opted out
    assert "[EMAIL]" in globex and "[BADGE]" in globex and "[TICKET]" in globex
    assert "ana@example.org" not in globex and "BADGE-1234" not in globex and "TCK-99" not in globex


def test_cli_redact(capsys: pytest.CaptureFixture[str]) -> None:
    from persona_mw.cli import main

    assert main(["redact", "mail ana@example.org, card 4111 1111 1111 1111"]) == 0
    assert capsys.readouterr().out.strip() == "mail [EMAIL], card [CARD]"
    assert main(["redact", "--kinds", "passport", "x"]) == 2
    assert "unknown PII kind 'passport'" in capsys.readouterr().err


def test_ids_are_never_redacted_so_forget_still_finds_the_rows(make_mw: Any, store_url: Any) -> None:
    """A numeric user id looks like a phone number: it must stay an id in events, traces and jobs."""
    from persona_mw import hookimpl
    from persona_mw.testing import registered

    class AfterTurn:
        @hookimpl
        def persona_after_turn(self) -> None:
            raise RuntimeError("keep the job pending")

    db = store_url()
    mw = make_mw("privacy: {redact: [phone]}\n", db=db)
    user = "4155550132"
    with registered(mw, AfterTurn(), "after"):
        mw.feedback(kind="stated", user=user, text="call me on +1 415 555 0132")
        mw.chat(user=user, messages="my number is +1 415 555 0132")
        mw.drain()
    exported = mw.export_user(user)
    assert exported["feedback"][0]["user"] == user and exported["traces"][0]["user"] == user
    assert exported["jobs"][0]["payload"]["request"]["user"] == user
    assert "[PHONE]" in json.dumps(exported) and "+1 415 555 0132" not in json.dumps(exported)
    mw.forget(user)
    mw.close()
    raw = store_bytes(db)
    assert user.encode() not in raw


def test_memories_are_redacted_too(make_mw: Any, store_url: Any) -> None:
    pytest.importorskip("persona_mw.plugins.memory")
    db = store_url()
    mw = make_mw("privacy: {redact: [email, card]}\npipeline:\n  - use: memory\n    embedder: false\n"
                 "    mode: bm25\n    store_turns: true\n", db=db)
    mw.chat(user="ana", messages=f"my email is {PII['email']} and my card {PII['card']}")
    mw.drain()
    texts = " ".join(m.text for m in mw.store.list_memories("user:ana"))
    assert "[EMAIL]" in texts and "[CARD]" in texts and PII["email"] not in texts
    mw.close()
    raw = store_bytes(db)
    assert PII["email"].encode() not in raw and PII["card"].encode() not in raw
