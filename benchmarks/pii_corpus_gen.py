"""Writes benchmarks/data/pii_corpus.jsonl: the PII detection corpus (positives and hard negatives).

Sentences are composed from templates written per language, filled with values built from real-world
formats, independently of the detectors in persona_mw/privacy.py:

- phones: national numbering plans (area codes and mobile prefixes in use: Berlin 030, Madrid 91, Milano 02,
  Lisboa 21, London 020, Tokyo 03, Beijing 010, DE mobile 015x-017x, FR 06/07, IT 3xx, PT 91-96, CN 13x-18x
  ...), with the separators people write (spaces, dashes, slashes, dots, brackets, "(0)" trunk prefix);
- cards: issuer prefixes (Visa 4, Mastercard 51-55 and 2221-2720, Amex 34/37 4-6-5, Diners 36 4-6-4,
  Discover 6011, JCB 35, UnionPay 62) with a valid Luhn digit, grouped as printed or typed;
- IBANs: each country's BBAN layout (ISO 13616 registry) with bank codes of real banks and computed check
  digits, in print form, compact, lowercase and dashed;
- addresses: the street-address conventions of each language ("Hauptstraße 12", "12 rue de la Paix",
  "Calle Mayor 5", "Via Roma 10", "Rua Augusta 100", "221B Baker Street") with real street names;
- emails: common providers of each country, IDN domains and EAI (non-ASCII) local parts, CJK text
  written right against the address.

Negatives are the things detectors confuse with PII: timestamps, dates, order/invoice/tracking numbers,
versions, zip lists, prices, ISBNs/EANs, measurements, IPs, coordinates, UUIDs, Luhn-failing cards,
bad-checksum IBANs, file names with @, street words without an address.

Each line: {"id", "lang", "text", "entities": [{"kind", "start", "end", "value"}], "trap"} (trap names
the kind of hard negative, for negatives). Deterministic (seeded). Run: python benchmarks/pii_corpus_gen.py
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any, Callable

OUT = Path(__file__).parent / "data" / "pii_corpus.jsonl"
R = random.Random(20261203)


def digits(n: int) -> str:
    return "".join(R.choice(string.digits) for _ in range(n))


def nz_digits(n: int) -> str:  # subscriber numbers do not start with 0 or 1
    return R.choice("23456789") + digits(n - 1)


# --------------------------------------------------------------------------- phones (real national plans)
def phone(lang: str) -> str:
    f: list[Callable[[], str]]
    if lang == "de":
        ac = R.choice(["30", "40", "89", "221", "69", "711", "211", "351", "341", "511"])
        mob = R.choice(["151", "152", "157", "160", "162", "170", "171", "172", "173", "175", "176", "177", "179"])
        sub = nz_digits(8 - len(ac) + 1 if len(ac) == 2 else 7)
        msub = nz_digits(8 if mob.startswith("15") else 7)  # 015x: 8-digit subscriber, 016x/017x: 7
        f = [lambda: f"0{ac} {sub}", lambda: f"0{ac}/{sub}", lambda: f"(0{ac}) {sub}", lambda: f"0{ac}-{sub}",
             lambda: f"+49 {ac} {sub}", lambda: f"+49 (0){ac} {sub}", lambda: f"0{mob} {msub}",
             lambda: f"0{mob}/{msub}", lambda: f"+49 {mob} {msub}", lambda: f"0{mob}-{msub}"]
    elif lang == "fr":
        def pairs() -> str:  # 069x are overseas (Réunion, Antilles: +262/+590), not metropolitan numbers
            first = R.choice("345678") + digits(1)  # and 070-072 are not allocated (ARCEP: mobiles 06, 073-079)
            return " ".join([first] + [digits(2) for _ in range(3)])
        f = [lambda: f"0{R.choice('12345')} {pairs()}", lambda: f"0{R.choice('67')} {pairs()}",
             lambda: f"0{R.choice('67')}.{pairs().replace(' ', '.')}", lambda: f"+33 {R.choice('167')} {pairs()}",
             lambda: f"0{R.choice('1234567')}{pairs().replace(' ', '')}", lambda: f"+33 (0){R.choice('16')} {pairs()}",
             lambda: f"0{R.choice('67')}-{pairs().replace(' ', '-')}"]
    elif lang == "es":
        f = [lambda: f"91 {digits(3)} {digits(2)} {digits(2)}", lambda: f"93 {digits(3)} {digits(2)} {digits(2)}",
             lambda: f"91{digits(1)} {digits(3)} {digits(3)}", lambda: f"6{digits(2)} {digits(3)} {digits(3)}",
             lambda: f"6{digits(2)} {digits(2)} {digits(2)} {digits(2)}", lambda: f"+34 6{digits(2)} {digits(3)} {digits(3)}",
             lambda: f"+34 91 {digits(3)} {digits(2)} {digits(2)}", lambda: f"6{digits(8)}",
             lambda: f"95{digits(1)}-{digits(3)}-{digits(3)}"]
    elif lang == "it":
        mob = R.choice(["320", "328", "333", "335", "338", "339", "340", "347", "348", "349", "366", "380", "392"])
        f = [lambda: f"02 {digits(4)} {digits(4)}", lambda: f"06 {digits(4)} {digits(4)}",
             lambda: f"055 {digits(3)} {digits(4)}", lambda: f"011 {digits(3)} {digits(4)}",
             lambda: f"{mob} {digits(3)} {digits(4)}", lambda: f"{mob}/{digits(7)}", lambda: f"{mob}{digits(7)}",
             lambda: f"+39 {mob} {digits(3)} {digits(4)}", lambda: f"+39 02 {digits(4)} {digits(4)}",
             lambda: f"{mob}-{digits(3)}-{digits(4)}"]
    elif lang == "pt":
        mob = R.choice(["91", "92", "93", "96"])
        f = [lambda: f"21 {digits(3)} {digits(4)}", lambda: f"22 {digits(3)} {digits(4)}",
             lambda: f"{mob}{digits(1)} {digits(3)} {digits(3)}", lambda: f"+351 {mob}{digits(1)} {digits(3)} {digits(3)}",
             lambda: f"+351 21 {digits(3)} {digits(4)}", lambda: f"{mob}{digits(7)}",
             lambda: f"(+351) {mob}{digits(1)} {digits(3)} {digits(3)}"]
    elif lang == "en":
        ac = R.choice(["212", "415", "312", "617", "206", "303", "512", "646", "718"])
        ex = nz_digits(3)
        f = [lambda: f"({ac}) {ex}-{digits(4)}", lambda: f"{ac}-{ex}-{digits(4)}", lambda: f"{ac}.{ex}.{digits(4)}",
             lambda: f"+1 {ac} {ex} {digits(4)}", lambda: f"1-800-{ex}-{digits(4)}",
             lambda: f"020 7{digits(3)} {digits(4)}", lambda: f"0161 {nz_digits(3)} {digits(4)}",
             lambda: f"07{R.choice('3456789')}{digits(2)} {digits(6)}", lambda: f"+44 20 7{digits(3)} {digits(4)}",
             lambda: f"+44 7{R.choice('3456789')}{digits(2)} {digits(6)}", lambda: f"0131 {nz_digits(3)} {digits(4)}"]
    elif lang == "ja":
        f = [lambda: f"03-{nz_digits(4)}-{digits(4)}", lambda: f"06-{nz_digits(4)}-{digits(4)}",
             lambda: f"0{R.choice(['90', '80', '70'])}-{nz_digits(4)}-{digits(4)}",
             lambda: f"0{R.choice(['90', '80'])}{nz_digits(4)}{digits(4)}", lambda: f"+81 3-{nz_digits(4)}-{digits(4)}",
             lambda: f"+81 {R.choice(['90', '80'])} {nz_digits(4)} {digits(4)}", lambda: f"045-{nz_digits(3)}-{digits(4)}",
             lambda: f"(03) {nz_digits(4)}-{digits(4)}"]
    else:  # zh
        mob = R.choice(["130", "133", "135", "136", "138", "139", "150", "152", "158", "159", "186", "188", "189"])
        f = [lambda: f"010-{nz_digits(8)}", lambda: f"021-{nz_digits(8)}", lambda: f"(010) {nz_digits(4)} {digits(4)}",
             lambda: f"{mob} {digits(4)} {digits(4)}", lambda: f"{mob}{digits(8)}", lambda: f"{mob}-{digits(4)}-{digits(4)}",
             lambda: f"+86 {mob} {digits(4)} {digits(4)}", lambda: f"+86 10 {nz_digits(8)}", lambda: f"0755-{nz_digits(8)}"]
    return R.choice(f)()


# --------------------------------------------------------------------------- cards (issuer prefixes + Luhn)
def luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def card() -> str:
    prefix, length, groups = R.choice([
        ("4", 16, (4, 4, 4, 4)), ("4", 16, (4, 4, 4, 4)), (R.choice(["51", "52", "53", "54", "55"]), 16, (4, 4, 4, 4)),
        (str(R.randint(2221, 2720)), 16, (4, 4, 4, 4)), (R.choice(["34", "37"]), 15, (4, 6, 5)),
        ("36", 14, (4, 6, 4)), ("6011", 16, (4, 4, 4, 4)), (str(R.randint(3528, 3589)), 16, (4, 4, 4, 4)),
        ("62", 16, (4, 4, 4, 4)), ("62", 19, (4, 4, 4, 4, 3))])
    body = prefix + digits(length - len(prefix) - 1)
    num = body + luhn_digit(body)
    sep = R.choice(["", " ", " ", "  ", ".", "-", "-"])
    parts, i = [], 0
    for g in groups:
        parts.append(num[i:i + g])
        i += g
    return sep.join(parts)


# --------------------------------------------------------------------------- IBANs (BBAN layouts + mod 97)
def iban_check(cc: str, bban: str) -> str:
    moved = bban + cc + "00"
    n = int("".join(str(int(c, 36)) for c in moved))
    return f"{98 - n % 97:02d}"


def iban(lang: str) -> str:
    cc = {"de": "DE", "fr": "FR", "es": "ES", "it": "IT", "pt": "PT", "en": R.choice(["GB", "GB", "IE", "NL"]),
          "ja": R.choice(["DE", "FR", "GB"]), "zh": R.choice(["DE", "GB", "NL"])}[lang]
    if lang in ("de",) and R.random() < 0.3:
        cc = R.choice(["AT", "CH", "BE"])
    bban = {
        "DE": lambda: R.choice(["37040044", "10070000", "50010517", "76026000", "20041111"]) + digits(10),
        "AT": lambda: R.choice(["12000", "20111", "32000"]) + digits(11),
        "CH": lambda: R.choice(["00762", "00700", "08390"]) + digits(12),
        "BE": lambda: digits(12),
        "FR": lambda: R.choice(["30006", "30004", "20041", "10278"]) + digits(5) + digits(11) + digits(2),
        "ES": lambda: R.choice(["2100", "0049", "0182", "2085"]) + digits(4) + digits(2) + digits(10),
        "IT": lambda: R.choice(string.ascii_uppercase) + R.choice(["03069", "02008", "05034"]) + digits(5) + digits(12),
        "PT": lambda: R.choice(["0035", "0033", "0007", "0010"]) + digits(4) + digits(11) + digits(2),
        "GB": lambda: R.choice(["NWBK", "BARC", "HBUK", "LOYD", "MIDL"]) + digits(6) + digits(8),
        "IE": lambda: R.choice(["AIBK", "BOFI"]) + digits(6) + digits(8),
        "NL": lambda: R.choice(["ABNA", "INGB", "RABO"]) + digits(10),
    }[cc]()
    s = cc + iban_check(cc, bban) + bban
    style = R.choice(["print", "print", "compact", "lower", "dash", "lowerprint"])
    grouped = " ".join(s[i:i + 4] for i in range(0, len(s), 4))
    return {"print": grouped, "compact": s, "lower": s.lower(), "dash": grouped.replace(" ", "-"),
            "lowerprint": grouped.lower()}[style]


# --------------------------------------------------------------------------- emails
EMAILS = {
    "de": ["anna.schmidt@gmx.de", "j.mueller@web.de", "thomas.becker@t-online.de", "lena_wagner@posteo.de",
           "jürgen.müller@müller-bau.de", "info@bäckerei-schäfer.de", "k.hoffmann@uni-hamburg.de", "max.weber92@gmail.com"],
    "fr": ["j.dupont@orange.fr", "marie.martin@free.fr", "françois.lefèvre@laposte.net", "contact@café-crème.fr",
           "sophie.bernard@wanadoo.fr", "l.petit+factures@gmail.com", "élodie@exemple.fr", "pierre.durand@sfr.fr"],
    "es": ["maria.garcia@telefonica.es", "jose.lopez@gmail.com", "josé@bücher.de", "lucía.fernández@correo.es",
           "c.sanchez@yahoo.es", "info@españa-viajes.es", "ana_ruiz@hotmail.es", "pedro.martinez@uv.es"],
    "it": ["giulia.rossi@libero.it", "marco.bianchi@tiscali.it", "f.esposito@virgilio.it", "nicolò@università.it",
           "luca.romano@gmail.com", "chiara.colombo@alice.it", "info@caffè-roma.it", "a.ricci@polimi.it"],
    "pt": ["joao.silva@sapo.pt", "ana.santos@gmail.com", "joão.ferreira@correio.pt", "m.costa@uol.com.br",
           "info@açores-turismo.pt", "rita_oliveira@hotmail.com", "pedro.almeida@iol.pt", "conceição@exemplo.pt"],
    "en": ["ana.lopez+news@example.co.uk", "bob_smith99@mail-server.org", "jane.doe@outlook.com",
           "j.o'connor@eircom.net", "sam.taylor@yahoo.co.uk", "mike@startup.io", "billing@acme-corp.com",
           "emily.chen@cs.stanford.edu"],
    "ja": ["tanaka.taro@docomo.ne.jp", "yamada@example.co.jp", "山田@例え.jp", "suzuki.hanako@gmail.com",
           "info@日本語ドメイン.jp", "k-sato@softbank.ne.jp", "ユーザー@例え.テスト", "ito_kenji@yahoo.co.jp"],
    "zh": ["wang.fang@163.com", "li_na88@qq.com", "用户@例子.广告", "zhangwei@sina.com", "联系@公司.中国",
           "chen.jie@126.com", "liu.yang@foxmail.com", "service@例子.公司"],
}

# --------------------------------------------------------------------------- addresses (real conventions)
def address(lang: str) -> str:
    n = str(R.randint(1, 180))
    if lang == "de":
        street = R.choice(["Hauptstraße", "Bahnhofstraße", "Goethestraße", "Schillerstr.", "Lindenallee", "Am Markt",
                           "Berliner Straße", "Kastanienweg", "Marktplatz", "Unter den Linden", "Friedrichstraße",
                           "Karl-Marx-Allee", "Kurfürstendamm", "Mühlengasse", "Rosenstraße", "Am Hang",
                           "Münchner Str.", "Hafenstraße"])
        return R.choice([f"{street} {n}", f"{street} {n}a", f"{street} {n}-{int(n) + 2}", f"{street} {n}"])
    if lang == "fr":
        street = R.choice(["rue de la Paix", "avenue des Champs-Élysées", "boulevard Saint-Germain", "place de la République",
                           "rue Victor Hugo", "allée des Tilleuls", "impasse du Moulin", "quai de la Tournelle",
                           "chemin des Vignes", "rue du Faubourg Saint-Honoré", "avenue Jean Jaurès", "rue Lepic",
                           "bd Haussmann", "rue de Rivoli", "cours Mirabeau"])
        return R.choice([f"{n} {street}", f"{n} bis {street}", f"{n}, {street}", f"{n} {street}"])
    if lang == "es":
        street = R.choice(["Calle Mayor", "Calle de Alcalá", "Avenida de la Constitución", "Paseo de Gracia",
                           "Plaza Mayor", "Gran Vía", "C/ Serrano", "Calle Real", "Avda. Diagonal", "Calle del Carmen",
                           "Paseo de la Castellana", "Rambla de Catalunya", "Calle San Fernando"])
        return R.choice([f"{street} {n}", f"{street}, {n}", f"{street}, nº {n}", f"{street} {n}, 3º B",
                         f"{street}, {n}, 2º izda."])
    if lang == "it":
        street = R.choice(["Via Roma", "Via Garibaldi", "Corso Vittorio Emanuele II", "Piazza Navona", "Viale Monza",
                           "Via dei Mille", "Via della Spiga", "Largo Argentina", "Via Giuseppe Verdi", "Corso Buenos Aires",
                           "Via Nazionale", "Piazza del Duomo", "Via Toledo", "Viale dei Mille"])
        return R.choice([f"{street} {n}", f"{street}, {n}", f"{street} {n}/A", f"{street} {n}"])
    if lang == "pt":
        street = R.choice(["Rua Augusta", "Avenida da Liberdade", "Rua da Prata", "Praça do Comércio", "Travessa do Carmo",
                           "Av. Paulista", "Rua Oscar Freire", "Rua de Santa Catarina", "Avenida Atlântica",
                           "Rua Garrett", "Alameda Santos", "Rua das Flores", "Estrada de Benfica"])
        return R.choice([f"{street} {n}", f"{street}, {n}", f"{street}, nº {n}", f"{street}, {n}, 2º Esq."])
    # en (ja/zh sentences use English-style addresses abroad)
    street = R.choice(["Baker Street", "Elm Road", "Oak Avenue", "5th Avenue", "Maple Drive", "High Street", "Church Lane",
                       "Sunset Boulevard", "Kings Road", "Pennsylvania Avenue NW", "Market Street", "Abbey Road",
                       "Park Place", "Victoria Terrace", "Mulberry Close", "Lexington Ave"])
    return R.choice([f"{n} {street}", f"{n}B {street}", f"Flat 4, {n} {street}", f"{n} {street}, Apt 3C",
                     f"{n} {street}"])


# --------------------------------------------------------------------------- sentence templates
T: dict[str, dict[str, list[str]]] = {
    "de": {"email": ["Schreib mir einfach an {x}.", "Meine neue Mailadresse lautet {x}", "Bitte in Kopie an {x} senden.",
                     "Kontakt: {x} (nur werktags)"],
           "phone": ["Du erreichst mich unter {x}.", "Ruf mich bitte unter {x} zurück.", "Tel.: {x}",
                     "Meine Handynummer ist {x}, abends besser.", "Notfallkontakt: Mama, {x}"],
           "card": ["Buch es von meiner Kreditkarte {x} ab.", "Die Karte {x} läuft 09/27 ab.", "Kartennummer: {x}"],
           "iban": ["Bitte überweise das Geld auf {x}.", "Meine IBAN: {x}", "Die Miete geht an {x} (Kontoinhaber Schulz)."],
           "address": ["Meine neue Adresse ist {x}, 10115 Berlin.", "Das Paket bitte an {x} liefern.",
                       "Ich wohne jetzt in der {x} in Köln.", "Treffpunkt: {x}, 2. OG"]},
    "fr": {"email": ["Écris-moi à {x} stp.", "Mon adresse mail : {x}", "Envoie la facture à {x}, merci."],
           "phone": ["Tu peux m'appeler au {x}.", "Mon portable : {x}", "Appelez le {x} après 18h.",
                     "Tél. {x} (bureau)", "Rappelle-moi au {x} ce soir."],
           "card": ["Débitez ma carte {x} s'il vous plaît.", "Carte bancaire n° {x}, exp. 11/28", "Ma CB : {x}"],
           "iban": ["Virement sur {x} merci.", "Mon IBAN est {x}.", "RIB : {x}"],
           "address": ["J'habite au {x}, 75002 Paris.", "Livraison au {x}, 2e étage.", "Notre bureau : {x}, Lyon.",
                       "Rendez-vous au {x} à midi."]},
    "es": {"email": ["Escríbeme a {x}.", "Mi correo es {x}", "Manda el presupuesto a {x}, gracias."],
           "phone": ["Llámame al {x}.", "Mi móvil es el {x}", "Teléfono de contacto: {x}", "Puedes llamar al {x} por la tarde."],
           "card": ["Cárgalo a mi tarjeta {x}.", "Tarjeta: {x}, caduca 03/27", "El número de la tarjeta es {x}."],
           "iban": ["Haz la transferencia a {x}.", "Mi IBAN: {x}", "Domiciliación en la cuenta {x}."],
           "address": ["Vivo en {x}, 28013 Madrid.", "Envíalo a {x}, Barcelona.", "La oficina está en {x}.",
                       "Mi dirección: {x}, Sevilla"]},
    "it": {"email": ["Scrivimi a {x}.", "La mia email è {x}", "Manda il preventivo a {x}, grazie."],
           "phone": ["Chiamami al {x}.", "Il mio cellulare è {x}", "Tel. {x} (ufficio)", "Per urgenze: {x}"],
           "card": ["Addebita sulla carta {x}.", "Carta di credito: {x}, scade 06/28", "Numero carta {x}"],
           "iban": ["Fai il bonifico su {x}.", "Il mio IBAN è {x}", "Coordinate bancarie: {x}"],
           "address": ["Abito in {x}, 20121 Milano.", "Spedisci a {x}, Roma.", "Lo studio è in {x}.",
                       "Indirizzo: {x}, Napoli"]},
    "pt": {"email": ["Escreve-me para {x}.", "O meu email é {x}", "Manda a fatura para {x}, obrigado."],
           "phone": ["Liga-me para o {x}.", "O meu telemóvel é {x}", "Contacto: {x}", "Telefone {x} (escritório)"],
           "card": ["Debita no cartão {x}.", "Cartão de crédito {x}, validade 10/27", "O número do cartão é {x}."],
           "iban": ["Faz a transferência para {x}.", "O meu IBAN é {x}", "NIB/IBAN: {x}"],
           "address": ["Moro na {x}, 1100-053 Lisboa.", "Envia para {x}, Porto.", "O escritório fica na {x}.",
                       "Morada: {x}, São Paulo"]},
    "en": {"email": ["mail me at {x} please", "Contact: {x}.", "my email is {x}, reply there",
                     "cc {x} on the invoice"],
           "phone": ["call me on {x}", "my number is {x}", "ring {x} after six", "Phone: {x} (mobile)",
                     "text me at {x}"],
           "card": ["charge it to my card {x}", "card {x} exp 12/29", "use the Visa ending... actually the full one: {x}"],
           "iban": ["send the refund to {x}", "IBAN {x} for the deposit", "my bank account: {x}"],
           "address": ["I live at {x}, London", "ship to {x}, New York, NY 10001", "our office: {x}, Boston",
                       "deliver to {x} please"]},
    "ja": {"email": ["メールは{x}までお願いします。", "連絡先：{x}", "{x}に送ってください", "私のアドレスは {x} です。"],
           "phone": ["電話番号は{x}です。", "携帯：{x}", "{x}までお電話ください。", "連絡先 {x}（平日のみ）"],
           "card": ["カード番号は{x}です。", "クレジットカード：{x}"],
           "iban": ["振込先IBAN：{x}", "ドイツの口座 {x} に送金してください。"],
           "address": []},
    "zh": {"email": ["请发邮件到{x}谢谢", "我的邮箱是{x}。", "联系邮箱：{x}", "有问题发到 {x} 吧"],
           "phone": ["我的手机号是{x}。", "请拨打{x}联系我", "电话：{x}", "联系电话 {x}（工作日）"],
           "card": ["我的信用卡号是{x}。", "银行卡：{x}"],
           "iban": ["请汇款到IBAN {x}。", "收款账户：{x}"],
           "address": []},
}

# A few sentences with two kinds, per language.
MIXED = {
    "de": "Ich bin {email}, Tel. {phone}.", "fr": "Contact : {email} ou {phone}.", "es": "Soy {email}, móvil {phone}.",
    "it": "Scrivi a {email} o chiama il {phone}.", "pt": "Email {email}, telemóvel {phone}.",
    "en": "I'm {email}, phone {phone}, {address}", "ja": "メール：{email}、電話：{phone}", "zh": "邮箱{email}，电话{phone}",
}

NEGATIVES: dict[str, list[str]] = {
    "de": ["Das Meeting ist am 2024-05-08 12:30:45 protokolliert worden.", "Termin: 08.05.2024 um 14:30 Uhr.",
           "Deine Bestellnummer lautet 302-4481923-7720155.", "Rechnungsnummer RE-2024-00123 vom 03.02.2024",
           "Sendungsnummer 00340434161094042557 (DHL)", "Ich nutze Python 3.11.4 und Node 20.11.1.",
           "Liefergebiete: PLZ 10115, 10117, 10119 und 10178.", "Postleitzahlen 80331 80333 80335 80336",
           "Der Laptop kostet 1.299,00 € inkl. MwSt.", "Preis: EUR 12.499,99", "ISBN 978-3-16-148410-0",
           "Artikelnummer 4006381333931", "Kundennummer 1002345678 bitte angeben.", "Die Strecke ist 12 345 m lang.",
           "Gewicht: 3,5 kg, Maße 120 x 60 x 75 cm", "Router unter 192.168.178.1 erreichbar.",
           "Koordinaten 52.520008, 13.404954", "Die Einwohnerzahl lag bei 83 200 000.",
           "Build 22631.3296 ist installiert.", "Ticket #48213 wurde geschlossen.",
           "Kartennummer 4111 1111 1111 1112 ist ungültig (Prüfsumme).", "DE88 3704 0044 0532 0130 00 hat eine falsche Prüfziffer.",
           "Die drei Hauptstraßen der Stadt sind gesperrt.", "Im Jahr 2024 habe ich 12 Bücher gelesen.",
           "Am Montag 3 Termine, am Dienstag 5.", "Zeitraum 1990-2024, Seiten 112-118",
           "Der Zug fährt um 07:45 von Gleis 12.", "Aktenzeichen 3 O 123/24", "Version v2.14.3 behebt den Fehler.",
           "Die Datei heißt logo@2x.png.", "npm install react@18.2.0", "Mein Nutzername ist @anna_s.",
           "Wir treffen uns in der Straße, in der ich früher gewohnt habe.", "Spielstand 3:1 nach 90 Minuten.",
           "UUID 550e8400-e29b-41d4-a716-446655440000", "Die Jahre 2019, 2020, 2021 und 2022 waren gut.",
           "Zählerstand 0045 6789 kWh", "Bestellung Nr. 1234567890 ist unterwegs.",
           "Das Auto hat 150 PS und 2.0 l Hubraum.", "Steuer-ID folgt per Post."],
    "fr": ["Le serveur a redémarré à 2024-05-08 12:30:45.", "Rendez-vous le 08/05/2024 à 14h30.",
           "Numéro de commande : 405-1234567-8912345", "Facture n° FA-2024-0042 du 12/03/2024",
           "Colis suivi 6A12345678901 chez Colissimo.", "J'utilise Python 3.12.1 et Django 5.0.2.",
           "Codes postaux 75001, 75002, 75003 et 75004", "Le vélo coûte 1 299,00 €.", "Prix : 12 499,99 €",
           "ISBN 978-2-07-036822-8", "Référence article 3017620422003", "La tour mesure 330 m, soit 1 083 pieds.",
           "Poids : 2,5 kg ; dimensions 60 x 40 cm", "Adresse IP 10.0.0.254", "Population : 67 750 000 habitants",
           "Version 1.2.3.4 publiée hier.", "Dossier n° 2024/00187", "La rue est très longue et bruyante.",
           "Il y a 3 rues principales dans le village.", "Carte 4970 1012 3456 7891 refusée (Luhn faux).",
           "FR76 3000 6000 0112 3456 7890 188 : clé invalide.", "Score final 2-1 à la 89e minute.",
           "Le train part à 07:45, voie 12.", "Années 1998, 2002, 2006 et 2010", "Chapitre 12, page 311",
           "Le fichier icone@3x.webp est trop lourd.", "pip install requests==2.31.0", "Coordonnées 48.8566, 2.3522",
           "Il a couru 42 195 mètres.", "Ticket n° 58213 résolu.", "Mon pseudo est @marie_m.",
           "Température : 21,5 °C", "Le 12 juillet 2024 à 18:00", "Lot 4/12 livré.", "Vol AF 1234 à 10:20",
           "Mot de passe changé le 2024-01-15 08:00:00", "SIRET à venir", "Commande 1234567890 expédiée.",
           "Entre 2010 et 2020, 15 % de hausse.", "Les numéros 12, 15 et 18 sont gagnants."],
    "es": ["El registro indica 2024-05-08 12:30:45.", "Cita el 08/05/2024 a las 14:30.",
           "Número de pedido: 171-3456789-1234567", "Factura F-2024-00981", "Envío 1Z999AA10123456784 (UPS)",
           "Uso Python 3.10.12 y React 18.2.0.", "Códigos postales 28001, 28002, 28003 y 28004",
           "El portátil cuesta 1.299,00 €.", "Precio: 12.499,99 euros", "ISBN 978-84-376-0494-7",
           "EAN 8410076472885", "La montaña mide 3 718 m.", "Pesa 2,3 kg y mide 45 x 30 cm",
           "IP del servidor: 172.16.0.12", "Población: 47 400 000 habitantes", "Versión 4.2.1.7 instalada.",
           "Expediente 2024/000345", "La calle es estrecha y empinada.", "Hay 3 calles principales en el pueblo.",
           "Tarjeta 5500 0000 0000 0005 (no válida, falla Luhn).", "ES91 2100 0418 4502 0005 1333 tiene un dígito de control malo.",
           "Resultado 3-2 en la prórroga.", "El tren sale a las 07:45 del andén 12.", "Años 2015, 2016, 2017 y 2018",
           "Capítulo 12, página 311", "avatar@2x.jpg no carga", "npm install vue@3.4.21", "Coordenadas 40.4168, -3.7038",
           "Corrió 21 097 metros.", "Incidencia #77312 cerrada.", "Mi usuario es @lucia_r.", "Temperatura 38,5 °C",
           "El 12 de julio de 2024 a las 18:00", "Vuelo IB 3456 a las 10:20", "Pedido 9876543210 enviado.",
           "Entre 2010 y 2020 subió un 15 %.", "Los números 12, 15 y 18 ganan.", "Referencia 00012345/2024",
           "Contraseña cambiada el 2024-01-15 08:00:00", "Plaza de aparcamiento número 12"],
    "it": ["Il log riporta 2024-05-08 12:30:45.", "Appuntamento il 08/05/2024 alle 14:30.",
           "Numero ordine: 402-9876543-2109876", "Fattura n. 2024/00123", "Spedizione 00340434161094042557",
           "Uso Python 3.9.18 e Flask 3.0.2.", "CAP 20121, 20122, 20123 e 20124", "Il divano costa 1.299,00 €.",
           "Prezzo: € 12.499,99", "ISBN 978-88-04-66883-2", "Codice EAN 8001505005592", "Il Monte Bianco è alto 4 806 m.",
           "Peso 1,8 kg, misure 50 x 35 cm", "Indirizzo IP 192.168.1.100", "Popolazione: 58 850 000 abitanti",
           "Versione 2.0.1.5 rilasciata.", "Pratica n. 2024/5567", "Via email ti mando tutto domani.",
           "Ci sono 3 vie principali in paese.", "Carta 4000 1234 5678 9011 rifiutata (Luhn errato).",
           "IT60 X054 2811 1010 0000 0123 457 ha il CIN sbagliato.", "Risultato 2-0 al 90°.",
           "Il treno parte alle 07:45 dal binario 12.", "Anni 2011, 2012, 2013 e 2014", "Capitolo 12, pagina 311",
           "foto@2x.png è sfocata", "pip install numpy==1.26.4", "Coordinate 41.9028, 12.4964", "Ha corso 42 195 metri.",
           "Ticket #99120 chiuso.", "Il mio nick è @giulia_r.", "Temperatura 37,2 °C", "Il 12 luglio 2024 alle 18:00",
           "Volo AZ 1234 alle 10:20", "Ordine 1234567890 spedito.", "Tra il 2010 e il 2020 +15 %.",
           "I numeri 12, 15 e 18 vincono.", "installa via Python 3 e pip", "Corso di laurea 2024 in informatica",
           "Password cambiata il 2024-01-15 08:00:00"],
    "pt": ["O log mostra 2024-05-08 12:30:45.", "Consulta a 08/05/2024 às 14:30.",
           "Número da encomenda: 405-7654321-1234567", "Fatura FT 2024/00987", "Objeto RR123456785PT nos CTT",
           "Uso Python 3.11.2 e Postgres 16.1.", "Códigos postais 1100-053, 1100-148 e 1200-195", "O portátil custa 1.299,00 €.",
           "Preço: R$ 12.499,99", "ISBN 978-972-0-04576-3", "EAN 5601234567893", "A serra tem 1 993 m.",
           "Pesa 2,1 kg e mede 40 x 30 cm", "IP 10.10.1.1", "População: 10 300 000 habitantes", "Versão 3.1.4.1 instalada.",
           "Processo n.º 2024/1234", "A rua é estreita e íngreme.", "Há 3 ruas principais na vila.",
           "Cartão 4532 0151 1283 0367 recusado (Luhn falha).", "PT50 0002 0123 1234 5678 9015 5 tem dígitos de controlo errados.",
           "Resultado 2-1 no fim.", "O comboio parte às 07:45 da linha 12.", "Anos 2015, 2016, 2017 e 2018",
           "Capítulo 12, página 311", "icone@2x.png não abre", "npm install lodash@4.17.21", "Coordenadas -23.5505, -46.6333",
           "Correu 42 195 metros.", "Pedido de suporte #88213 fechado.", "O meu user é @joao_s.", "Temperatura 36,8 °C",
           "Dia 12 de julho de 2024 às 18:00", "Voo TP 1234 às 10:20", "Encomenda 1234567890 enviada.",
           "Entre 2010 e 2020 subiu 15 %.", "Os números 12, 15 e 18 ganharam.", "NIF a enviar depois.",
           "Senha alterada em 2024-01-15 08:00:00", "Lugar de estacionamento 12"],
    "en": ["Answer in three short sentences.", "the meeting is on 2024-01-15 at 10:30",
           "the job ran at 2024-05-08 12:30:45 UTC", "Order #114-3941689-8772232 has shipped", "Invoice INV-2024-000123",
           "tracking 1Z999AA10123456784", "I prefer Python 3.11.4 over 2.7.18", "zip codes 10001, 10002, 10003 and 10004",
           "ZIPs 94103 94105 94107 94110", "it costs $1,299.00 plus tax", "price: USD 12,499.99", "ISBN 978-0-306-40615-7",
           "ISBN 9780306406157", "UPC 036000291452", "the trail is 12,345 ft long", "weight 3.5 lb, 24 x 18 x 10 in",
           "server 192.168.10.254 is down", "population 331,900,000", "build 10.0.22631.3296", "version 1.2.3.4",
           "card number 4111 1111 1111 1112 fails Luhn", "GB82 WEST 1234 5698 7654 31 has a bad checksum",
           "the 3 main streets of the town", "I walked 5 miles down the road", "chapter 12 section 4 page 311",
           "use @decorator syntax and user@localhost paths", "the file is icon@2x.png", "npm install react@18.2.0",
           "coordinates 40.7128, -74.0060", "the score was 3-1 at 90 minutes", "ticket #48213 is closed",
           "the train leaves at 07:45 from platform 12", "years 1999, 2000, 2001 and 2002",
           "UUID 550e8400-e29b-41d4-a716-446655440000", "it was 2,048 MB in 14.6 seconds", "flight BA 1234 at 10:20",
           "order 1234567890123 (not a card: Luhn fails)", "between 2010 and 2020 it grew 15%", "the numbers 12, 15 and 18 win",
           "install via Python 3 and pip", "Password changed on 2024-01-15 08:00:00"],
    "ja": ["ログ時刻は2024-05-08 12:30:45です。", "会議は2024年5月8日 14:30からです。", "注文番号：250-1234567-8901234",
           "請求書番号 INV-2024-00123", "伝票番号 1234-5678-9012", "Python 3.12.2 を使っています。",
           "郵便番号 100-0001、100-0002、100-0003", "価格は12,800円（税込）です。", "合計 ¥1,299,000", "ISBN 978-4-10-109205-8",
           "JAN 4901234567894", "富士山の高さは3,776 mです。", "重さ2.5 kg、サイズ60 x 40 cm", "サーバーIP 192.168.0.10",
           "人口は約125,700,000人です。", "バージョン 2.3.1.4", "カード番号 4111 1111 1111 1112 は無効です。",
           "試合は3-1で終わった。", "電車は07:45発、12番線です。", "2019年、2020年、2021年", "第12章 311ページ",
           "画像 icon@2x.png", "npm install react@18.2.0", "座標 35.6762, 139.6503", "42,195メートルを走った。",
           "チケット #48213 を閉じました。", "気温は36.5 °Cです。", "2024年7月12日 18:00", "フライト JL 123 10:20発",
           "注文 1234567890 を発送しました。", "2010年から2020年で15 %増加", "当選番号は12、15、18です。",
           "パスワード変更日時 2024-01-15 08:00:00", "在庫 1,250 個", "部屋番号 1203", "問い合わせ番号 5678-1234-9012",
           "UUID 550e8400-e29b-41d4-a716-446655440000", "期間 1990-2024", "データ 2,048 MB", "スコア 98.5 点"],
    "zh": ["日志时间 2024-05-08 12:30:45。", "会议在2024年5月8日 14:30开始。", "订单号：1234567890123456",
           "发票号 24112000000012345678", "快递单号 SF1234567890123", "我在用 Python 3.12.2。",
           "邮编 100000、100010、100020", "价格是12,800元。", "合计 ¥1,299,000", "ISBN 978-7-02-000220-7",
           "条形码 6901234567892", "珠穆朗玛峰高8,848.86米。", "重2.5 kg，尺寸60 x 40 cm", "服务器IP 10.0.0.8",
           "人口约1,411,750,000。", "版本 2.3.1.4", "卡号 6222 0202 0000 0000 001 无效（校验失败）。", "比分3-1。",
           "火车07:45从12站台出发。", "2019年、2020年、2021年", "第12章 第311页", "图片 icon@2x.png",
           "pip install torch==2.2.1", "坐标 39.9042, 116.4074", "跑了42,195米。", "工单 #48213 已关闭。",
           "气温36.5 °C。", "2024年7月12日 18:00", "航班 CA 1234 10:20起飞", "订单 1234567890 已发货。",
           "2010年到2020年增长了15 %。", "中奖号码是12、15、18。", "密码修改时间 2024-01-15 08:00:00",
           "库存 1,250 件", "房间号 1203", "运单号 773012345678901", "UUID 550e8400-e29b-41d4-a716-446655440000",
           "期间 1990-2024", "数据 2,048 MB", "得分 98.5 分"],
}


def main() -> None:
    rows: list[dict[str, Any]] = []
    makers: dict[str, Callable[[str], str]] = {
        "phone": phone, "card": lambda _lang: card(), "iban": iban, "address": address,
        "email": lambda lang: R.choice(EMAILS[lang]),
    }
    counts = {"email": 9, "phone": 14, "card": 6, "iban": 6, "address": 13}
    for lang, kinds in T.items():
        for kind, templates in kinds.items():
            if not templates:
                continue
            n = counts[kind] if kind != "email" else len(EMAILS[lang])
            emails = list(EMAILS[lang])
            for i in range(n):
                value = emails[i] if kind == "email" else makers[kind](lang)
                tpl = templates[i % len(templates)]
                start = tpl.index("{x}")
                text = tpl.replace("{x}", value)
                rows.append({"lang": lang, "text": text, "trap": None,
                             "entities": [{"kind": kind, "start": start, "end": start + len(value), "value": value}]})
        for _ in range(3):
            tpl = MIXED[lang]
            vals = {"email": R.choice(EMAILS[lang]), "phone": phone(lang), "address": address("en")}
            text, ents = "", []
            pos = 0
            while pos < len(tpl):
                j = tpl.find("{", pos)
                if j < 0:
                    text += tpl[pos:]
                    break
                k = tpl.index("}", j)
                kind = tpl[j + 1:k]
                text += tpl[pos:j]
                ents.append({"kind": kind, "start": len(text), "end": len(text) + len(vals[kind]), "value": vals[kind]})
                text += vals[kind]
                pos = k + 1
            rows.append({"lang": lang, "text": text, "trap": None, "entities": ents})
        for text in NEGATIVES[lang]:
            rows.append({"lang": lang, "text": text, "trap": "hard-negative", "entities": []})
    for i, row in enumerate(rows):
        row["id"] = f"pii-{i:04d}"
        for e in row["entities"]:
            assert row["text"][e["start"]:e["end"]] == e["value"], row
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({k: row[k] for k in ("id", "lang", "text", "entities", "trap")}, ensure_ascii=False) + "\n")
    pos = sum(1 for r in rows if r["entities"])
    print(f"{OUT}: {len(rows)} sentences, {pos} positive, {len(rows) - pos} negative, "
          f"{len({r['lang'] for r in rows})} languages")


if __name__ == "__main__":
    main()
