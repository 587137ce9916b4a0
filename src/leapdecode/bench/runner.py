"""The benchmark loop: every method on every question, interleaved, timed fairly, in one process.

```
check methods / settings / out dir ──► (CLI loads the models) ──► warm-up: each method once, untimed
for question:                      # a question is complete when all its repeats of all methods ran
    for repeat:
        for method:                # back to back on the same prompt: drift hits all methods alike
            for turn:              # turn 2 is asked after THIS method's own answer to turn 1
                prompt ids ──► runner.run ──► TurnOutput (timed inside the runner)
    keep each method's median repeat (by wall time) as its AnswerRecord
──► compare to `ar` ──► answers.jsonl, summary.json, PNG plots, report.md
```

Prompts: with a chat template, turn k is the conversation ``[user t1, assistant a1, ..., user tk]``
through the template (as Spec-Bench does). A target without a chat template (the tiny test models)
gets the same conversation as plain text: the turns and answers joined by blank lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from leapdecode.bench.questions import Question, categories_of
from leapdecode.bench.report import differing_questions, format_table, write_report
from leapdecode.bench.summary import (
    REFERENCE_METHOD,
    AnswerRecord,
    TurnOutput,
    build_summary,
    compare_to_reference,
    machine_description,
    write_answers,
    write_summary,
)
from leapdecode.bench.llamacpp_peer import LLAMACPP_METHODS, is_llamacpp, require_llamacpp
from leapdecode.errors import InvalidSettingError, LeapdecodeError
from leapdecode.methods import LOSSLESS, all_methods, get_method, split_variant
from leapdecode.peers import PEER_METHODS
from leapdecode.sampling import SamplingParams

WARMUP_PROMPT = "Write one short sentence about the sea."
"""Untimed prompt each method answers once before the timed runs."""

PLAIN_TURN_SEPARATOR = "\n\n"
"""Joins turns and answers into one prompt when the target has no chat template."""


# ----- settings and validation ----------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    """How each method is run; the same for every method."""

    max_new_tokens: int = 256  # per turn
    repeats: int = 1  # timed runs per (question, method); the median (by wall time) is kept
    temperature: float = 0.0  # 0 = greedy
    seed: int | None = None  # sampling seed, the same for every call
    warmup_tokens: int = 8  # new tokens of the untimed warm-up run
    chat: bool | None = None  # None: use the chat template when the target has one

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "repeats", "warmup_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidSettingError(f"{name} must be a positive integer, got {value!r}")
        SamplingParams(temperature=self.temperature)  # raises for a negative temperature

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def valid_method_names() -> list[str]:
    """Engine methods (from the registry), then the transformers and llama.cpp peers."""
    return [spec.name for spec in all_methods()] + list(PEER_METHODS) + list(LLAMACPP_METHODS)


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Split a comma-separated list (or take a list), drop blanks and repeats, keep the order."""
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    if not names:
        raise InvalidSettingError(f"no methods given; valid methods: {', '.join(valid_method_names())}")
    return names


def needs_draft(method: str) -> bool:
    """True for methods that cannot run without a draft model."""
    method = split_variant(method)[0]
    if method in PEER_METHODS or method in LLAMACPP_METHODS:
        return method == "hf-assisted"
    return get_method(method).needs_draft_model


def is_lossless(method: str) -> bool:
    """Lossless engine methods, and the transformers peers (greedy generate, exact by design). The llama.cpp
    peers are not: other kernels, so their output is compared to `ar`'s by token agreement."""
    method = split_variant(method)[0]
    if method in LLAMACPP_METHODS:
        return False
    return method in PEER_METHODS or get_method(method).promise == LOSSLESS


