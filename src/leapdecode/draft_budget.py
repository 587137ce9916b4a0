"""Cost-aware draft width for a batch of greedy rows (lossless: it only decides how much to draft).

In a batched verification pass every row is padded to the longest draft, and on a CPU each extra token
position costs almost as much as a row of its own. Drafting pays only where the tokens it is expected to
add outweigh that cost, so each step picks one draft width `k` for the greedy rows:

    maximise   E[tokens committed] / E[step time]
    E[tokens]  = sum over rows of 1 + a_r + a_r^2 + ... + a_r^min(k, proposed_r)
    step time  = t0 + t1 * rows * (1 + k)          (fitted online from the measured steps)

where a_r is row r's estimated chance that the next drafted token is accepted (a geometric model, the
one of Leviathan et al. 2023, estimated from the row's own accept history). Greedy output does not depend
on how much is drafted, so every choice keeps it identical to plain decoding.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RowAcceptance:
    """Accept history of one row: accepted drafted tokens and rejections seen (with a weak prior)."""

    accepted: float = 1.0
    rejected: float = 1.0

    @property
    def rate(self) -> float:
        """Estimated chance that a drafted token is accepted given its predecessors were."""
        return self.accepted / (self.accepted + self.rejected)

    def update(self, proposed: int, accepted: int, decay: float = 0.9) -> None:
        if proposed <= 0:
            return
        self.accepted = decay * self.accepted + accepted
        self.rejected = decay * self.rejected + (1.0 if accepted < proposed else 0.0)


class StepCostModel:
    """Least-squares fit of step seconds = t0 + t1 * token positions, forgetting old steps."""

    def __init__(self, forget: float = 0.98, prior_ratio: float = 0.3):
        self.forget = forget
        self.prior_ratio = prior_ratio  # t1 / t0 until the steps seen vary enough to fit
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def observe(self, positions: int, seconds: float) -> None:
        f = self.forget
        self.n, self.sx, self.sy = f * self.n + 1, f * self.sx + positions, f * self.sy + seconds
        self.sxx, self.sxy = f * self.sxx + positions * positions, f * self.sxy + positions * seconds

    def coefficients(self) -> tuple[float, float]:
        """(t0, t1); only their ratio matters to the choice of width."""
        if self.n >= 4:
            mean_x, mean_y = self.sx / self.n, self.sy / self.n
            var = self.sxx / self.n - mean_x * mean_x
            if var > 0.2:  # positions varied enough to separate the two terms
                t1 = (self.sxy / self.n - mean_x * mean_y) / var
                t0 = mean_y - t1 * mean_x
                if t1 > 0 and t0 > 0:
                    return t0, t1
                if t1 > 0:  # no fixed cost visible: positions are all that count
                    return 1e-3 * t1, t1
                return 1.0, 0.0  # extra positions looked free
        return 1.0, self.prior_ratio


def choose_width(rates: list[float], proposed: list[int], rows: int, cost: tuple[float, float],
                 fixed_width: int = 0) -> int:
    """The draft width in [0, max(proposed)] with the most expected tokens per second for the greedy rows
    (`rates`, `proposed`), in a batch of `rows` rows whose other rows already need `fixed_width`."""
    t0, t1 = cost
    best_k, best = 0, -1.0
    for k in range(max(proposed, default=0) + 1):
        tokens = 0.0
        for a, n in zip(rates, proposed):
            term, gain = 1.0, 1.0
            for _ in range(min(k, n)):
                term *= a
                gain += term
            tokens += gain
        seconds = t0 + t1 * rows * (1 + max(k, fixed_width))
        if tokens / seconds > best * (1 + 1e-9):
            best_k, best = k, tokens / seconds
    return best_k
