"""Micro-batching for the server: concurrent requests share one forward pass.

Each request hands over its decoded chips; one worker thread waits for the first request, then keeps
collecting until it holds `max_batch` images or `max_wait_s` has passed since that first request, and runs
them as one batch (in slices of `max_batch` when a single request is larger). A forward on 8 chips costs far
less than 8 forwards on one, so throughput under many small requests approaches the offline `predict`.
Requests asking for TTA and requests without it never share a batch (they run different functions).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

POLL_S = 0.001  # with `expecting`: how often a waiting batch checks whether anyone is still on the way
# chips (list of 3xSxS uint8 or [0, 1] float tensors), tta -> probabilities (n, n_tags)
BatchForward = Callable[[Sequence[torch.Tensor], bool], np.ndarray]


@dataclass
class _Job:
    chips: list[torch.Tensor]
    tta: bool
    future: Future = field(default_factory=Future)


class MicroBatcher:
    def __init__(self, forward: BatchForward, max_batch: int = 64, max_wait_s: float = 0.010,
                 expecting: Callable[[], int] | None = None, setup: Callable[[], None] | None = None):
        """expecting: how many requests are on their way (accepted, still being read or decoded). A batch waits
        for company only while that is above 0: with nobody else coming, waiting up to max_wait_s only left
        the cores idle (~10 ms of a ~45 ms cycle under 8 synchronous clients, benchmarks/serve_load.py).
        setup: called first in the worker thread (e.g. its torch thread count)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.forward, self.max_batch, self.max_wait_s = forward, max_batch, max(0.0, max_wait_s)
        self.expecting, self.setup = expecting, setup
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._held: list[_Job] = []  # jobs of the other TTA kind, first in line for the next batch
        self._thread = threading.Thread(target=self._run, name="chiptag-batcher", daemon=True)
        self._closed = False
        self.batches = 0  # forwards run (for tests and the benchmark: proof that requests were merged)
        self._thread.start()

    def submit(self, chips: Sequence[torch.Tensor], tta: bool = False) -> Future:
        """-> a Future of the (len(chips), n_tags) probabilities, in order."""
        job = _Job(list(chips), bool(tta))
        if self._closed:
            job.future.set_exception(RuntimeError("the batcher is closed"))
        elif not job.chips:
            job.future.set_result(np.zeros((0, 0), dtype=np.float32))
        else:
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

    def _collect(self) -> list[_Job] | None:
        """Jobs for one batch (same TTA flag), or None when closing."""
        first = self._held.pop(0) if self._held else self._queue.get()
        if first is None:
            return None
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
            self._forward(jobs)
        for job in self._held:
            job.future.set_exception(RuntimeError("the server is shutting down"))

    def _forward(self, jobs: list[_Job]) -> None:
        chips = [c for job in jobs for c in job.chips]
        try:
            probs = np.concatenate([self.forward(chips[i:i + self.max_batch], jobs[0].tta)
                                    for i in range(0, len(chips), self.max_batch)])
            self.batches += (len(chips) + self.max_batch - 1) // self.max_batch
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the worker lives on
            for job in jobs:
                job.future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            job.future.set_result(probs[start:start + len(job.chips)])
            start += len(job.chips)
