"""Relaxed acceptance (lossy): accept a drafted token the target would not have produced exactly, when a rule
judges it good enough. Usable with every chain and tree drafter; each rule has knobs, and at zero relaxation
it is exact verification (the same tokens, the same random draws).

The walk is the exact verifiers' (greedy: `greedy.py`; sampling: `tree_sampling.py`, `kseq.py` for SpecTr's
independent drafts, a chain being a tree with one child per node), with one change at each child c of the
current node, token x, drafted from q:

- greedy: the child whose token is the target's argmax is taken first (exact); otherwise the admitted child
  with the highest target probability, where a rule admits x from the target's distribution at temperature 1,
  p = softmax(logits). The committed token after the accepted path is the target's argmax.
- sampling: one uniform draw u per child, as in exact speculative sampling; x is accepted when
  u * gamma * q(x) < p(x) (exact; gamma = 1 except in SpecTr's rule) or when the rule admits it for this u,
  reading the same p as the exact test: the target's distribution after temperature, top-k and top-p (for a
  later sibling, the residual left by the earlier ones, so a rule at zero relaxation never admits more than
  the exact test). On rejection of every child the token is drawn from the exact residual, so the only
  change is that some rejected tokens are kept.

The rules (knobs in brackets, their zero-relaxation point after "exact at"):

- `typical` (Medusa-2's typical acceptance, Cai et al. 2024) [epsilon = 0.09, delta = sqrt(epsilon)]:
  admit x when p(x) > min(epsilon, delta * exp(-H(p))), H the entropy of p. Greedy and sampling alike
  (the paper defines it for sampling; greedy reads p at temperature 1). Exact at epsilon >= 1, delta = inf.
- `lantern` (LANTERN, Jang et al. 2024) [k = 8, delta = 0.1, embeddings = input|output]: the latent
  neighbourhood A(x) of x is x and its k nearest tokens by cosine similarity of the target's input (or
  output) embeddings, taken in order of proximity while the target mass they add stays within the
  total-variation budget delta (so the relaxed target moves at most delta of mass). Sampling: accept with
  probability min(1, p(A) / (gamma q(A))) (both sides summed over the set); greedy: admit x when
  p(A(x)) > max p (x is the argmax of the relaxed target). Neighbours are computed once per needed token.
  Exact at delta = 0 or k = 0.
- `grouped` (Grouped Speculative Decoding, So et al. 2025) [tau = 0.5, max_group = 8]: the group at a node
  is formed from the target's distribution: the smallest set of its most probable tokens whose mass reaches
  tau (at least the argmax, at most max_group tokens). Greedy: admit x when it is in the group; sampling:
  a token of the group is accepted with probability min(1, p(G) / (gamma q(G))) (the group's ratio), any
  other token by the exact test. Exact at tau = 0 or max_group = 1.
"""
from __future__ import annotations

import math

import torch

from ..sampling import SamplingParams, probs_from_logits, sample
from ..tree import DraftTree
from .base import Verdict
from .distributions import draft_q, residual
from .kseq import MultiDraftTree, kseq_gamma, kseq_residual


def _mass(p: torch.Tensor, token: int) -> float:
    return float(p[token]) if 0 <= token < p.shape[-1] else 0.0


class AcceptanceRule:
    """A relaxed acceptance rule. `admits_greedy(p, x)`: p the target's distribution at temperature 1 (V,);
    `admits_sampled(p, q, x, u, gamma)`: p the target's sampling distribution at this node (or the residual
    its earlier siblings left), q the one x was drawn from, u the child's uniform draw; `node`: the drafted node's
    index in the tree. `exact`: the knobs are at zero relaxation. A rule that reads the target's final hidden
    states sets `needs_hidden`; the step gives it the pass's rows with `bind(hidden (N+1, H))` first."""

    name = "exact"
    exact = True
    needs_hidden = False

    def bind(self, hidden: torch.Tensor | None) -> None:
        pass

    def admits_greedy(self, p: torch.Tensor, token: int, node: int = -1) -> bool:
        return False

    def admits_sampled(self, p: torch.Tensor, q: torch.Tensor, token: int, u: float, gamma: float = 1.0,
                       node: int = -1) -> bool:
        return False

    def describe(self) -> str:
        return self.name


