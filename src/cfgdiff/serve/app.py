"""The web app: one page (static/, no external assets) and a small JSON + server-sent-events API
over an Engine (jobs.py), on Starlette, served by uvicorn.

    GET  /                the page (and /app.js, /app.css)
    GET  /api/model       class names, samplers and limits, for the page's controls
    GET  /api/status      the running job, how many wait, counts of done/cancelled/refused
    POST /api/generate    JSON settings -> a text/event-stream of the job's events
    POST /api/cancel      {"job": ID} -> stops that job (waiting or running)

Every input is checked before anything runs: a bad value is HTTP 422 with a one-line reason,
a body that is not JSON 415/422, a body over 8 KiB 413, a full queue 503 with Retry-After.
No route takes a file name: the page's three files have fixed routes. Bodies must be JSON,
which a page on another site cannot send here without a CORS preflight, which this server
does not answer; on a loopback address the Host header must name the loopback too (no DNS
rebinding). A client that goes away cancels its job.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from ipaddress import ip_address

import anyio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cfgdiff.errors import CfgDiffError, ConfigError, RuntimeFault
from cfgdiff.serve.jobs import Busy, Engine

MAX_BODY = 8192
_JOB_ID = re.compile(r"^[0-9a-f]{16}$")
_FINAL = {"done", "cancelled", "error"}
# The page loads nothing from elsewhere; the browser is told so, and enforces it.
_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server to this machine."""
    if host == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Refused(Exception):
    def __init__(self, status: int, reason: str, headers: dict | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


def _refusal(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


async def _json_body(request: Request):
    """The request's JSON body, at most MAX_BODY bytes."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise _Refused(415, "the body must be JSON (Content-Type: application/json)")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise _Refused(413, f"the body must be at most {MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise _Refused(413, f"the body must be at most {MAX_BODY} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        raise _Refused(422, "the body is not valid JSON") from None


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


class HostCheck:
    """ASGI middleware: a request whose Host header names none of `allowed` (compared without
    the port; IPv6 in brackets) is refused with 400, so that a page elsewhere whose name is made
    to resolve to 127.0.0.1 (DNS rebinding) cannot use a server on the loopback."""

    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "").lower()
            end = host.find("]")
            name = host[: end + 1] if host.startswith("[") and end > 0 else host.split(":")[0]
            if name not in self.allowed:
                refusal = _refusal(400, "the Host header must name this machine's loopback")
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EventStream(StreamingResponse):
    """A streaming response that watches for the client leaving, whatever ASGI version the
    server speaks, and then cancels the stream (whose generator cancels the job)."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                await self.stream_response(send)
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


def create_app(engine: Engine, allowed_hosts: list[str] | None = None) -> Starlette:
    """The app over `engine`. `allowed_hosts`: the Host header names accepted (None: any)."""
    files = resources.files("cfgdiff.serve") / "static"
    pages = {route: (files.joinpath(name).read_bytes(), kind) for route, (name, kind) in
             _STATIC.items()}  # fmt: skip

    def static(route: str) -> Callable:
        body, kind = pages[route]

        async def page(request: Request) -> Response:
            headers = {"Content-Security-Policy": _CSP, "Cache-Control": "no-cache",
                       "X-Content-Type-Options": "nosniff"}  # fmt: skip
            return Response(body, media_type=kind, headers=headers)

        return page

    async def model(request: Request) -> Response:
        return JSONResponse(engine.info())

    async def status(request: Request) -> Response:
        return JSONResponse(engine.status())

    async def generate(request: Request) -> Response:
        try:
            settings = engine.parse(await _json_body(request))
        except _Refused as e:
            return _refusal(e.status, e.reason)
        except CfgDiffError as e:
            return _refusal(422, str(e))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict] = asyncio.Queue()

        def sink(event: dict) -> None:  # called from the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server is stopping
                pass

        try:
            job = engine.submit(settings, sink)
        except Busy as e:
            return _refusal(503, str(e), {"Retry-After": "2"})

        async def stream():
            try:
                while True:
                    event = await events.get()
                    yield _sse(event)
                    if event["type"] in _FINAL:
                        return
            finally:  # finished, or the client left: a job still going is cancelled
                engine.cancel(job.id)

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return EventStream(stream(), headers=headers)

    async def cancel(request: Request) -> Response:
        try:
            body = await _json_body(request)
        except _Refused as e:
            return _refusal(e.status, e.reason)
        job = body.get("job") if isinstance(body, dict) else None
        if not isinstance(job, str) or not _JOB_ID.match(job) or len(body) != 1:
            return _refusal(422, 'the body must be {"job": ID} with the ID a job was given')
        return JSONResponse({"cancelled": engine.cancel(job)})

    routes = [Route(r, static(r), methods=["GET"]) for r in _STATIC]
    routes += [
        Route("/api/model", model, methods=["GET"]),
        Route("/api/status", status, methods=["GET"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/cancel", cancel, methods=["POST"]),
    ]
    middleware = []
    if allowed_hosts is not None:
        middleware.append(Middleware(HostCheck, allowed=allowed_hosts))
    return Starlette(routes=routes, middleware=middleware)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); a ConfigError naming `host`
    or `port` when it cannot be had."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"`port` must be in [0, 65535], got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as e:
        raise ConfigError(f"`host` {host}: {e.strerror or e}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)  # connections wait in the backlog until the server runs
    except OSError as e:
        sock.close()
        raise ConfigError(f"`port` {port} on {host}: {e.strerror or e}") from None
    return sock


def _server(engine: Engine, sock: socket.socket, host: str):
    import uvicorn

    hosts = [*LOOPBACK_NAMES, host, f"[{host}]"] if is_loopback(host) else None
    config = uvicorn.Config(
        create_app(engine, hosts), log_level="warning", access_log=False,
        timeout_graceful_shutdown=3, limit_concurrency=256, timeout_keep_alive=5,
    )  # fmt: skip
    return uvicorn.Server(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve_forever(engine: Engine, sock: socket.socket, host: str) -> None:
    """Serve on a socket from bind() until interrupted (Ctrl-C, SIGTERM), then stop the
    engine's jobs."""
    server = _server(engine, sock, host)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()


@dataclass
class RunningServer:
    """A server started by start_in_thread: its URL, and stop()."""

    url: str
    server: object
    thread: threading.Thread
    engine: Engine

    def stop(self) -> None:
        self.engine.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_in_thread(engine: Engine, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Serve in a background thread (tests, benchmarks); returns once it accepts connections."""
    sock = bind(host, port)
    server = _server(engine, sock, host)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(2000):
        if server.started or not thread.is_alive():
            break
        threading.Event().wait(0.005)
    if not server.started:
        raise RuntimeFault(f"the web server on {url_of(sock)} did not start")
    return RunningServer(url_of(sock), server, thread, engine)
