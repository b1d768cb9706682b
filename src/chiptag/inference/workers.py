"""`chiptag serve --workers N`: N HTTP processes share one listening socket; each parses requests and decodes
uploads (the work one event loop could not keep up with: 0.73x of offline predict on a faster CPU); the
forward runs where it is cheapest.

    one model (--shared-model; CUDA always): this process loads the model and runs the micro-batcher; each
        worker sends a request's decoded chips (uint8, one array) through a pipe and gets its rows back
        (ForwardClient), so requests from all workers share one batch on the device.
    per worker (--model-per-worker; the CPU default, by measurement: README "Serving"): each worker loads its
        own model with its share of the cores, and is kept on them (core_shares).

This process supervises: a worker that dies is started again; SIGTERM or Ctrl-C (only this process sees it:
the workers sit in their own process group) is passed on as one SIGTERM per worker, each stops accepting and
finishes its requests in flight (uvicorn's graceful shutdown, up to --timeout), and only then does the model
stop. Metrics: every process writes to one PROMETHEUS_MULTIPROC_DIR, made here and removed on exit.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chiptag.errors import ChiptagError
from chiptag.inference.serve import banner, create_app, uvicorn_options
from chiptag.inference.service import OnTheWay, ServeOptions, Service

MODEL_FAILED = 3  # a worker's exit code when its model cannot load: restarting it would only fail again
SPAWN = mp.get_context("spawn")  # fork would copy the parent's torch/ORT thread pools in an unusable state


@dataclass
class Link:
    """A worker's end of the one-model feed: the shared request queue, its own answer queue (queues travel to
    a process only when it starts: the model process finds it by `worker`), and the shared count of requests
    on their way (the batcher waits for company only while it is above 0)."""
    worker: int
    requests: Any
    answers: Any
    on_the_way: Any


class ForwardClient:
    """In a worker: the model process's batcher, as MicroBatcher.submit (-> Future of batcher.Rows)."""

    def __init__(self, link: Link):
        self.link, self._futures, self._lock = link, {}, threading.Lock()
        self._ids = (f"{os.getpid()}:{n}" for n in itertools.count())  # a restarted worker never takes stale rows
        threading.Thread(target=self._answers, name="chiptag-answers", daemon=True).start()

    def submit(self, chips: Sequence[torch.Tensor], tta: bool = False) -> Future:
        future, job = Future(), next(self._ids)
        with self._lock:
            self._futures[job] = future
        self.link.requests.put((self.link.worker, job, torch.stack(list(chips)).numpy(), bool(tta)))
        return future

    def _answers(self) -> None:
        while True:
            job, ok, payload = self.link.answers.get()
            with self._lock:
                future = self._futures.pop(job, None)
            if future is None or not future.set_running_or_notify_cancel():  # gone, or the request gave up
                continue
            if ok:
                future.set_result(payload)
            else:
                future.set_exception(RuntimeError(payload))


def _feed(service: Service, requests, answers: dict) -> None:
    """In the model process: the workers' requests -> the batcher; each answer back to its worker's queue."""
    while (item := requests.get()) is not None:
        worker, job, chips, tta = item
        future = service.batcher.submit(list(torch.from_numpy(chips)), tta)
        future.add_done_callback(functools.partial(_reply, answers[worker], job))


def _reply(answers, job: str, future: Future) -> None:
    exc = future.exception()
    answers.put((job, exc is None, future.result() if exc is None else f"{exc.__class__.__name__}: {exc}"))


def _watch_parent(server, parent: int) -> None:
    """A worker whose supervisor died (SIGKILL) stops too, rather than serving on alone."""
    while not server.should_exit:
        if os.getppid() != parent:
            server.should_exit = True
        time.sleep(1.0)


def core_shares(cores: Sequence[int], workers: int) -> list[set[int]] | None:
    """Each worker's own cores when every worker runs a model on CPU: the cores this process may use, cut into
    equal shares. A worker kept on its share runs its forward and its event loop there, instead of migrating
    between cores and evicting the other worker's caches: at 8 clients on 2 cores, 0.82-0.83x of offline
    predict against 0.77-0.80x unpinned (benchmarks/serve_load.py, README "Serving"). None (no pinning) when
    the cores do not divide evenly among the workers."""
    cores = sorted(cores)
    if workers < 1 or len(cores) % workers:
        return None
    per = len(cores) // workers
    return [set(cores[i * per:(i + 1) * per]) for i in range(workers)]


