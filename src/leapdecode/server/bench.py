"""`leapdecode bench-serve`: concurrent streaming chat requests against a server; throughput and latency.

For each concurrency level c and each method (interleaved: all methods at c, then the next c), `--requests`
requests are sent by c client threads, each streaming `/v1/chat/completions` at temperature 0 with the same
prompts for every method. Throughput is completion tokens over all requests / wall time of the run;
latency is per request (send to last byte), TTFT the time to the first content. A warm-up request per method
runs first and is not timed. With no `--url`, `leapdecode serve` is started as a subprocess on a free port.
Only the client's stdlib is used, so the command needs nothing beyond the runtime dependencies.
An HTTP error from the server (e.g. a method it did not load) ends the run with `ServerReplyError`: one line with
the server's own message.
"""
from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from ..errors import LeapdecodeError


class ServerReplyError(LeapdecodeError):
    """The server answered a request with an HTTP error (its message is in the error's text), or could not be
    reached."""


def _reply_error(err: urllib.error.HTTPError, what: str) -> ServerReplyError:
    """The server's OpenAI-style error message (or its raw body) as one line."""
    try:
        raw = err.read().decode("utf-8", "replace")
    except OSError:
        raw = ""
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = " ".join(raw.split())[:200] or err.reason
    return ServerReplyError(f"the server answered {what} with HTTP {err.code}: {message}")


@contextmanager
def _reply(request: urllib.request.Request, what: str, timeout: float):
    """urlopen, with an HTTP error from the server (or no server) turned into `ServerReplyError`."""
    try:
        reply = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise _reply_error(err, what) from None
    except urllib.error.URLError as err:
        raise ServerReplyError(f"cannot reach the server at {request.full_url} ({what}): {err.reason}") from None
    with reply:
        yield reply


@dataclass
class RequestTiming:
    latency: float  # seconds, send to end of stream
    ttft: float  # seconds to the first content
    tokens: int  # completion tokens (from usage)
    text: str
    mean_accepted: float


@dataclass
class BenchRow:
    method: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    latency_p50: float
    latency_p90: float
    latency_p99: float
    ttft_p50: float
    mean_accepted: float
    identical_to_ar: bool | None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _stream_chat(url: str, api_key: str | None, model: str, prompt: str, method: str, max_tokens: int) -> RequestTiming:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "method": method}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    started = time.perf_counter()
    ttft, text, usage, stats = None, [], {}, {}
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers)
    with _reply(request, f"a {method!r} chat request", timeout=600) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise LeapdecodeError(f"server error: {chunk['error']['message']}")
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    text.append(piece)
            usage = chunk.get("usage") or usage
            stats = chunk.get("leapdecode") or stats
    latency = time.perf_counter() - started
    return RequestTiming(latency, ttft if ttft is not None else latency, int(usage.get("completion_tokens", 0)),
                         "".join(text), float(stats.get("mean_accepted", 0.0)))


