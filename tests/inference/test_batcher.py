"""The micro-batcher merges concurrent requests into one forward, keeps each request's rows in order, never
mixes TTA with plain requests, pins a forward's failure to the chips that cause it (never another request),
and survives requests that gave up."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from chiptag.inference.batcher import MicroBatcher


class Recorder:
    """A forward whose output row is the chip's id, so a misrouted row shows; the first call blocks until
    released, letting later requests queue up behind it."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[int, bool]] = []
        self.entered, self.release, self.fail = threading.Event(), threading.Event(), fail

    def __call__(self, chips, tta):
        if not self.calls:
            self.entered.set()
            self.release.wait(10)
        self.calls.append((len(chips), tta))
        if self.fail:
            raise RuntimeError("forward broke")
        return np.array([[float(c[0, 0, 0]), float(tta)] for c in chips], dtype=np.float32)


def chip(i: int) -> torch.Tensor:
    return torch.full((3, 2, 2), float(i))


def test_queued_requests_share_one_forward_and_keep_their_rows():
    fwd = Recorder()
    b = MicroBatcher(fwd, max_batch=64, max_wait_s=0.05)
    try:
        first = b.submit([chip(0)])
        assert fwd.entered.wait(10)
        futures = [b.submit([chip(10 * i + j) for j in range(i)]) for i in range(1, 6)]  # 15 chips in 5 requests
        fwd.release.set()
        assert first.result(10).probs[:, 0].tolist() == [0.0]
        for i, f in enumerate(futures, start=1):
            assert f.result(10).errors == {} and f.result(10).probs[:, 0].tolist() == [10.0 * i + j for j in range(i)]
        assert fwd.calls == [(1, False), (15, False)]  # the five queued requests ran as one forward
    finally:
        b.close()


def test_max_batch_splits_and_tta_is_never_mixed():
    fwd = Recorder()
    b = MicroBatcher(fwd, max_batch=4, max_wait_s=0.05)
    try:
        first = b.submit([chip(0)])
        assert fwd.entered.wait(10)
        plain, tta, big = b.submit([chip(1)]), b.submit([chip(2)], tta=True), b.submit([chip(i) for i in range(3, 9)])
        fwd.release.set()
        first.result(10)
        assert tta.result(10).probs.tolist() == [[2.0, 1.0]] and plain.result(10).probs.tolist() == [[1.0, 0.0]]
        assert big.result(10).probs[:, 0].tolist() == [3, 4, 5, 6, 7, 8]
        assert all(n <= 4 for n, _ in fwd.calls) and (1, True) in fwd.calls
    finally:
        b.close()


def test_a_forward_that_always_fails_fails_each_request_and_the_worker_lives_on():
    fwd = Recorder(fail=True)
    b = MicroBatcher(fwd, max_batch=8, max_wait_s=0.01)
    try:
        futures = [b.submit([chip(i)]) for i in range(3)]
        assert fwd.entered.wait(10)
        fwd.release.set()
        for f in futures:
            with pytest.raises(RuntimeError, match="forward broke"):
                f.result(10)
        fwd.fail = False
        assert b.submit([chip(7)]).result(10).probs[:, 0].tolist() == [7.0]
    finally:
        b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit([chip(1)]).result(1)


def test_batch_waits_for_company_only_while_someone_is_on_the_way():
    """With `expecting`, a lone request runs at once (no max_wait of idle cores); while another request is still
    being decoded, the batch waits for it and both share one forward."""
    import time

    calls, incoming = [], [0]

    def fwd(chips, tta):
        calls.append(len(chips))
        return np.array([[float(c[0, 0, 0]), float(tta)] for c in chips], dtype=np.float32)

    b = MicroBatcher(fwd, max_batch=64, max_wait_s=2.0, expecting=lambda: incoming[0])
    try:
        t0 = time.monotonic()
        assert b.submit([chip(1)]).result(timeout=5).probs[:, 0].tolist() == [1.0]
        assert time.monotonic() - t0 < 1.0 and calls == [1]  # nobody on the way: no 2 s wait
        incoming[0] = 1  # a second request is being decoded
        first = b.submit([chip(2)])
        time.sleep(0.2)
        assert not first.done()  # waiting for the one on its way
        incoming[0] = 0
        second = b.submit([chip(3)])
        assert first.result(timeout=5).probs[:, 0].tolist() == [2.0]
        assert second.result(timeout=5).probs[:, 0].tolist() == [3.0]
        assert calls == [1, 2]  # the two shared one forward
    finally:
        b.close()


