"""One decoding step, the same for one request (`Decoder`) and for the server's batch: a single request is a
batch of one.

```
each sequence: Drafter.propose(DraftContext) ─► DraftTree   (within its budget; None = plain decoding;
                                                              a chain is cut after its first end token)
width policy:  DraftCut.choose (greedy, cuttable drafts) ─► each keeps its first n nodes, one n per pass
Scorer.score(roots, trees) ─► logits (B, q, V)              ONE target forward pass over every row's root
                                                              and tree (engine.SequenceScorer over an
                                                              lm.CausalLM for one sequence,
                                                              batching.RaggedScorer for a ragged batch)
verify_rows: each row verifies its own nodes ─► Verdict      (greedy: on the logits' device, ids moved;
                                                              sampling: that row's logits moved to the CPU)
Scorer.commit(accepted) ─► the cache holds exactly the committed text
Drafter.update(DraftFeedback); the cut learns; stop handling and statistics per sequence
```
Invariant between steps: a sequence's cache holds every committed token but the last, which is fed again as
the root of its next draft tree. Stop handling: the committed tokens are cut at `limit` (max_new_tokens,
capped by the context) and after an end token; a stop string cuts the text (`TextAssembler`).

With `errors` (row -> message), the step isolates failures: a row whose drafter, verification or stop
handling raises is recorded there and the others go on (the batch engine then ends it); without it, errors
propagate (`Decoder`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence as Seq

import torch

from .draft_cut import DraftCut, DraftHistory
from .drafters.base import DraftContext, DraftFeedback, Drafter
from .errors import InvalidSettingError, LeapdecodeError
from .sampling import SamplingParams, make_generator
from .stats import GenerationResult, GenerationStats
from .text_stream import TextAssembler
from .tree import DraftTree
from .verifiers import Verdict, verify, verify_greedy

_EMPTY = torch.zeros(1, 0, dtype=torch.long)
_NEVER = -1  # pad token for batched greedy chains: never equal to an argmax, so padding is never accepted


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    params: SamplingParams = SamplingParams()
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise InvalidSettingError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}")


def settings(max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, stop: str | Seq[str] | None = None) -> GenerationSettings:
    """`GenerationSettings` from the keyword arguments of `generate`."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return GenerationSettings(max_new_tokens=max_new_tokens, params=SamplingParams(temperature, top_k, top_p),
                              seed=seed, stop=stops)


def describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


