"""Writes benchmarks/data/pii_holdout.jsonl: a small hand-written held-out PII set.

The main corpus (pii_corpus_gen.py) was used while the detectors were developed, so its figures are
optimistic. These sentences were written by hand afterwards, in other phrasings and with forms the
main corpus lacks (Swiss/Austrian/Brazilian numbers, other banks, other street types), and scored once
without changing the detectors; pii_eval.py --corpus benchmarks/data/pii_holdout.jsonl reports them.
Each item: (lang, text, [(kind, value), ...]); spans are the first occurrence of each value.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "data" / "pii_holdout.jsonl"

POS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("de", "Hallo, hier ist Petra – erreichbar unter 0221 / 9876543 oder petra.klein@freenet.de.",
     [("phone", "0221 / 9876543"), ("email", "petra.klein@freenet.de")]),
    ("de", "Zustellung an Lessingstraße 7b, 04109 Leipzig", [("address", "Lessingstraße 7b")]),
    ("de", "Handy: 0176 23456789", [("phone", "0176 23456789")]),
    ("de", "Überweisung bitte an AT61 1904 3002 3457 3201", [("iban", "AT61 1904 3002 3457 3201")]),
    ("de", "Schweizer Nummer: +41 44 668 18 00", [("phone", "+41 44 668 18 00")]),
    ("de", "Büro Zürich: 044 668 18 00", [("phone", "044 668 18 00")]),
    ("de", "Wir sind umgezogen: Schlossallee 3, München", [("address", "Schlossallee 3")]),
    ("de", "Visa 4556 7375 8689 9855 bitte belasten", [("card", "4556 7375 8689 9855")]),
    ("de", "Die Praxis liegt in der Kantstr. 44 in Charlottenburg.", [("address", "Kantstr. 44")]),
    ("de", "Fax +49 89 1234-5678", [("phone", "+49 89 1234-5678")]),
    ("fr", "Mon fixe : 04 72 10 30 30, mon mail : c.moreau@numericable.fr",
     [("phone", "04 72 10 30 30"), ("email", "c.moreau@numericable.fr")]),
    ("fr", "Nouvelle adresse : 27 avenue de l'Opéra, 75001 Paris", [("address", "27 avenue de l'Opéra")]),
    ("fr", "Envoyez le chèque au 3 ter impasse des Lilas", [("address", "3 ter impasse des Lilas")]),
    ("fr", "IBAN : FR14 2004 1010 0505 0001 3M02 606", [("iban", "FR14 2004 1010 0505 0001 3M02 606")]),
    ("fr", "Joignable au +33 1 42 68 53 00 toute la journée", [("phone", "+33 1 42 68 53 00")]),
    ("fr", "Ma carte Mastercard : 5425 2334 3010 9903", [("card", "5425 2334 3010 9903")]),
    ("fr", "Appelle-moi : 07 81 23 45 67 !", [("phone", "07 81 23 45 67")]),
    ("fr", "Bureau au 14 boulevard de la Croix-Rousse, Lyon", [("address", "14 boulevard de la Croix-Rousse")]),
    ("fr", "Écrire à hélène.roux@académie.fr", [("email", "hélène.roux@académie.fr")]),
    ("es", "Mi dirección es Calle de Toledo 42, 4º A, 28005 Madrid", [("address", "Calle de Toledo 42, 4º A")]),
    ("es", "Llámame: 654 32 10 98", [("phone", "654 32 10 98")]),
    ("es", "Fijo de la oficina 934 12 34 56", [("phone", "934 12 34 56")]),
    ("es", "Cuenta ES79 2100 0813 6101 2345 6789", [("iban", "ES79 2100 0813 6101 2345 6789")]),
    ("es", "Correo: javier.moreno@movistar.es", [("email", "javier.moreno@movistar.es")]),
    ("es", "Tarjeta American Express 3714 496353 98431", [("card", "3714 496353 98431")]),
    ("es", "Nos vemos en Avenida de América 10", [("address", "Avenida de América 10")]),
    ("es", "Teléfono en México: +52 55 1234 5678", [("phone", "+52 55 1234 5678")]),
    ("it", "Il mio numero fisso è 06 6982 1234", [("phone", "06 6982 1234")]),
    ("it", "Residente in Via Giuseppe Mazzini 21, 00195 Roma", [("address", "Via Giuseppe Mazzini 21")]),
    ("it", "IBAN IT60 X054 2811 1010 0000 0123 456", [("iban", "IT60 X054 2811 1010 0000 0123 456")]),
    ("it", "Cell. 339 876 5432 – chiamare dopo le 18", [("phone", "339 876 5432")]),
    ("it", "Mail: s.ferrari@pec.it", [("email", "s.ferrari@pec.it")]),
    ("it", "Consegna in Piazza della Signoria 5, Firenze", [("address", "Piazza della Signoria 5")]),
    ("it", "Carta 4024 0071 2345 6781", [("card", "4024 0071 2345 6781")]),
    ("it", "Ufficio: Corso Magenta 12, Milano", [("address", "Corso Magenta 12")]),
    ("pt", "O meu número é 934 567 890", [("phone", "934 567 890")]),
    ("pt", "Celular no Brasil: (11) 91234-5678", [("phone", "(11) 91234-5678")]),
    ("pt", "Telefone fixo +55 21 2345-6789", [("phone", "+55 21 2345-6789")]),
    ("pt", "Morada: Rua do Ouro 88, 1100-061 Lisboa", [("address", "Rua do Ouro 88")]),
    ("pt", "IBAN PT50 0002 0123 1234 5678 9015 4", [("iban", "PT50 0002 0123 1234 5678 9015 4")]),
    ("pt", "Email: beatriz.lima@netcabo.pt", [("email", "beatriz.lima@netcabo.pt")]),
    ("pt", "Fica na Avenida Brasil, 1500, Rio de Janeiro", [("address", "Avenida Brasil, 1500")]),
    ("pt", "Cartão 5105 1051 0510 5100", [("card", "5105 1051 0510 5100")]),
    ("en", "Reach me at +1 (646) 555-7823 or d.kim@protonmail.com",
     [("phone", "+1 (646) 555-7823"), ("email", "d.kim@protonmail.com")]),
    ("en", "Send it to 742 Evergreen Terrace, Springfield", [("address", "742 Evergreen Terrace")]),
    ("en", "Our HQ: 1 Infinite Loop, Cupertino", [("address", "1 Infinite Loop")]),
    ("en", "Office phone 0117 496 0123", [("phone", "0117 496 0123")]),
    ("en", "Amex 3400 000000 00009", [("card", "3400 000000 00009")]),
    ("en", "Bank: IE29 AIBK 9311 5212 3456 78", [("iban", "IE29 AIBK 9311 5212 3456 78")]),
    ("en", "Mobile 07700 900461", [("phone", "07700 900461")]),
    ("en", "I'm at 10 Downing Street until Friday", [("address", "10 Downing Street")]),
    ("en", "ping tom.h@mail.co.uk", [("email", "tom.h@mail.co.uk")]),
    ("en", "Call 212-736-5000 to book", [("phone", "212-736-5000")]),
    ("en", "Card: 6011 0009 9013 9424", [("card", "6011 0009 9013 9424")]),
    ("ja", "お問い合わせは052-123-4567まで。", [("phone", "052-123-4567")]),
    ("ja", "携帯番号：080-9876-5432", [("phone", "080-9876-5432")]),
    ("ja", "連絡はhanako.sato@nifty.comへ", [("email", "hanako.sato@nifty.com")]),
    ("ja", "カード 3530 1113 3330 0000 で支払います", [("card", "3530 1113 3330 0000")]),
    ("ja", "メールアドレスは佐藤@会社.jpです", [("email", "佐藤@会社.jp")]),
    ("zh", "我的微信绑定手机 186 1234 5678", [("phone", "186 1234 5678")]),
    ("zh", "上海办公室电话021-62345678", [("phone", "021-62345678")]),
    ("zh", "邮件发到zhao.lei@163.com就行", [("email", "zhao.lei@163.com")]),
    ("zh", "银联卡 6212 2612 0200 1234 567", [("card", "6212 2612 0200 1234 567")]),
    ("zh", "香港电话 +852 2123 4567", [("phone", "+852 2123 4567")]),
]

NEG: list[tuple[str, str]] = [
    ("de", "Der Vertrag 2023-11-30T23:59:59 läuft aus."), ("de", "Lieferung zwischen 14:00 und 18:00."),
    ("de", "Bestellnr. 028-1234567-1234567 storniert."), ("de", "Auflage: 12.500 Exemplare, 2. Auflage 2021."),
    ("de", "PLZ-Bereich 50667–51149"), ("de", "Kontostand: 12.345,67 EUR"),
    ("de", "Die Hausnummern 12, 14 und 16 bekommen neue Briefkästen."), ("de", "Release 4.19.2 vom 03.04.2024"),
    ("de", "Flug LH 400 um 13:35, Sitz 23A"), ("de", "Telefonkonferenz am 12.06. um 10 Uhr"),
    ("de", "Die Baustelle in der Hauptstraße dauert bis Mai."), ("de", "Seriennummer SN 4711-0815-2024"),
    ("fr", "Horodatage : 2023-11-30 23:59:59"), ("fr", "Livraison entre 14h00 et 18h00."),
    ("fr", "Commande n° 7845 1236 9874 expédiée."), ("fr", "Tirage : 12 500 exemplaires."),
    ("fr", "Codes postaux 69001 à 69009"), ("fr", "Solde : 12 345,67 €"),
    ("fr", "Version 4.19.2 du 03/04/2024"), ("fr", "La rue de la Paix est chère au Monopoly."),
    ("fr", "Vol AF 0084, siège 23A"), ("fr", "Réunion le 12/06 à 10h"),
    ("es", "Marca de tiempo 2023-11-30 23:59:59"), ("es", "Pedido n.º 4512-7788-1234 enviado"),
    ("es", "Tirada de 12.500 ejemplares"), ("es", "Códigos postales 08001 a 08042"),
    ("es", "Saldo: 12.345,67 €"), ("es", "Versión 4.19.2 del 03/04/2024"),
    ("es", "La Calle Mayor está cortada por obras."), ("es", "Vuelo IB 6251, asiento 23A"),
    ("it", "Timestamp 2023-11-30 23:59:59"), ("it", "Ordine n. 5512 3344 9876 spedito"),
    ("it", "Tiratura 12.500 copie"), ("it", "CAP da 00118 a 00199"), ("it", "Saldo: 12.345,67 €"),
    ("it", "Versione 4.19.2 del 03/04/2024"), ("it", "Via libera al progetto 2025"),
    ("it", "La via Roma è chiusa al traffico."), ("it", "Volo AZ 610, posto 23A"),
    ("pt", "Carimbo 2023-11-30 23:59:59"), ("pt", "Pedido nº 3312-4455-6677 enviado"),
    ("pt", "Tiragem de 12.500 exemplares"), ("pt", "CEP 01310-100 e 01311-000"), ("pt", "Saldo: R$ 12.345,67"),
    ("pt", "Versão 4.19.2 de 03/04/2024"), ("pt", "A Rua Augusta estava cheia de turistas."),
    ("en", "timestamp 2023-11-30T23:59:59Z"), ("en", "Order 112-7788990-1234567 was refunded"),
    ("en", "print run of 12,500 copies"), ("en", "ZIPs 02108 through 02116"), ("en", "balance: $12,345.67"),
    ("en", "release 4.19.2 from 04/03/2024"), ("en", "Baker Street is busy today"),
    ("en", "flight UA 901, seat 23A"), ("en", "SKU 8841-2270-1193"), ("en", "PO 4500012345 approved"),
    ("en", "commit 9fceb02d0ae598e95dc970b74767f19372d61af8"), ("en", "phone battery at 87%, 3200 mAh"),
    ("en", "lat/long 51.5072, -0.1276"), ("en", "see RFC 5322 and RFC 6531 for email syntax"),
    ("ja", "タイムスタンプ 2023-11-30 23:59:59"), ("ja", "注文番号 503-2233445-6677889"),
    ("ja", "発行部数 12,500部"), ("ja", "残高 12,345円"), ("ja", "バージョン 4.19.2（2024/04/03）"),
    ("ja", "便名 NH 106、座席 23A"), ("zh", "时间戳 2023-11-30 23:59:59"), ("zh", "订单编号 202311301234567890"),
    ("zh", "印数 12,500 册"), ("zh", "余额 12,345.67 元"), ("zh", "版本 4.19.2（2024/04/03）"),
    ("zh", "航班 MU 5101，座位 23A"),
]


def main() -> None:
    rows = []
    for i, (lang, text, ents) in enumerate(POS):
        entities = []
        for kind, value in ents:
            start = text.index(value)
            entities.append({"kind": kind, "start": start, "end": start + len(value), "value": value})
        rows.append({"id": f"hold-p{i:03d}", "lang": lang, "text": text, "entities": entities, "trap": None})
    for i, (lang, text) in enumerate(NEG):
        rows.append({"id": f"hold-n{i:03d}", "lang": lang, "text": text, "entities": [], "trap": "hard-negative"})
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{OUT}: {len(POS)} positive, {len(NEG)} negative")


if __name__ == "__main__":
    main()
