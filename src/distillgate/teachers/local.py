"""``LocalTeacher``: the in-process transformers teacher behind the async ``Teacher`` interface.

Generation is CPU-bound, so it never runs on the event loop: one worker thread owns the model and takes jobs from
a queue. Jobs that arrive within ``batch_wait_s`` of each other are decoded together as one padded batch (up to
``max_batch`` rows; each row keeps its own sampling settings and stops on its own), which is where a small CPU
model gains throughput. Streaming hands text deltas from the worker to the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distillgate.errors import DistillgateError, UpstreamError
from distillgate.teachers import wire
from distillgate.teachers.base import Teacher, TeacherCard
from distillgate.teachers.engine import DeltaCallback, Generation, LocalModel, Prompt, SamplingParams


@dataclass
class _Job:
    prompts: list[Prompt]
    params: list[SamplingParams]
    future: concurrent.futures.Future[list[Generation]]
    on_delta: DeltaCallback | None = None


class LocalTeacher(Teacher):
    """Serves a ``LocalModel`` to concurrent async callers through a batching worker thread."""

    def __init__(self, engine: LocalModel, *, max_batch: int = 32, batch_wait_s: float = 0.01) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self.batches_run = 0  # how many batched forward loops ran (observability, tests)
        self._engine_lock = threading.Lock()  # the engine is not thread-safe: generation and label scoring share it
        self._thread = threading.Thread(target=self._worker, name=f"teacher:{self.model_name}", daemon=True)
        self._thread.start()
        self._label_queue: queue.Queue[tuple[Prompt, list[str], bool, concurrent.futures.Future[Any]] | None] = \
            queue.Queue()
        self._label_thread = threading.Thread(target=self._label_worker, name=f"labels:{self.model_name}",
                                              daemon=True)
        self._label_thread.start()

    # ------------------------------------------------------------------ worker
    def submit(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams],
               on_delta: DeltaCallback | None = None) -> concurrent.futures.Future[list[Generation]]:
        """Queue a job for the worker; thread-safe. The future resolves to one Generation per prompt."""
        if self._closed:
            raise UpstreamError(f"teacher {self.model_name!r} is closed", status=503)
        for p in params:
            p.check()
        future: concurrent.futures.Future[list[Generation]] = concurrent.futures.Future()
        self._queue.put(_Job(list(prompts), list(params), future, on_delta))
        return future

    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            rows = len(job.prompts)
            deadline = time.monotonic() + self.batch_wait_s
            stop_after = False
            while rows < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop_after = True
                    break
                jobs.append(nxt)
                rows += len(nxt.prompts)
            self._run(jobs)
            if stop_after:
                return

    def _run(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        prompts: list[Prompt] = []
        params: list[SamplingParams] = []
        owner: list[tuple[_Job, int]] = []
        for job in jobs:
            for i, (prompt, p) in enumerate(zip(job.prompts, job.params, strict=True)):
                prompts.append(prompt)
                params.append(p)
                owner.append((job, i))

        def dispatch(row: int, text: str) -> None:
            job, i = owner[row]
            if job.on_delta is not None:
                job.on_delta(i, text)

        try:
            self.batches_run += 1
            with self._engine_lock:
                gens = self.engine.generate(prompts, params, on_delta=dispatch)
        except Exception as exc:  # one bad job must not fail its batch-mates: retry them alone
            if len(jobs) == 1:
                jobs[0].future.set_exception(_as_upstream(exc))
                return
            for job in jobs:
                try:
                    with self._engine_lock:
                        one = self.engine.generate(job.prompts, job.params, on_delta=job.on_delta)
                    job.future.set_result(one)
                except Exception as single:
                    job.future.set_exception(_as_upstream(single))
            return
        at = 0
        for job in jobs:
            job.future.set_result(gens[at:at + len(job.prompts)])
            at += len(job.prompts)

    async def generate(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams],
                       on_delta: DeltaCallback | None = None) -> list[Generation]:
        """Await generations from the worker without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(prompts, params, on_delta))

    # --------------------------------------------------------------- interface
    def card(self) -> TeacherCard:
        return self.engine.card()

    def fingerprint(self) -> str:
        sha = self.engine.card().file_sha256 or "unknown"
        return f"dg-{sha[:12]}"

    def _label_worker(self) -> None:
        """Score concurrent label requests together: one padded pass per batch, the shared prefix computed once."""
        while True:
            first = self._label_queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._label_queue.get(timeout=self.batch_wait_s)
                except queue.Empty:
                    break
                if nxt is None:
                    self._label_queue.put(None)
                    break
                batch.append(nxt)
            groups: dict[tuple[tuple[str, ...], bool], list[tuple[Prompt, concurrent.futures.Future[Any]]]] = {}
            for prompt, wanted, mean, future in batch:
                if future.set_running_or_notify_cancel():
                    groups.setdefault((tuple(wanted), mean), []).append((prompt, future))
            for (label_set, mean), jobs in groups.items():
                try:
                    with self._engine_lock:
                        probs = self.engine.score_labels_batch([p for p, _ in jobs], list(label_set),
                                                               length_normalise=mean)
                        sizes = [len(self.engine.encode(p)) for p, _ in jobs]
                except Exception as exc:
                    for _, future in jobs:
                        future.set_exception(_as_upstream(exc))
                    continue
                for (_, future), dist, size in zip(jobs, probs, sizes, strict=True):
                    future.set_result((dist, size))

    async def score_labels(self, messages: Prompt, labels: Sequence[str], *,
                           length_normalise: bool = False) -> tuple[dict[str, float], int]:
        """The teacher's distribution over ``labels`` as the answer to ``messages``, and the prompt's tokens."""
        if self._closed:
            raise UpstreamError(f"teacher {self.model_name!r} is closed", status=503)
        future: concurrent.futures.Future[tuple[dict[str, float], int]] = concurrent.futures.Future()
        self._label_queue.put((messages, list(labels), length_normalise, future))
        return await asyncio.wrap_future(future)

    async def _label_completion(self, body: Mapping[str, Any], labels: list[str], mean: bool) -> dict[str, Any]:
        req = wire.parse_chat(body)
        if req.stream or req.n != 1:
            raise UpstreamError("label_choices answers one non-streamed choice (n=1, stream=false)", status=400)
        probs, prompt_tokens = await self.score_labels(req.messages, labels, length_normalise=mean)
        best = max(probs, key=probs.__getitem__)
        answer_tokens = len(self.engine.tokenizer(best, add_special_tokens=False)["input_ids"])
        return wire.label_response(self.model_name, self.fingerprint(), probs, prompt_tokens, answer_tokens)

    async def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        if body.get("label_choices") is not None:
            labels = wire.parse_label_choices(body.get("label_choices"))
            mean = wire.parse_label_score(body.get("label_score"))
            rest = {k: v for k, v in body.items() if k not in ("label_choices", "label_score")}
            return await self._label_completion(rest, labels, mean)
        req = wire.parse_chat(body)
        gens = await self.generate([req.messages] * req.n,
                                   [wire.choice_params(req.params, j) for j in range(req.n)])
        return wire.chat_response(self.model_name, self.fingerprint(), gens)

    async def stream_chat_completion(self, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        req = wire.parse_chat(body)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

        def on_delta(row: int, text: str) -> None:
            loop.call_soon_threadsafe(deltas.put_nowait, (row, text))

        cid, created, fp = wire.new_id("chatcmpl"), int(time.time()), self.fingerprint()
        future = asyncio.wrap_future(self.submit([req.messages] * req.n,
                                                 [wire.choice_params(req.params, j) for j in range(req.n)],
                                                 on_delta))
        yield wire.chunk(cid, created, self.model_name, fp,
                         [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None} for j in range(req.n)])
        try:
            while not future.done() or not deltas.empty():
                getter = asyncio.ensure_future(deltas.get())
                waiting: set[asyncio.Future[Any]] = {getter, future}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    row, text = getter.result()
                    yield wire.chunk(cid, created, self.model_name, fp,
                                     [{"index": row, "delta": {"content": text}, "logprobs": None,
                                       "finish_reason": None}])
                else:
                    getter.cancel()
            gens = future.result()
        finally:
            if not future.done():
                future.cancel()
        for j, g in enumerate(gens):
            yield wire.chunk(cid, created, self.model_name, fp,
                             [{"index": j, "delta": {}, "logprobs": wire.chat_logprobs(g.logprobs),
                               "finish_reason": g.finish_reason}])
        yield wire.chunk(cid, created, self.model_name, fp, [], wire.usage(gens[0].prompt_tokens, gens))

    async def completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        req = wire.parse_completion(body)
        prompts: list[Prompt] = []
        params: list[SamplingParams] = []
        for prompt in req.prompts:
            for j in range(req.n):
                prompts.append(prompt)
                params.append(wire.choice_params(req.params, j))
        gens = await self.generate(prompts, params)
        return wire.completion_response(self.model_name, self.fingerprint(), req.prompts, req.n, gens, req.echo)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._label_queue.put(None)
        await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self._label_thread.join)


def _as_upstream(exc: Exception) -> UpstreamError:
    """Engine errors as the interface's UpstreamError: bad input -> 400, anything else -> 500."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, DistillgateError):
        return UpstreamError(exc.message, status=400, hint=exc.hint)
    return UpstreamError(f"local teacher failed: {type(exc).__name__}: {exc}", status=500,
                         hint="rerun with DISTILLGATE_DEBUG=1 and report it")