def _get_json(url: str, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with _reply(urllib.request.Request(url, headers=headers), f"GET {urllib.parse.urlsplit(url).path}",
                timeout=10) as reply:
        return json.loads(reply.read())


def _start_server(args, methods: list[str], max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "leapdecode.cli", "serve", "--model", args.model, "--method", ",".join(methods),
           "--port", str(port), "--max-batch-size", str(max_batch), "--log-level", "warning"]
    if args.draft_model:
        cmd += ["--draft-model", args.draft_model]
    if getattr(args, "device", None):
        cmd += ["--device", args.device]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    if getattr(args, "threads", None):
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LeapdecodeError(f"`leapdecode serve` exited with code {proc.returncode}")
        try:
            _get_json(url + "/health", None)
            return proc, url
        except (ServerReplyError, ConnectionError, OSError):
            time.sleep(0.5)
    proc.terminate()
    raise LeapdecodeError("the server did not come up in 15 minutes")


def _prompts(count: int) -> list[str]:
    from ..bench.questions import load_questions

    questions = load_questions()
    by_category: dict[str, list[str]] = {}
    for q in questions:
        by_category.setdefault(q.category, []).append(q.turns[0])
    mixed = [p for group in zip(*by_category.values()) for p in group]  # one per category, round robin
    return [mixed[i % len(mixed)] for i in range(count)]


def run_bench_serve(args) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sizes = [int(c) for c in args.batch_sizes.split(",") if c.strip()]
    if not methods or not sizes or min(sizes) < 1 or args.requests < 1 or args.max_tokens < 1:
        raise LeapdecodeError("need methods, batch sizes >= 1, --requests >= 1 and --max-tokens >= 1")
    proc = None
    url = args.url
    try:
        if url is None:
            proc, url = _start_server(args, methods, max(sizes))
        url = url.rstrip("/")
        model = _get_json(url + "/v1/models", args.api_key)["data"][0]["id"]
        prompts = _prompts(args.requests)
        for method in methods:  # warm-up, not timed
            _stream_chat(url, args.api_key, model, prompts[0], method, 8)
        rows: list[BenchRow] = []
        reference: dict[int, list[str]] = {}
        for c in sizes:
            for method in methods:
                started = time.perf_counter()
                with ThreadPoolExecutor(max_workers=c) as pool:
                    timings = list(pool.map(lambda p: _stream_chat(url, args.api_key, model, p, method,
                                                                   args.max_tokens), prompts))
                wall = time.perf_counter() - started
                texts = [t.text for t in timings]
                same = None
                if method == "ar":
                    reference[c] = texts
                elif c in reference:
                    same = texts == reference[c]
                tokens = sum(t.tokens for t in timings)
                rows.append(BenchRow(
                    method=method, concurrency=c, requests=len(timings), tokens=tokens, wall_s=wall,
                    tokens_per_s=tokens / wall if wall else 0.0,
                    latency_p50=_percentile([t.latency for t in timings], 0.5),
                    latency_p90=_percentile([t.latency for t in timings], 0.9),
                    latency_p99=_percentile([t.latency for t in timings], 0.99),
                    ttft_p50=_percentile([t.ttft for t in timings], 0.5),
                    mean_accepted=statistics.fmean(t.mean_accepted for t in timings), identical_to_ar=same))
                _print_row(rows[-1], header=len(rows) == 1)
        _print_speedups(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([asdict(r) for r in rows], f, indent=2)
        return 1 if any(r.identical_to_ar is False for r in rows) else 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


def _print_row(r: BenchRow, header: bool) -> None:
    if header:
        print(f"{'method':10} {'batch':>5} {'reqs':>4} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'p50 s':>6} "
              f"{'p90 s':>6} {'p99 s':>6} {'ttft50':>6} {'accept':>6}  identical")
    same = "-" if r.identical_to_ar is None else ("yes" if r.identical_to_ar else "NO")
    print(f"{r.method:10} {r.concurrency:>5} {r.requests:>4} {r.tokens:>6} {r.wall_s:>7.2f} {r.tokens_per_s:>7.1f} "
          f"{r.latency_p50:>6.2f} {r.latency_p90:>6.2f} {r.latency_p99:>6.2f} {r.ttft_p50:>6.2f} "
          f"{r.mean_accepted:>6.2f}  {same}", flush=True)


def _print_speedups(rows: list[BenchRow]) -> None:
    for c in sorted({r.concurrency for r in rows}):
        base = next((r for r in rows if r.concurrency == c and r.method == "ar"), None)
        if base is None or not base.tokens_per_s:
            continue
        others = [f"{r.method} {r.tokens_per_s / base.tokens_per_s:.2f}x" for r in rows
                  if r.concurrency == c and r.method != "ar"]
        if others:
            print(f"batch {c}: throughput vs ar: {', '.join(others)}")
