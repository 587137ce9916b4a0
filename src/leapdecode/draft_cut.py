"""The width policy: how much of each greedy draft the target verifies (lossless: greedy output does not
depend on it). One `DraftCut` serves a `Decoder` (one sequence) or a batch engine (many).

A verification pass over more tokens costs more: unevenly on a CPU (SmolLM2-135M on two cores, after a
300-token prompt: 1 token 32.5 ms, 3 tokens 39.4, 4 tokens 50.8, 17 tokens about 69), and almost nothing
more on a GPU. So each step the engine keeps the first n nodes of the drafter's tree (a prefix in node
order is itself a tree: parents come before their children) for the n with the most expected tokens per
second:

    E[tokens](n) = 1 + sum over the kept nodes j of P(j accepted),
                   P(j accepted) = product over j's path of a(depth, rank)
    seconds(n)   = the measured time of a pass over n + 1 positions, plus the step's drafting time

a(depth, rank) is the chance that a node is accepted when its parent is, by depth and sibling rank (the
geometric model of Leviathan et al. 2023, per tree slot as in Sequoia's and EAGLE-2's tree shapes), kept
apart per drafter label (`DraftTree.label`; pld: the matched n-gram's length) and by whether the previous
step's draft matched (copying comes in runs), and learnt from every step's outcome, also for the nodes that
were cut: the token the target committed after a node's parent says whether the node would have matched.
Pass times are a running mean per width; a width not yet measured is interpolated between measured ones and
assumed no dearer than the widest one measured (nor any width dearer than a wider one), and a short ladder
of widths is tried at steps after a missed draft (once, then again every 64 such steps), so that the small
ones are measured too.

In a batch of B sequences, one n is chosen for the pass: each cuttable draft keeps its first min(n, size)
nodes, E[tokens](n) sums over the sequences (each its own accept rates, a `DraftHistory`), and seconds(n) is
the measured time of a pass over B x (1 + max(n, the widest uncut draft)) positions, the padded batch the
target really computes. A single sequence is the batch of one, where this is the rule above.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .tree import DraftTree

_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # widths (root + nodes) measured once each
_REMEASURE = 64  # ... and again after this many steps that follow a missed draft


@dataclass
class AcceptRates:
    """a(slot): decayed hits / tries per slot, with an optimistic prior (0.8 in 2 tries): a slot not yet
    seen is kept, and so learnt, rather than cut and never seen."""

    decay: float = 0.98
    hits: dict[tuple, float] = field(default_factory=dict)
    tries: dict[tuple, float] = field(default_factory=dict)

    def rate(self, slot: tuple) -> float:
        return (1.6 + self.hits.get(slot, 0.0)) / (2.0 + self.tries.get(slot, 0.0))

    def observe(self, slot: tuple, hit: bool) -> None:
        self.hits[slot] = self.decay * self.hits.get(slot, 0.0) + float(hit)
        self.tries[slot] = self.decay * self.tries.get(slot, 0.0) + 1.0


@dataclass
class PassCosts:
    """Running mean of a pass's seconds per width (positions fed: the root plus the kept nodes)."""

    weight: float = 0.2
    seconds: dict[int, float] = field(default_factory=dict)

    def observe(self, width: int, seconds: float) -> None:
        old = self.seconds.get(width)
        self.seconds[width] = seconds if old is None else (1 - self.weight) * old + self.weight * seconds

    def estimate(self, width: int) -> float | None:
        """Seconds for a pass over `width` positions: never more than a measured wider pass (a stale or
        unlucky reading of a narrow width does not price it out), interpolated between measured widths."""
        wider = [self.seconds[w] for w in self.seconds if w >= width]
        cap = min(wider) if wider else None
        if width in self.seconds:
            return min(self.seconds[width], cap)
        below = max((w for w in self.seconds if w < width), default=None)
        above = min((w for w in self.seconds if w > width), default=None)
        if below is None and above is None:
            return None
        if above is None:
            return self.seconds[below]
        if below is None:
            return cap
        t = (width - below) / (above - below)
        return min((1 - t) * self.seconds[below] + t * self.seconds[above], cap)


