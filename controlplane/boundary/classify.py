"""The reference content classifier: what a request body holds, as a sensitivity and findings. Pure.

Stdlib only (it runs as its own service on a golden host that has only Debian's python3). A
body is read as bytes (latin-1, so an offset is a byte offset) and searched for:

============  =============  ===============================================================
kind          sensitivity    how it is recognised
============  =============  ===============================================================
email         internal       ``local@domain.tld`` (ASCII, a dotted domain with a 2+ letter TLD)
phone         internal       ``+`` and 8-15 digits (E.164, spaces or dashes allowed), or a
                             North American number written ``(NXX) NXX-XXXX`` / ``NXX-NXX-XXXX``
iban          confidential   a country code, 2 check digits and 11-30 letters/digits, mod 97 == 1
us-ssn        confidential   ``AAA-GG-SSSS`` with the SSA's rules (no 000/666/9xx area, no 00
                             group, no 0000 serial)
es-dni        confidential   8 digits and the mod-23 check letter (Spain's DNI)
fi-hetu       confidential   ``DDMMYY``, a century sign, 3 digits and the mod-31 check character
card          restricted     13-19 digits (single spaces/dashes allowed) with a card network's
                             prefix and a valid Luhn check digit
secret        restricted     ``controlplane.governance.secretscan.find``: known token patterns,
                             32+ hex digits (not one labelled ``sha256:`` etc.: a digest),
                             high-entropy tokens
============  =============  ===============================================================

The verdict's sensitivity is the highest of its findings' (``public`` when there are none).
Findings carry the kind and offset only, never the matched text: a verdict may be logged and
recorded in receipts. Recognition is for mistakes (an agent pasting a customer record into a
prompt), not for an adversary who encodes what it sends: see docs/egress.md.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from controlplane.governance import secretscan

NAME, VERSION = "avm-reference", "1"
CLASSIFIER = f"{NAME}@{VERSION}"
LEVELS = ("public", "internal", "confidential", "restricted")
SENSITIVITY = {
    "email": "internal",
    "phone": "internal",
    "iban": "confidential",
    "us-ssn": "confidential",
    "es-dni": "confidential",
    "fi-hetu": "confidential",
    "card": "restricted",
    "secret": "restricted",
}
MAX_FINDINGS = 64  # a verdict stays small (it travels in a response header); the level is exact

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])")
_E164 = re.compile(r"(?<![\w+])\+[1-9](?:[ -]?\d){7,14}(?![\d])")
_NANP = re.compile(r"(?<![\w(])(?:\([2-9]\d\d\) ?|[2-9]\d\d-)[2-9]\d\d-\d{4}(?!\d)")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d\d(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d\d-(?!0000)\d{4}(?![\d-])")
_DNI = re.compile(r"(?<![A-Za-z0-9])\d{8}-?[A-HJ-NP-TV-Z](?![A-Za-z0-9])")
_HETU = re.compile(r"(?<![A-Za-z0-9])(\d{6})([-+A-FU-Y])(\d{3})([0-9A-Y])(?![A-Za-z0-9])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|3[0689]|6(?:011|5|4[4-9]|22)|35|62)")
_DIGIT_RUN = re.compile(r"\d(?:[ \-()+./]{0,2}\d){7,}")  # 8+ digits: the shortest kind has 8
_LOCAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
_DIGEST_LABEL = re.compile(r"(?:sha(?:1|224|256|384|512)|md5)[:=]$")  # "sha256:<hex>" is a digest
_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"
_HETU_CHECK = "0123456789ABCDEFHJKLMNPRSTUVWXY"


@dataclasses.dataclass(frozen=True)
class Verdict:
    sensitivity: str
    findings: tuple[tuple[str, int], ...]  # (kind, byte offset), in offset order
    classifier: str = CLASSIFIER

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted({k for k, _ in self.findings}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "sensitivity": self.sensitivity,
            "findings": [{"kind": k, "offset": o} for k, o in self.findings],
            "classifier": self.classifier,
        }


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _hetu_ok(m: re.Match[str]) -> bool:
    date, _, serial, check = m.groups()
    day, month = int(date[:2]), int(date[2:4])
    if not (1 <= day <= 31 and 1 <= month <= 12):
        return False
    return _HETU_CHECK[int(date + serial) % 31] == check


def _digit_windows(text: str) -> list[tuple[int, int]]:
    """Where the digit-shaped kinds can be: runs of 8+ digits (1-2 separators between), 2 characters of
    context before (a ``+`` or ``(``), 3 after (a check letter and what follows it). One scan
    instead of one per kind: re's per-position cost dominates on a large body."""
    out: list[tuple[int, int]] = []
    for m in _DIGIT_RUN.finditer(text):
        a, b = max(0, m.start() - 2), min(len(text), m.end() + 3)
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _emails(text: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    at = text.find("@")
    while at > 0:
        start = at
        while start > 0 and at - start <= 64 and text[start - 1] in _LOCAL:
            start -= 1
        if start < at and _EMAIL.match(text, start):
            out.append(("email", start))
        at = text.find("@", at + 1)
    return out


def _found(text: str) -> list[tuple[str, int]]:
    out = _emails(text)
    out += [("iban", m.start()) for m in _IBAN.finditer(text) if _iban_ok(m.group())]
    for a, b in _digit_windows(text):  # lookbehind sees before ``a``; the window ends past ``b``
        out += [("phone", m.start()) for m in _E164.finditer(text, a, b)]
        out += [("phone", m.start()) for m in _NANP.finditer(text, a, b)]
        out += [("us-ssn", m.start()) for m in _SSN.finditer(text, a, b)]
        for m in _DNI.finditer(text, a, b):
            digits, letter = m.group()[:8], m.group()[-1]
            if _DNI_LETTERS[int(digits) % 23] == letter:
                out.append(("es-dni", m.start()))
        out += [("fi-hetu", m.start()) for m in _HETU.finditer(text, a, b) if _hetu_ok(m)]
        for m in _CARD.finditer(text, a, b):
            digits = re.sub(r"[ -]", "", m.group())
            if 13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) and luhn(digits):
                out.append(("card", m.start()))
    cards = {o for k, o in out if k == "card"}
    # a card number is not also a phone number or a secret (a 16-digit run has neither's shape,
    # but E.164 and the entropy rule may see one inside it)
    out = [(k, o) for k, o in out if not (k == "phone" and o + 1 in cards)]
    out += [
        ("secret", o)
        for label, o in secretscan.find(text)
        if o not in cards and not (label == "hex run" and _DIGEST_LABEL.search(text, max(0, o - 8), o))
    ]
    return out


def classify(body: bytes) -> Verdict:
    """The verdict over a request body (any bytes; a body that is not text has no findings)."""
    found = sorted(set(_found(body.decode("latin-1"))), key=lambda x: (x[1], x[0]))
    level = max((LEVELS.index(SENSITIVITY[k]) for k, _ in found), default=0)
    return Verdict(LEVELS[level], tuple(found[:MAX_FINDINGS]))
