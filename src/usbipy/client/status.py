"""Reading usbipyd's status API (``/api/v1/status`` on its --http listener): one
server's, or every one DNS-SD finds that serves it on the network."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from ..errors import UsbipError
from ..tls import TlsFiles, client_context

#: Seconds one server has to answer; bytes its answer may hold.
STATUS_TIMEOUT = 5.0
MAX_STATUS = 4 << 20


@dataclass
class ServerStatus:
    url: str
    status: dict[str, Any] | None = None
    error: str | None = None


def status_url(text: str) -> str:
    """-r HOST:PORT (or a URL) as the status API's URL: https unless on loopback."""
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
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        shown = f"[{host}]" if ":" in host else host
        base = f"{'http' if loopback else 'https'}://{shown}:{port}"
    return f"{base}/api/v1/status"


def fetch(url: str, tls: TlsFiles | None, server_name: str | None = None) -> ServerStatus:
    """One server's status (blocking), or why not."""
    answer = ServerStatus(url)
    context: ssl.SSLContext | None = None
    if url.startswith("https://"):
        if tls is None:
            answer.error = "its status needs TLS: give --tls-cert, --tls-key and --tls-ca"
            return answer
        context = client_context(tls)
        if server_name is not None:
            context.check_hostname = True
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=STATUS_TIMEOUT,  # noqa: S310 (http(s) only)
                                    context=context) as reply:
            body = reply.read(MAX_STATUS + 1)
        if len(body) > MAX_STATUS:
            answer.error = "its answer is too long"
        else:
            answer.status = json.loads(body)
    except urllib.error.HTTPError as exc:
        answer.error = f"refused: HTTP {exc.code}: {_reason(exc)}"
    except urllib.error.URLError as exc:
        answer.error = f"not answering: {getattr(exc.reason, 'strerror', None) or exc.reason}"
    except (OSError, ValueError) as exc:
        answer.error = f"not answering: {getattr(exc, 'strerror', None) or exc}"
    return answer


def _reason(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read(4096))["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)


async def fetch_all(urls: list[str], tls: TlsFiles | None) -> list[ServerStatus]:
    return list(await asyncio.gather(*(asyncio.to_thread(fetch, url, tls) for url in urls)))