@dataclass
class Sequence:
    """One sequence being decoded: its committed tokens, drafter, generator, text, stop state and statistics."""

    prompt_ids: list[int]
    settings: GenerationSettings
    drafter: Drafter
    generator: torch.Generator | None
    text: TextAssembler
    stats: GenerationStats
    limit: int  # most new tokens: max_new_tokens, capped by the context
    stop_ids: frozenset[int]
    started: float  # perf_counter at the start of the request (wall time counts from here)
    history: DraftHistory | None = None  # what the width policy learns of this sequence's drafts
    tokens: list[int] = field(default_factory=list)  # prompt + committed tokens (the last one not yet cached)
    ids: list[int] = field(default_factory=list)  # new tokens of the result (cut at a stop string)
    produced: int = 0  # committed new tokens
    new: list[int] = field(default_factory=list)  # the last step's new tokens of the result
    finished: bool = False
    # a method's rule over the next token's logits (momentum decoding): (tokens, prompt length, logits (V,))
    # -> logits; only for methods without drafts, so the root's row is the one verified
    logits_rule: Callable[[list[int], int, torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def begin(cls, prompt_ids: list[int], settings: GenerationSettings, drafter: Drafter, *, method: str,
              tokenizer, stop_ids, context_length: int, history: DraftHistory | None = None,
              started: float | None = None, logits_rule=None) -> "Sequence":
        """A new sequence; its drafter begins with the prompt (the prompt fits the context)."""
        started = time.perf_counter() if started is None else started
        generator = make_generator(settings.seed)
        drafter.begin(prompt_ids, settings.params)
        return cls(prompt_ids=list(prompt_ids), settings=settings, drafter=drafter, generator=generator,
                   text=TextAssembler(tokenizer, settings.stop),
                   stats=GenerationStats(method=method, prompt_tokens=len(prompt_ids)),
                   limit=min(settings.max_new_tokens, context_length - len(prompt_ids)),
                   stop_ids=frozenset(stop_ids), started=started, history=history, tokens=list(prompt_ids),
                   logits_rule=logits_rule)

    @property
    def params(self) -> SamplingParams:
        return self.settings.params

    def result(self) -> GenerationResult:
        return GenerationResult(text=self.text.text, token_ids=self.ids, prompt_ids=self.prompt_ids,
                                stats=self.stats)


class Scorer(Protocol):
    """Runs the target over every row's root and draft tree in one pass, and keeps the accepted entries."""

    prompt_pending: bool  # the next pass also feeds a prompt (so its time is not a verification pass's)

    def score(self, roots: list[int], trees: list[DraftTree], hidden: list[int | None]
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, q, V): row b's entry 0 after its root, i+1 after its node i; and hidden states (B, q, H)
        when any `hidden[b]` asks for them (row b's: the model's `hidden_states[hidden[b]]`, -1 the final
        post-norm ones), else None."""
        ...

    def commit(self, accepted: list[list[int]]) -> None:
        """Keep each row's root and its accepted nodes in the cache, nothing else of this pass."""
        ...


# ----- the stages ----------------------------------------------------------------------------------------

def propose(row: Sequence, cap: int | None = None) -> DraftTree:
    """The row's draft (an empty chain when it proposes nothing), within its budget, cut after an end token.
    `cap` (the batch's share of drafted tokens) caps a greedy row's budget."""
    budget = row.limit - row.produced - 1  # the target adds one token of its own
    if cap is not None and row.params.greedy:
        budget = min(budget, cap)
    tree = None
    if budget > 0:
        ctx = DraftContext(row.tokens, len(row.prompt_ids), budget, row.params, row.generator, row.stop_ids)
        tree = row.drafter.propose(ctx)
    if tree is None or tree.size == 0:
        return DraftTree.chain(_EMPTY)
    if tree.size > budget:
        raise LeapdecodeError(f"drafter proposed {tree.size} tokens, over its budget of {budget}")
    return tree.cut_after_stop(row.stop_ids)


def fit_width(rows: list[Sequence], trees: list[DraftTree], cut: DraftCut, skip=()) -> None:
    """The width policy: cut the greedy rows' cuttable drafts (in place) to the width `cut` chooses."""
    cuttable = [b for b, (row, tree) in enumerate(zip(rows, trees)) if b not in skip and row.params.greedy
                and tree.size and row.drafter.cuttable and row.history is not None]
    if not cuttable:
        return
    fixed = max((t.size for b, t in enumerate(trees) if b not in cuttable), default=0)
    width = cut.choose([trees[b] for b in cuttable], [rows[b].history for b in cuttable], rows=len(rows),
                       fixed=fixed)
    for b in cuttable:
        trees[b] = trees[b].prefix(width)


def verifier_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The one place logits move between devices: greedy verification takes the argmax where the logits are
    and moves only ids; sampling draws from the CPU generator, so a sampled row's logits go to the CPU."""
    if logits.device.type != "cpu" and not params.greedy:
        return logits.float().cpu()
    return logits


def verify_rows(trees: list[DraftTree], logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None], errors: dict[int, str] | None = None,
                own: list[torch.Tensor] | None = None, rules: list | None = None) -> Verdict:
    """Verify a ragged batch: row b has its own tree (n_b nodes) and reads logits[b, :n_b+1] (B, q, V).

    Greedy chains of several rows are verified together: each is padded to the longest with a token that never
    matches, so acceptance stops at the row's own length. Other rows (sampling, branching trees) are verified
    one at a time with the row's own generator, so each row draws exactly the random numbers it would alone.
    `own[b]`: row b's logits as its verifier reads them (`verifier_logits`; computed when not given). With
    `errors`, rows already in it are skipped and a row whose verification raises is recorded there (nothing
    accepted, no token); without it, errors propagate. `rules[b]`: row b's relaxed acceptance rule (lossy;
    None: exact), verified alone.
    """
    batch = len(trees)
    skip = errors if errors is not None else {}
    rules = rules or [None] * batch
    if own is None:
        own = [verifier_logits(logits[b : b + 1, : trees[b].size + 1], params[b]) for b in range(batch)]
    accepted: list[list[int]] = [[] for _ in range(batch)]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    together = [b for b in range(batch) if b not in skip and params[b].greedy and trees[b].layout.is_chain
                and rules[b] is None]
    if len(together) > 1:
        try:
            width = max(trees[b].size for b in together)
            padded = torch.full((len(together), width), _NEVER, dtype=torch.long)
            for i, b in enumerate(together):
                padded[i, : trees[b].size] = trees[b].tokens[0]
            verdict = verify_greedy(DraftTree.chain(padded), logits[together, : width + 1])
            for i, b in enumerate(together):
                accepted[b], tokens[b] = verdict.accepted_nodes[i], verdict.tokens[i]
        except Exception:
            if errors is None:
                raise
            together = []  # find the row at fault: verify each one alone below
    else:
        together = []
    for b in range(batch):
        if b in together or b in skip:
            continue
        try:
            verdict = verify(trees[b], own[b], params[b], generators[b], rules[b])
        except Exception as err:
            if errors is None:
                raise
            errors[b] = describe(err)
            continue
        accepted[b], tokens[b] = verdict.accepted_nodes[0], verdict.tokens[0]
    return Verdict(accepted_nodes=accepted, tokens=tokens)


def advance(row: Sequence, new: list[int], drafted: int) -> None:
    """Commit one step's tokens to a row: statistics, then stop handling (limit, end token, stop string)."""
    stats = row.stats
    stats.target_forward_passes += 1
    stats.drafted_tokens += drafted
    stats.accept_lengths.append(len(new))
    new = new[: row.limit - row.produced]
    hit = next((i for i, t in enumerate(new) if t in row.stop_ids), None)
    if hit is not None:
        new = new[: hit + 1]
        stats.stop_reason = "eos"
    row.tokens.extend(new)
    row.produced += len(new)
    taken = row.text.push(new)
    row.new = new[:taken]
    row.ids.extend(row.new)
    if row.text.stopped:
        stats.stop_reason = "stop_string"
    elif hit is None and row.produced >= row.limit:
        stats.stop_reason = "max_new_tokens" if row.limit == row.settings.max_new_tokens else "context"
    row.finished = bool(stats.stop_reason)
    stats.new_tokens = len(row.ids)
    stats.wall_time = time.perf_counter() - row.started
    if row.finished:
        stats.draft_forward_passes = row.drafter.forward_passes


def learn(row: Sequence, tree: DraftTree, proposed: DraftTree, nodes: list[int], new: list[int],
          logits: torch.Tensor, hidden: torch.Tensor | None, observe_cut: bool) -> None:
    """What the row's drafter and the width policy learn from the verdict. `tree`: what was verified;
    `proposed`: the drafter's whole proposal (the cut learns from the nodes it cut off too); `logits`
    (1, N+1, V) and `hidden` (1, N+1, H) the row's own rows of the pass."""
    row.drafter.update(DraftFeedback(proposed=tree.size, accepted=len(nodes), committed=new, accepted_nodes=nodes,
                                     tree=tree, target_logits=logits, target_hidden=hidden))
    if observe_cut and row.history is not None and row.params.greedy:
        row.history.observe(proposed, new)


def _attempt(errors: dict[int, str] | None, b: int, work, *args):
    """`work(*args)`; with `errors`, an exception is recorded as row b's error instead of raised."""
    if errors is None:
        return work(*args)
    try:
        return work(*args)
    except Exception as err:
        errors[b] = describe(err)
        return None


# ----- the step ------------------------------------------------------------------------------------------

def decode_step(rows: list[Sequence], scorer: Scorer, cut: DraftCut | None = None, cap: int | None = None,
                errors: dict[int, str] | None = None) -> None:
    """One step for every row: propose -> cut -> score -> verify -> commit -> learn -> stop (see above).
    Afterwards each row's `new` holds its new tokens of this step and `finished` whether it is done."""
    step_started = time.perf_counter()
    failed = errors if errors is not None else {}
    for row in rows:
        row.new = []
    trees = [_attempt(errors, b, propose, row, cap) or DraftTree.chain(_EMPTY) for b, row in enumerate(rows)]
    proposed = list(trees)  # before the width cut
    measured = (cut is not None and not scorer.prompt_pending  # a pass that also feeds a prompt is no measure
                and any(row.params.greedy for b, row in enumerate(rows) if b not in failed))
    if measured:
        fit_width(rows, trees, cut, skip=failed)

    pass_started = time.perf_counter()
    # per row: the index into the model's hidden states its drafter reads (-1: the final ones), None: none
    wants_hidden = [row.drafter.target_hidden_layer if row.drafter.needs_target_hidden else None for row in rows]
    logits, hidden = scorer.score([row.tokens[-1] for row in rows], trees, wants_hidden)
    for b, row in enumerate(rows):
        if row.logits_rule is not None and b not in failed:
            ruled = _attempt(errors, b, row.logits_rule, row.tokens, len(row.prompt_ids), logits[b, 0])
            if ruled is not None:
                logits[b, 0] = ruled
    own = [verifier_logits(logits[b : b + 1, : tree.size + 1], row.params)
           for b, (row, tree) in enumerate(zip(rows, trees))]
    for b, (row, tree) in enumerate(zip(rows, trees)):  # rules reading the hidden states (judge): this pass's
        if row.drafter.acceptance is not None and hidden is not None and wants_hidden[b] is not None:
            row.drafter.acceptance.bind(hidden[b, : tree.size + 1])
    verdict = verify_rows(trees, logits, [row.params for row in rows], [row.generator for row in rows],
                          errors, own, [row.drafter.acceptance for row in rows])
    verified = time.perf_counter()
    scorer.commit(verdict.accepted_nodes)

    for b, (row, tree) in enumerate(zip(rows, trees)):
        if b not in failed:
            own_hidden = hidden[b : b + 1, : tree.size + 1] if wants_hidden[b] is not None and hidden is not None else None
            _attempt(errors, b, learn, row, tree, proposed[b], verdict.accepted_nodes[b], verdict.tokens[b], own[b],
                     own_hidden, measured)
    if measured:  # the pass and its verification, and the rest of the step (drafting)
        seconds = verified - pass_started
        cut.observe(len(rows) * (1 + max(t.size for t in trees)), seconds,
                    time.perf_counter() - step_started - seconds)
    for b, (row, tree) in enumerate(zip(rows, trees)):
        if b not in failed:
            _attempt(errors, b, advance, row, verdict.tokens[b], tree.size)
