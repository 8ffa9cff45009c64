"""PII scrubbing: a fixed list of >= 200 items in Korean and English sentences leaks nothing; a
guard list of look-alikes gets no replacement; scrubbing twice is a no-op."""

from __future__ import annotations

import random
import re

import pytest

from fmforge.data import pii


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    for check in "0123456789":
        if pii._luhn(body + check):
            return body + check
    raise AssertionError


def _group(digits: str, sizes: tuple[int, ...], sep: str) -> str:
    out, pos = [], 0
    for size in sizes:
        out.append(digits[pos : pos + size])
        pos += size
    return sep.join(out)


def _items() -> list[tuple[str, str]]:
    """Return (value, placeholder) pairs: every kind, with and without separators."""
    rng = random.Random(2024)
    items: list[tuple[str, str]] = []
    for user, host in [("kim.minsu", "naver.com"), ("j.doe+news", "example.co.uk"),
                       ("lee_0423", "daum.net"), ("admin", "mail.korea.ac.kr"),
                       ("first.last", "gmail.com"), ("x", "sub.domain.io"),
                       ("park-jy", "kakao.com"), ("o'brien", "company.org"),
                       ("support", "fmforge.dev"), ("a1b2c3", "univ.edu")]:  # fmt: skip
        items.append((f"{user}@{host}", "<EMAIL>"))
    for i in range(20):
        user = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10)))
        host = rng.choice(["naver.com", "hanmail.net", "outlook.com", "ex-ample.ai", "x.co.kr"])
        items.append((f"{user}{i}@{host}", "<EMAIL>"))
    for _ in range(30):
        octets = [rng.choice([8, 23, 51, 77, 104, 142, 185, 203, 211]), *rng.sample(range(256), 3)]
        items.append((".".join(map(str, octets)), "<IP_ADDRESS>"))
    for v6 in ["2001:4860:4860::8888", "2606:4700:4700::1111", "2a00:1450:4001:81b::200e",
               "2001:db8::1".replace("db8", "4860"), "2400:cb00:2048:1:0:0:6ca2:c665",
               "2620:fe::fe", "2001:67c:2e8:22::c100:68b"]:  # fmt: skip
        items.append((v6, "<IP_ADDRESS>"))
    cards = [("4", 16, (4, 4, 4, 4)), ("51", 16, (4, 4, 4, 4)), ("2221", 16, (4, 4, 4, 4)),
             ("37", 15, (4, 6, 5)), ("6011", 16, (4, 4, 4, 4)), ("35", 16, (4, 4, 4, 4)),
             ("62", 16, (4, 4, 4, 4)), ("4", 13, (4, 4, 5))]  # fmt: skip
    for prefix, length, groups in cards:
        for sep in (" ", "-", ""):
            for _ in range(2):
                number = _luhn_complete(prefix if prefix != "35" else "3530", length, rng)
                items.append((_group(number, groups, sep), "<CREDIT_CARD>"))
    for gender, kind in [("1", "<KR_RRN>"), ("2", "<KR_RRN>"), ("3", "<KR_RRN>"),
                         ("4", "<KR_RRN>"), ("5", "<KR_FRN>"), ("6", "<KR_FRN>"),
                         ("7", "<KR_FRN>"), ("8", "<KR_FRN>")]:  # fmt: skip
        for sep in ("-", "", " "):
            for _ in range(2):
                yy = rng.randrange(100) if gender in "1256" else rng.randrange(0, 25)
                mm, dd = rng.randint(1, 12), rng.randint(1, 28)
                # Random trailing digits: numbers issued since Oct 2020 carry no checksum.
                tail = "".join(str(rng.randrange(10)) for _ in range(6))
                items.append((f"{yy:02d}{mm:02d}{dd:02d}{sep}{gender}{tail}", kind))
    for sep in ("-", " ", ".", ""):
        for prefix in ("010", "011", "016", "019"):
            items.append((f"{prefix}{sep}{rng.randint(200, 9999)}{sep}{rng.randint(1000, 9999)}",
                          "<KR_PHONE>"))  # fmt: skip
        for area in ("02", "031", "051", "064", "070"):
            middle = rng.randint(1000, 9999) if area == "070" else rng.randint(200, 9999)
            items.append((f"{area}{sep}{middle}{sep}{rng.randint(1000, 9999)}", "<KR_PHONE>"))
        items.append((f"+82{sep or ' '}10{sep}{rng.randint(1000, 9999)}{sep}1234", "<KR_PHONE>"))
        items.append((f"+82{sep}2{sep}{rng.randint(200, 999)}{sep}5678", "<KR_PHONE>"))
    return items


TEMPLATES = [
    "Please contact {} for details.",
    "My number is {}, call me after 6pm.",
    "연락처는 {} 입니다.",
    "{}로 연락 주세요.",
    "고객님의 정보({})가 확인되었습니다.",
    "Record: id={};",
]
ITEMS = _items()


def test_the_item_list_is_large_and_covers_every_kind():
    assert len(ITEMS) >= 200
    assert {kind for _, kind in ITEMS} == set(pii.PLACEHOLDERS)


@pytest.mark.parametrize("template", TEMPLATES)
def test_no_item_leaks(template):
    leaks = []
    for value, kind in ITEMS:
        sentence = template.format(value)
        scrubbed, counts = pii.scrub(sentence)
        digits = re.sub(r"\D", "", value)
        if value in scrubbed or (len(digits) >= 7 and digits in re.sub(r"\D", "", scrubbed)):
            leaks.append((sentence, scrubbed))
        elif counts != {kind: 1} or kind not in scrubbed:
            leaks.append((sentence, scrubbed, counts))
    assert leaks == []


GUARD = [
    "Released on 2024-03-15 at 14:30:00, see https://example.com/docs.",
    "Timestamp 20240315143000 and unix time 1710513000 in the log.",
    "Upgrade from version 1.2.3 to v10.4.1.2, or 3.11.7.",
    "The router is at 192.168.0.1 and the DNS at 10.0.0.53; localhost is 127.0.0.1.",
    "Link-local fe80::1 and loopback ::1 are private.",
    "ISBN 978-3-16-148410-0 and ISBN-10 0-306-40615-2.",
    "Card 4111 1111 1111 1112 fails the Luhn check.",
    "Order number 1234567890123 shipped.",
    "Invalid date 991332-1234567 is not a registration number.",
    "February 30th: 900230-1234567 is no registration number.",
    "Price 12,345,678원, pages 010-020 of the report.",
    "C++ uses std::vector and a::b scopes.",
    "Coordinates 37.5665, 126.9780 (Seoul).",
    "Phone-like 1588-1234 is a business line.",
    "2023년 10월 5일 오전 10시 30분에 회의가 있습니다.",
    "MAC address 00:1A:2B:3C:4D:5E on the switch.",
    "Serial 12-34-56-78.",
]


@pytest.mark.parametrize("sentence", GUARD)
def test_guard_list_is_untouched(sentence):
    assert pii.scrub(sentence) == (sentence, {})


def test_scrubbing_twice_is_a_no_op():
    text = " ".join(template.format(value) for template, (value, _) in zip(TEMPLATES * 50, ITEMS))
    once, counts = pii.scrub(text)
    assert sum(counts.values()) == min(len(ITEMS), len(TEMPLATES) * 50)
    assert pii.scrub(once) == (once, {})


def test_private_addresses_can_be_included():
    assert pii.scrub("host 192.168.0.1", public_ip_only=False)[0] == "host <IP_ADDRESS>"