def test_setup_runs_in_the_worker_thread_before_the_first_forward():
    seen = []

    def fwd(chips, tta):
        seen.append(("forward", threading.current_thread().name))
        return np.zeros((len(chips), 1), dtype=np.float32)

    b = MicroBatcher(fwd, setup=lambda: seen.append(("setup", threading.current_thread().name)))
    try:
        b.submit([chip(1)]).result(timeout=5)
    finally:
        b.close()
    assert seen == [("setup", "chiptag-batcher"), ("forward", "chiptag-batcher")]


def test_one_bad_chip_fails_only_its_own_entry():
    """Issue 25: a chip the forward cannot take (here: of another shape, like a 3-frame GIF's 4-D tensor) in a
    batch of 16 requests fails its own entry; the 15 other requests and the other chips of its request get
    their rows."""
    def fwd(chips, tta):
        x = torch.stack(chips)  # raises on mixed shapes, as the engine's stack does
        if x.dim() != 4:
            raise RuntimeError(f"Invalid rank {x.dim()}")  # ONNX Runtime's answer to the odd chip alone
        return np.array([[float(c[0, 0, 0])] for c in x], dtype=np.float32)

    gate = Recorder()
    b = MicroBatcher(lambda chips, tta: gate(chips, tta) if not gate.calls else fwd(chips, tta), max_batch=64,
                     max_wait_s=0.05)
    try:
        b.submit([chip(0)])
        assert gate.entered.wait(10)
        odd = torch.zeros(3, 3, 2, 2)
        futures = [b.submit([chip(i)]) for i in range(1, 8)] + [b.submit([chip(8), odd, chip(9)])] + [
            b.submit([chip(i)]) for i in range(10, 18)] + [b.submit([odd])]
        gate.release.set()
        for i, f in enumerate(futures[:7], start=1):
            assert f.result(10).probs[:, 0].tolist() == [float(i)] and f.result(10).errors == {}
        mixed = futures[7].result(10)
        assert mixed.probs[0, 0] == 8.0 and np.isnan(mixed.probs[1]).all() and mixed.probs[2, 0] == 9.0
        assert list(mixed.errors) == [1] and "RuntimeError" in mixed.errors[1]
        for i, f in zip(range(10, 18), futures[8:16]):
            assert f.result(10).probs[:, 0].tolist() == [float(i)]
        with pytest.raises(RuntimeError):  # every chip of this request failed: the request gets the error
            futures[16].result(10)
    finally:
        b.close()


def test_a_request_that_gave_up_neither_runs_nor_stops_the_worker():
    """A request that timed out has its future cancelled while it waits in the queue; the worker thread must
    skip it, not die setting its result (InvalidStateError in `chiptag-batcher`: the server stopped answering)."""
    import warnings

    fwd = Recorder()
    b = MicroBatcher(fwd, max_batch=64, max_wait_s=0.01)
    try:
        first = b.submit([chip(0)])
        assert fwd.entered.wait(10)
        gave_up = b.submit([chip(1)])
        assert gave_up.cancel()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an exception in the worker thread fails the test, not just warns
            fwd.release.set()
            first.result(10)
            assert b.submit([chip(2)]).result(10).probs[:, 0].tolist() == [2.0]
        assert all(n == 1 for n, _ in fwd.calls)  # the cancelled chip never ran
    finally:
        b.close()
