"""`chiptag serve RUN`: an HTTP API and a web page for tagging chips with a trained run (FastAPI + uvicorn).

    POST /v1/predict   multipart field `files` (one or many images; TIFF rasters for a multiband model), optional
                       `tta=true` and `preview=true` (query or form fields)
                       -> {"run_id", "tta", "results": [{"name", "tags", "probabilities", "error"}, ...]}
                       preview=true adds each decoded entry's "preview": a PNG data URL of the chip as the model
                       sees it (a raster: the RGB composite of its first three bands, 2-98 percentile stretch)
    GET  /v1/model     run id, backbone, image size, resize mode, tags, thresholds, val/test F2 and baseline
    GET  /metrics      Prometheus text format (inference/metrics.py: chiptag_* counters, histograms, gauges)
    GET  /healthz      the process answers;   GET /readyz   the model is loaded and one warm-up forward ran
    GET  /             the web page (static/index.html: plain HTML/CSS/JS, no CDN)

Whole-request problems answer a JSON 4xx {"error": "..."} naming the problem: 401 (a token is set and the
`Authorization: Bearer <token>` header is missing or wrong: /v1/* and /metrics only), 413 (request bytes, a
file's bytes, too many images), 415 (not multipart/form-data), 422 (no `files`, a bad `tta`), 408 (over the
request timeout), 503 (not ready yet). An image that cannot be used fails only its own entry of the batch; a
request none of whose images can be used answers 422 (413 when every one is over the pixel cap) with the
entries' messages joined in "error" and the "results" as usual.

Access: bound to a loopback address no token is needed; bound to any other address `serve` refuses to start
without one (--token / CHIPTAG_TOKEN) unless told --no-token (check_access). No CORS headers unless
--cors-origin names the origins. SIGTERM (or Ctrl-C): stop accepting, finish the requests in flight (up to
--timeout), then exit 0. --workers N: inference/workers.py.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from chiptag.errors import ChiptagError
from chiptag.inference.service import ServeOptions, Service, UploadError

FIELD = "files"
INLINE_BYTES = 256 * 1024  # an upload this small whose header says at most INLINE_PIXELS (service.py): inline
TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


class RequestError(Exception):
    def __init__(self, status: int, message: str, results: list | None = None):
        super().__init__(message)
        self.status, self.message, self.results = status, message, results


def _limited(receive, limit: int):
    """An ASGI receive that stops a body over `limit` bytes as it streams in (chunked uploads carry no
    Content-Length), so an oversized request never fills the disk or the memory."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise RequestError(413, f"request body over {limit:,} bytes (--max-request-mb)")
        return message

    return wrapped


def _flag(value: str | None, name: str = "tta") -> bool:
    v = (value or "").strip().lower()
    if v not in TRUE | FALSE:
        raise RequestError(422, f"{name} must be true or false, got {value!r}")
    return v in TRUE


def _option(request: Request, form, name: str) -> bool:
    """A true/false option from the query string or, failing that, a form field of the same name."""
    field = form.get(name) if isinstance(form.get(name), str) else None
    return _flag(request.query_params.get(name, field), name)


async def _read_form(request: Request, max_bytes: int, max_images: int):
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise RequestError(415, f"send images as multipart/form-data in field '{FIELD}' "
                                f"(got content-type {ctype or 'none'!r})")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise RequestError(413, f"request body of {int(length):,} bytes is over {max_bytes:,} (--max-request-mb)")
    try:  # the parser itself refuses far more files than allowed, before spooling them
        return await Request(request.scope, _limited(request.receive, max_bytes)).form(
            max_files=max_images + 1, max_fields=16)
    except HTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise RequestError(413, f"too many images: at most {max_images} per request (--max-images)") from None
        raise RequestError(422, f"malformed multipart body: {exc.detail}") from None


def _uploads(form, max_images: int, max_file_bytes: int) -> list[UploadFile]:
    files = [v for k, v in form.multi_items() if k == FIELD and isinstance(v, UploadFile)]
    if not files:
        others = sorted({k for k, v in form.multi_items() if isinstance(v, UploadFile)})
        got = f" (got file field(s) {', '.join(map(repr, others))})" if others else ""
        raise RequestError(422, f"no images: send one or more files in multipart field '{FIELD}'{got}")
    if len(files) > max_images:
        raise RequestError(413, f"too many images: {len(files)} > {max_images} per request (--max-images)")
    for i, f in enumerate(files):
        if f.size is not None and f.size > max_file_bytes:
            raise RequestError(413, f"{f.filename or f'file {i + 1}'}: {f.size:,} bytes is over {max_file_bytes:,} "
                                    "per file (--max-file-mb)")
    return files