def check_methods(
    methods: str | Sequence[str], *, has_draft: bool, settings: BenchSettings | None = None
) -> list[str]:
    """Validate method names against the registry and the settings; return the cleaned list.

    Raises ``LeapdecodeError`` listing the valid methods for an unknown name, and for a method that
    needs a draft model when there is none.
    """
    names = parse_methods(methods)
    valid = valid_method_names()
    unknown = [n for n in names if split_variant(n)[0] not in valid]
    if unknown:
        raise InvalidSettingError(
            f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"valid methods: {', '.join(valid)}"
        )
    with_options = [n for n in names if "@" in n and split_variant(n)[0] in PEER_METHODS]
    if with_options:
        raise InvalidSettingError(f"the transformers peers take no @options: {', '.join(with_options)}")
    if not has_draft:
        wanting = [n for n in names if needs_draft(n)]
        if wanting:
            raise InvalidSettingError(
                f"method{'s' if len(wanting) > 1 else ''} {', '.join(wanting)} "
                f"need{'' if len(wanting) > 1 else 's'} a draft model (--draft-model)"
            )
    if settings is not None and not settings.greedy:
        peers = [n for n in names if n in PEER_METHODS]
        if peers:
            raise InvalidSettingError(
                f"{', '.join(peers)} run transformers' generate() greedy only; drop them or use "
                "--temperature 0"
            )
        peers = [n for n in names if is_llamacpp(n)]
        if peers:
            raise InvalidSettingError(f"{', '.join(peers)} run llama.cpp greedy only; drop them or use --temperature 0")
    require_llamacpp(names)  # before any model is loaded
    return names


def prepare_out_dir(path: str | os.PathLike[str]) -> Path:
    """Create the output folder if needed and check that files can be written into it."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise LeapdecodeError(f"output folder {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise LeapdecodeError(f"output folder {out} is not writable: {exc.strerror or exc}") from None
    return out


# ----- method runners ---------------------------------------------------------------------------------


class MethodRunner(Protocol):
    """Runs one method on prompt token ids; built once per benchmark, reused for every call."""

    name: str

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> TurnOutput: ...


class EngineRunner:
    """A leapdecode method through ``Decoder.generate``; ``options`` are defaults under the name's @options."""

    def __init__(self, name: str, target, draft, settings: BenchSettings, options: Mapping[str, Any] | None = None):
        from leapdecode.engine import Decoder

        self.name = name
        self.settings = settings
        base, variant = split_variant(name)
        options = {**(options or {}), **variant}
        self.decoder = Decoder(target, base, draft=draft if needs_draft(name) else None, **options)

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> TurnOutput:
        result = self.decoder.generate(
            prompt_ids, max_new_tokens=max_new_tokens, temperature=self.settings.temperature,
            seed=self.settings.seed,
        )
        from leapdecode.kv_compress import kv_bytes

        self.kv_bytes = kv_bytes(self.decoder.lm.cache)  # what the KV cache holds after the answer (real tensors)
        st = result.stats
        return TurnOutput(list(result.token_ids), st.wall_time, st.target_forward_passes,
                          list(st.accept_lengths))


class PeerRunner:
    """transformers' ``generate()`` (hf-ar, hf-pld, hf-assisted) through ``peers.hf_generate``.

    transformers reports no acceptance statistics, so a forward pre-hook on the target counts its
    forward calls (the prefill call included: in ``generate`` it produces the first token) and reads
    each call's first position; the difference between consecutive positions is what a call committed.
    The hook exists only during the call.
    """

    def __init__(self, name: str, target, draft):
        self.name = name
        self.target = target
        self.draft = draft if name == "hf-assisted" else None

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> TurnOutput:
        from leapdecode.peers import hf_generate

        with _first_positions(self.target.model) as positions:
            result = hf_generate(self.name, self.target, prompt_ids, max_new_tokens, draft=self.draft)
        ids = list(result.token_ids)
        return TurnOutput(ids, result.wall_time, len(positions),
                          _peer_accept_lengths(positions, len(prompt_ids), len(ids)))


