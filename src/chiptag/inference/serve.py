"""`chiptag serve RUN`: an HTTP API and a web page for tagging chips with a trained run (FastAPI + uvicorn).

    POST /v1/predict   multipart field `files` (one or many images), optional `tta=true` (query or form field)
                       -> {"run_id", "tta", "results": [{"name", "tags", "probabilities", "error"}, ...]}
    GET  /v1/model     run id, backbone, image size, resize mode, tags, thresholds, val/test F2 and baseline
    GET  /healthz      the process answers;   GET /readyz   the model is loaded and one warm-up forward ran
    GET  /             the web page (static/index.html: plain HTML/CSS/JS, no CDN)

Whole-request problems answer a JSON 4xx {"error": "..."} naming the problem: 413 (request bytes, a file's
bytes, too many images), 415 (not multipart/form-data), 422 (no `files`, a bad `tta`), 408 (over the request
timeout), 503 (not ready yet). An image that cannot be used fails only its own entry of the batch.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from chiptag.inference.service import ServeOptions, Service, UploadError

FIELD = "files"
INLINE_BYTES = 256 * 1024  # an upload this small whose header says at most INLINE_PIXELS (service.py): inline
TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


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


def _flag(value: str | None) -> bool:
    v = (value or "").strip().lower()
    if v not in TRUE | FALSE:
        raise RequestError(422, f"tta must be true or false, got {value!r}")
    return v in TRUE


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
    service.incoming += 1  # the batcher waits for company only while someone is on the way
    try:
        form = await _read_form(request, opts.max_request_bytes, opts.max_images)
        try:
            raw_tta = form.get("tta") if isinstance(form.get("tta"), str) else None
            tta = _flag(request.query_params.get("tta", raw_tta))
            files = _uploads(form, opts.max_images, opts.max_file_bytes)
            names = [f.filename or f"file {i + 1}" for i, f in enumerate(files)]
            decoded = await _decode_all(service, names, files)
        finally:
            await form.close()
    finally:
        service.incoming -= 1
    good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
    if not good:
        return _answer(service, names, decoded, {}, tta)
    future = service.batcher.submit([decoded[i] for i in good], tta)
    future.add_done_callback(lambda _: service.answering(+1))  # runs in the batcher's thread, as it finishes
    try:
        return _answer(service, names, decoded, dict(zip(good, await asyncio.wrap_future(future))), tta)
    finally:  # exactly one -1 per +1, also when the request timed out before its forward finished
        future.add_done_callback(lambda _: service.answering(-1))


def _answer(service: Service, names: list[str], decoded: list, rows: dict, tta: bool) -> dict:
    results = [service.entry(n, rows.get(i), decoded[i] if i not in rows else None) for i, n in enumerate(names)]
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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=service.warm, name="chiptag-warmup", daemon=True).start()
        yield
        service.close()

    app = FastAPI(title="chiptag", summary="Tag satellite chips with a trained chiptag run", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
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


def serve(run, opts: ServeOptions) -> None:
    """Load RUN (a ChiptagError names what is wrong before anything listens), then serve until Ctrl-C."""
    import uvicorn

    service = Service(run, opts)
    print(f"chiptag serve: {service.run} ({service.engine} on {service.predictor.device}) at "
          f"http://{opts.host}:{opts.port}/  (API: POST /v1/predict, GET /v1/model; Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(service), host=opts.host, port=opts.port, log_level="info", timeout_keep_alive=5,
                limit_concurrency=opts.max_connections)


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
