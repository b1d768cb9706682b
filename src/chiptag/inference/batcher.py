"""Micro-batching for the server: concurrent requests share one forward pass.

Each request hands over its decoded chips; one worker thread waits for the first request, then keeps
collecting until it holds `max_batch` images or `max_wait_s` has passed since that first request, and runs
them as one batch (in slices of `max_batch` when a single request is larger). A forward on 8 chips costs far
less than 8 forwards on one, so throughput under many small requests approaches the offline `predict`.
Requests asking for TTA and requests without it never share a batch (they run different functions).

Failures stay with the chip that causes them: when a forward raises, its batch is halved and each half run
again, down to single chips, so one malformed chip (or one the engine refuses) fails only its own entry, never
another entry or another request (issue 25: one animated GIF among 16 concurrent requests failed 6-13 of the
good ones). A request whose every chip failed gets the error itself (a broken engine is the server's error).
A request that gave up (its future cancelled on a timeout) is skipped, and nothing a job does can stop the
worker thread: if it died the server would stop answering.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np
import torch

POLL_S = 0.001  # with `expecting`: how often a waiting batch checks whether anyone is still on the way
# chips (list of 3xSxS uint8 or [0, 1] float tensors), tta -> probabilities (n, n_tags)
BatchForward = Callable[[Sequence[torch.Tensor], bool], np.ndarray]


class Monitor(Protocol):
    """What the batcher reports (the server's Prometheus metrics)."""

    def queued(self, delta: int) -> None: ...  # images waiting for a forward: +n on submit, -n when taken

    def batch(self, size: int) -> None: ...  # one forward ran on `size` images


class Rows(NamedTuple):
    """A request's answer: probabilities (n, n_tags) in its chips' order; a chip whose forward failed has a NaN
    row and its message in `errors` (index -> message)."""
    probs: np.ndarray
    errors: dict[int, str]


@dataclass
class _Job:
    chips: list[torch.Tensor]
    tta: bool
    future: Future = field(default_factory=Future)


class MicroBatcher:
    def __init__(self, forward: BatchForward, max_batch: int = 64, max_wait_s: float = 0.010,
                 expecting: Callable[[], int] | None = None, setup: Callable[[], None] | None = None,
                 monitor: Monitor | None = None):
        """expecting: how many requests are on their way (accepted, still being read or decoded). A batch waits
        for company only while that is above 0: with nobody else coming, waiting up to max_wait_s only left
        the cores idle (~10 ms of a ~45 ms cycle under 8 synchronous clients, benchmarks/serve_load.py).
        setup: called first in the worker thread (e.g. its torch thread count). monitor: told the queue depth and
        each forward's size."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.forward, self.max_batch, self.max_wait_s = forward, max_batch, max(0.0, max_wait_s)
        self.expecting, self.setup, self.monitor = expecting, setup, monitor
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._held: list[_Job] = []  # jobs of the other TTA kind, first in line for the next batch
        self._thread = threading.Thread(target=self._run, name="chiptag-batcher", daemon=True)
        self._closed = False
        self.batches = 0  # forwards run (for tests and the benchmark: proof that requests were merged)
        self._thread.start()

    def submit(self, chips: Sequence[torch.Tensor], tta: bool = False) -> Future:
        """-> a Future of Rows (the (len(chips), n_tags) probabilities, in order, and per-chip errors); the
        Future raises only when every chip failed."""
        job = _Job(list(chips), bool(tta))
        if self._closed:
            job.future.set_exception(RuntimeError("the batcher is closed"))
        elif not job.chips:
            job.future.set_result(Rows(np.zeros((0, 0), dtype=np.float32), {}))
        else:
            if self.monitor is not None:
                self.monitor.queued(len(job.chips))
            self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _next(self, timeout: float | None) -> _Job | None:
        try:
            return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _take(self, job: _Job | None) -> bool:
        """Whether `job` is a live request, now marked running: a request that gave up (its future cancelled by
        a timeout) is dropped here, and a running future can no longer be cancelled, so setting its result
        later cannot raise InvalidStateError in this thread."""
        if job is None:
            return False
        if job.future.set_running_or_notify_cancel():
            return True
        if self.monitor is not None:
            self.monitor.queued(-len(job.chips))
        return False

    def _collect(self) -> list[_Job] | None:
        """Jobs for one batch (same TTA flag), or None when closing."""
        while True:
            first = self._held.pop(0) if self._held else self._queue.get()
            if first is None:
                return None
            if first.future.running() or self._take(first):  # held jobs were taken when first dequeued
                break
        jobs, n = [first], len(first.chips)
        deadline = time.monotonic() + self.max_wait_s
        while n < self.max_batch:
            if self.expecting is not None and not self.expecting() and self._queue.empty():
                break  # nobody else is on the way
            wait = deadline - time.monotonic()
            job = self._next(wait if self.expecting is None else min(wait, POLL_S))
            if job is None:
                if self._closed:
                    self._queue.put(None)  # the sentinel may have been taken here: leave one for _collect
                    break
                if time.monotonic() >= deadline:
                    break
                continue
            if not self._take(job):
                continue
            if job.tta != first.tta:
                self._held.append(job)
                continue
            jobs.append(job)
            n += len(job.chips)
        return jobs

    def _run(self) -> None:
        if self.setup is not None:
            self.setup()
        while True:
            jobs = self._collect()
            if jobs is None:
                break
            try:
                self._forward(jobs)
            except BaseException as exc:  # noqa: BLE001 - a bug here must fail these jobs, not the thread
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
        for job in self._held:
            if self.monitor is not None:
                self.monitor.queued(-len(job.chips))
            job.future.set_exception(RuntimeError("the server is shutting down"))

    def _rows(self, chips: list[torch.Tensor], tta: bool) -> list[np.ndarray | Exception]:
        """Each chip's probability row, or the exception that chip alone raises: a failing forward is split in
        halves and retried until the failure is pinned to single chips (k bad chips among n cost ~2k log n
        extra forwards, only when something failed)."""
        try:
            probs = self.forward(chips, tta)
            if len(probs) != len(chips):
                raise RuntimeError(f"the forward returned {len(probs)} rows for {len(chips)} chips")
            self.batches += 1
            if self.monitor is not None:
                self.monitor.batch(len(chips))
            return list(probs)
        except Exception as exc:  # noqa: BLE001 - pinned to its chip(s) below, the worker lives on
            if len(chips) == 1:
                return [exc]
            mid = len(chips) // 2
            return self._rows(chips[:mid], tta) + self._rows(chips[mid:], tta)

    def _forward(self, jobs: list[_Job]) -> None:
        chips = [c for job in jobs for c in job.chips]
        if self.monitor is not None:
            self.monitor.queued(-len(chips))
        tta = jobs[0].tta
        rows = [r for i in range(0, len(chips), self.max_batch) for r in self._rows(chips[i:i + self.max_batch], tta)]
        width = next((len(r) for r in rows if not isinstance(r, Exception)), 0)
        start = 0
        for job in jobs:
            mine, start = rows[start:start + len(job.chips)], start + len(job.chips)
            failed = {i: r for i, r in enumerate(mine) if isinstance(r, Exception)}
            if len(failed) == len(mine):
                job.future.set_exception(failed[0])
                continue
            probs = np.full((len(mine), width), np.nan, dtype=np.float32)
            for i, r in enumerate(mine):
                if i not in failed:
                    probs[i] = r
            job.future.set_result(Rows(probs, {i: f"{e.__class__.__name__}: {e}" for i, e in failed.items()}))