@contextlib.contextmanager
def _first_positions(model) -> Iterator[list[int | None]]:
    """Collect the first position id of every forward call of ``model`` (None where unknown)."""
    positions: list[int | None] = []

    def hook(_module, _args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = kwargs.get("cache_position")
        positions.append(None if pos is None or pos.numel() == 0 else int(pos.reshape(-1)[0]))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield positions
    finally:
        handle.remove()


def _peer_accept_lengths(positions: Sequence[int | None], prompt_len: int, new_tokens: int) -> list[int]:
    """Tokens committed per forward call, from each call's first position; [] when not derivable.

    Call i >= 1 starts at the last committed token (position S_i - 1 for a sequence of S_i tokens),
    so call i committed ``pos[i+1] - pos[i]``; the prefill call counts from ``prompt_len - 1`` and the
    last call up to the last new token.
    """
    if not positions or any(p is None for p in positions):
        return []
    starts = [prompt_len - 1, *positions[1:], prompt_len + new_tokens - 1]
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    if any(n < 1 for n in lengths) or sum(lengths) != new_tokens:
        return []
    return lengths


def make_runner(name: str, target, draft, settings: BenchSettings,
                options: Mapping[str, Any] | None = None) -> MethodRunner:
    """The runner for an engine method (``options``: extra method options), a transformers or llama.cpp peer."""
    if name in PEER_METHODS:
        return PeerRunner(name, target, draft)
    if is_llamacpp(name):
        from leapdecode.bench.llamacpp_peer import LlamaCppRunner

        return LlamaCppRunner(name, target, options)
    return EngineRunner(name, target, draft, settings, options)


RunnerFactory = Callable[[str, Any, Any, BenchSettings], MethodRunner]


def runner_factory_with(method_options: Mapping[str, Mapping[str, Any]]) -> RunnerFactory:
    """``make_runner`` with extra options per method name (e.g. from ``--skip-config``); a name's own
    @options win over them."""
    def factory(name: str, target, draft, settings: BenchSettings) -> MethodRunner:
        return make_runner(name, target, draft, settings, method_options.get(name))

    return factory


# ----- prompts -------------------------------------------------------------------------------------


class PromptBuilder:
    """Token ids of turn k of a conversation, for one target tokenizer."""

    def __init__(self, target, chat: bool | None = None):
        from leapdecode.engine import Decoder

        self.tokenizer = target.tokenizer
        self.chat = target.has_chat_template if chat is None else chat
        if self.chat and not target.has_chat_template:
            raise InvalidSettingError(f"model {target.name!r} has no chat template")
        self._encoder = Decoder(target, "ar")  # encode_prompt only; never generates

    def ids(self, user_turns: Sequence[str], answers: Sequence[str]) -> list[int]:
        """Ids of ``[user t1, assistant a1, ..., user tk]`` with k = len(user_turns) = len(answers) + 1."""
        if len(user_turns) != len(answers) + 1:
            raise ValueError("one more user turn than answers expected")
        if self.chat:
            messages: list[dict[str, str]] = []
            for turn, answer in zip(user_turns, [*answers, None]):
                messages.append({"role": "user", "content": turn})
                if answer is not None:
                    messages.append({"role": "assistant", "content": answer})
            return self._encoder.encode_prompt(messages)
        parts = [p for pair in zip(user_turns, [*answers, ""]) for p in pair][:-1]
        return self._encoder.encode_prompt(PLAIN_TURN_SEPARATOR.join(parts), chat=False)

    def answer_text(self, token_ids: Sequence[int]) -> str:
        """The text an answer contributes to the next turn (special tokens dropped, trimmed)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()


# ----- memory ------------------------------------------------------------------------------------------


class PeakRss:
    """Peak resident memory of this process during a call, in MB (2**20 bytes).

    On Linux the kernel's high-water mark (VmHWM) is reset before the call (``/proc/self/clear_refs``)
    and read after it, which catches a short peak inside the call. Where that is not possible the
    current RSS (``/proc/self/statm``) is sampled before and after the call instead.
    """

    def __init__(self) -> None:
        self.can_reset = self._reset() and self._hwm_mb() is not None
        self._page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 4096 / 2**20

    @contextlib.contextmanager
    def measure(self) -> Iterator[list[float]]:
        """Yields a list that holds the call's peak (MB) after the block; empty if not measurable."""
        out: list[float] = []
        before = self._rss_mb()
        if self.can_reset:
            self._reset()
        try:
            yield out
        finally:
            after = self._hwm_mb() if self.can_reset else self._rss_mb()
            values = [v for v in (before, after) if v is not None]
            if values:
                out.append(max(values))

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _hwm_mb() -> float | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def _rss_mb(self) -> float | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page_mb
        except (OSError, ValueError, IndexError):
            return None


# ----- the loop ----------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    """What a benchmark run produced."""

    records: list[AnswerRecord]  # one per (complete question, method), identical_to_ar filled in
    summary: dict[str, Any] | None  # None when no question completed
    mismatches: dict[str, list[int]]  # lossless method -> question ids whose tokens differ from ar's
    interrupted: bool  # Ctrl-C: only complete questions were kept
    files: list[Path] = field(default_factory=list)
    call_order: list[tuple[int, int, str]] = field(default_factory=list)  # (question_id, repeat, method)

    @property
    def table(self) -> str:
        return format_table(self.summary) if self.summary else ""


@dataclass
class _Run:
    """One method's answer to one question in one repeat (all turns)."""

    turns: list[str]
    outputs: list[TurnOutput]
    peak_rss_mb: float | None

    @property
    def wall_time(self) -> float:
        return sum(o.wall_time for o in self.outputs)


def run_benchmark(
    target,
    draft,
    questions: Sequence[Question],
    methods: str | Sequence[str],
    settings: BenchSettings,
    out_dir: str | os.PathLike[str],
    *,
    command_line: str = "leapdecode bench",
    extra_settings: Mapping[str, Any] | None = None,
    runner_factory: RunnerFactory = make_runner,
    progress: bool = True,
    plots: bool = True,
    log=None,
) -> BenchResult:
    """Run ``methods`` on ``questions`` with already-loaded models and write the results to ``out_dir``.

    ``target``/``draft`` are ``LoadedModel``s (``draft`` may be None). Ctrl-C stops the run, keeps the
    questions that are complete and still writes the files (``BenchResult.interrupted``). Lossless
    methods whose greedy output differs from ``ar`` are reported on ``log`` (stderr by default), in
    ``summary.json`` (``settings.lossless_mismatches``) and at the top of ``report.md``.
    """
    log = log or sys.stderr
    names = check_methods(methods, has_draft=draft is not None, settings=settings)
    if not questions:
        raise LeapdecodeError("no questions to run")
    out = prepare_out_dir(out_dir)
    prompts = PromptBuilder(target, settings.chat)
    runners = {name: runner_factory(name, target, draft, settings) for name in names}
    meter = PeakRss()
    peak: dict[str, float] = {}
    records: list[AnswerRecord] = []
    call_order: list[tuple[int, int, str]] = []
    reference = REFERENCE_METHOD if REFERENCE_METHOD in names else names[0]
    flagged: dict[str, list[int]] = {}
    interrupted = False

    def run_one(name: str, question: Question) -> _Run:
        answers: list[str] = []
        outputs: list[TurnOutput] = []
        peaks: list[float] = []
        for k in range(len(question.turns)):
            ids = prompts.ids(question.turns[: k + 1], answers)
            limit = min(settings.max_new_tokens, target.context_length - len(ids))
            if limit < 1:
                raise LeapdecodeError(
                    f"question {question.question_id} turn {k + 1}: the prompt has {len(ids)} tokens, "
                    f"{target.name!r} has a context of {target.context_length}"
                )
            with meter.measure() as rss:
                output = runners[name].run(ids, limit)
            peaks += rss
            outputs.append(output)
            answers.append(prompts.answer_text(output.token_ids))
        return _Run(answers, outputs, max(peaks) if peaks else None)

    load_start = _load_average()
    if load_start is not None and load_start > 0.5 * (os.cpu_count() or 1):
        print(f"note: the load average is {load_start:.1f} on {os.cpu_count()} cores: other processes "
              "compete for the CPU and timings will be noisy", file=log)
    bar = _progress_bar(len(questions) * len(names) * settings.repeats, progress)
    try:
        with _quiet_transformers():
            bar.set_description("warm-up")
            warm_ids = prompts.ids([WARMUP_PROMPT], [])
            for name in names:
                runners[name].run(warm_ids, settings.warmup_tokens)
            for question in questions:
                bar.set_description(f"question {question.question_id} ({question.category})")
                runs: dict[str, list[_Run]] = {name: [] for name in names}
                for repeat in range(settings.repeats):
                    for name in names:
                        bar.set_postfix_str(name, refresh=False)
                        call_order.append((question.question_id, repeat, name))
                        run = run_one(name, question)
                        runs[name].append(run)
                        if run.peak_rss_mb is not None:
                            peak[name] = max(peak.get(name, 0.0), run.peak_rss_mb)
                        bar.update(1)
                new = [_record(question, name, _median_run(runs[name])) for name in names]
                for record in new:  # KV-cache bytes after the last answer (engine methods)
                    record.kv_bytes = getattr(runners[record.method], "kv_bytes", None)
                records += new
                for name, qids in _mismatches(new, reference, names, settings).items():
                    flagged.setdefault(name, []).extend(qids)
                    bar.write(f"WARNING: lossless method {name} differs from {reference} on question "
                              f"{question.question_id}", file=log)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()

    if not records:
        if interrupted:
            print("interrupted before the first question was complete; nothing written", file=log)
        return BenchResult([], None, {}, interrupted, call_order=call_order)

    records = compare_to_reference(records, reference)
    done = {r.question_id for r in records}
    run_settings = {
        "methods": ",".join(names),
        "lossless_methods": [n for n in names if is_lossless(n)],
        **dict(extra_settings or {}),
        "questions_run": len(done),
        "categories_run": categories_of([q for q in questions if q.question_id in done]),
        "max_new_tokens": settings.max_new_tokens,
        "repeats": settings.repeats,
        "temperature": settings.temperature,
        "seed": settings.seed,
        "torch_threads": _torch_threads(),
        "load_average": _load_note(load_start, _load_average()),
        "prompt_format": "chat template" if prompts.chat else "plain text: turns and answers joined by blank lines",
        "order": "per question: each repeat runs every method back to back (interleaved)",
        "timing": f"median of {settings.repeats} repeat(s) by wall time; warm-up run per method not timed",
        "peak_rss": "process resident set high-water mark during the method's calls"
        if meter.can_reset else "process RSS sampled before and after each call",
        "lossless_mismatches": {m: q for m, q in flagged.items()},
        "interrupted": interrupted,
    }
    summary = build_summary(
        records, model=target.name, draft_model=getattr(draft, "name", None) if draft is not None else None,
        machine=machine_description(), settings=run_settings, peak_rss_mb=peak,
    )
    from leapdecode.bench.quality import add_quality_to_summary, quality_table, write_quality

    quality = quality_table(records, {q.question_id: q.reference for q in questions},
                            summary["settings"]["reference_method"])
    add_quality_to_summary(summary, quality, [n for n in names if not is_lossless(n)])
    files = [write_answers(out / "answers.jsonl", records), write_summary(out / "summary.json", summary)]
    if plots:
        from leapdecode.bench import write_plots

        files += write_plots(out, summary, records)
    lossless = [n for n in names if is_lossless(n)] if settings.greedy else None
    files.append(write_report(out, summary, records, command_line, lossless=lossless))
    files += write_quality(out, summary, records, questions, [n for n in names if is_lossless(n)], plots=plots,
                           quality=quality)
    return BenchResult(records, summary, flagged, interrupted, files, call_order)


def _mismatches(
    records: Sequence[AnswerRecord], reference: str, names: Sequence[str], settings: BenchSettings
) -> dict[str, list[int]]:
    """Lossless methods whose tokens differ from the reference's (greedy runs only)."""
    if not settings.greedy or not is_lossless(reference):
        return {}
    return {m: q for m, q in differing_questions(records, reference).items() if is_lossless(m)}


def _median_run(runs: Sequence[_Run]) -> _Run:
    """The run with the median wall time (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.wall_time)
    return ordered[(len(ordered) - 1) // 2]


def _record(question: Question, method: str, run: _Run) -> AnswerRecord:
    outs = run.outputs
    return AnswerRecord(
        question_id=question.question_id,
        category=question.category,
        method=method,
        turns=list(run.turns),
        token_ids=[list(o.token_ids) for o in outs],
        new_tokens=sum(len(o.token_ids) for o in outs),
        wall_time=run.wall_time,
        target_forward_passes=sum(o.target_forward_passes for o in outs),
        accept_lengths=[n for o in outs for n in o.accept_lengths],
    )


def _load_average() -> float | None:
    """The 1-minute system load average (None where unknown)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _load_note(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "unknown"
    return f"{start:.1f} at start, {end:.1f} at end ({os.cpu_count()} logical cores; above ~half the cores means contention)"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


class _NoBar:
    def set_description(self, *a, **k) -> None: ...
    def set_postfix_str(self, *a, **k) -> None: ...
    def update(self, *a) -> None: ...
    def close(self) -> None: ...

    @staticmethod
    def write(text: str, file=None) -> None:
        print(text, file=file or sys.stderr)


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar on stderr with ETA over (question x method x repeat) runs."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-call warnings (they would break the progress bar); restore after."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)

