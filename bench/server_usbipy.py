"""usbipy's side of the benchmark: the device set the peer also exports, on 127.0.0.1:PORT.

A mass-storage disk (64 MiB), a CDC-ACM port that echoes, and 14 HID keyboards:
16 devices, the most usbip 0.7.0 exports on one port.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from usbipy.capture import Capture
from usbipy.devices import CdcAcm, HidKeyboard, ImageFile, MassStorage
from usbipy.server import UsbipServer
from usbipy.server.service import run_loop
from usbipy.server.tls import ServerTls
from usbipy.tls import TlsFiles, server_context

KEYBOARDS = 14


def _tls() -> ServerTls | None:
    """BENCH_TLS=DIR (with server.pem, server-key.pem, ca.pem): serve over mutual TLS;
    BENCH_KTLS=1 hands the sessions to kernel TLS."""
    where = os.environ.get("BENCH_TLS")
    if not where:
        return None
    files = TlsFiles(Path(where, "server.pem"), Path(where, "server-key.pem"),
                     Path(where, "ca.pem"))
    kernel = os.environ.get("BENCH_KTLS") == "1"
    return ServerTls(server_context(files, kernel=kernel), kernel=kernel)


def _capture() -> Capture | None:
    """BENCH_CAPTURE=FILE: record every URB there (usbipyd --capture)."""
    where = os.environ.get("BENCH_CAPTURE")
    return Capture(where) if where else None


async def main(port: int) -> None:
    server = UsbipServer(port=port, tls=_tls(), capture=_capture())
    server.add(MassStorage(ImageFile.scratch(64 << 20)))
    server.add(CdcAcm())
    for _ in range(KEYBOARDS):
        server.add(HidKeyboard())
    async with server:
        print("ready", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    # As usbipyd: uvloop when it is installed (pass --asyncio to compare without it).
    loop = "asyncio" if "--asyncio" in sys.argv else "auto"
    run_loop(main(int(sys.argv[-1])), loop)
