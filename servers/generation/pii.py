"""PII masking for questions before they leave the service (to a provider, to retrieval,
into logs and traces). Each detected value becomes a numbered placeholder such as
`[EMAIL_1]`; the masks (kind and placeholder, never the value) are reported to the caller.

Detected: e-mail addresses, IBANs (mod-97 checked), payment card numbers (Luhn checked),
US social security numbers, phone numbers (7+ digits in the usual international or
national notations). Order matters: the stricter patterns run first so that a card number
is not taken for a phone number.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?\b")
CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]?\d{2,4}){1,4}(?![\w])")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(value: str) -> bool:
    compact = value.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _card(value: str) -> bool:
    digits = re.sub(r"\D", "", value)
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _phone(value: str) -> bool:
    digits = re.sub(r"\D", "", value)
    # Years, section numbers and amounts are short; a phone number has at least 7 digits
    # and is written with a separator or a leading +.
    return 7 <= len(digits) <= 15 and (value.startswith("+") or bool(re.search(r"[\s.()-]", value)))


RULES: tuple[tuple[str, re.Pattern[str], Callable[[str], bool]], ...] = (
    ("EMAIL", EMAIL, lambda _v: True),
    ("IBAN", IBAN, iban_ok),
    ("SSN", SSN, lambda _v: True),
    ("CARD", CARD, _card),
    ("PHONE", PHONE, _phone),
)


@dataclass(frozen=True)
class Mask:
    kind: str
    placeholder: str


@dataclass
class Masked:
    text: str
    masks: list[Mask] = field(default_factory=list)


def mask(text: str) -> Masked:
    """`text` with every detected PII value replaced by a placeholder. The same value
    twice gets the same placeholder."""
    masks: list[Mask] = []
    seen: dict[tuple[str, str], str] = {}
    counts: dict[str, int] = {}
    for kind, pattern, valid in RULES:
        def replace(match: re.Match[str], kind: str = kind, valid: Callable[[str], bool] = valid) -> str:
            value = match.group(0)
            if not valid(value):
                return value
            key = (kind, value)
            if key not in seen:
                counts[kind] = counts.get(kind, 0) + 1
                seen[key] = f"[{kind}_{counts[kind]}]"
                masks.append(Mask(kind=kind, placeholder=seen[key]))
            return seen[key]

        text = pattern.sub(replace, text)
    return Masked(text=text, masks=masks)
