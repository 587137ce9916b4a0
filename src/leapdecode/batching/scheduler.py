"""Continuous batching: many requests, each with its own method, decoded together with one target pass per step.

```
submit(prompt ids, method, settings) ──► waiting queue (thread-safe)
step():  drop cancelled rows
         admit waiting requests (prefill each alone, merge its cache row into the RaggedCache)
         step.decode_step(rows, RaggedScorer): each row proposes with its own budget and generator; the
         width policy cuts the greedy drafts; ONE target pass over the padded batch (mask (B, 1, q, C+q));
         each row verifies its own nodes; the cache keeps the accepted columns; stop handling per row
         updates to each request's handle (text pieces, then the result); finished rows leave
```
Methods that patch the target (`MethodSpec.target_patch`) cannot share a batch and are refused. An error in
one row (its drafter, its verification or sampling, its stop handling) fails only that row; an error in the
shared forward pass fails the batch. Trained drafters' networks are loaded once per method (`MethodBuild.shared`)
and shared, read-only, by the requests' drafters.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..draft_cut import AcceptRates, DraftCut, DraftHistory
from ..errors import InvalidSettingError, LeapdecodeError, PromptTooLongError
from ..lm import CausalLM
from ..methods import MethodBuild, MethodSpec, get_method
from ..sampling import make_generator
from ..stats import GenerationResult
from ..step import GenerationSettings, Sequence, decode_step, describe, settings as _settings
from .metrics import EngineMetrics
from .ragged_cache import RaggedCache, RaggedScorer
from .requests import Pending, SequenceHandle, SequenceUpdate


@dataclass
class Row(Sequence):
    """A running request: its sequence (see `step.Sequence`), its handle and its method."""

    handle: SequenceHandle | None = None
    method: str = ""


class BatchEngine:
    """Serves many generation requests with one target model, one batched forward pass per step.

    `methods` maps each method name to serve to its options (e.g. {"ar": {}, "pld": {"num_draft_tokens": 6}});
    besides the method's own options, `fit_width=false` turns the width policy off for that method.
    Use `step()` from your own loop, `run_until_done()`, or `start()` a worker thread and `submit()` from others.
    """

    def __init__(self, target, methods: Mapping[str, dict] | None = None, draft=None, max_batch_size: int = 8,
                 compact_slack: int = 16, step_draft_budget: int = 16, fit_width: bool = True):
        if max_batch_size < 1:
            raise InvalidSettingError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.target, self.draft, self.max_batch_size = target, draft, max_batch_size
        # Draft tokens per step shared by the greedy rows of a batch: every row is padded to the longest
        # draft, so long drafts in a full batch cost more than they save. Greedy output does not depend
        # on draft length; sampled rows keep their own budget so seeded output equals a lone run.
        # Within that budget the width policy (draft_cut.py: pass times measured per width, accept rates
        # learnt per method) cuts the greedy drafts to the width with the most expected tokens per second.
        self.step_draft_budget = step_draft_budget
        self.cut = DraftCut() if fit_width else None
        methods = {name: dict(options or {}) for name, options in (methods or {"ar": {}}).items()}
        for name in methods:
            spec = get_method(name)
            if spec.target_patch is not None:
                raise InvalidSettingError(f"method {name!r} patches the target model and cannot share a batch")
            if spec.run is not None:
                raise InvalidSettingError(f"method {name!r} runs a loop of its own and cannot share a batch")
            if spec.needs_draft_model and draft is None:
                raise InvalidSettingError(f"method {name!r} needs a draft model")
        if draft is not None:  # like `Decoder`: a draft with another tokenizer is refused at start, not per request
            from ..loading import check_draft_compatible

            check_draft_compatible(target, draft)
        self.specs: dict[str, tuple[MethodSpec, MethodBuild]] = {}
        self.rates: dict[str, AcceptRates | None] = {}  # per method; None: its drafts are not cut
        for name, options in methods.items():
            cut = _flag(options.pop("fit_width", True), name)
            build = MethodBuild(target=target, draft=draft, options=options, shared={})
            self.specs[name] = (get_method(name), build)
            self.specs[name][0].make_drafter(build)  # validates the options now (and loads what drafters share)
            self.rates[name] = AcceptRates() if cut else None
        self.lm = CausalLM(target.model)  # used for prefill of joining sequences
        self.cache = RaggedCache(self.lm.sliding_window, compact_slack)
        self.rows: list[Row] = []
        self.metrics = EngineMetrics()
        self._waiting: deque[Pending] = deque()
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
            self._waiting.append(Pending(handle, list(prompt_ids), method, settings))
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
                        row.handle._emit(SequenceUpdate(finished=True, error=describe(err)))
                    self.metrics.requests_failed += len(self.rows)
                    self.rows = []
                    self.cache = self.cache.emptied()
        self.metrics.busy_seconds += time.perf_counter() - started
        self.metrics.running = len(self.rows)
        return self.has_work()

    def run_until_done(self) -> None:
        while self.step():
            pass

    def generate(self, prompt_ids: list[int], method: str = "ar", **settings) -> GenerationResult:
        """One request through the batch engine (synchronously, for tests and scripts)."""
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
                pending.handle._emit(SequenceUpdate(finished=True, error=describe(err)))
                self.metrics.requests_failed += 1

    def _join(self, p: Pending) -> None:
        """Prefill one sequence alone (exactly as `Decoder` does) and merge its cache row into the batch.

        Everything that may fail for this request alone (its drafter, generator, text state, prefill) comes
        before its cache row is added, so a failure leaves the batch as it was."""
        spec, build = self.specs[p.method]
        started = time.perf_counter()
        rates = self.rates[p.method]
        row = Row.begin(p.prompt_ids, p.settings, spec.make_drafter(build), method=p.method,
                        tokenizer=self.target.tokenizer, stop_ids=self.target.stop_token_ids,
                        context_length=self.target.context_length,
                        history=DraftHistory(rates) if rates is not None else None, started=started,
                        logits_rule=spec.make_rule(build))
        row.handle, row.method = p.handle, p.method
        self.lm.reset()
        try:
            if len(p.prompt_ids) > 1:
                self.lm.forward(torch.tensor([p.prompt_ids[:-1]], dtype=torch.long), logits_to_keep=1, prompt=True)
            self.cache.add_row(self.lm.cache, len(p.prompt_ids) - 1)
        finally:
            self.lm.reset()
        row.stats.prefill_time = time.perf_counter() - started
        self.rows.append(row)

    def _decode_step(self) -> None:
        """One `step.decode_step` over the batch; then each row's update. An error in one row's own work fails
        that row."""
        failed: dict[int, str] = {}  # row index -> error
        cap = max(1, self.step_draft_budget // len(self.rows))
        produced = [row.produced for row in self.rows]
        decode_step(self.rows, RaggedScorer(self.target.model, self.cache, self.lm.device), self.cut, cap, failed)
        self.metrics.batch_passes += 1
        self.metrics.row_passes += len(self.rows)
        for b, row in enumerate(self.rows):
            if b not in failed:
                self.metrics.tokens_generated += row.produced - produced[b]
                self._emit(row)
        self._fail({id(self.rows[b]): message for b, message in failed.items()})
        self._drop([r for r in self.rows if r.finished], cancelled=False)

    def _emit(self, row: Row) -> None:
        piece = row.text.delta()
        if row.finished:
            piece += row.text.delta(final=True)
            row.handle._emit(SequenceUpdate(text=piece, token_ids=row.new, finished=True, result=row.result()))
            self.metrics.requests_finished += 1
        elif piece or row.new:
            row.handle._emit(SequenceUpdate(text=piece, token_ids=row.new))

    def _fail(self, errors: dict[int, str]) -> None:
        """End the rows (by id) whose own work raised, each with its error; the others go on."""
        rows = [r for r in self.rows if id(r) in errors]
        for row in rows:
            if not row.handle.done.is_set():
                row.handle._emit(SequenceUpdate(finished=True, error=errors[id(row)]))
                self.metrics.requests_failed += 1
        self._drop(rows, cancelled=False)

    def _drop(self, rows: list[Row], cancelled: bool) -> None:
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
            self.cache = self.cache.emptied()

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
        self.cache = self.cache.emptied()


def _flag(value, method: str) -> bool:
    """A boolean option: a bool, or its text from the command line."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise InvalidSettingError(f"method {method!r}: fit_width must be true or false, got {value!r}")