async def _predict(service: Service, request: Request) -> dict:
    opts = service.opts
    service.on_the_way.add(1)  # the batcher waits for company only while someone is on the way
    try:
        form = await _read_form(request, opts.max_request_bytes, opts.max_images)
        try:
            tta, preview = _option(request, form, "tta"), _option(request, form, "preview")
            files = _uploads(form, opts.max_images, opts.max_file_bytes)
            names = [f.filename or f"file {i + 1}" for i, f in enumerate(files)]
            decoded = await _decode_all(service, names, files)
        finally:
            await form.close()
    finally:
        service.on_the_way.add(-1)
    good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
    previews = {i: service.preview(decoded[i]) for i in good} if preview else {}
    if not good:  # nothing in the request could be used: the whole request fails, its entries say why
        body = _answer(service, names, decoded, {}, tta, previews)
        bombs = all("pixel cap" in r["error"] for r in body["results"])
        raise RequestError(413 if bombs else 422, "; ".join(r["error"] for r in body["results"]), body["results"])
    future = service.batcher.submit([decoded[i] for i in good], tta)
    # "just answered" counts as on the way (its client often sends the next request at once); the callback
    # runs in the thread that finishes the future, exactly one -1 per +1, also after a timeout
    future.add_done_callback(lambda _: service.on_the_way.add(1))
    try:
        done = await asyncio.wrap_future(future)  # batcher.Rows: a chip that failed the forward has its error
        for j, message in done.errors.items():
            decoded[good[j]] = f"{names[good[j]]}: the model could not tag it ({message})"
        rows = {i: done.probs[j] for j, i in enumerate(good) if j not in done.errors}
        return _answer(service, names, decoded, rows, tta, previews)
    finally:
        future.add_done_callback(lambda _: service.on_the_way.add(-1))


def _answer(service: Service, names: list[str], decoded: list, rows: dict, tta: bool, previews: dict) -> dict:
    results = [service.entry(n, rows.get(i), decoded[i] if i not in rows else None) for i, n in enumerate(names)]
    for i, url in previews.items():
        results[i]["preview"] = url
    tagged = sum(r["error"] is None for r in results)
    service.metrics.images.labels("tagged").inc(tagged)
    service.metrics.images.labels("error").inc(len(results) - tagged)
    return {"run_id": service.run_id, "tta": tta, "results": results}


async def _decode_all(service: Service, names: list[str], files: list[UploadFile]) -> list:
    """Small uploads (a chip) are decoded right here: ~0.1 ms, less than handing one to a thread costs (0.95 ->
    0.85 ms of server CPU per 1-chip request, measured with a no-op forward); the others in the thread pool,
    each reading its own spooled file there, so a big image never stalls the event loop."""
    decoded: list = [None] * len(files)
    slow = []
    for i, (n, f) in enumerate(zip(names, files)):
        raw = f.file.read() if f.size is not None and f.size <= INLINE_BYTES else None
        if raw is not None and service.small(raw):
            decoded[i] = _decode(service, n, raw)
        else:
            f.file.seek(0)
            slow.append(i)
    for i, d in zip(slow, await asyncio.gather(*(run_in_threadpool(_decode, service, names[i], files[i].file)
                                                  for i in slow))):
        decoded[i] = d
    return decoded


def _decode(service: Service, name: str, data):
    """-> the chip, or the error message (a string) for its entry."""
    try:
        return service.decode(name, data)
    except UploadError as exc:
        return str(exc)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _guarded(path: str) -> bool:
    """What a token protects: the API and the metrics; the probes (/healthz, /readyz) and the page stay open
    (the page itself asks for the token)."""
    return path.startswith("/v1/") or path == "/metrics"