def _worker(run: Path, opts: ServeOptions, sock, link: Link | None, threads: int, parent: int,
            cpus: set[int] | None = None) -> None:
    import uvicorn

    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only (two signals would make uvicorn force-exit)
    if cpus:  # before any thread starts: torch's and ONNX Runtime's pools stay on this worker's cores
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)
    remote = ForwardClient(link) if link is not None else None
    service = Service(run, opts, remote=remote, on_the_way=OnTheWay(link.on_the_way) if link else None)
    service.warm()  # before accepting: a worker that shares the socket must not answer 503 while others are ready
    if service.error:
        print(f"chiptag serve: worker {os.getpid()}: the model failed to load: {service.error}", file=sys.stderr,
              flush=True)
        raise SystemExit(MODEL_FAILED)
    server = uvicorn.Server(uvicorn.Config(create_app(service), **uvicorn_options(opts)))
    threading.Thread(target=_watch_parent, args=(server, parent), daemon=True).start()
    server.run(sockets=[sock])


def _bind(opts: ServeOptions):
    import uvicorn

    try:
        return uvicorn.Config(app=None, host=opts.host, port=opts.port).bind_socket()
    except SystemExit:  # uvicorn logs the reason (address in use...) and exits
        raise ChiptagError(f"cannot listen on {opts.host}:{opts.port} (see the line above)") from None


def serve_workers(run: Path, opts: ServeOptions) -> None:
    if "prometheus_client" in sys.modules and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise RuntimeError("prometheus_client was imported before serve_workers: its metrics would not be shared")
    metrics_dir = tempfile.mkdtemp(prefix="chiptag-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before the first import, here and in every worker
    service, requests, on_the_way, answers = None, None, None, {}
    try:
        cores = sorted(os.sched_getaffinity(0))
        one_model = not opts.model_per_worker  # the command refuses it off CPU
        if one_model:
            on_the_way = SPAWN.Value("i", 0)
            service = Service(run, opts, on_the_way=OnTheWay(on_the_way))
            service.warm()
            if service.error:
                raise ChiptagError(f"the model failed to load: {service.error}")
            requests = SPAWN.Queue()
            threading.Thread(target=_feed, args=(service, requests, answers), name="chiptag-feed", daemon=True).start()
        sock = _bind(opts)
        threads = 1 if one_model else max(1, len(cores) // opts.workers)  # one-model workers only decode
        shares = None if one_model else core_shares(cores, opts.workers)

        def start(worker: int) -> mp.Process:
            link = None
            if one_model:  # a restarted worker gets a fresh queue: its predecessor's may hold a broken lock
                answers[worker] = SPAWN.Queue()
                link = Link(worker, requests, answers[worker], on_the_way)
            p = SPAWN.Process(target=_worker, args=(Path(run), opts, sock, link, threads, os.getpid(),
                                                    shares[worker] if shares else None), name="chiptag-worker")
            p.start()
            return p

        workers = [start(i) for i in range(opts.workers)]
        where = (f"one model fed by {opts.workers} HTTP workers" if one_model else
                 f"{opts.workers} workers with a model each, {threads} thread(s) apiece"
                 + (", each on its own core(s)" if shares else ""))
        print(banner(opts, Path(run), service.engine if service else opts.engine, where), flush=True)
        stopped_by = _supervise(workers, start, opts)
    finally:
        if requests is not None:
            requests.put(None)
        if service is not None:
            service.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    # as uvicorn does in one process: once drained, exit by the signal itself (143 after SIGTERM, 130 after ^C)
    signal.signal(stopped_by, signal.SIG_DFL)
    os.kill(os.getpid(), stopped_by)


def _supervise(workers: list[mp.Process], start, opts: ServeOptions) -> int:
    """Keep `workers` alive until SIGTERM or SIGINT; then drain them. -> the signal."""
    from prometheus_client import multiprocess

    stopping, received = threading.Event(), []

    def stop(sig, _frame):
        received.append(sig)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    while not stopping.wait(0.5):
        for i, p in enumerate(workers):
            if not p.is_alive():
                if p.exitcode == MODEL_FAILED:
                    _stop(workers, opts)
                    raise ChiptagError("a worker could not load the model (its reason is above)")
                print(f"chiptag serve: worker {p.pid} exited ({p.exitcode}); starting another", file=sys.stderr,
                      flush=True)
                multiprocess.mark_process_dead(p.pid)
                workers[i] = start(i)
    _stop(workers, opts)
    return received[0]


def _stop(workers: list[mp.Process], opts: ServeOptions) -> None:
    for p in workers:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + opts.timeout_s + 10
    for p in workers:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
