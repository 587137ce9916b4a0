"""Incremental detokenization with stop strings: turns committed token ids into text deltas.

Text is always the decoding of all new ids so far, so the streamed pieces add up to the final text.
Text that could be the start of a stop string, or an incomplete UTF-8 character, is held back.
"""
from __future__ import annotations


class TextAssembler:
    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stop_strings if s)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self._text = ""
        self._decoded = 0  # how many of `ids` `_text` covers; without stop strings decoding waits until read
        self.emitted = 0
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    @property
    def text(self) -> str:
        if not self.stopped and self._decoded != len(self.ids):
            self._text, self._decoded = self._decode(), len(self.ids)
        return self._text

    def push(self, tokens: list[int]) -> int:
        """Add committed tokens; return how many were taken (fewer when a stop string ended the text)."""
        if not self.stops:
            self.ids.extend(tokens)
            return len(tokens)
        for taken, token in enumerate(tokens, start=1):
            self.ids.append(token)
            text = self.text
            hits = [h for h in (text.find(s) for s in self.stops) if h >= 0]
            if hits:
                self._text = text[: min(hits)]
                self.stopped = True
                return taken
        return len(tokens)

    def delta(self, final: bool = False) -> str:
        """The text not yet emitted that is safe to emit now."""
        text = self.text
        end = len(text)
        if not final and not self.stopped:
            end -= self.holdback
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.emitted:
            return ""
        piece = text[self.emitted : end]
        self.emitted = end
        return piece