class TypicalRule(AcceptanceRule):
    name = "typical"

    def __init__(self, epsilon: float = 0.09, delta: float | None = None):
        epsilon = float(epsilon)
        delta = math.sqrt(max(epsilon, 0.0)) if delta is None else float(delta)
        if epsilon < 0 or delta < 0:
            raise ValueError(f"typical: epsilon and delta must be >= 0, got epsilon={epsilon}, delta={delta}")
        self.epsilon, self.delta = epsilon, delta
        self.exact = epsilon >= 1.0 and math.isinf(delta)

    def threshold(self, p: torch.Tensor) -> float:
        p = p.float()
        entropy = float(-(p * p.clamp_min(1e-30).log()).sum())
        scaled = self.delta * math.exp(-entropy) if not math.isinf(self.delta) else math.inf
        return min(self.epsilon, scaled)

    def admits_greedy(self, p: torch.Tensor, token: int, node: int = -1) -> bool:
        return _mass(p, token) > self.threshold(p)

    def admits_sampled(self, p, q, token, u, gamma=1.0, node=-1) -> bool:
        return _mass(p, token) > self.threshold(p)

    def describe(self) -> str:
        return f"typical(epsilon={self.epsilon:g}, delta={self.delta:g})"


class LanternRule(AcceptanceRule):
    name = "lantern"

    def __init__(self, embedding: torch.Tensor | None, k: int = 8, delta: float = 0.1):
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"lantern: k must be an integer >= 0, got {k!r}")
        if not 0.0 <= float(delta) <= 1.0:
            raise ValueError(f"lantern: delta (a total-variation budget) must be in [0, 1], got {delta}")
        self.k, self.delta = k, float(delta)
        self.exact = k == 0 or self.delta == 0.0
        self._table = embedding  # (V', H): the target's input or output embeddings
        self._norms: torch.Tensor | None = None
        self._near: dict[int, torch.Tensor] = {}  # token -> its k nearest tokens, nearest first

    def neighbours(self, token: int) -> torch.Tensor:
        """The k nearest other tokens of `token` by cosine similarity of the embeddings (computed once)."""
        near = self._near.get(token)
        if near is None:
            table = self._table
            if self.k == 0 or table is None or not 0 <= token < table.shape[0]:
                near = torch.zeros(0, dtype=torch.long)
            else:
                if self._norms is None:
                    self._norms = table.float().norm(dim=-1).clamp_min(1e-12)
                sims = (table.float() @ table[token].float()) / self._norms
                sims[token] = -math.inf
                near = torch.topk(sims, min(self.k, table.shape[0] - 1)).indices.cpu()
            self._near[token] = near
        return near

    def neighbourhood(self, p: torch.Tensor, token: int) -> torch.Tensor:
        """A(token): the token and its nearest neighbours, in order of proximity, while the target mass they
        add stays within delta."""
        near = self.neighbours(token)
        near = near[near < p.shape[-1]].to(p.device)
        added = p[near].float().cumsum(0)
        keep = near[added <= self.delta + 1e-12]  # cumsum grows: the kept ones are a prefix
        return torch.cat([torch.tensor([token], device=p.device), keep])

    def admits_greedy(self, p: torch.Tensor, token: int, node: int = -1) -> bool:
        if not 0 <= token < p.shape[-1]:
            return False
        return float(p[self.neighbourhood(p, token)].sum()) > float(p.max())

    def admits_sampled(self, p, q, token, u, gamma=1.0, node=-1) -> bool:
        if not 0 <= token < p.shape[-1]:
            return False
        group = self.neighbourhood(p, token)
        q_mass = float(q[group[group < q.shape[-1]]].sum())
        return q_mass > 0 and u * gamma * q_mass < float(p[group].sum())

    def describe(self) -> str:
        return f"lantern(k={self.k}, delta={self.delta:g})"


