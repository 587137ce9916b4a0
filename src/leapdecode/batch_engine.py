"""Continuous batching: many requests, each with its own method, decoded together with one target pass per step.

```
submit(prompt ids, method, settings) ──► waiting queue
step():  drop cancelled rows
         admit waiting requests (prefill each alone, merge its cache row into the batch)
         each row's drafter proposes a tree (its own budget, its own generator)
         ONE target forward over the padded batch: ids (B, q), position_ids (B, q), mask (B, 1, q, C+q)
         verify_ragged: each row verifies only its own nodes ─► Verdict per row
         RaggedCache.commit: mark the kept columns valid, trim, compact when the holes pile up
         stop handling per row (EOS, max tokens, stop strings, context) ─► updates to the caller
```

The batched KV cache (`RaggedCache`) is a transformers `DynamicCache` of shape (B, heads, C, head_dim) plus a
bool map `valid` (B, C): which columns hold a committed token of that row. Rows never move during a step:
every row's new tokens are appended at the same columns, rejected draft entries and padding simply stay
invalid (a hole) and are masked out. A token's position is the number of valid columns before it, passed
as `position_ids`, so holes never shift positions. When the widest row wastes more than `compact_slack`
columns, or rows join or leave, the cache is re-packed: each row's valid columns are gathered to the right
end (left padding). Masked holes get exactly zero attention weight, so every row computes what it would
alone (up to float summation order), which the tests check as identical greedy output.

Sliding-window layers (gemma3) get their own mask from the same positions, like `lm.CausalLM` does.
Methods that patch the target (`MethodSpec.target_patch`) cannot share a batch and are refused.
Drafters that read the target's features (`needs_target_hidden`: medusa, hydra, falcon) make the step ask for
`output_hidden_states`; each such row gets its own rows of the final hidden states, as `Decoder` hands them.
An error in one row (its drafter, its verification or sampling, its stop handling) fails only that row; an
error in the shared forward pass fails the batch. Trained drafters' networks are loaded once per method
(`SharedBuild.shared`) and shared, read-only, by the requests' drafters.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from transformers import DynamicCache

from . import kv_cache
from .draft_budget import RowAcceptance, StepCostModel, choose_width
from .drafters.base import DraftContext, DraftFeedback, Drafter
from .engine import GenerationSettings
from .errors import InvalidSettingError, LeapdecodeError, PromptTooLongError
from .lm import CausalLM
from .methods import MethodBuild, MethodSpec, get_method
from .sampling import SamplingParams, make_generator
from .stats import GenerationResult, GenerationStats
from .text_stream import TextAssembler
from .tree import DraftTree
from .verifiers import Verdict, verify, verify_greedy

_EMPTY = torch.zeros(1, 0, dtype=torch.long)
_NEVER = -1  # pad token for drafts: never equal to an argmax, so padded nodes are never accepted


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


# ----- the ragged verifier -------------------------------------------------------------------------------

def verify_ragged(trees: list[DraftTree], logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None], errors: dict[int, str] | None = None) -> Verdict:
    """Verify a ragged batch: row b has its own tree (n_b nodes) and reads logits[b, :n_b+1] (B, Q, V).

    Greedy chains are verified together: each chain is padded to the longest with a token that never
    matches, so acceptance stops at the row's own length. Sampling rows and branching trees are verified one
    row at a time with the row's own generator, so each row draws exactly the random numbers it would alone.
    With `errors` (row -> message), rows already in it are skipped and a row whose verification raises is
    recorded there (with nothing accepted and no token) instead of failing the others; without it, errors
    propagate.
    """
    batch = len(trees)
    skip = errors if errors is not None else {}
    accepted: list[list[int]] = [[] for _ in range(batch)]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    together = [b for b in range(batch) if b not in skip and params[b].greedy and trees[b].layout.is_chain]
    if together:
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
    for b in range(batch):
        if b in together or b in skip:
            continue
        n = trees[b].size
        try:
            verdict = verify(trees[b], logits[b : b + 1, : n + 1], params[b], generators[b])
        except Exception as err:
            if errors is None:
                raise
            errors[b] = _describe(err)
            continue
        accepted[b], tokens[b] = verdict.accepted_nodes[0], verdict.tokens[0]
    return Verdict(accepted_nodes=accepted, tokens=tokens)


# ----- the batched cache ---------------------------------------------------------------------------------

def _layers_of(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers
            if getattr(layer, "keys", None) is not None and layer.keys.numel()]


def _left_pad(t: torch.Tensor | None, width: int, rows: int, like: torch.Tensor) -> torch.Tensor:
    """`t` (rows, H, n, D) left-padded with zeros to `width` columns; all zeros (shaped like `like`) if None."""
    if t is None or t.shape[2] == 0:
        return like.new_zeros(rows, like.shape[1], width, like.shape[3])
    if t.shape[2] == width:
        return t
    return torch.cat([t.new_zeros(rows, t.shape[1], width - t.shape[2], t.shape[3]), t], 2)


@dataclass
class StepInputs:
    """One batched target pass over B rows of q query tokens each (root + padded tree)."""

    ids: torch.Tensor  # (B, q) int64
    positions: torch.Tensor  # (B, q) int64
    masks: dict[str, torch.Tensor]  # layer type -> (B, 1, q, C+q) bool


class RaggedCache:
    """A batched KV cache whose rows hold different numbers of committed tokens at their own columns."""

    def __init__(self, sliding_window: int | None = None, compact_slack: int = 16):
        self.sliding_window = sliding_window
        self.compact_slack = compact_slack
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (B, H, C, D); empty until known
        self.valid = torch.zeros(0, 0, dtype=torch.bool)  # (B, C)
        self.cache = DynamicCache()
        self.compactions = 0

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    def lengths(self) -> torch.Tensor:
        """(B,) committed tokens in each row's cache (= the position of each row's next token)."""
        return self.valid.sum(1)

    # ----- layout changes (between steps) -----
    def _rebuild(self) -> None:
        self.cache = DynamicCache(ddp_cache_data=self.layers) if self.layers and self.width else DynamicCache()

    def _read_back(self) -> None:
        self.layers = _layers_of(self.cache)

    def add_row(self, row: DynamicCache, length: int) -> None:
        """Append one sequence's prefilled cache (1, H, length, D) as the last row, right-aligned.
        All or nothing: the cache is changed only once the merged row is built."""
        row_layers = _layers_of(row) if length else []
        width = max(self.width, length)
        template = self.layers or row_layers
        merged = []
        for i in range(len(template)):
            mine = [_left_pad(t, width, self.rows, template[i][j]) for j, t in
                    enumerate(self.layers[i] if self.layers else (None, None))]
            theirs = [_left_pad(t, width, 1, template[i][j]) for j, t in
                      enumerate(row_layers[i] if row_layers else (None, None))]
            merged.append((torch.cat([mine[0], theirs[0]], 0), torch.cat([mine[1], theirs[1]], 0)))
        valid_row = torch.zeros(1, width, dtype=torch.bool)
        valid_row[0, width - length :] = True
        old = torch.cat([torch.zeros(self.rows, width - self.width, dtype=torch.bool), self.valid], 1)
        self.layers, self.valid = merged, torch.cat([old, valid_row], 0)
        self._rebuild()

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then re-pack."""
        index = torch.tensor(rows, dtype=torch.long)
        self.valid = self.valid[index]
        self.layers = [(k[index.to(k.device)], v[index.to(v.device)]) for k, v in self.layers]
        self.compact()

    def compact(self) -> None:
        """Gather each row's valid columns to the right end; the width becomes the longest row's length."""
        lengths = self.lengths()
        width = int(lengths.max()) if self.rows else 0
        order = torch.argsort((~self.valid).to(torch.int8), dim=1, stable=True)  # valid columns first, in order
        shift = (width - lengths).unsqueeze(1)  # left padding of each row
        cols = torch.arange(width).unsqueeze(0)
        src = torch.gather(order, 1, (cols - shift).clamp_min(0)) if width else order[:, :0]  # (B, width)
        moved = []
        for k, v in (self.layers if width else []):
            moved.append(tuple(torch.gather(t, 2, src.to(t.device)[:, None, :, None].expand(
                -1, t.shape[1], -1, t.shape[3])) for t in (k, v)))
        self.layers = moved
        self.valid = cols >= shift
        self.compactions += 1
        self._rebuild()

    # ----- one step -----
    def step_inputs(self, roots: list[int], trees: list[DraftTree]) -> StepInputs:
        """Inputs for feeding each row's root plus its tree, padded to the largest tree."""
        batch, past = self.rows, self.width
        q = 1 + max(t.size for t in trees)
        lengths = self.lengths()
        ids = torch.zeros(batch, q, dtype=torch.long)
        positions = lengths.unsqueeze(1).repeat(1, q)
        new = torch.eye(q, dtype=torch.bool).unsqueeze(0).repeat(batch, 1, 1)  # padding attends to itself only
        for b, tree in enumerate(trees):
            n = tree.size + 1
            ids[b, 0] = roots[b]
            ids[b, 1:n] = tree.tokens[0]
            layout = tree.layout
            positions[b, :n] += layout.depths
            new[b, :n, :n] = layout.ancestor_mask
        full = torch.cat([self.valid.unsqueeze(1).expand(-1, q, -1), new], 2).unsqueeze(1)  # (B, 1, q, C+q)
        masks = {"full_attention": full}
        if self.sliding_window is not None:
            key_pos = torch.cat([self.valid.long().cumsum(1) - 1, positions], 1)  # (B, C+q)
            in_window = key_pos.unsqueeze(1) > positions.unsqueeze(2) - self.sliding_window
            masks["sliding_attention"] = full & in_window.unsqueeze(1)
        return StepInputs(ids=ids, positions=positions, masks=masks)

    def commit(self, kept: list[list[int]], q: int) -> None:
        """After a pass of q columns per row: row b keeps its root and its accepted nodes `kept[b]`."""
        new_valid = torch.zeros(self.rows, q, dtype=torch.bool)
        for b, nodes in enumerate(kept):
            new_valid[b, 0] = True
            if nodes:
                new_valid[b, torch.tensor(nodes) + 1] = True
        self.valid = torch.cat([self.valid, new_valid], 1)
        used = self.valid.any(0).nonzero()
        end = int(used[-1]) + 1 if used.numel() else 0
        if end < self.width:  # nobody kept the last columns: crop them (views, no copy)
            self.valid = self.valid[:, :end]
            kv_cache.crop(self.cache, end)
        self._read_back()
        if self.width - int(self.lengths().max()) > self.compact_slack:
            self.compact()


