"""Per-call statistics and the result record of a generation."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    """Counts for one generation call. `accept_lengths[i]` = tokens committed by target pass i
    (accepted draft tokens + the target's own token), so plain decoding has all ones."""

    method: str = "ar"
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forward_passes: int = 0  # decode passes; the prefill pass is not counted
    draft_forward_passes: int = 0
    drafted_tokens: int = 0  # tree nodes proposed, summed over passes
    accept_lengths: list[int] = field(default_factory=list)
    prefill_time: float = 0.0  # seconds
    wall_time: float = 0.0  # seconds, prefill included, tokenization excluded
    stop_reason: str = ""  # "eos", "max_new_tokens", "stop_string", "context"

    @property
    def mean_accepted(self) -> float:
        """Mean tokens committed per target pass (Spec-Bench's "mean accepted tokens")."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0

    @property
    def acceptance_histogram(self) -> dict[int, int]:
        """How many target passes accepted 0, 1, 2, ... draft tokens."""
        return dict(sorted(Counter(n - 1 for n in self.accept_lengths).items()))

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens over drafted tokens."""
        accepted = sum(self.accept_lengths) - len(self.accept_lengths)
        return accepted / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "target_forward_passes": self.target_forward_passes,
            "draft_forward_passes": self.draft_forward_passes,
            "drafted_tokens": self.drafted_tokens,
            "mean_accepted": self.mean_accepted,
            "acceptance_rate": self.acceptance_rate,
            "acceptance_histogram": self.acceptance_histogram,
            "accept_lengths": list(self.accept_lengths),
            "prefill_time": self.prefill_time,
            "wall_time": self.wall_time,
            "tokens_per_s": self.tokens_per_s,
            "stop_reason": self.stop_reason,
        }


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only (an EOS that ended generation is included)
    prompt_ids: list[int]
    stats: GenerationStats