class GroupedRule(AcceptanceRule):
    name = "grouped"

    def __init__(self, tau: float = 0.5, max_group: int = 8):
        if not 0.0 <= float(tau) <= 1.0:
            raise ValueError(f"grouped: tau must be in [0, 1], got {tau}")
        if not isinstance(max_group, int) or isinstance(max_group, bool) or max_group < 1:
            raise ValueError(f"grouped: max_group must be an integer >= 1, got {max_group!r}")
        self.tau, self.max_group = float(tau), max_group
        self.exact = self.tau == 0.0 or max_group == 1

    def group(self, p: torch.Tensor) -> torch.Tensor:
        """The smallest set of the most probable tokens whose mass reaches tau (1 to max_group tokens)."""
        values, order = torch.topk(p.float(), min(self.max_group, p.shape[-1]))
        reached = (values.cumsum(0) >= self.tau - 1e-12).nonzero()
        size = int(reached[0]) + 1 if len(reached) else len(values)
        return order[:size]

    def admits_greedy(self, p: torch.Tensor, token: int, node: int = -1) -> bool:
        return bool((self.group(p) == token).any())

    def admits_sampled(self, p, q, token, u, gamma=1.0, node=-1) -> bool:
        group = self.group(p)
        if not bool((group == token).any()):
            return False
        q_mass = float(q[group[group < q.shape[-1]]].sum())
        return q_mass > 0 and u * gamma * q_mass < float(p[group].sum())

    def describe(self) -> str:
        return f"grouped(tau={self.tau:g}, max_group={self.max_group})"


# ----- the verifier ---------------------------------------------------------------------------------------

def verify_relaxed(tree: DraftTree, target_logits: torch.Tensor, params: SamplingParams,
                   generator: torch.Generator | None, rule: AcceptanceRule) -> Verdict:
    """target_logits: (B, N+1, V), row 0 after the root, row i+1 after node i."""
    if params.greedy:
        return _greedy(tree, target_logits, rule)
    p_all = probs_from_logits(target_logits, params)
    accepted_all, tokens_all = [], []
    for b in range(p_all.shape[0]):
        if isinstance(tree, MultiDraftTree) and tree.drafts:
            nodes, out = _kseq_walk(tree, b, p_all[b], generator, rule)
        else:
            nodes, out = _tree_walk(tree, b, p_all[b], generator, rule)
        accepted_all.append(nodes)
        tokens_all.append([int(tree.tokens[b, n]) for n in nodes] + [out])
    return Verdict(accepted_nodes=accepted_all, tokens=tokens_all)


def _greedy(tree: DraftTree, target_logits: torch.Tensor, rule: AcceptanceRule) -> Verdict:
    choice = target_logits.argmax(-1)  # (B, N+1)
    soft = target_logits.float().softmax(-1)  # what the rule reads: the target at temperature 1
    children = tree.layout.children
    accepted_all, tokens_all = [], []
    for b in range(choice.shape[0]):
        row = choice[b].tolist()
        drafted = tree.tokens[b].tolist()
        nodes, at = [], 0  # `at` indexes rows: 0 = root, i+1 = node i
        while True:
            kids = children[at]
            nxt = next((c for c in kids if drafted[c] == row[at]), None)
            if nxt is None and kids:
                p = soft[b, at]
                admitted = [c for c in kids if rule.admits_greedy(p, drafted[c], node=c)]
                if admitted:
                    nxt = max(admitted, key=lambda c: _mass(p, drafted[c]))
            if nxt is None:
                break
            nodes.append(nxt)
            at = nxt + 1
        accepted_all.append(nodes)
        tokens_all.append([drafted[n] for n in nodes] + [row[at]])
    return Verdict(accepted_nodes=accepted_all, tokens=tokens_all)


