"""Language id on the chatterbot corpus: >= 95% accurate over its languages, Korean recall >= 99%,
with the network blocked (the model ships inside py3langid's wheel)."""

from __future__ import annotations

import importlib.util
import socket
from collections import Counter
from pathlib import Path

import pytest
import yaml

from fmforge.data import langid

# chatterbot directory -> ISO 639-1. Hinglish (Hindi in Latin script, mixed with English) has no
# language code of its own, so it is left out.
CODES = {
    "bengali": "bn", "chinese": "zh", "dutch": "nl", "english": "en", "french": "fr",
    "german": "de", "hebrew": "he", "hindi": "hi", "indonesian": "id", "italian": "it",
    "japanese": "ja", "korean": "ko", "marathi": "mr", "oriya": "or", "persian": "fa",
    "portuguese": "pt", "russian": "ru", "spanish": "es", "swedish": "sv", "tamil": "ta",
    "telugu": "te", "thai": "th", "traditionalchinese": "zh", "turkish": "tr",
    "ukrainian": "uk", "urdu": "ur", "yoruba": "yo",
}  # fmt: skip


def _samples() -> list[tuple[str, str]]:
    """Return (expected code, text): consecutive turns joined until >= 100 characters."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("chatterbot-corpus is not installed: pip install chatterbot-corpus")
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    samples = []
    for directory, code in sorted(CODES.items()):
        buffer = ""
        for path in sorted((root / directory).glob("*.yml")):
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for conversation in data.get("conversations") or []:
                for turn in conversation:
                    if turn is None:
                        continue
                    buffer = f"{buffer} {turn}".strip()
                    if len(buffer) >= 100:
                        samples.append((code, buffer))
                        buffer = ""
    return samples


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    langid._identifier.cache_clear()  # load the model again, offline
    yield
    langid._identifier.cache_clear()


def test_accuracy_on_the_chatterbot_languages(no_network):
    samples = _samples()
    right, total = Counter(), Counter()
    for code, text in samples:
        total[code] += 1
        right[code] += langid.identify(text)[0] == code
    accuracy = sum(right.values()) / len(samples)
    per_language = {code: round(right[code] / total[code], 3) for code in sorted(total)}
    print(f"accuracy={accuracy:.4f} over {len(samples)} samples; {per_language}")
    assert len(total) >= 25 and len(samples) >= 4000
    assert accuracy >= 0.95
    assert right["ko"] / total["ko"] >= 0.99


def test_profile_languages_are_known():
    known = set(langid.languages())
    assert {code for code in langid.PROFILE_LANGUAGE.values() if code} <= known
    code, probability = langid.identify("이 문장은 한국어로 쓰였습니다. 날씨가 좋네요.")
    assert code == "ko" and 0.5 < probability <= 1.0
