"""The PII test corpus: (text, kinds that must be found). Negatives list no kind."""

POSITIVES: list[tuple[str, set[str]]] = [
    ("mail me at ana.lopez+news@example.co.uk please", {"email"}),
    ("Contact: bob_smith99@mail-server.org.", {"email"}),
    ("my number is +1 415 555 0132", {"phone"}),
    ("call (415) 555-0132 after six", {"phone"}),
    ("Ring 020 7946 0958 at the office", {"phone"}),
    ("whatsapp +447911123456", {"phone"}),
    ("tel. 030-12345678", {"phone"}),
    ("card 4111 1111 1111 1111 exp 12/29", {"card"}),
    ("pay with 5500-0000-0000-0004", {"card"}),
    ("amex 378282246310005 is mine", {"card"}),
    ("I live at 221B Baker Street, London", {"address"}),
    ("ship to 1600 Pennsylvania Avenue NW", {"address"}),
    ("office: 42 Wallaby Way, Sydney", {"address"}),
    ("Meine Adresse ist Hauptstraße 12 in Berlin", {"address"}),
    ("IBAN DE89 3704 0044 0532 0130 00 for the refund", {"iban"}),
    ("GB82WEST12345698765432", {"iban"}),
    ("I'm ana@example.com, phone +33 6 12 34 56 78, 10 Downing Street", {"email", "phone", "address"}),
]

NEGATIVES: list[str] = [
    "Answer in three short sentences.",
    "I prefer Python 3.11.4 over 2.7.18",
    "the meeting is on 2024-01-15 at 10:30",
    "server 192.168.10.254 is down",
    "it costs 1,000,000 dollars, or 12.50 per unit",
    "card number 4111 1111 1111 1112 fails Luhn",
    "the order id is 1234567890123 (not a card: Luhn fails)",
    "use @decorator syntax and user@localhost paths",
    "avoid emojis 😀 and write formally",
    "the 3 main streets of the town",
    "chapter 12 section 4 page 311",
    "DE89 is a postcode prefix, not an IBAN",
    "ISBN 978-3-16-148410-0",
    "I walked 5 miles down the road",
]