def _slots(tree: DraftTree, hot: bool) -> list[tuple[int, bool, int, int]]:
    """Each node's slot: the drafter's label for the draft, whether the previous draft matched (`hot`), the
    node's depth (1 for the root's children) and its sibling rank (0 for a first child), both capped."""
    layout = tree.layout
    depths = layout.depths.tolist()
    slots = [(tree.label, hot, 0, 0)] * tree.size
    for kids in layout.children:
        for rank, c in enumerate(kids):
            slots[c] = (tree.label, hot, min(depths[c + 1], 32), min(rank, 8))
    return slots


@dataclass
class DraftHistory:
    """What the cut learns from one sequence's drafts: accept rates per slot (`rates`, which the sequences of
    one method may share) and whether its last draft matched at least its first token (`hot`)."""

    rates: AcceptRates = field(default_factory=AcceptRates)
    hot: bool = False

    def reach(self, tree: DraftTree) -> list[float]:
        """Each node's chance of being accepted: the product of the slot rates along its path."""
        slots, parents = _slots(tree, self.hot), tree.parents
        reach: list[float] = []
        for n in range(tree.size):
            reach.append((1.0 if parents[n] == -1 else reach[parents[n]]) * self.rates.rate(slots[n]))
        return reach

    def observe(self, proposed: DraftTree, committed: list[int]) -> None:
        """`proposed`: the drafter's whole tree (before any cut); `committed`: the accepted tokens plus the
        target's own (the target's next token after the root and after each accepted node)."""
        if proposed.size == 0:
            self.hot = False
            return
        slots, self.hot = _slots(proposed, self.hot), False
        tokens = proposed.tokens[0].tolist()
        layout = proposed.layout
        at, depth = 0, 0  # walk the committed path through the whole proposal, cut nodes included
        while depth < len(committed):
            hit = None
            for c in layout.children[at]:
                match = hit is None and tokens[c] == committed[depth]
                self.rates.observe(slots[c], match)
                if match:
                    hit = c
            if hit is None:
                return
            self.hot = True
            at, depth = hit + 1, depth + 1


class DraftCut:
    """Chooses how many of the drafts' nodes a pass verifies, from pass times it measures."""

    def __init__(self) -> None:
        self.costs = PassCosts()
        self.overhead: float | None = None  # running mean of a step's seconds outside the pass (drafting)
        self.fresh: set[int] = set()  # widths (positions) measured since the ladder last started
        self.cold_steps = 0

    def choose(self, trees: list[DraftTree], histories: list[DraftHistory], rows: int = 1, fixed: int = 0) -> int:
        """The number n of leading nodes each of `trees` keeps (all of them until pass times are known), in a
        pass over `rows` sequences whose other drafts (not cut) have up to `fixed` nodes."""
        n_all = max(tree.size for tree in trees)

        def positions(n: int) -> int:
            return rows * (1 + max(n, fixed))

        if not any(h.hot for h in histories):  # measure the ladder's small widths where drafts pay least anyway
            self.cold_steps += 1
            if self.cold_steps % _REMEASURE == 0:  # and again now and then: widths seldom kept go stale
                self.fresh.clear()
            unmeasured = [w - 1 for w in _LADDER if w - 1 <= n_all and positions(w - 1) not in self.fresh]
            if unmeasured:
                return unmeasured[0]
        reach = [h.reach(tree) for tree, h in zip(trees, histories)]
        gain, best_n, best = float(rows), 0, -1.0  # every sequence commits the target's own token
        for n in range(n_all + 1):
            seconds = self.costs.estimate(positions(n))
            if seconds is None:
                return n_all
            seconds += self.overhead or 0.0
            if gain / seconds > best * (1 + 1e-9):
                best_n, best = n, gain / seconds
            gain += sum(r[n] for r in reach if n < len(r))
        return best_n

    def observe(self, positions: int, seconds: float, overhead: float) -> None:
        """`positions`: tokens the pass fed (rows x width); `seconds`: the pass and its verification;
        `overhead`: the step's other seconds (drafting)."""
        self.costs.observe(positions, seconds)
        self.fresh.add(positions)
        self.overhead = overhead if self.overhead is None else 0.8 * self.overhead + 0.2 * overhead
