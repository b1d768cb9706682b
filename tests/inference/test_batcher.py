"""The micro-batcher merges concurrent requests into one forward, keeps each request's rows in order,
never mixes TTA with plain requests, and passes a forward's error to every waiting request."""

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
        assert first.result(10)[:, 0].tolist() == [0.0]
        for i, f in enumerate(futures, start=1):
            assert f.result(10)[:, 0].tolist() == [10.0 * i + j for j in range(i)]
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
        assert tta.result(10).tolist() == [[2.0, 1.0]] and plain.result(10).tolist() == [[1.0, 0.0]]
        assert big.result(10)[:, 0].tolist() == [3, 4, 5, 6, 7, 8]
        assert all(n <= 4 for n, _ in fwd.calls) and (1, True) in fwd.calls
    finally:
        b.close()


def test_forward_error_reaches_every_request_and_the_worker_lives_on():
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
        assert b.submit([chip(7)]).result(10)[:, 0].tolist() == [7.0]
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
        assert b.submit([chip(1)]).result(timeout=5)[:, 0].tolist() == [1.0]
        assert time.monotonic() - t0 < 1.0 and calls == [1]  # nobody on the way: no 2 s wait
        incoming[0] = 1  # a second request is being decoded
        first = b.submit([chip(2)])
        time.sleep(0.2)
        assert not first.done()  # waiting for the one on its way
        incoming[0] = 0
        second = b.submit([chip(3)])
        assert first.result(timeout=5)[:, 0].tolist() == [2.0] and second.result(timeout=5)[:, 0].tolist() == [3.0]
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