class Gate:
    """Every HTTP request passes here (pure ASGI, no per-request task): the token check, the request metrics,
    the JSON access log."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        self.token = service.opts.token.encode() if service.opts.token else None
        self.json_log = service.opts.access_log == "json"

    def refused(self, scope) -> str | None:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if header is None:
            return "this server needs a token: send the header 'Authorization: Bearer <token>'"
        scheme, _, given = header.partition(b" ")
        # constant time: how much of a guess matched never shows in the response time
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            return "wrong token in the 'Authorization: Bearer <token>' header"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, metrics = time.perf_counter(), 500, self.service.metrics

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.in_flight.inc()
        try:
            problem = self.refused(scope) if self.token is not None and _guarded(scope["path"]) else None
            if problem:
                await _error(401, problem, {"WWW-Authenticate": 'Bearer realm="chiptag"'})(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:  # an unhandled error still counts (as the 500 the outer middleware answers)
            metrics.in_flight.dec()
            seconds = time.perf_counter() - t0
            metrics.answered(scope["path"], status, seconds)
            if self.json_log:
                self.log(scope, status, seconds)

    @staticmethod
    def log(scope, status: int, seconds: float) -> None:
        client = scope.get("client") or ("", 0)
        agent = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"user-agent"), None)
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "pid": os.getpid(),
                  "client": f"{client[0]}:{client[1]}", "method": scope["method"], "path": scope["path"],
                  "status": status, "duration_ms": round(seconds * 1000, 2), "user_agent": agent}
        sys.stderr.write(json.dumps(record) + "\n")
        sys.stderr.flush()


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_access(host: str, token: str | None, no_token: bool) -> None:
    """Refuse to serve beyond loopback without a token (anyone who reaches the port would use the model), unless
    --no-token says so on purpose (then warn)."""
    if token is not None and not token.strip():
        raise ChiptagError("--token (or CHIPTAG_TOKEN) is empty")
    if token is not None and (token != token.strip() or any(c.isspace() or not c.isprintable() for c in token)):
        raise ChiptagError("--token must be printable, without spaces (it travels in an HTTP header)")
    if token and no_token:
        raise ChiptagError("--token and --no-token contradict each other: pass one")
    if is_loopback(host) or token:
        return
    if not no_token:
        raise ChiptagError(f"refusing to serve on {host} without a token: anyone who can reach the port could use "
                           "the model. Pass --token TOKEN (or set CHIPTAG_TOKEN); clients then send "
                           "'Authorization: Bearer TOKEN'. Or pass --no-token to serve openly on purpose")
    print(f"warning: serving on {host} with --no-token: anyone who can reach the port can use the API",
          file=sys.stderr, flush=True)


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=service.warm, name="chiptag-warmup", daemon=True).start()
        yield
        service.close()

    app = FastAPI(title="chiptag", summary="Tag satellite chips with a trained chiptag run", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(Gate, service=service)
    if service.opts.cors_origins:  # added last: outermost, so preflights and 401s carry the CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(service.opts.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        if exc.results is not None:  # no upload could be used: each entry still says why
            return JSONResponse({"error": exc.message, "results": exc.results}, status_code=exc.status)
        return _error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        return _error(422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # still JSON, so the page shows it on the card
        return _error(500, f"internal error: {exc.__class__.__name__}: {exc}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return (resources.files("chiptag.inference") / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if service.ready:
            return {"status": "ready", "engine": service.engine}
        if service.error:
            return _error(503, f"model failed to load: {service.error}")
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        body, ctype = service.metrics.exposition()
        return Response(body, media_type=ctype)

    @app.get("/v1/model")
    async def model():
        return service.model_info()

    @app.post("/v1/predict")
    async def predict(request: Request):
        if not service.ready:
            return _error(503, service.error or "model still loading; poll /readyz")
        try:
            async with asyncio.timeout(service.opts.timeout_s):
                return JSONResponse(await _predict(service, request))
        except TimeoutError:
            return _error(408, f"request not done within {service.opts.timeout_s:g} s (--timeout)")

    return app


def uvicorn_options(opts: ServeOptions) -> dict:
    """The one uvicorn configuration (one process, or each worker)."""
    return {"log_level": "info", "access_log": opts.access_log == "text", "timeout_keep_alive": 5,
            "limit_concurrency": opts.max_connections,
            # SIGTERM: stop accepting, let the requests in flight finish (none may take longer than this)
            "timeout_graceful_shutdown": max(1, int(opts.timeout_s + 1))}


def banner(opts: ServeOptions, run, engine: str, workers: str = "") -> str:
    access = "token required" if opts.token else "no token"
    return (f"chiptag serve: {run} ({engine} on {opts.device}{', ' + workers if workers else ''}) at "
            f"http://{opts.host}:{opts.port}/  ({access}; API: POST /v1/predict, GET /v1/model, /metrics; "
            "Ctrl-C or SIGTERM stops after the requests in flight)")


def serve(run, opts: ServeOptions) -> None:
    """Load RUN (a ChiptagError names what is wrong before anything listens), then serve until Ctrl-C or
    SIGTERM (both drain the requests in flight first). One process; `--workers N` is
    inference.workers.serve_workers (the CLI picks). The caller checked access (check_access)."""
    import uvicorn

    service = Service(run, opts)
    print(banner(opts, service.run, service.engine), flush=True)
    uvicorn.run(create_app(service), host=opts.host, port=opts.port, **uvicorn_options(opts))


class BackgroundServer:
    """uvicorn in a thread of this process on a free port (tests, benchmarks): `with BackgroundServer(app) as
    url: ...`; leaving the block stops it cleanly (lifespan shutdown included)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", limit_concurrency: int | None = None):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=5,
                                                    limit_concurrency=limit_concurrency))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
