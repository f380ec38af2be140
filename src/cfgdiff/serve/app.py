"""The web app: one page (static/, no external assets) and a small JSON + server-sent-events API
over an Engine (jobs.py), on Starlette, served by uvicorn.

    GET  /                the page (and /app.js, /app.css)
    GET  /api/model       class names, samplers, limits and the request's fields (schema.py)
    GET  /api/status      the running job, how many wait, counts of done/cancelled/refused
    POST /api/generate    JSON settings -> a text/event-stream of the job's events
    POST /api/cancel      {"job": ID} -> stops that job (waiting or running)

Every answer that is not a page or a stream is JSON, and every refusal has one shape:
{"error": one line of at most schema.MAX_MESSAGE characters, "field": the request field at
fault or null}. Every input is checked before anything runs: a bad value is HTTP 422, a body
that is not JSON 415/422, a body over 8 KiB 413, a body that does not arrive in time 408, a
full queue 503 with Retry-After, an unknown path 404 and a wrong method 405.
No route takes a file name: the page's three files have fixed routes. Bodies must be JSON,
which a page on another site cannot send here without a CORS preflight, which this server
does not answer; on a loopback address the Host header must name the loopback too (no DNS
rebinding). A client that goes away cancels its job.

Connections are bounded (Timeouts): a request must arrive (its headers, then its body) within
a few seconds, an idle keep-alive connection is closed after a few more, and when
`connections` are open the one idle longest is closed to make room, so that idle or
half-sent connections cannot lock out the page, on the loopback or with --host. Stopping
(SIGTERM, SIGINT, or `stop()`) first ends every job with a final "cancelled" event that says
the server is stopping, so open streams end whole; the process then exits 0 (docs/DESIGN.md,
"Interfaces over the library").
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from ipaddress import ip_address

import anyio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cfgdiff.errors import CfgDiffError, ConfigError, RuntimeFault
from cfgdiff.serve.jobs import Busy, Engine
from cfgdiff.serve.schema import MAX_MESSAGE, parse_int

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


@dataclass(frozen=True)
class Timeouts:
    """How long a connection may take and how many may be open. `request`: seconds from the
    connection (or the previous answer) to a request's whole headers; `body`: seconds to its
    whole body; `keep_alive`: seconds an idle connection is kept after an answer;
    `connections`: open at once, beyond which the one idle longest is closed; `shutdown`:
    seconds open streams get to end once jobs are cancelled."""

    request: float = 5.0
    body: float = 5.0
    keep_alive: float = 5.0
    connections: int = 64
    shutdown: float = 5.0


class _Refused(Exception):
    def __init__(self, status: int, reason: str, headers: dict | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


def _refusal(
    status: int, reason: str, headers: dict | None = None, field: str | None = None
) -> JSONResponse:
    """The one shape of every refusal: one line, capped, and the field at fault."""
    reason = " ".join(reason.split())
    if len(reason) > MAX_MESSAGE:
        reason = reason[: MAX_MESSAGE - 1] + "…"
    return JSONResponse({"error": reason, "field": field}, status_code=status, headers=headers)


async def _json_body(request: Request, seconds: float):
    """The request's JSON body, at most MAX_BODY bytes, arrived within `seconds`. An integer
    too long to be any field's value is read as a schema.Digits marker, not converted."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise _Refused(415, "the body must be JSON (Content-Type: application/json)")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise _Refused(413, f"the body must be at most {MAX_BODY} bytes")
    chunks, size = [], 0
    try:
        with anyio.fail_after(seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    raise _Refused(413, f"the body must be at most {MAX_BODY} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise _Refused(408, f"the body did not arrive within {seconds:g} s") from None
    try:
        return json.loads(b"".join(chunks), parse_int=parse_int)
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


def create_app(
    engine: Engine, allowed_hosts: list[str] | None = None, timeouts: Timeouts = Timeouts()
) -> Starlette:
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
            settings = engine.parse(await _json_body(request, timeouts.body))
        except _Refused as e:
            return _refusal(e.status, e.reason)
        except CfgDiffError as e:
            return _refusal(422, str(e), field=getattr(e, "field", None))
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
            body = await _json_body(request, timeouts.body)
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

    async def http_error(request: Request, e: HTTPException) -> Response:
        reason = {
            404: f"no such page or API: {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(e.status_code, str(e.detail))
        return _refusal(e.status_code, reason, dict(e.headers or {}))

    handlers = {HTTPException: http_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


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


def _server_classes():
    """uvicorn's HTTP/1.1 connection and server, bounded as Timeouts says and stopping jobs
    first (imported here: uvicorn is the `serve` extra's)."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Connection(H11Protocol):
        """A connection that must bring a request within `timeouts.request` seconds (of its
        opening, or of the previous answer) and that is closed to make room when it is the
        one idle longest of more than `timeouts.connections`."""

        timeouts = Timeouts()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = None
            self._arm()
            over = len(self.connections) - self.timeouts.connections
            if over > 0:
                idle = [c for c in self.connections if c is not self and c.waiting()]
                for c in sorted(idle, key=lambda c: c.idle_since)[:over]:
                    c.transport.close()

        def waiting(self) -> bool:
            """Between requests: none has arrived whole, or the last one is answered."""
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self.idle_since = self.loop.time()
            self._deadline = self.loop.call_later(self.timeouts.request, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            if self.waiting() and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if not self.waiting():
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    class Server(uvicorn.Server):
        """uvicorn's server; stopping, it first ends the engine's jobs, so that every open
        stream gets its final event and ends before the connections are waited for."""

        engine: Engine

        async def shutdown(self, sockets=None) -> None:
            self.engine.stop()
            await super().shutdown(sockets)

    return Connection, Server


def _server(engine: Engine, sock: socket.socket, host: str, timeouts: Timeouts = Timeouts()):
    import uvicorn

    connection, server = _server_classes()
    connection.timeouts = timeouts
    hosts = [*LOOPBACK_NAMES, host, f"[{host}]"] if is_loopback(host) else None
    config = uvicorn.Config(
        create_app(engine, hosts, timeouts), log_level="warning", access_log=False,
        http=connection, timeout_graceful_shutdown=timeouts.shutdown, limit_concurrency=None,
        timeout_keep_alive=timeouts.keep_alive, lifespan="off",
    )  # fmt: skip
    out = server(config)
    out.engine = engine
    return out


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve_forever(engine: Engine, sock: socket.socket, host: str) -> None:
    """Serve on a socket from bind() until SIGINT (Ctrl-C) or SIGTERM, then stop the engine's
    jobs (each open stream gets its final event) and return: either signal is how a server is
    asked to stop, not an error. (uvicorn handles both while it runs and raises the one it
    got again once it has stopped; the handlers set here take that.)"""
    server = _server(engine, sock, host)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.close()


@dataclass
class RunningServer:
    """A server started by start_in_thread: its URL, and stop()."""

    url: str
    server: object
    thread: threading.Thread
    engine: Engine

    def stop(self) -> None:
        """Stop as a signal stops `cfgdiff serve`: jobs end with their final event, then the
        server."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()


def start_in_thread(
    engine: Engine, host: str = "127.0.0.1", port: int = 0, timeouts: Timeouts = Timeouts()
) -> RunningServer:
    """Serve in a background thread (tests, benchmarks); returns once it accepts connections."""
    sock = bind(host, port)
    server = _server(engine, sock, host, timeouts)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(2000):
        if server.started or not thread.is_alive():
            break
        threading.Event().wait(0.005)
    if not server.started:
        raise RuntimeFault(f"the web server on {url_of(sock)} did not start")
    return RunningServer(url_of(sock), server, thread, engine)
