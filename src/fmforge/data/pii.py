"""Personal data scrubbing: find PII spans and replace them with typed placeholders.

Kinds and how each is recognised (a candidate must pass its check, not only its pattern):

| placeholder | what | check |
|---|---|---|
| `<EMAIL>` | e-mail address | local@domain.tld pattern |
| `<IP_ADDRESS>` | IPv4 / IPv6 | parses; public (global) unless `public_ip_only=False` |
| `<CREDIT_CARD>` | payment card, 13-19 digits, spaces/hyphens | issuer prefix and Luhn |
| `<KR_RRN>` | Korean resident registration number YYMMDD-GNNNNNN | valid date, G in 1-4, 9, 0 |
| `<KR_FRN>` | Korean foreigner registration number | valid date, G in 5-8 |
| `<KR_PHONE>` | Korean phone: mobile 01X, Seoul 02, area 0XX, 070, +82 | prefix and digit counts |

Registration numbers are never checked against the old checksum: numbers issued since October
2020 end in random digits. Placeholders match none of the patterns, so scrubbing scrubbed text
is a no-op.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import date

PLACEHOLDERS = ("<EMAIL>", "<IP_ADDRESS>", "<CREDIT_CARD>", "<KR_RRN>", "<KR_FRN>", "<KR_PHONE>")

_EMAIL = re.compile(
    r"(?<![\w.+'-])[A-Za-z0-9][A-Za-z0-9._%+'-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}"
    r"(?![A-Za-z0-9-])"
)
# No digit, dot or letter on either side, so version strings (v1.2.3.4, 1.2.3.4.5) never match.
_IPV4 = re.compile(r"(?<![A-Za-z0-9_.])(?:\d{1,3}\.){3}\d{1,3}(?![A-Za-z0-9_]|\.\d)")
_IPV6 = re.compile(
    r"(?<![A-Za-z0-9_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![A-Za-z0-9_:])"
)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_RRN = re.compile(r"(?<![\d-])(\d{2})(\d{2})(\d{2})[ -]?([0-9])\d{6}(?![\d-])")
# Korean phones: +82 (0)?X... or 0X...; groups by '-', '.', ' ' or nothing.
_PHONE = re.compile(
    r"(?<![A-Za-z0-9_+])(?:\+82[ .-]?\(?0?\)?[ .-]?|0)"
    r"(?:1[016789][ .-]?\d{3,4}|2[ .-]?\d{3,4}|[3-6][1-5][ .-]?\d{3,4}|70[ .-]?\d{4})"
    r"[ .-]?\d{4}(?!\d)"
)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_prefix(digits: str) -> bool:
    n = len(digits)
    two, four = int(digits[:2]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return n == 16  # Mastercard
    if two in (34, 37):
        return n == 15  # American Express
    if digits.startswith(("6011", "65")) or 644 <= int(digits[:3]) <= 649:
        return 16 <= n <= 19  # Discover
    if 3528 <= four <= 3589:
        return 16 <= n <= 19  # JCB
    if two == 62:
        return 16 <= n <= 19  # UnionPay
    if two == 36 or 300 <= int(digits[:3]) <= 305 or two == 38:
        return n == 14  # Diners Club
    return False


def _valid_date(yy: str, mm: str, dd: str, gender: str) -> bool:
    century = {"9": 1800, "0": 1800, "1": 1900, "2": 1900, "5": 1900, "6": 1900,
               "3": 2000, "4": 2000, "7": 2000, "8": 2000}.get(gender)  # fmt: skip
    if century is None:
        return False
    try:
        date(century + int(yy), int(mm), int(dd))
    except ValueError:
        return False
    return True


def _is_public(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_global
    except ValueError:
        return False


def find_pii(text: str, public_ip_only: bool = True) -> list[tuple[int, int, str]]:
    """Return non-overlapping (start, end, placeholder) spans of personal data, by position."""
    spans: list[tuple[int, int, str]] = []

    def free(start: int, end: int) -> bool:
        return all(end <= s or start >= e for s, e, _ in spans)

    for m in _EMAIL.finditer(text):
        spans.append((m.start(), m.end(), "<EMAIL>"))
    for m in _RRN.finditer(text):
        if "-" in m.group(0) or " " in m.group(0):  # with a separator: the format is enough
            if _valid_date(*m.group(1, 2, 3, 4)) and free(m.start(), m.end()):
                kind = "<KR_FRN>" if m.group(4) in "5678" else "<KR_RRN>"
                spans.append((m.start(), m.end(), kind))
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group(0))
        if _card_prefix(digits) and _luhn(digits) and free(m.start(), m.end()):
            spans.append((m.start(), m.end(), "<CREDIT_CARD>"))
    for m in _RRN.finditer(text):
        if _valid_date(*m.group(1, 2, 3, 4)) and free(m.start(), m.end()):
            kind = "<KR_FRN>" if m.group(4) in "5678" else "<KR_RRN>"
            spans.append((m.start(), m.end(), kind))
    for m in _PHONE.finditer(text):
        if free(m.start(), m.end()):
            spans.append((m.start(), m.end(), "<KR_PHONE>"))
    for pattern in (_IPV4, _IPV6):
        for m in pattern.finditer(text):
            candidate = m.group(0)
            if pattern is _IPV6 and candidate.count(":") < 2 or not _looks_ipv6(candidate, pattern):
                continue
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                continue
            if (not public_ip_only or _is_public(candidate)) and free(m.start(), m.end()):
                spans.append((m.start(), m.end(), "<IP_ADDRESS>"))
    return sorted(spans)


def _looks_ipv6(candidate: str, pattern: re.Pattern) -> bool:
    # Code such as `std::map` or `a::b` parses as IPv6 only by accident: demand four hex groups,
    # or a compressed address with a group of two or more digits.
    if pattern is not _IPV6:
        return True
    groups = [g for g in candidate.split(":") if g]
    if len(groups) >= 4:
        return True
    return "::" in candidate and any(sum(c.isdigit() for c in g) >= 2 for g in groups)


def scrub(text: str, public_ip_only: bool = True) -> tuple[str, dict[str, int]]:
    """Return `text` with PII replaced by placeholders, and the count of spans per placeholder."""
    spans = find_pii(text, public_ip_only)
    if not spans:
        return text, {}
    counts: dict[str, int] = {}
    pieces, last = [], 0
    for start, end, kind in spans:
        pieces.append(text[last:start])
        pieces.append(kind)
        counts[kind] = counts.get(kind, 0) + 1
        last = end
    pieces.append(text[last:])
    return "".join(pieces), counts
