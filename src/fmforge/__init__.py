"""fmforge: raw text to a deployed foundation model that keeps improving from its own use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fmforge.api import LoadedEncoder, LoadedModel


def load(model: str, **kwargs: Any) -> LoadedModel | LoadedEncoder:
    """Load a model dir or built-in name: a decoder (.generate/.chat) or encoder (.embed/.fill)."""
    from fmforge.api import load as _load

    return _load(model, **kwargs)


__all__ = ["__version__", "load"]