# ----- requests and their state ------------------------------------------------------------------------

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
class _Pending:
    handle: SequenceHandle
    prompt_ids: list[int]
    method: str
    settings: GenerationSettings


@dataclass
class _Row:
    """One running sequence: its committed tokens, drafter, generator, text and stop state."""

    handle: SequenceHandle
    method: str
    prompt_ids: list[int]
    settings: GenerationSettings
    drafter: Drafter
    generator: torch.Generator
    tokens: list[int]
    limit: int
    text: TextAssembler
    stats: GenerationStats
    started: float
    ids: list[int] = field(default_factory=list)
    produced: int = 0
    finished: bool = False
    acceptance: RowAcceptance = field(default_factory=RowAcceptance)


@dataclass
class EngineMetrics:
    """Counters since the engine started, and the current load."""

    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    row_passes: int = 0  # sum over steps of the batch size: target passes as each request sees them
    batch_passes: int = 0  # batched target forward passes
    busy_seconds: float = 0.0
    running: int = 0
    waiting: int = 0

    @property
    def mean_accepted(self) -> float:
        return self.tokens_generated / self.row_passes if self.row_passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_generated / self.busy_seconds if self.busy_seconds else 0.0

    @property
    def mean_batch_size(self) -> float:
        return self.row_passes / self.batch_passes if self.batch_passes else 0.0


