"""PII masking: what is masked, what is left alone."""

from __future__ import annotations

import pytest

from servers.generation.pii import iban_ok, luhn_ok, mask


@pytest.mark.parametrize(("text", "kinds"), [
    ("write to jane.doe@example.com", ["EMAIL"]),
    ("call +44 20 7946 0958 or (555) 123-4567", ["PHONE", "PHONE"]),
    ("card 4111 1111 1111 1111 expires soon", ["CARD"]),
    ("card 4111-1111-1111-1111", ["CARD"]),
    ("IBAN GB82 WEST 1234 5698 7654 32", ["IBAN"]),
    ("IBAN DE89370400440532013000", ["IBAN"]),
    ("SSN 123-45-6789", ["SSN"]),
])
def test_masks_each_kind(text: str, kinds: list[str]) -> None:
    masked = mask(text)
    assert sorted(m.kind for m in masked.masks) == sorted(kinds)
    assert all(m.placeholder in masked.text for m in masked.masks)


@pytest.mark.parametrize("text", [
    "Article 17(1) GDPR 2016/679 applies from 2018",
    "Keep records for 5 years under section 4.2.1",
    "card 4111 1111 1111 1112 fails the Luhn check",  # not a card number
])
def test_leaves_ordinary_text_alone(text: str) -> None:
    assert mask(text).masks == [] and mask(text).text == text


def test_failed_checks_are_not_reported_as_that_kind() -> None:
    # Digit runs that fail a kind's check may still be masked as phone-like numbers: the
    # masker errs on the side of masking.
    assert "IBAN" not in {m.kind for m in mask("IBAN GB00 WEST 1234 5698 7654 32 has a bad check").masks}
    assert "SSN" not in {m.kind for m in mask("SSN 000-12-3456 is not a valid number").masks}


def test_same_value_same_placeholder_and_values_never_reported() -> None:
    masked = mask("a@b.io wrote to c@d.io and a@b.io again")
    assert masked.text == "[EMAIL_1] wrote to [EMAIL_2] and [EMAIL_1] again"
    assert "a@b.io" not in repr(masked.masks)


def test_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")
