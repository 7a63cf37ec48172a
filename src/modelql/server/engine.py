"""The continuous-batching scheduler: one worker thread owns the model.

Requests are split into *sequences* (`modelql.runtime.generate.Sequence`, one per prompt × choice:
the same decode state `modelql generate` uses). The worker loop:

1. runs queued one-off jobs (embeddings, knowledge calls that need the model);
2. admits waiting sequences while the batch has room: prefill (the prompt, in chunks when others
   are decoding, so a long prompt does not stall their streams);
3. advances **all** active sequences with `generate.step(model, sequences)`: sampling from each
   sequence's pending logits, then one batched `Model.forward(ids[B,1], caches)` for the next step.

Each request owns an `asyncio.Queue`; the worker hands it events through
`loop.call_soon_threadsafe`, so the event loop never blocks on the model. Cancelling a request
(client disconnect) drops its sequences before the next decode step. Beyond `max_queue` waiting
sequences, `submit` refuses with 503 (or 429), the OpenAI error envelope at the edge.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ModelqlError
from ..runtime.generate import Delta, Sequence, forward_last, prefill_batch, step
from ..runtime.model import KVBlock
from .errors import HttpError

log = logging.getLogger("modelql.server.engine")


@dataclass
class Token:
    """One decode step of choice `index`: the runtime's `generate.Delta` (text may be empty while
    held back; `finish_reason` set on the last)."""

    index: int
    delta: Delta


@dataclass
class Finished:
    index: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    index: int
    error: BaseException


@dataclass
class _Seq:
    request: "RequestHandle"
    index: int
    seq: Sequence
    prefilled: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None


class RequestHandle:
    """One HTTP request's sequences and its event queue (read on the event loop)."""

    def __init__(self, engine: "Engine", loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.remaining = 0

    def publish(self, event: Any) -> None:
        """Called from the worker thread: queued in the engine's outbox, delivered at the end of the
        loop turn (one event-loop wake-up per decode step, not one per token)."""
        self.engine._outbox.append((self, event))

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.engine._wake()

    async def events(self, timeout: float | None = None):
        """Yield lists of events (everything that arrived together: a slow reader gets several
        tokens at once) until every sequence has finished or failed; with `timeout`, yield None after
        that many seconds without one (keep-alives, disconnect polling). Leaving early cancels."""
        left = self.remaining
        try:
            while left:
                try:
                    batch = [await asyncio.wait_for(self.queue.get(), timeout)]
                except asyncio.TimeoutError:
                    yield None
                    continue
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                left -= sum(isinstance(e, (Finished, Failed)) for e in batch)
                yield batch
        finally:
            if left:
                self.cancel()


def _dispatch(items: list) -> None:
    for handle, event in items:
        handle.queue.put_nowait(event)


class Engine:
    def __init__(self, model, *, max_batch: int = 16, max_queue: int = 64, queue_full_status: int = 503,
                 metrics=None, prefill_chunk: int = 256):
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.queue_full_status = queue_full_status
        self.metrics = metrics
        self.prefill_chunk = prefill_chunk
        self._cv = threading.Condition()
        self._pending: collections.deque[_Seq] = collections.deque()
        self._jobs: collections.deque[tuple[Callable, concurrent.futures.Future]] = collections.deque()
        self._active: list[_Seq] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._outbox: list[tuple[RequestHandle, Any]] = []  # worker thread only
        self.block: KVBlock | None = None  # the running sequences' caches, packed (made on first use)
        self.steps = 0  # decode steps run (for tests and the benchmark)
        self.max_batch_seen = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="modelql-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._active)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # -- submission (event loop side) ----------------------------------------------------------

    def submit(self, sequences: list[Sequence], loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue one request's sequences (choice i = sequences[i]); raises HttpError (503/429) when the
        queue is full."""
        handle = RequestHandle(self, loop or asyncio.get_running_loop())
        with self._cv:
            if self._stopping or not self.running:
                raise HttpError(503, "server is shutting down", code="service_unavailable")
            free_slots = max(0, self.max_batch - len(self._active))
            waiting_after = len(self._pending) + len(sequences) - free_slots
            if waiting_after > self.max_queue and (self._pending or self._active):
                if self.metrics:
                    self.metrics.rejected.inc()
                status = self.queue_full_status
                raise HttpError(status, f"server busy: {len(self._pending)} sequences queued "
                                        f"(limit {self.max_queue}); retry later",
                                code="rate_limit_exceeded" if status == 429 else "service_unavailable",
                                headers={"Retry-After": "1"})
            for i, seq in enumerate(sequences):
                self._pending.append(_Seq(handle, i, seq))
            handle.remaining = len(sequences)
            self._gauges()
            self._cv.notify_all()
        return handle

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Queue `fn(model)` to run on the worker thread between decode steps (from any thread)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stopping or not self.running:
                raise HttpError(503, "server is shutting down", code="service_unavailable")
            self._jobs.append((fn, fut))
            self._cv.notify_all()
        return fut

    async def run(self, fn: Callable[[Any], Any]) -> Any:
        """`call` for the event loop: await `fn(model)` run on the worker thread."""
        return await asyncio.wrap_future(self.call(fn))

    # -- worker ----------------------------------------------------------------------------

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._pending))
            self.metrics.active_sequences.set(len(self._active))

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not (self._stopping or self._pending or self._jobs or self._active):
                    self._cv.wait()
                if self._stopping:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
            for fn, fut in jobs:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self.model))
                    except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
                        fut.set_exception(exc)
            try:
                # caches are grown inside the decode forward (inference mode); packing them into the
                # batch block must run in inference mode too, or torch refuses the in-place copy
                with torch.inference_mode():
                    self._admit()
                    self._decode()
            except Exception as exc:  # a bug in a decode step: fail the batch, keep serving
                log.exception("decode step failed")
                for seq in self._active:
                    self._fail(seq, exc)
                self._active = []
            self._deliver()
            with self._cv:
                self._gauges()
        self._shutdown()
        self._deliver()

    def _deliver(self) -> None:
        """Hand the outbox to the event loop(s): one thread-safe call per loop."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, event in self._outbox:
            by_loop.setdefault(handle.loop, []).append((handle, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_dispatch, items)
            except RuntimeError:  # event loop closed: nobody is listening any more
                for handle, _ in items:
                    handle.cancelled = True

    def _shutdown(self) -> None:
        err = HttpError(503, "server is shutting down", code="service_unavailable")
        with self._cv:
            seqs = self._active + list(self._pending)
            self._active, self._pending = [], collections.deque()
            jobs = list(self._jobs)
            self._jobs.clear()
        for seq in seqs:
            self._fail(seq, err)
        for _, fut in jobs:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(err)

    def _fail(self, seq: _Seq, exc: BaseException) -> None:
        seq.seq.cache = None
        seq.request.publish(Failed(seq.index, exc))

    def _publish(self, seq: _Seq, delta: Delta) -> bool:
        """Publish one step's delta (+ Finished on the last); → whether the sequence finished."""
        now = time.perf_counter()
        m = self.metrics
        if seq.first_token_at is None:
            seq.first_token_at = now
            if m:
                m.model_ttft.observe(now - seq.request.submitted_at)
        elif m:
            m.model_tpot.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if m:
            m.model_generation_tokens.inc()
        seq.request.publish(Token(seq.index, delta))
        if delta.finish_reason is None:
            return False
        s = seq.seq
        seq.request.publish(Finished(seq.index, delta.finish_reason, len(s.prompt_ids), s.generated))
        s.cache = None
        return True

    def _admit(self) -> None:
        """Prefill waiting sequences while the batch has room. With others decoding, at most
        `prefill_chunk` prompt tokens per loop turn, so running streams keep flowing. Whole prompts
        that arrive together are prefilled in one batched forward (`generate.prefill_batch`); a
        prompt over the budget is fed in chunks on its own."""
        budget = self.prefill_chunk
        while len(self._active) < self.max_batch:
            group: list[_Seq] = []
            with self._cv:
                for seq in list(self._pending):
                    if len(self._active) + len(group) >= self.max_batch:
                        break
                    if seq.request.cancelled:
                        self._pending.remove(seq)
                        self._fail(seq, asyncio.CancelledError())
                        continue
                    size = len(seq.seq.prompt_ids)
                    if seq.prefilled or ((self._active or group) and size > budget):
                        break
                    group.append(seq)
                    budget -= size
                if not self._pending:
                    return
                head = self._pending[0]
            if not group:
                if self._active and budget <= 0:
                    return
                try:
                    done, used = self._prefill(head, budget if self._active else None)
                except Exception as exc:
                    self._drop(head, exc)
                    continue
                budget -= used
                if not done:
                    return
                group_done = [head]
            else:
                group_done = self._prefill_group(group)
            with self._cv:
                for seq in group_done:
                    self._pending.remove(seq)
                    self._active.append(seq)

    def _drop(self, seq: _Seq, exc: BaseException) -> None:
        with self._cv:
            self._pending.remove(seq)
        if not isinstance(exc, ModelqlError):
            log.exception("prefill failed", exc_info=exc)
        self._fail(seq, exc)

    def _prefill_group(self, group: list[_Seq]) -> list[_Seq]:
        """Whole-prompt prefill of several sequences in one forward; → the ones now ready. If the
        batched pass fails, each is retried alone so one bad request cannot fail the others."""
        if self.metrics:
            self.metrics.model_prompt_tokens.inc(sum(len(s.seq.prompt_ids) for s in group))
        try:
            prefill_batch(self.model, [s.seq for s in group])
            ready = group
        except Exception:
            ready = []
            for seq in group:
                seq.seq.cache = self.model.new_cache()
                try:
                    seq.seq.prefill(self.model)
                    ready.append(seq)
                except Exception as exc:
                    self._drop(seq, exc)
        for seq in ready:
            seq.prefilled = len(seq.seq.prompt_ids)
        return ready

    def _prefill(self, seq: _Seq, budget: int | None) -> tuple[bool, int]:
        """Feed (part of) the prompt. → (whole prompt in, tokens used). The last chunk leaves the
        first token's logits pending, as `Sequence.prefill` does."""
        s = seq.seq
        ids = s.prompt_ids
        if seq.prefilled == 0 and self.metrics:
            self.metrics.model_prompt_tokens.inc(len(ids))
        if budget is None or len(ids) - seq.prefilled <= budget:
            if seq.prefilled == 0:
                s.prefill(self.model)
            else:
                rest = ids[seq.prefilled:]
                s.logits = forward_last(self.model, torch.tensor([rest]), [s.cache], [s])[0]
            used = len(ids) - seq.prefilled
            seq.prefilled = len(ids)
            return True, used
        chunk = ids[seq.prefilled: seq.prefilled + max(1, budget)]
        self.model.forward(torch.tensor([chunk]), s.cache, logits="none")
        seq.prefilled += len(chunk)
        return False, len(chunk)

    def _pack(self, live: list[_Seq]) -> None:
        """Keep the running sequences' caches in block slots 0..B-1, in batch order (one fused
        attention call per layer in the decode step). Sequences only leave or join at the end, so
        moving each down to its index never overwrites a live one."""
        if self.block is None:
            spec, dtype = getattr(self.model, "spec", None), getattr(self.model, "dtype", None)
            if spec is None or dtype is None:
                return
            self.block = KVBlock(spec, dtype, self.max_batch)
        self.block.pack([seq.seq.cache for seq in live])

    def _decode(self) -> None:
        live = []
        for seq in self._active:
            if seq.request.cancelled:
                self._fail(seq, asyncio.CancelledError())
            else:
                live.append(seq)
        self._active = live
        if not live:
            return
        self._pack(live)
        deltas = step(self.model, [seq.seq for seq in live])
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(live))
        if self.metrics:
            self.metrics.batch_size.observe(len(live))
        self._active = [seq for seq, delta in zip(live, deltas) if not self._publish(seq, delta)]
