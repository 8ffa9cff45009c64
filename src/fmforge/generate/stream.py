"""Generated token ids -> text deltas, holding back split characters and stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """Turn generated token ids into text deltas.

    A delta never ends inside a UTF-8 character (byte-level tokens can split one: the decoder then
    shows U+FFFD, which is held back until the next token completes the character), and never
    shows a stop string or a tail that could still grow into one. After a stop string, `stopped`
    is True and the text before it has been emitted.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.text = ""  # decoded text of the committed tokens
        self.pending: list[int] = []  # tokens whose text may still end mid-character
        self.emitted = 0  # characters of text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now final (possibly "")."""
        if self.stopped:
            return ""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if not piece.endswith("\ufffd"):
            self.text += piece
            self.pending.clear()
            piece = ""
        full = self.text + piece
        for stop in self.stop:
            # Anything before `emitted` held no stop string, so search only from there.
            index = full.find(stop, max(self.emitted - len(stop) + 1, 0))
            if index != -1:
                self.stopped = True
                self.text, self.pending = full[:index], []
                return self._emit(index)
        safe = len(self.text)  # the undecodable tail (piece) is never safe
        safe -= self._stop_prefix_length(self.text)
        return self._emit(max(safe, self.emitted))

    def finish(self) -> str:
        """Return whatever is still held back (generation ended without a stop string)."""
        if self.stopped:
            return ""
        if self.pending:
            self.text += self.tokenizer.decode(self.pending, skip_special_tokens=True)
            self.pending.clear()
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        delta = self.text[self.emitted : end]
        self.emitted = max(end, self.emitted)
        return delta

    def _stop_prefix_length(self, text: str) -> int:
        # The longest tail of `text` that is a proper prefix of some stop string.
        best = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
