"""Reading usbipyd's status API (``/api/v1/status`` on its --http listener): one
server's, or every one DNS-SD finds that serves it on the network."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from ..errors import UsbipError
from ..netaddr import is_loopback
from ..tls import TlsFiles, client_context

#: Seconds one server has to answer; bytes its answer may hold.
STATUS_TIMEOUT = 5.0
MAX_STATUS = 4 << 20


@dataclass
class ServerStatus:
    url: str
    status: dict[str, Any] | None = None
    error: str | None = None


def status_url(text: str, *, secure: bool | None = None) -> str:
    """-r HOST:PORT (or a URL) as the status API's URL: https unless on loopback (or
    as ``secure`` says: a listener on a wildcard address, reached on loopback, speaks
    TLS all the same)."""
    if text.startswith(("http://", "https://")):
        base = text.rstrip("/")
    else:
        parsed = urllib.parse.urlsplit(f"//{text}")
        try:
            host, port = parsed.hostname, parsed.port
        except ValueError:
            raise UsbipError(f"-r {text}: not HOST:PORT") from None
        if not host or port is None:
            raise UsbipError(f"-r {text}: give the status listener's HOST:PORT (usbipyd "
                             "--http)")
        loopback = is_loopback(host)
        shown = f"[{host}]" if ":" in host else host
        tls = not loopback if secure is None else secure
        base = f"{'https' if tls else 'http'}://{shown}:{port}"
    return f"{base}/api/v1/status"


def fetch(url: str, tls: TlsFiles | None, server_name: str | None = None) -> ServerStatus:
    """One server's status (blocking), or why not; within STATUS_TIMEOUT in all."""
    answer = ServerStatus(url)
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    context: ssl.SSLContext | None = None
    if parts.scheme == "https":
        if tls is None:
            answer.error = "its status needs TLS: give --tls-cert, --tls-key and --tls-ca"
            return answer
        context = client_context(tls)
    deadline = time.monotonic() + STATUS_TIMEOUT
    try:
        # (http.client, not urllib: no proxy from the environment sees the request, and
        # the certificate is checked for --tls-server-name when it is given)
        sock = socket.create_connection((host, port), timeout=STATUS_TIMEOUT)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=server_name or host)
        connection = http.client.HTTPConnection(host, port, timeout=STATUS_TIMEOUT)
        connection.sock = sock
        try:
            connection.request("GET", parts.path or "/", headers={"Accept": "application/json"})
            reply = connection.getresponse()
            body = b""
            while len(body) <= MAX_STATUS and (chunk := reply.read(65536)):
                body += chunk
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no whole answer in {STATUS_TIMEOUT:g} s")
        finally:
            connection.close()
        if reply.status != 200:
            answer.error = f"refused: HTTP {reply.status}: {_reason(body, reply.reason)}"
        elif len(body) > MAX_STATUS:
            answer.error = "its answer is too long"
        else:
            answer.status = json.loads(body)
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as exc:
        answer.error = f"not answering: {getattr(exc, 'strerror', None) or exc}"
    return answer


def _reason(body: bytes, reason: str) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return reason


async def fetch_all(urls: list[str], tls: TlsFiles | None,
                    server_name: str | None = None) -> list[ServerStatus]:
    return list(await asyncio.gather(*(asyncio.to_thread(fetch, url, tls, server_name)
                                       for url in urls)))