# ----- the engine ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SharedBuild(MethodBuild):
    """A method's build that lives as long as the engine: `shared` keeps what every request's drafter may
    reuse read-only (a trained drafter's loaded network), so it is loaded once, not per request."""

    shared: dict = field(default_factory=dict)


class BatchEngine:
    """Serves many generation requests with one target model, one batched forward pass per step.

    `methods` maps each method name to serve to its options (e.g. {"ar": {}, "pld": {"num_draft_tokens": 6}}).
    Use `step()` from your own loop, `run_until_done()`, or `start()` a worker thread and `submit()` from others.
    """

    def __init__(self, target, methods: Mapping[str, dict] | None = None, draft=None, max_batch_size: int = 8,
                 compact_slack: int = 16, step_draft_budget: int = 16, adaptive_width: bool = True):
        if max_batch_size < 1:
            raise InvalidSettingError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.target, self.draft, self.max_batch_size = target, draft, max_batch_size
        # Draft tokens per step shared by the greedy rows of a batch: every row is padded to the longest
        # draft, so long drafts in a full batch cost more than they save. Greedy output does not depend
        # on draft length; sampled rows keep their own budget so seeded output equals a lone run.
        # Within that budget, `costs` (fitted from the measured steps) and each row's accept history choose
        # one draft width per step (see draft_budget.py): on a CPU, drafting in a full batch rarely pays.
        self.step_draft_budget = step_draft_budget
        self.costs = StepCostModel()
        self.adaptive_width = adaptive_width
        methods = dict(methods or {"ar": {}})
        for name in methods:
            spec = get_method(name)
            if spec.target_patch is not None:
                raise InvalidSettingError(f"method {name!r} patches the target model and cannot share a batch")
            if spec.needs_draft_model and draft is None:
                raise InvalidSettingError(f"method {name!r} needs a draft model")
        if draft is not None:  # like `Decoder`: a draft with another tokenizer is refused at start, not per request
            from .loading import check_draft_compatible

            check_draft_compatible(target, draft)
        self.specs: dict[str, tuple[MethodSpec, SharedBuild]] = {}
        for name, options in methods.items():
            spec = get_method(name)
            build = SharedBuild(target=target, draft=draft, options=dict(options or {}))
            spec.make_drafter(build)  # validates the options now (and loads what the drafters share)
            self.specs[name] = (spec, build)
        self.lm = CausalLM(target.model)  # used for prefill of joining sequences
        self.cache = RaggedCache(self.lm.sliding_window, compact_slack)
        self.rows: list[_Row] = []
        self.metrics = EngineMetrics()
        self._waiting: deque[_Pending] = deque()
        self._lock = threading.Condition()
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def methods(self) -> list[str]:
        return list(self.specs)

    # ----- submitting -----
    def submit(self, prompt_ids: list[int], method: str = "ar", settings: GenerationSettings = GenerationSettings(),
               on_update: Callable[[SequenceUpdate], None] | None = None) -> SequenceHandle:
        """Queue a request (thread-safe); it joins the batch at the next step with a free slot."""
        if method not in self.specs:
            raise InvalidSettingError(f"method {method!r} is not served; served methods: {', '.join(self.specs)}")
        if not prompt_ids:
            raise InvalidSettingError("the prompt is empty")
        context = self.target.context_length
        if len(prompt_ids) >= context:
            raise PromptTooLongError(f"the prompt has {len(prompt_ids)} tokens but the context is {context} tokens")
        if settings.seed is not None:
            try:
                make_generator(settings.seed)
            except (RuntimeError, ValueError, TypeError, OverflowError) as err:
                raise InvalidSettingError(f"seed {settings.seed!r} cannot seed a generator: {err}") from None
        with self._lock:
            handle = SequenceHandle(self._next_id, on_update)
            self._next_id += 1
            self._waiting.append(_Pending(handle, list(prompt_ids), method, settings))
            self.metrics.waiting = len(self._waiting)
            self._lock.notify_all()
        return handle

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.rows or self._waiting)

    # ----- the step loop -----
    def step(self) -> bool:
        """Drop cancelled rows, admit waiting ones, run one batched pass; return whether work remains."""
        started = time.perf_counter()
        with torch.inference_mode():
            self._drop([r for r in self.rows if r.handle.cancelled], cancelled=True)
            self._admit()
            if self.rows:
                try:
                    self._decode_step()
                except Exception as err:  # the shared pass failed (a bug or resource error): fail the batch,
                    for row in self.rows:  # keep the engine usable
                        row.handle._emit(SequenceUpdate(finished=True, error=_describe(err)))
                    self.metrics.requests_failed += len(self.rows)
                    self.rows = []
                    self.cache = RaggedCache(self.lm.sliding_window, self.cache.compact_slack)
        self.metrics.busy_seconds += time.perf_counter() - started
        self.metrics.running = len(self.rows)
        return self.has_work()

    def run_until_done(self) -> None:
        while self.step():
            pass

    def generate(self, prompt_ids: list[int], method: str = "ar", **settings) -> GenerationResult:
        """One request through the batch engine (synchronously, for tests and scripts)."""
        from .engine import _settings

        handle = self.submit(prompt_ids, method, _settings(**settings))
        self.run_until_done()
        if handle.error:
            raise LeapdecodeError(handle.error)
        return handle.result

    def _admit(self) -> None:
        while len(self.rows) < self.max_batch_size:
            with self._lock:
                if not self._waiting:
                    break
                pending = self._waiting.popleft()
                self.metrics.waiting = len(self._waiting)
            if pending.handle.cancelled:
                pending.handle._emit(SequenceUpdate(finished=True, error="cancelled"))
                self.metrics.requests_cancelled += 1
                continue
            try:
                self._join(pending)
            except Exception as err:
                pending.handle._emit(SequenceUpdate(finished=True, error=_describe(err)))
                self.metrics.requests_failed += 1

    def _join(self, p: _Pending) -> None:
        """Prefill one sequence alone (exactly as `Decoder` does) and merge its cache row into the batch.

        Everything that may fail for this request alone (its drafter, generator, text state, prefill) comes
        before its cache row is added, so a failure leaves the batch as it was."""
        spec, build = self.specs[p.method]
        started = time.perf_counter()
        generator = make_generator(p.settings.seed)
        drafter = spec.make_drafter(build)
        drafter.begin(p.prompt_ids, p.settings.params)
        text = TextAssembler(self.target.tokenizer, p.settings.stop)
        stats = GenerationStats(method=p.method, prompt_tokens=len(p.prompt_ids))
        limit = min(p.settings.max_new_tokens, self.target.context_length - len(p.prompt_ids))
        row = _Row(handle=p.handle, method=p.method, prompt_ids=p.prompt_ids, settings=p.settings, drafter=drafter,
                   generator=generator, tokens=list(p.prompt_ids), limit=limit, text=text, stats=stats,
                   started=started)
        self.lm.reset()
        try:
            if len(p.prompt_ids) > 1:
                self.lm.forward(torch.tensor([p.prompt_ids[:-1]], dtype=torch.long), logits_to_keep=1)
            self.cache.add_row(self.lm.cache, len(p.prompt_ids) - 1)
        finally:
            self.lm.reset()
        stats.prefill_time = time.perf_counter() - started
        self.rows.append(row)

    def _propose(self, row: _Row) -> DraftTree:
        """The row's draft for this step (an empty chain when it proposes nothing), within its budget."""
        budget = row.limit - row.produced - 1
        if row.settings.params.greedy:
            budget = min(budget, max(1, self.step_draft_budget // max(1, len(self.rows))))
        tree = None
        if budget > 0:
            ctx = DraftContext(row.tokens, len(row.prompt_ids), budget, row.settings.params, row.generator,
                               self.target.stop_token_ids)
            tree = row.drafter.propose(ctx)
        if tree is None or tree.size == 0:
            return DraftTree.chain(_EMPTY)
        if tree.size > budget:
            raise LeapdecodeError(f"drafter proposed {tree.size} tokens, over its budget of {budget}")
        return tree.cut_after_stop(self.target.stop_token_ids)

    def _decode_step(self) -> None:
        """Propose, one batched target pass, verify, commit. An error in one row's own work fails that row."""
        failed: dict[int, str] = {}  # row index -> error
        trees: list[DraftTree] = []
        for b, row in enumerate(self.rows):
            try:
                trees.append(self._propose(row))
            except Exception as err:
                failed[b] = _describe(err)
                trees.append(DraftTree.chain(_EMPTY))
        proposals = self._fit_width(trees)
        started = time.perf_counter()
        inputs = self.cache.step_inputs([row.tokens[-1] for row in self.rows], trees)
        device = self.lm.device
        masks = {k: m.to(device) for k, m in inputs.masks.items()}
        wants_hidden = [bool(getattr(row.drafter, "needs_target_hidden", False)) for row in self.rows]
        out = self.target.model(
            input_ids=inputs.ids.to(device), position_ids=inputs.positions.to(device),
            attention_mask=masks if self.cache.sliding_window is not None else masks["full_attention"],
            cache=self.cache.cache, use_cache=True, **({"output_hidden_states": True} if any(wants_hidden) else {}),
        )
        logits = out.logits  # (B, q, V)
        hidden = out.hidden_states[-1] if any(wants_hidden) else None  # (B, q, H): final norm outputs
        if logits.device.type != "cpu":  # verification and drafters' bookkeeping run on the CPU
            logits = logits.float().cpu()
        verdict = verify_ragged(trees, logits, [r.settings.params for r in self.rows],
                                [r.generator for r in self.rows], errors=failed)
        self.cache.commit(verdict.accepted_nodes, inputs.ids.shape[1])
        self.costs.observe(inputs.ids.numel(), time.perf_counter() - started)
        self.metrics.batch_passes += 1
        self.metrics.row_passes += len(self.rows)
        for b, row in enumerate(self.rows):
            if b in failed:
                continue
            nodes, new, tree = verdict.accepted_nodes[b], verdict.tokens[b], trees[b]
            try:
                drafted = proposals[b] if proposals[b] is not None else tree
                if drafted.layout.is_chain:  # the whole proposal, also the part cut off, against what was committed
                    seen = drafted.tokens[0, : len(new)].tolist()
                    agree = next((i for i, (d, t) in enumerate(zip(seen, new)) if d != t), len(seen))
                    row.acceptance.update(len(seen), agree)
                else:
                    row.acceptance.update(tree.size, len(nodes))
                # each row's own rows of the features, like `Decoder` hands them: (1, N+1, H)
                own_hidden = hidden[b : b + 1, : tree.size + 1] if wants_hidden[b] else None
                row.drafter.update(DraftFeedback(proposed=tree.size, accepted=len(nodes), committed=new,
                                                 accepted_nodes=nodes, tree=tree,
                                                 target_logits=logits[b : b + 1, : tree.size + 1],
                                                 target_hidden=own_hidden))
                self._advance(row, new, tree.size)
            except Exception as err:
                failed[b] = _describe(err)
        self._fail({id(self.rows[b]): message for b, message in failed.items()})
        self._drop([r for r in self.rows if r.finished], cancelled=False)

    def _fit_width(self, trees: list[DraftTree]) -> list[DraftTree | None]:
        """Cut the greedy rows' chains to the draft width with the most expected tokens per second; return
        each row's uncut proposal where it was cut (it still teaches the row's accept rate), else None."""
        proposals: list[DraftTree | None] = [None] * len(trees)
        if not self.adaptive_width:
            return proposals
        cut = [b for b, (row, tree) in enumerate(zip(self.rows, trees))
               if row.settings.params.greedy and tree.size > 0 and tree.layout.is_chain]
        if not cut:
            return proposals
        fixed = max((t.size for b, t in enumerate(trees) if b not in cut), default=0)
        width = choose_width([self.rows[b].acceptance.rate for b in cut], [trees[b].size for b in cut],
                             len(self.rows), self.costs.coefficients(), fixed_width=fixed)
        for b in cut:
            if trees[b].size > width:
                proposals[b] = trees[b]
                trees[b] = trees[b].prefix(width)
        return proposals

    def _advance(self, row: _Row, new: list[int], drafted: int) -> None:
        """Commit one step's tokens to a row: stop handling exactly as `Decoder` + `GenerationStream`."""
        stats = row.stats
        stats.target_forward_passes += 1
        stats.drafted_tokens += drafted
        stats.accept_lengths.append(len(new))
        new = new[: row.limit - row.produced]
        hit = next((i for i, t in enumerate(new) if t in self.target.stop_token_ids), None)
        if hit is not None:
            new = new[: hit + 1]
            stats.stop_reason = "eos"
        row.tokens.extend(new)
        row.produced += len(new)
        taken = row.text.push(new)
        row.ids.extend(new[:taken])
        self.metrics.tokens_generated += len(new)
        if row.text.stopped:
            stats.stop_reason = "stop_string"
        elif hit is None and row.produced >= row.limit:
            stats.stop_reason = "max_new_tokens" if row.limit == row.settings.max_new_tokens else "context"
        row.finished = bool(stats.stop_reason)
        stats.new_tokens = len(row.ids)
        stats.wall_time = time.perf_counter() - row.started
        piece = row.text.delta()
        if row.finished:
            piece += row.text.delta(final=True)
            stats.draft_forward_passes = getattr(row.drafter, "forward_passes", 0)
            result = GenerationResult(text=row.text.text, token_ids=row.ids, prompt_ids=row.prompt_ids, stats=stats)
            row.handle._emit(SequenceUpdate(text=piece, token_ids=new[:taken], finished=True, result=result))
            self.metrics.requests_finished += 1
        elif piece or new:
            row.handle._emit(SequenceUpdate(text=piece, token_ids=new[:taken]))

    def _fail(self, errors: dict[int, str]) -> None:
        """End the rows (by id) whose own work raised, each with its error; the others go on."""
        rows = [r for r in self.rows if id(r) in errors]
        for row in rows:
            if not row.handle.done.is_set():
                row.handle._emit(SequenceUpdate(finished=True, error=errors[id(row)]))
                self.metrics.requests_failed += 1
        self._drop(rows, cancelled=False)

    def _drop(self, rows: list[_Row], cancelled: bool) -> None:
        if not rows:
            return
        for row in rows:
            if cancelled:
                row.handle._emit(SequenceUpdate(finished=True, error="cancelled"))
                self.metrics.requests_cancelled += 1
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        self.rows = [self.rows[i] for i in keep]
        if self.rows:
            self.cache.keep_rows(keep)
        else:
            self.cache = RaggedCache(self.lm.sliding_window, self.cache.compact_slack)

    # ----- worker thread -----
    def start(self) -> None:
        """Run the step loop in a daemon thread until `close()`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="leapdecode-batch-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                while not (self.rows or self._waiting) and not self._stop.is_set():
                    self._lock.wait(timeout=0.5)
            if self._stop.is_set():
                break
            self.step()

    def close(self) -> None:
        """Stop the worker thread; unfinished requests end with an error."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        for row in self.rows:
            row.handle._emit(SequenceUpdate(finished=True, error="server shutting down"))
        self.rows = []
        with self._lock:
            while self._waiting:
                self._waiting.popleft().handle._emit(SequenceUpdate(finished=True, error="server shutting down"))
        self.cache = RaggedCache(self.lm.sliding_window, self.cache.compact_slack)
