"""OpenAI's `n`: several choices for one request, streamed or not.

```
method superposed ──► one superposed-decoding run (k = n drafts, one pass per step) on a worker thread,
                      beside the batch engine (its own cache; the weights are only read)
any other method  ──► n requests to the batch engine (seeds seed, seed+1, ... when a seed is given),
                      their updates merged; each chunk names its choice by `index`
```
A superposed run makes its drafts together, so when streamed each choice's text comes in one chunk at the end.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading

from ..stats import GenerationResult
from .schema import APIError, CompletionRequest

SUPERPOSED = "superposed"


def finish_reason(result: GenerationResult) -> str:
    return "stop" if result.stats.stop_reason in ("eos", "stop_string") else "length"


def usage(results: list[GenerationResult]) -> dict:
    p, c = len(results[0].prompt_ids), sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _indexed(choice: dict, index: int) -> dict:
    return {**choice, "index": index}


class Several:
    """Serves requests with n > 1 (or with the method `superposed`) for a `_Service` (server/app.py)."""

    def __init__(self, service, stats):
        self.service, self.stats = service, stats  # stats: GenerationResult -> the `leapdecode` extra
        self._decoder = None
        self._lock = threading.Lock()  # one superposed run at a time (one decoder, one cache)

    # ----- the runs -----
    def _superposed(self, ids: list[int], n: int, settings) -> list[GenerationResult]:
        from ..engine import Decoder

        with self._lock:
            if self._decoder is None:
                self._decoder = Decoder(self.service.engine.target, SUPERPOSED)
            p = settings.params
            return self._decoder.generate_several(ids, n, max_new_tokens=settings.max_new_tokens,
                                                  temperature=p.temperature, top_p=p.top_p, seed=settings.seed,
                                                  stop=settings.stop)

    def _prepare(self, req: CompletionRequest):
        if req.method == SUPERPOSED:
            _, settings = self.service.settings(dataclasses.replace(req, method=None))
        else:
            _, settings = self.service.settings(req)
        return settings, self.service.encode(req)

    async def _engine_runs(self, req: CompletionRequest, on_update=None) -> list[GenerationResult]:
        """n engine requests; `on_update(index, update)` (async) for each update; the results in order."""
        service = self.service
        handles, queues = [], []
        try:
            for i in range(req.n):
                seeded = req if req.seed is None else dataclasses.replace(req, seed=req.seed + i)
                handle, queue, _, _ = service.submit(seeded)
                handles.append(handle)
                queues.append(queue)

            async def drain(i: int):
                while True:
                    update = await queues[i].get()
                    if on_update is not None:
                        await on_update(i, update)
                    if update.finished:
                        if update.error:
                            raise APIError(500, f"generation failed: {update.error}", type="server_error")
                        return update.result

            return list(await asyncio.gather(*(drain(i) for i in range(req.n))))
        finally:
            for handle in handles:
                handle.cancel()

    async def results(self, req: CompletionRequest) -> list[GenerationResult]:
        if req.method == SUPERPOSED:
            settings, ids = self._prepare(req)
            return await asyncio.to_thread(self._superposed, ids, req.n, settings)
        self._prepare(req)  # a bad request fails before anything is submitted
        return await self._engine_runs(req)

    # ----- the responses -----
    def body(self, req: CompletionRequest, rid: str, results: list[GenerationResult]) -> dict:
        service = self.service
        body = service._envelope(req, rid, chunk=False)
        body["choices"] = [_indexed(service._choice(req, r.text, finish_reason(r), delta=False), i)
                           for i, r in enumerate(results)]
        body["usage"] = usage(results)
        body["leapdecode"] = self.stats(results[0])
        return body

    async def events(self, req: CompletionRequest, rid: str, sse):
        """The SSE events of a streamed request with n choices."""
        service = self.service
        chunk = lambda choices, **extra: sse({**service._envelope(req, rid, True), "choices": choices, **extra})
        if req.kind == "chat":  # each choice's first chunk carries the role
            for i in range(req.n):
                yield chunk([_indexed(service._choice(req, "", None, True, True), i)])
        if req.method == SUPERPOSED:
            try:
                results = await self.results(req)
            except APIError as err:
                yield sse(err.body())
                return
            for i, r in enumerate(results):
                if r.text:
                    yield chunk([_indexed(service._choice(req, r.text, None, True), i)])
        else:
            pending: asyncio.Queue = asyncio.Queue()

            async def on_update(i, update):
                await pending.put((i, update))

            task = asyncio.ensure_future(self._engine_runs(req, on_update))
            finished = 0
            try:
                while finished < req.n:
                    getter = asyncio.ensure_future(pending.get())
                    done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        if task.exception() is not None:
                            raise task.exception()
                        continue
                    i, update = getter.result()
                    if update.text:
                        yield chunk([_indexed(service._choice(req, update.text, None, True), i)])
                    if update.finished:
                        finished += 1
                        if update.error:
                            raise APIError(500, f"generation failed: {update.error}", type="server_error")
                results = await task
            except APIError as err:
                task.cancel()
                yield sse(err.body())
                return
        for i, r in enumerate(results):
            extra = {"leapdecode": self.stats(r)} if i == req.n - 1 else {}
            yield chunk([_indexed(service._choice(req, "", finish_reason(r), True), i)],
                        **({"usage": usage(results)} if i == req.n - 1 else {}), **extra)
        if req.include_usage:
            yield chunk([], usage=usage(results))
        yield sse("[DONE]")