def _try(p: torch.Tensor, q: torch.Tensor, token: int, generator, rule: AcceptanceRule, gamma: float = 1.0,
         node: int = -1) -> bool:
    """One child: the exact test u * gamma * q(x) < p(x), else the rule with the same u and p."""
    u = float(torch.rand((), generator=generator))
    px, qx = _mass(p, token), _mass(q, token)
    if qx > 0 and u * gamma * qx < px:
        return True
    return rule.admits_sampled(p, q, token, u, gamma, node=node)


def _tree_walk(tree: DraftTree, b: int, p_rows: torch.Tensor, generator, rule: AcceptanceRule):
    children = tree.layout.children
    drafted = tree.tokens[b].tolist()
    nodes: list[int] = []
    at = 0
    while True:
        p = p_rows[at]
        chosen = None
        for c in children[at]:
            q = draft_q(tree, b, c, p)
            if _try(p, q, drafted[c], generator, rule, node=c):
                chosen = c
                break
            p = residual(p, q)
        if chosen is None:
            return nodes, int(sample(p, generator))
        nodes.append(chosen)
        at = chosen + 1


def _kseq_walk(tree: MultiDraftTree, b: int, p_rows: torch.Tensor, generator, rule: AcceptanceRule):
    drafted = tree.tokens[b].tolist()
    nodes: list[int] = []
    alive = list(range(len(tree.drafts)))
    depth, at = 0, 0
    while True:
        p = p_rows[at]
        tries = [tree.drafts[j][depth] for j in alive if len(tree.drafts[j]) > depth]
        if not tries:
            return nodes, int(sample(p, generator))
        q = draft_q(tree, b, tries[0], p)
        gamma = kseq_gamma(p, q, len(tries))
        chosen = next((c for c in tries if _try(p, q, drafted[c], generator, rule, gamma, node=c)), None)
        if chosen is None:
            return nodes, int(sample(kseq_residual(p, q, len(tries), gamma), generator))
        nodes.append(chosen)
        alive = [j for j in alive if len(tree.drafts[j]) > depth and tree.drafts[j][depth] == chosen]
        depth, at = depth + 1, chosen + 1


# ----- building a rule from a method's options -----------------------------------------------------------

RULES = {
    "typical": ({"epsilon": 0.09, "delta": None}, "Medusa-2 typical acceptance (Cai et al. 2024)"),
    "lantern": ({"k": 8, "delta": 0.1, "embeddings": "input"},
                "LANTERN latent-neighbourhood relaxation with a TV budget (Jang et al. 2024)"),
    "grouped": ({"tau": 0.5, "max_group": 8}, "Grouped Speculative Decoding (So et al. 2025)"),
    "judge": ({"judge": None, "threshold": 0.5},
              "Judge Decoding (Bachmann et al. 2025): a linear judge head on the target's hidden states"),
}


def make_rule(name: str, options: dict, model=None) -> AcceptanceRule:
    """The rule `name` with its knobs (`RULES[name][0]` holds them and their defaults); `model` (a transformers
    causal LM) gives lantern its embeddings."""
    if name == "typical":
        return TypicalRule(options.get("epsilon", 0.09), options.get("delta"))
    if name == "grouped":
        return GroupedRule(options.get("tau", 0.5), options.get("max_group", 8))
    if name == "lantern":
        which = options.get("embeddings", "input")
        if which not in ("input", "output"):
            raise ValueError(f"lantern: embeddings must be input or output, got {which!r}")
        table = None
        if model is not None:
            module = model.get_input_embeddings() if which == "input" else model.get_output_embeddings()
            table = module.weight.detach()
        return LanternRule(table, options.get("k", 8), options.get("delta", 0.1))
    if name == "judge":
        raise ValueError("the judge rule is built from a trained judge (catalog.relaxed)")
    raise ValueError(f"unknown acceptance rule {name!r}; rules: {', '.join(RULES)}")
