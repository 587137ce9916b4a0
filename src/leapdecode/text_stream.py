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
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, tokens: list[int]) -> int:
        """Add committed tokens; return how many were taken (fewer when a stop string ended the text)."""
        if not self.stops:
            self.ids.extend(tokens)
            self.text = self._decode()
            return len(tokens)
        for taken, token in enumerate(tokens, start=1):
            self.ids.append(token)
            self.text = self._decode()
            hits = [h for h in (self.text.find(s) for s in self.stops) if h >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return taken
        return len(tokens)

    def delta(self, final: bool = False) -> str:
        """The text not yet emitted that is safe to emit now."""
        end = len(self.text)
        if not final and not self.stopped:
            end -= self.holdback
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece
