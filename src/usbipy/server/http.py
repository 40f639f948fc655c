"""usbipyd's HTTP listener (--http ADDR:PORT): the status API, the live page, metrics.

Served by a thread per request (the standard library's WSGI server), bounded in
number; what a request needs from the server is read on the event loop
(:class:`~.status.StatusBoard`) and handed back. Routes:

- ``GET /``, ``/static/app.js``, ``/static/style.css``: the page (``page/``);
- ``GET /api/v1/status``: every device the client may see, with its state (JSON);
- ``GET /api/v1/events``: the same as server-sent events, sent when it changes;
- ``POST /api/v1/devices/BUSID/release``: an admin ends the session holding BUSID;
- ``GET /metrics``: Prometheus' text format (with prometheus_client).

Who may do what: on a loopback address, the machine's own users are admins (as
they are of the metrics); on any other address the listener speaks mutual TLS
with the server's certificate and CA, and the access policy's ``grant`` rules
decide what each certificate may see (``view``) and release (``admin``). A
plaintext request there fails its handshake: nothing is sent in the clear.

Browsers are the other attack surface. A request whose Host is not this
listener's address is refused (DNS rebinding: a web page's own name resolving
to 127.0.0.1), and a release must be a JSON POST from the page's own origin,
which a cross-site form cannot send (CSRF). The page runs under a strict
Content-Security-Policy and puts every string a peer chose in the DOM as text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from ..escape import printable
from ..netaddr import is_loopback
from ..policy import Client, Grant
from ..tls import TlsSession
from .access import client_of
from .status import StatusBoard, Viewer

if TYPE_CHECKING:
    from .server import UsbipServer

log = logging.getLogger("usbipy.server")

#: Requests served at once; more wait in the listen queue, then are closed.
MAX_REQUESTS = 32
#: Event streams open at once (each holds a request thread while the page is open).
MAX_STREAMS = 8
#: Seconds a connection has for its TLS handshake and its whole request (headers),
#: and each write of a reply may wait.
REQUEST_TIMEOUT = 10.0
#: How often an event stream looks for a change; and a comment, to keep it open.
STREAM_CHECK = 0.5
STREAM_KEEPALIVE = 15.0
#: An event stream ends after this (the browser reconnects at once): no request
#: thread lives forever.
STREAM_LIFETIME = 3600.0
#: Seconds a request waits for the event loop's answer.
LOOP_TIMEOUT = 10.0
#: Bytes a release's body may say it has (it says "{}").
MAX_BODY = 4096
#: Connections at once from one address other than loopback.
MAX_PER_ADDRESS = 8

API = "/api/v1/"
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/static/style.css": ("style.css", "text/css; charset=utf-8")}
#: (a tuple: wsgiref adds to the list it is given, and these are every reply's)
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'; "
                                "base-uri 'none'; form-action 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)

StartResponse = Callable[..., Any]


def _cut(sock: socket.socket) -> None:
    """A connection's deadline passed: end its reads and writes (its thread then ends)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


#: The deadline of the request this thread serves.
_request = threading.local()


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT
    viewer: Viewer

    def setup(self) -> None:
        super().setup()
        server = self.server
        assert isinstance(server, _Listener)
        peer = self.client_address[0] if isinstance(self.client_address, tuple) else None
        if isinstance(self.connection, ssl.SSLSocket):
            session = TlsSession.of(self.connection, kernel=False)
            self.viewer = Viewer(client_of(peer, session))
        else:
            self.viewer = Viewer(client_of(peer, None), everywhere=Grant.ADMIN)

    def get_environ(self) -> dict[str, Any]:
        deadline: threading.Timer | None = getattr(_request, "deadline", None)
        if deadline is not None:
            deadline.cancel()  # (the request is whole: what is left is the reply)
        environ = super().get_environ()
        environ["usbipy.viewer"] = self.viewer
        return environ

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass  # (a scrape every 15 s, a page's polls: not news)


class LoopBusy(Exception):
    """The event loop did not answer a request in time."""


class _Listener(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    #: The TLS every connection must speak, or None (loopback).
    tls: ssl.SSLContext | None = None

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self._active = threading.BoundedSemaphore(MAX_REQUESTS)
        self._lock = threading.Lock()
        #: Connections being served, by client address.
        self._per_address: dict[str, int] = {}
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # (HTTPServer.server_bind asks the DNS for this host's name: a slow or dead
        # resolver would hold up usbipyd's start, for a name nothing uses)
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        with self._lock:
            crowded = (not is_loopback(address)
                       and self._per_address.get(address, 0) >= MAX_PER_ADDRESS)
            if crowded or not self._active.acquire(blocking=False):
                self.shutdown_request(request)  # (a flood waits for no thread)
                return
            self._per_address[address] = self._per_address.get(address, 0) + 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(address)
            raise

    def _done(self, address: str) -> None:
        with self._lock:
            left = self._per_address.pop(address, 1) - 1
            if left:
                self._per_address[address] = left
            self._active.release()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(str(client_address[0]))

    def finish_request(self, request: Any, client_address: Any) -> None:
        # One deadline for the handshake and the whole request, not one per read: a
        # client that sends a byte now and then holds no thread past it. (The app
        # cancels it once the request is whole: see _Handler.get_environ.)
        request.settimeout(REQUEST_TIMEOUT)
        # (a descriptor of its own for the deadline: TLS takes the request's over, and
        # shutdown(2) on either ends the one connection both name)
        watch = request.dup()
        deadline = threading.Timer(REQUEST_TIMEOUT, _cut, (watch,))
        deadline.daemon = True
        deadline.start()
        try:
            if self.tls is None:
                self._serve(request, client_address, deadline)
                return
            try:
                secured = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                # (plaintext on the TLS port, a certificate the CA did not sign, silence)
                log.debug("http: %s: TLS handshake refused: %s",
                          printable(str(client_address[0])), exc)
                return
            try:
                self._serve(secured, client_address, deadline)
            finally:
                secured.close()
        finally:
            deadline.cancel()
            watch.close()

    def _serve(self, sock: Any, client_address: Any, deadline: threading.Timer) -> None:
        _request.deadline = deadline  # (the handler runs on this thread)
        try:
            super().finish_request(sock, client_address)
        finally:
            _request.deadline = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("http: request from %s failed", printable(str(client_address[0])),
                  exc_info=True)


class HttpEndpoint:
    """The listener on ADDR:PORT. Bound when made (so that usbipyd can report a busy
    port before it daemonizes), served from :meth:`start`, which needs the server's
    event loop."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        if tls is None and not is_loopback(host):
            raise ValueError(f"{host} is not a loopback address: serving the status there "
                             "needs TLS (--tls-cert, --tls-key and --tls-ca)")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._httpd = _Listener((host, port), family)
        self._httpd.tls = tls
        self.host = host
        self.port: int = self._httpd.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        #: The page's address, and the metrics'.
        self.base = f"{'https' if tls is not None else 'http'}://{shown}:{self.port}"
        self.url = f"{self.base}/metrics"
        self._hosts = _allowed_hosts(host, self.port)
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._streams = threading.BoundedSemaphore(MAX_STREAMS)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.board: StatusBoard | None = None
        self._metrics: Callable[..., Iterable[bytes]] | None = None

    def start(self, server: UsbipServer, loop: asyncio.AbstractEventLoop,
              board: StatusBoard | None = None) -> None:
        from .. import __version__

        self._loop = loop
        self.board = board if board is not None else StatusBoard(
            server, name=socket.gethostname(), version=__version__)
        try:
            from .metrics import metrics_app
        except ImportError:  # (prometheus_client is optional: the rest works without it)
            self._metrics = None
        else:
            self._metrics = metrics_app(server, loop)
        self._httpd.set_app(self._app)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="usbipy-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()

    # --- the application ------------------------------------------------------------

    def _on_loop(self, work: Any) -> Any:
        """``work`` run on the server's loop; LoopBusy if it takes LOOP_TIMEOUT (it is
        cancelled then: nothing piles up behind a stuck read)."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result(LOOP_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise LoopBusy from None

    def _app(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        try:
            return self._route(environ, start)
        except LoopBusy:
            return _json(start, "504 Gateway Timeout", {
                "error": f"the server did not answer within {LOOP_TIMEOUT:g} s"})
        except Exception:  # (one line in usbipyd's log, not a traceback on its stderr)
            log.exception("http: %s %s failed", environ.get("REQUEST_METHOD"),
                          printable(str(environ.get("PATH_INFO"))))
            return _json(start, "500 Internal Server Error",
                         {"error": "the server failed; its log says why"})

    def _route(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        viewer: Viewer = environ["usbipy.viewer"]
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        host = environ.get("HTTP_HOST")
        if self._httpd.tls is None and host is not None and host.lower() not in self._hosts:
            return _json(start, "421 Misdirected Request",
                         {"error": "this listener answers only to its own address"})
        board = self.board
        assert board is not None
        server = board.server
        if path in PAGE_FILES and method in ("GET", "HEAD"):
            if not viewer.may_view(server):
                return _json(start, "403 Forbidden", _refused(viewer.client))
            name, kind = PAGE_FILES[path]
            body = resources.files(__package__).joinpath("page", name).read_bytes()
            start("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body))),
                             *SECURITY_HEADERS])
            return [body]
        if path == "/favicon.ico":  # (a browser asks; the page has no icon)
            start("204 No Content", list(SECURITY_HEADERS))
            return []
        if path == "/metrics" and method in ("GET", "HEAD"):
            if self._metrics is None:
                return _json(start, "404 Not Found", {"error": "metrics need prometheus_client:"
                                                      " pip install 'usbipy[metrics]'"})
            if not viewer.may_view_all(server):  # (metrics name every device and client)
                return _json(start, "403 Forbidden", {
                    "error": f"{viewer.client.name} may not read the metrics (they name "
                             "every device and client: a grant rule with no device part "
                             "allows it)"})
            return self._metrics(environ, start)
        if not path.startswith(API):
            return _json(start, "404 Not Found", {"error": f"no such page: {path}"})
        if not viewer.may_view(server):
            return _json(start, "403 Forbidden", _refused(viewer.client))
        route = path[len(API):]
        if route == "status" and method == "GET":
            return _json(start, "200 OK", self._on_loop(board.status(viewer)))
        if route == "events" and method == "GET":
            return self._events(start, board, viewer)
        if route.startswith("devices/") and route.endswith("/release"):
            if method != "POST":
                return _json(start, "405 Method Not Allowed", {"error": "release is a POST"},
                             [("Allow", "POST")])
            # (wsgiref decodes the path as latin-1; a busid is UTF-8 on the wire)
            busid = route[len("devices/"):-len("/release")].encode("latin-1").decode(
                "utf-8", "replace")
            return self._release(environ, start, board, viewer, busid)
        return _json(start, "404 Not Found", {"error": f"no such API: {path}"})

    def _release(self, environ: dict[str, Any], start: StartResponse, board: StatusBoard,
                 viewer: Viewer, busid: str) -> Iterable[bytes]:
        # (the body says nothing; a length that is not small is refused, so that no
        # request holds the server's memory, and a small one is read: a socket closed
        # with bytes unread is reset, and the reply lost with it)
        length = environ.get("CONTENT_LENGTH") or "0"
        if not length.isdigit():
            return _json(start, "400 Bad Request", {"error": "a bad Content-Length"})
        if int(length) > MAX_BODY:
            return _json(start, "413 Content Too Large", {"error": "a release has no body "
                                                          "but {}"})
        environ["wsgi.input"].read(int(length))
        if environ.get("CONTENT_TYPE", "").split(";")[0].strip() != "application/json":
            return _json(start, "415 Unsupported Media Type",
                         {"error": "send the release as application/json"})
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and origin not in self._origins(environ):
            return _json(start, "403 Forbidden", {"error": "a release comes from this "
                                                  "server's own page"})
        grants = self._on_loop(_grant_of(board, viewer, busid))
        if grants is None:
            return _json(start, "404 Not Found", {"error": f"no device {busid}"})
        if grants is not Grant.ADMIN:
            return _json(start, "403 Forbidden", {"error": f"{viewer.client.name} may not "
                                                  f"release {printable(busid)}"})
        try:
            client = self._on_loop(board.release(busid, by=viewer.client.name))
        except LookupError as exc:
            return _json(start, "409 Conflict", {"error": str(exc)})
        return _json(start, "200 OK", {"released": busid, "client": client})

    def _origins(self, environ: dict[str, Any]) -> set[str]:
        scheme = "https" if self._httpd.tls is not None else "http"
        host = environ.get("HTTP_HOST")
        return {f"{scheme}://{h}" for h in ({host} if host else set()) | self._hosts}

    def _events(self, start: StartResponse, board: StatusBoard,
                viewer: Viewer) -> Iterable[bytes]:
        if not self._streams.acquire(blocking=False):
            return _json(start, "503 Service Unavailable",
                         {"error": f"{MAX_STREAMS} pages are open already"},
                         [("Retry-After", "5")])
        start("200 OK", [("Content-Type", "text/event-stream; charset=utf-8"),
                         ("X-Accel-Buffering", "no"), *SECURITY_HEADERS])
        return self._stream(board, viewer)

    def _stream(self, board: StatusBoard, viewer: Viewer) -> Iterator[bytes]:
        try:
            began = sent = time.monotonic()
            last = None
            while not self._closing.is_set() and time.monotonic() - began < STREAM_LIFETIME:
                if not viewer.may_view(board.server):  # (a reload took its grant away)
                    return
                try:
                    status = self._on_loop(board.status(viewer))
                except LoopBusy:
                    self._closing.wait(STREAM_CHECK)
                    continue
                changed = _changes(status)
                if changed != last:
                    last, sent = changed, time.monotonic()
                    yield f"event: status\ndata: {json.dumps(status)}\n\n".encode()
                elif time.monotonic() - sent >= STREAM_KEEPALIVE:
                    sent = time.monotonic()
                    yield b": keepalive\n\n"
                self._closing.wait(STREAM_CHECK)
        finally:
            self._streams.release()


async def _grant_of(board: StatusBoard, viewer: Viewer, busid: str) -> Grant | None:
    """What ``viewer`` may do with the device ``busid`` exports; None: not shown to it."""
    for device, _record in await board.devices():
        if device.busid == busid:
            return viewer.grant(board.server, device)
    return None


def _changes(status: dict[str, Any]) -> str:
    """The status without what moves by itself (a session's age): sent when this changes."""
    devices = [{**d, "client": {k: v for k, v in d["client"].items() if k != "seconds"}}
               if d.get("client") else d for d in status["devices"]]
    return json.dumps({**status, "devices": devices}, sort_keys=True)


def _refused(client: Client) -> dict[str, str]:
    return {"error": f"{client.name} may not view this server's status (no policy rule "
                     "grants it view or admin)"}


def _json(start: StartResponse, status: str, body: Any,
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = json.dumps(body, indent=1).encode() + b"\n"
    start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                   *SECURITY_HEADERS, *(headers or [])])
    return [data]


def _allowed_hosts(host: str, port: int) -> set[str]:
    """The Host headers a loopback listener answers: its own address by any name the
    machine gives it, with and without the port."""
    names = {host, "localhost", "127.0.0.1", "[::1]"}
    if ":" in host:
        names.add(f"[{host}]")
    return {n.lower() for name in names for n in (name, f"{name}:{port}")}
