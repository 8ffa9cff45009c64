"""Language identification with py3langid, whose model ships inside its wheel (nothing downloads).

`identify(text)` returns (ISO 639-1 code, probability). The model (Lui & Baldwin 2012, langid.py,
97 languages, naive Bayes over byte n-grams) is loaded once per process on first use.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from fmforge.errors import UserError

PROFILE_LANGUAGE = {"en": "en", "ko": "ko", "code": None}  # None: no language check
MAX_CHARS = 1000  # the head of a document decides its language; longer adds time, not accuracy


@lru_cache(maxsize=1)
def _identifier() -> Any:
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise UserError("language id needs py3langid: pip install py3langid") from None
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str) -> tuple[str, float]:
    """Return (language code, probability) of the first MAX_CHARS characters of `text`."""
    language, probability = _identifier().classify(text[:MAX_CHARS])
    return str(language), float(probability)


def languages() -> list[str]:
    """Return the language codes the model knows."""
    return sorted(_identifier().nb_classes)
