"""`chiptag serve` under load, against offline `predict` on the same chips, in one run.

    python benchmarks/serve_load.py RUN --chips data/demo/train-jpg --clients 8 64 --workers 1 2 --repeat 3

1. offline: Predictor.predict on --offline-images chips (batch 64, the CLI's default), best of --rounds, between
   the load passes;
2. load: `chiptag serve RUN --workers W` in a subprocess on a free 127.0.0.1 port; --clients threads each POST
   one image per request (--images-per-request) for --seconds, then stop; img/s, p50/p99 latency, errors, and
   the CPU time per image of the server (all its processes) and of the clients. The clients share the machine's cores with the server, so
   they are as light as they can be: keep-alive http.client connections sending bodies encoded once (0.2 ms
   of CPU per request here, against 0.8 ms for httpx);
3. soak (each server, at the end): --soak bad requests (not an image, truncated JPEG, empty file, PNG bomb, oversized file, too many
   files, wrong field, not multipart) from the same clients; then /readyz must answer 200 and the server's RSS
   (all processes) must have grown by less than 100 MB.
Every server (--workers, and with --model-per-worker both: one shared model against a model per worker) is
started first; then --repeat round-robin passes run each server at each --clients for --seconds, with offline
predict measured between passes: each pass's ratio is taken against the offline figures just before and after
it, so a machine shared with other jobs drifts out of the ratio; the summary gives each configuration's median
ratio and its spread over the passes. Target (issue 22): img_s >= 0.85 x offline predict at 8+
clients x 1 image, 0 errors. Writes JSON with the command.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from itertools import cycle
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from chiptag.inference.predictor import Predictor


def offline_img_s(predictor: Predictor, chips: list[Path], rounds: int) -> float:
    predictor.predict(chips[:64], batch_size=64)  # warm-up
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        predictor.predict(chips, batch_size=64)
        best = max(best, len(chips) / (time.perf_counter() - t0))
    return best


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[int]:
    """pid and its descendants (the server's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").iterdir():
            children = task / "children"
            if children.exists():
                todo += [int(c) for c in children.read_text().split()]
    return out


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def tree_rss_mb(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except FileNotFoundError:
            continue
        total += next((int(x.split()[1]) / 1024 for x in lines if x.startswith("VmRSS:")), 0.0)
    return total


def start_server(run: Path, port: int, args, workers: int, per_worker: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from chiptag.cli import app; app()", "serve", str(run), "--port", str(port),
           "--device", args.device, "--engine", args.engine, "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--max-file-mb", "1", "--workers", str(workers),
           "--access-log", "off"] + (["--model-per-worker"] if per_worker else ["--shared-model"])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not ready after 300 s")


def encoded(url: str, kwargs: dict) -> tuple[bytes, dict]:
    """httpx's encoding of a request (multipart body and headers), built once so the timed clients only send."""
    req = httpx.Request("POST", f"{url}/v1/predict", **kwargs)
    return req.read(), {k: v for k, v in req.headers.items() if k.lower() not in ("host", "connection")}


def hammer(url: str, requests_of, clients: int, seconds: float | None, total: int | None) -> dict:
    """`clients` threads send requests_of(i) (pre-encoded: encoded()) until `seconds` pass or `total` requests
    were sent. Each client is a keep-alive http.client connection: the load generator shares the machine's
    cores with the server, so it does as little as it can (httpx cost ~0.8 ms of CPU per request here)."""
    lat, statuses, errors, lock = [], {}, [], threading.Lock()
    counter = iter(range(total)) if total is not None else None
    stop = time.monotonic() + seconds if seconds else None
    host, port = url.removeprefix("http://").split(":")

    def client() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            while True:
                if stop is not None and time.monotonic() >= stop:
                    return
                i = next(counter, None) if counter is not None else 0
                if i is None:
                    return
                body, headers = requests_of(i)
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/v1/predict", body=body, headers=headers)
                    r = conn.getresponse()
                    data, code = r.read(), r.status
                    ok = code == 200 and all(e["error"] is None for e in json.loads(data)["results"])
                    if r.will_close:
                        conn.close()
                except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                    ok, code = False, type(exc).__name__
                    conn.close()
                with lock:
                    lat.append(time.perf_counter() - t0)
                    statuses[str(code)] = statuses.get(str(code), 0) + 1
                    if not ok:
                        errors.append(code)
        finally:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"requests": len(lat), "seconds": time.perf_counter() - t0, "latency_s": lat, "statuses": statuses,
            "errors": len(errors)}


def bad_requests(url: str, chip: bytes):
    bomb = io.BytesIO()
    Image.new("RGB", (12000, 12000)).save(bomb, format="PNG")  # 144 Mpx > the 40 Mpx default cap, ~0.4 MB
    kinds = [
        {"files": [("files", ("notes.jpg", b"not an image at all"))]},
        {"files": [("files", ("cut.jpg", chip[: len(chip) // 3]))]},
        {"files": [("files", ("empty.jpg", b""))]},
        {"files": [("files", ("bomb.png", bomb.getvalue()))]},
        {"files": [("files", ("big.jpg", chip + b"\0" * (1024 * 1024 + 1)))]},
        {"files": [("files", (f"{i}.jpg", b"x")) for i in range(65)]},
        {"files": [("file", ("a.jpg", chip))]},
        {"json": {"path": "/etc/passwd"}},
    ]
    bodies = [encoded(url, k) for k in kinds]
    return lambda i: bodies[i % len(bodies)]


def load_once(url: str, args, chips: list[Path], clients: int, seconds: float) -> dict:
    """--clients threads against one running server for `seconds`: img/s, latency, errors, server CPU."""
    blobs = cycle([(c.name, c.read_bytes()) for c in chips])
    bodies = cycle([encoded(url, {"files": [("files", next(blobs)) for _ in range(args.images_per_request)]})
                    for _ in range(len(chips))])
    lock = threading.Lock()

    def good(_):
        with lock:
            return next(bodies)

    return hammer(url, good, clients, seconds, None)


def soak(url: str, server: subprocess.Popen, chips: list[Path], clients: int, n: int) -> dict:
    rss_before = tree_rss_mb(server.pid)
    out = hammer(url, bad_requests(url, chips[0].read_bytes()), clients, None, n)
    ready = httpx.get(f"{url}/readyz", timeout=30).status_code
    rss_after = tree_rss_mb(server.pid)
    return {"requests": out["requests"], "statuses": out["statuses"], "readyz_after": ready,
            "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
            "rss_growth_mb": round(rss_after - rss_before, 1),
            "ok": bool(ready == 200 and rss_after - rss_before < 100)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--chips", type=Path, default=Path("data/demo/train-jpg"))
    p.add_argument("--offline-images", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2, help="offline predict: best of this many passes")
    p.add_argument("--repeat", type=int, default=3, help="round-robin passes over every configuration")
    p.add_argument("--clients", type=int, nargs="+", default=[8, 64])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model-per-worker", choices=["no", "yes", "both"], default="no",
                   help="with workers > 1: one shared model (no), a model per worker (yes), or measure both")
    p.add_argument("--seconds", type=float, default=10.0, help="per configuration and pass")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--soak", type=int, default=1000, help="bad requests against each server at the end")
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", default="auto")
    p.add_argument("--note", default="", help="how the machine was (idle, shared with other jobs...)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.json"))
    args = p.parse_args()
    chips = sorted(args.chips.glob("*.jpg"))[: args.offline_images]
    layouts = {"no": [False], "yes": [True], "both": [False, True]}[args.model_per_worker]
    kinds = [(w, per) for w in args.workers for per in (layouts if w > 1 else [False])]
    predictor = Predictor.from_run(args.run, device=args.device)
    servers = {}
    try:
        for w, per in kinds:  # every server up (idle ones cost nothing), then round-robin passes
            port = free_port()
            servers[w, per] = (start_server(args.run, port, args, w, per), f"http://127.0.0.1:{port}")
        offline = [offline_img_s(predictor, chips, args.rounds)]
        print(f"offline predict: {offline[0]:.1f} img/s ({len(chips)} chips, batch 64, best of {args.rounds})",
              flush=True)
        passes = []
        for k in range(args.repeat):
            for (w, per), (server, url) in servers.items():
                for clients in args.clients:
                    cpu0 = tree_cpu_seconds(server.pid)
                    load = load_once(url, args, chips, clients, args.seconds)
                    server_cpu = tree_cpu_seconds(server.pid) - cpu0
                    offline.append(offline_img_s(predictor, chips, args.rounds))
                    images = max(1, load["requests"] * args.images_per_request)
                    lat = np.array(load["latency_s"]) * 1000
                    reference = (offline[-2] + offline[-1]) / 2  # offline just before and just after this pass
                    r = {"pass": k, "workers": w, "model": "per-worker" if per else "one", "clients": clients,
                         "img_s": round(images / load["seconds"], 1), "offline_img_s": round(reference, 1),
                         "p50_ms": round(float(np.percentile(lat, 50)), 1),
                         "p99_ms": round(float(np.percentile(lat, 99)), 1), "errors": load["errors"],
                         "server_cpu_ms_per_image": round(1000 * server_cpu / images, 2)}
                    r["ratio"] = round(r["img_s"] / reference, 3)
                    passes.append(r)
                    print(f"pass {k}: workers {w} ({r['model']} model) x {clients} clients: {r['img_s']} img/s = "
                          f"{r['ratio']}x offline {r['offline_img_s']} (p50 {r['p50_ms']} ms, p99 {r['p99_ms']} "
                          f"ms, errors {r['errors']})", flush=True)
        soaks = {f"workers {w} ({'per-worker' if per else 'one'} model)": soak(url, server, chips, 8, args.soak)
                 for (w, per), (server, url) in servers.items()} if args.soak else {}
        engine = httpx.get(f"{next(iter(servers.values()))[1]}/readyz").json()["engine"]
    finally:
        for server, _ in servers.values():
            server.terminate()  # SIGTERM: drains, then exits
        for server, _ in servers.values():
            server.wait(60)
    summary = []
    for (w, per) in kinds:
        for clients in args.clients:
            ratios = sorted(r["ratio"] for r in passes if (r["workers"], r["model"] == "per-worker", r["clients"])
                            == (w, per, clients))
            summary.append({"workers": w, "model": "per-worker" if per else "one", "clients": clients,
                            "ratio_median": float(np.median(ratios)), "ratio_min": ratios[0], "ratio_max": ratios[-1],
                            "target_met": bool(np.median(ratios) >= 0.85)})
    out = {"command": "python " + " ".join(sys.argv), "engine": engine, "cpu_count": os.cpu_count(),
           "load_average_at_end": os.getloadavg(), "note": args.note,
           "images_per_request": args.images_per_request, "summary": summary,
           "offline_img_s_series": [round(o, 1) for o in offline], "passes": passes, "soak": soaks}
    print(json.dumps({k: out[k] for k in ("command", "engine", "load_average_at_end", "summary", "soak")}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
