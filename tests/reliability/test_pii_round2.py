"""Issue #17, PII round two: the forms the detectors missed or mangled, the fields the redactor did not
look at (job payload metadata/stop/tools, add_raw meta, feedback ids), and corpus-level floors on
benchmarks/data/pii_corpus.jsonl (and the hand-written held-out set)."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from persona_mw import ConfigError, RequestError, parse_config
from persona_mw.errors import UnknownUserError
from persona_mw.privacy import Redactor, iban_ok

from tests.conftest import store_bytes

ALL = ["email", "phone", "card", "address", "iban"]
ROOT = Path(__file__).resolve().parents[2]


def kinds(text: str, **kw: Any) -> list[tuple[str, str]]:
    return [(text[s:e], k) for s, e, k in Redactor(ALL, **kw).find(text)]


# --------------------------------------------------------------------------- missed forms
MISSED = {
    "email_next_to_cjk": ("请发邮件到ana@example.com谢谢", "ana@example.com", "email"),
    "email_next_to_kana": ("メールはtaro.yamada@example.co.jpです", "taro.yamada@example.co.jp", "email"),
    "email_idn_eai": ("schreib an josé@bücher.de bitte", "josé@bücher.de", "email"),
    "email_eai_cjk": ("联系 用户@例子.广告 吧", "用户@例子.广告", "email"),
    "phone_de_mobile": ("Handy 0171/2345678", "0171/2345678", "phone"),
    "phone_fr_national": ("appelez le 01 23 45 67 89", "01 23 45 67 89", "phone"),
    "phone_fr_dotted": ("portable 06.12.34.56.78", "06.12.34.56.78", "phone"),
    "phone_es_national": ("llama al 912 34 56 78", "912 34 56 78", "phone"),
    "phone_es_mobile": ("mi móvil 612 345 678", "612 345 678", "phone"),
    "phone_it_mobile": ("chiama il 3471234567", "3471234567", "phone"),
    "phone_pt_mobile": ("O meu número é 912345678", "912345678", "phone"),
    "phone_jp": ("電話番号は03-1234-5678です", "03-1234-5678", "phone"),
    "phone_cn_mobile": ("我的手机号是138 0013 8000。", "138 0013 8000", "phone"),
    "card_dots": ("card 4111.1111.1111.1111 please", "4111.1111.1111.1111", "card"),
    "card_double_spaces": ("card 4111  1111  1111  1111 please", "4111  1111  1111  1111", "card"),
    "card_diners_dots_next_to_cjk": ("银行卡：3668.858245.3429", "3668.858245.3429", "card"),
    "iban_lowercase": ("iban de89 3704 0044 0532 0130 00 thanks", "de89 3704 0044 0532 0130 00", "iban"),
    "iban_dashed": ("IBAN DE89-3704-0044-0532-0130-00 thanks", "DE89-3704-0044-0532-0130-00", "iban"),
    "address_de": ("Meine Adresse: Berliner Straße 12a, Berlin", "Berliner Straße 12a", "address"),
    "address_fr": ("J'habite au 12 rue de la Paix, Paris", "12 rue de la Paix", "address"),
    "address_es": ("Vivo en Calle Mayor 5, Madrid", "Calle Mayor 5", "address"),
    "address_it": ("Abito in Via Roma 10, Milano", "Via Roma 10", "address"),
    "address_pt": ("Moro na Rua Augusta 100, Lisboa", "Rua Augusta 100", "address"),
}


@pytest.mark.parametrize("case", sorted(MISSED))
def test_missed_form_is_found(case: str) -> None:
    text, value, kind = MISSED[case]
    assert (value, kind) in kinds(text), kinds(text)
    assert value not in Redactor(ALL).redact(text)


def test_mod97_accepts_lowercase_and_dashes() -> None:
    assert iban_ok("de89-3704-0044-0532-0130-00") and not iban_ok("de88-3704-0044-0532-0130-00")


# --------------------------------------------------------------------------- mangled non-PII
# Each of these was rewritten by the detectors of main (666adec): [PHONE], [CARD] or [EMAIL].
MANGLED = {
    "timestamp": "the job ran at 2024-05-08 12:30:45 UTC",
    "timestamp_fr": "Mot de passe changé le 2024-01-15 08:00:00",
    "coordinates": "Koordinaten 52.520008, 13.404954",
    "build_number": "Build 22631.3296 ist installiert.",
    "year_range": "Zeitraum 1990-2024",
    "zip_range_de": "PLZ 50667-51149",
    "zip_range_us": "zips 94103-94110",
    "order_number_spaced": "Order 1234 5678 9012 shipped",
    "order_number_ja": "伝票番号 1234-5678-9012",
    "order_number_luhn_ok": "注文番号：250-1234567-8901234",
    "isbn_luhn_ok": "ISBN 978-972-0-04576-3",
    "ean_barcode": "JAN 4901234567894",
    "meter_reading": "Zählerstand 0045 6789 kWh",
    "retina_file_name": "the file is icon@2x.png",
}

# Forms main already handled: kept as guards against regressions (they pass on main too).
GUARDS_FOUND = {
    "phone_de_spaced": ("Ruf an: 030 12345678", "030 12345678", "phone"),
    "phone_it_spaced": ("chiama il 347 123 4567", "347 123 4567", "phone"),
    "phone_pt_spaced": ("liga para 21 234 5678", "21 234 5678", "phone"),
    "phone_intl": ("call +44 7911 123456", "+44 7911 123456", "phone"),
    "card_next_to_kana": ("カード番号は4111-1111-1111-1111です", "4111-1111-1111-1111", "card"),
    "address_en": ("I live at 221B Baker Street, London", "221B Baker Street", "address"),
}
GUARDS_CLEAN = {
    "date_dotted": "Termin am 08.05.2024 um 14:30",
    "order_number": "Order #114-3941689-8772232 has shipped",
    "order_number_de": "Bestellung Nr. 1234567890 ist unterwegs.",
    "invoice_code": "Invoice INV-2024-000123",
    "zip_list": "zip codes 10115 10117 10119 10178",
    "price_spaces": "ça coûte 1 234 567 € au total",
    "isbn": "ISBN 978-3-16-148410-0",
    "version": "Version v2.14.3 / Python 3.11.4",
    "not_an_address": "install via Python 3 and pip",
}


@pytest.mark.parametrize("case", sorted(MANGLED))
def test_non_pii_is_left_alone(case: str) -> None:
    text = MANGLED[case]
    assert Redactor(ALL).redact(text) == text


@pytest.mark.parametrize("case", sorted(GUARDS_FOUND))
def test_guard_still_found(case: str) -> None:
    text, value, kind = GUARDS_FOUND[case]
    assert (value, kind) in kinds(text)


@pytest.mark.parametrize("case", sorted(GUARDS_CLEAN))
def test_guard_still_clean(case: str) -> None:
    assert Redactor(ALL).redact(GUARDS_CLEAN[case]) == GUARDS_CLEAN[case]


def test_regions_config_decides_national_formats() -> None:
    de = "Ruf an: 030 12345678"
    assert kinds(de, regions=["FR"]) == []  # a German national number is not read as French
    assert kinds(de, regions=["DE"]) == [("030 12345678", "phone")]
    assert kinds("call +49 30 12345678", regions=["FR"]) == [("+49 30 12345678", "phone")]  # international: always
    cfg = parse_config("privacy: {redact: [phone], regions: [fr]}")
    assert cfg.privacy.regions == ["FR"] and cfg.privacy.for_tenant("x").regions == ["FR"]
    with pytest.raises(ConfigError, match=r"privacy.regions.*'XX'"):
        parse_config("privacy: {regions: [XX]}")


def test_without_phonenumbers_phones_fall_back_to_a_regex_and_say_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from persona_mw import privacy

    monkeypatch.setitem(sys.modules, "phonenumbers", None)  # import fails
    privacy._phonenumbers.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="persona_mw.privacy"):
            assert privacy.phone_backend() == "regex"
            r = Redactor(ALL)
            assert r.redact("call +44 7911 123456 now") == "call [PHONE] now"
            assert r.redact(MANGLED["timestamp"]) == MANGLED["timestamp"]
        assert "persona-mw[privacy]" in caplog.text
    finally:
        monkeypatch.undo()
        privacy._phonenumbers.cache_clear()
    assert privacy.phone_backend() == "phonenumbers"


# --------------------------------------------------------------------------- fields the redactor skipped
EMAIL, PHONE = "ana.secret@example.org", "+44 7911 123456"


def test_job_payload_metadata_stop_tools_are_redacted(make_mw: Any, store_url: Any) -> None:
    """Through the real HTTP server: the after-turn job record keeps no PII from any request field."""
    from persona_mw import hookimpl
    from persona_mw.server import create_app, serve_in_thread
    from persona_mw.testing import registered

    class AfterTurn:
        @hookimpl
        def persona_after_turn(self) -> None:
            raise RuntimeError("keep the job pending")

    db = store_url()
    mw = make_mw("privacy: {redact: [email, phone]}\n", db=db)
    body = {
        "model": "persona", "user": "ana",
        "messages": [{"role": "user", "content": "hello"}],
        "metadata": {"crm_note": f"customer {EMAIL}", EMAIL: "keyed by the address"},
        "stop": [f"call {PHONE}"],
        "tools": [{"type": "function", "function": {
            "name": "notify", "description": f"notify {EMAIL} by mail",
            "parameters": {"type": "object", "properties": {"to": {"type": "string", "default": PHONE}}}}}],
    }
    with registered(mw, AfterTurn(), "after"), serve_in_thread(create_app(mw)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        mw.drain()
    jobs = mw.export_user("ana")["jobs"]
    assert jobs, "the job stays pending"
    request = jobs[0]["payload"]["request"]
    assert request["metadata"] == {"crm_note": "customer [EMAIL]", "[EMAIL]": "keyed by the address"}
    assert request["params"]["stop"] == ["call [PHONE]"]
    tool = request["params"]["tools"][0]["function"]
    assert tool["description"] == "notify [EMAIL] by mail" and tool["name"] == "notify"
    assert request["user"] == "ana"
    mw.close()
    raw = store_bytes(db)
    assert EMAIL.encode() not in raw and PHONE.encode() not in raw


def test_add_raw_meta_is_redacted(make_mw: Any, store_url: Any) -> None:
    """Speaker, index text (speaker + previous turn), free-text date and message ids: all redacted."""
    pytest.importorskip("persona_mw.plugins.memory")
    db = store_url()
    mw = make_mw("privacy: {redact: [email, phone]}\npipeline:\n  - use: memory\n    embedder: false\n"
                 "    mode: bm25\n", db=db)
    mw.memory.add_raw("ana", [
        {"role": "user", "speaker": EMAIL, "content": "we met last spring", "id": f"msg {EMAIL}"},
        {"role": "assistant", "speaker": "bot", "content": "nice"},
    ], session_date=f"the day {PHONE} called")
    mems = mw.store.list_memories("user:ana")
    assert len(mems) == 2
    meta = json.dumps([m.meta for m in mems]) + json.dumps([m.provenance for m in mems])
    assert "[EMAIL]" in meta and "[PHONE]" in meta and EMAIL not in meta and PHONE not in meta
    assert mems[0].meta["speaker"] == "[EMAIL]" and mems[0].meta["date_text"] == "the day [PHONE] called"
    assert mw.memory.search("ana", "spring", k=1)  # still retrievable after redaction
    mw.close()
    raw = store_bytes(db)
    assert EMAIL.encode() not in raw and PHONE.encode() not in raw


def test_feedback_ids_with_pii_are_refused(make_mw: Any, store_url: Any) -> None:
    """Ids are keys stored as sent: one that carries an email or a phone number is a 4xx naming the field,
    and nothing is stored."""
    from persona_mw.server import create_app, serve_in_thread

    db = store_url()
    mw = make_mw("privacy: {redact: [email, phone]}\n", db=db)
    ok = {"kind": "stated", "user": "ana", "text": "short answers"}
    with serve_in_thread(create_app(mw)) as url:
        for field, value in [("id", EMAIL), ("id", "4155550132"), ("id", "call +44 7911 123456"),
                             ("trace_id", EMAIL), ("trace_id", "4155550132")]:
            r = httpx.post(f"{url}/v1/feedback", json={**ok, field: value}, timeout=30)
            assert r.status_code in (400, 422), (field, value, r.status_code, r.text)
            assert field in r.text and "Traceback" not in r.text
        r = httpx.post(f"{url}/v1/feedback", json={**ok, "id": "fb-2024-0001"}, timeout=30)
        assert r.status_code == 201 and r.json()["id"] == "fb-2024-0001"
    assert [e["id"] for e in mw.export_user("ana")["feedback"]] == ["fb-2024-0001"]
    with pytest.raises(RequestError, match="id") as exc:  # the library API says the same
        mw.feedback(kind="stated", user="ana", text="x", id="4155550132")
    assert exc.value.field == "id"
    mw.close()
    raw = store_bytes(db)
    assert EMAIL.encode() not in raw and b"4155550132" not in raw


def test_feedback_id_with_an_email_is_refused_even_without_redaction(make_mw: Any) -> None:
    mw = make_mw()
    with pytest.raises(RequestError) as exc:
        mw.feedback({"kind": "stated", "user": "ana", "text": "x", "id": EMAIL})
    assert exc.value.field == "id"
    with pytest.raises(UnknownUserError):  # nothing was stored, not even the user
        mw.export_user("ana")


# --------------------------------------------------------------------------- corpus floors
def _pii_eval() -> Any:
    spec = importlib.util.spec_from_file_location("pii_eval", ROOT / "benchmarks" / "pii_eval.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_corpus_size_and_languages() -> None:
    rows = _pii_eval().load()
    pos = [r for r in rows if r["entities"]]
    neg = [r for r in rows if not r["entities"]]
    assert len(pos) >= 300 and len(neg) >= 300
    assert {"en", "de", "fr", "es", "it", "pt", "ja", "zh"} <= {r["lang"] for r in rows}
    for r in pos:
        for e in r["entities"]:
            assert r["text"][e["start"]:e["end"]] == e["value"]


# Floors (docs/notes/pii.md): on the main corpus, which was used during development, precision and
# recall >= 0.97 overall, >= 0.95 per kind and per language, >= 0.98 of negatives untouched; on the
# held-out set, written afterwards, >= 0.90 precision and recall overall.
def test_corpus_precision_recall_floors() -> None:
    ev = _pii_eval()
    res = ev.evaluate(ev.load(), Redactor(ALL))
    assert res["overall"]["precision"] >= 0.97 and res["overall"]["recall"] >= 0.97, res["overall"]
    for group in ("per_kind", "per_language"):
        for name, s in res[group].items():
            assert s["precision"] >= 0.95 and s["recall"] >= 0.95, (group, name, s)
    assert res["clean_negatives"] >= 0.98


def test_holdout_precision_recall_floors() -> None:
    ev = _pii_eval()
    res = ev.evaluate(ev.load(ROOT / "benchmarks" / "data" / "pii_holdout.jsonl"), Redactor(ALL))
    assert res["overall"]["precision"] >= 0.90 and res["overall"]["recall"] >= 0.90, res["overall"]
