"""The forward alone, laid out as `chiptag serve` runs it: what a server could serve with free HTTP.

    python benchmarks/forward_ceiling.py RUN --batches 1 4 8 64 --workers 2

For each batch size, in one run, round-robin over --repeat passes:
1. one process on all the cores this process may use (the thread count `chiptag predict` uses): the layout of
   offline predict (batch 64) and of `chiptag serve` in one process;
2. --workers processes at once, each kept on its own share of the cores (inference.workers.core_shares, as
   `serve --workers N` places a model per worker), each with that share's thread count.
Each runs Predictor.predict_tensor (the run's engine, as the server) on a random normalised batch for
--seconds; img/s is summed over the processes. 8 one-chip clients on 2 workers give each worker batches of at
most 4: "workers at batch 4" / "one process at batch 64" is then the most a served/offline ratio can be with no
HTTP, decoding or clients at all. Writes JSON with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from chiptag.inference.workers import SPAWN, core_shares


def _forward(run: str, batch: int, cpus: list[int] | None, threads: int, seconds: float, barrier, out) -> None:
    import torch

    from chiptag.inference.predictor import Predictor

    if cpus:  # before any thread starts, as serve's workers
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)
    predictor = Predictor.from_run(run, device="cpu")
    pre = predictor.images.pre
    x = torch.randn(batch, pre.channels, pre.image_size, pre.image_size)
    for _ in range(3):
        predictor.predict_tensor(x)
    barrier.wait()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        predictor.predict_tensor(x)
        n += batch
    out.put(n / (time.perf_counter() - t0))


def measure(run: Path, batch: int, shares: list[list[int] | None], threads: int, seconds: float) -> float:
    barrier, out = SPAWN.Barrier(len(shares)), SPAWN.Queue()
    procs = [SPAWN.Process(target=_forward, args=(str(run), batch, cpus, threads, seconds, barrier, out))
             for cpus in shares]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 64])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--note", default="")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/forward_ceiling.json"))
    args = p.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    shares = core_shares(cores, args.workers)
    if shares is None:
        raise SystemExit(f"{len(cores)} cores do not divide among {args.workers} workers (serve would not pin them)")
    layouts = {"one process": ([None], len(cores)),
               f"{args.workers} workers": ([sorted(s) for s in shares], len(cores) // args.workers)}
    rates: dict[str, dict[int, list[float]]] = {k: {b: [] for b in args.batches} for k in layouts}
    for r in range(args.repeat):
        for b in args.batches:
            for name, (where, threads) in layouts.items():
                rates[name][b].append(round(measure(args.run, b, where, threads, args.seconds), 1))
                print(f"pass {r}  {name:12s} batch {b:3d}: {rates[name][b][-1]:8.1f} img/s", flush=True)
    medians = {name: {b: statistics.median(v) for b, v in per.items()} for name, per in rates.items()}
    reference = medians["one process"][max(args.batches)]
    print(f"\nimg/s, median of {args.repeat}; ratio to one process at batch {max(args.batches)}")
    for name, per in medians.items():
        print(f"  {name:12s} " + "  ".join(f"b{b}: {v:.1f} ({v / reference:.2f}x)" for b, v in per.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "cores": cores, "note": args.note,
        "img_s": rates, "median_img_s": medians, "reference_img_s": reference,
        "ratio_to_reference": {n: {b: round(v / reference, 3) for b, v in per.items()} for n, per in medians.items()},
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
