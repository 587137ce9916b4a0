"""The caller's side of a request in the batch engine: its handle (cancel, wait, result) and its updates."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from ..stats import GenerationResult
from ..step import GenerationSettings


@dataclass
class SequenceUpdate:
    """What one step produced for one request. `result` is set on the last update (or `error`)."""

    text: str = ""  # new text, safe to show (stop strings cut, incomplete characters held back)
    token_ids: list[int] = field(default_factory=list)  # new committed tokens (after stop cuts)
    finished: bool = False
    result: GenerationResult | None = None
    error: str | None = None


class SequenceHandle:
    """The caller's side of a submitted request: cancel it, wait for it, read its result."""

    def __init__(self, request_id: int, on_update: Callable[[SequenceUpdate], None] | None):
        self.id = request_id
        self.on_update = on_update
        self.result: GenerationResult | None = None
        self.error: str | None = None
        self.done = threading.Event()
        self.cancelled = False

    def cancel(self) -> None:
        """Free the slot at the next step boundary."""
        self.cancelled = True

    def _emit(self, update: SequenceUpdate) -> None:
        if update.finished:
            self.result, self.error = update.result, update.error
        if self.on_update is not None:
            try:
                self.on_update(update)
            except Exception:  # a broken receiver must not break the batch: drop this request instead
                self.cancelled = True
        if update.finished:
            self.done.set()


@dataclass
class Pending:
    """A submitted request waiting for a slot in the batch."""

    handle: SequenceHandle
    prompt_ids: list[int]
    method: str
    settings: GenerationSettings
