"""A capture of a whole session decodes in Wireshark's usbip dissector with nothing malformed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from usbipy.client import import_device, list_devices
from usbipy.protocol import Direction

from .conftest import Usbipyd, require


async def session(port: int) -> None:
    await list_devices("127.0.0.1", port)
    async with await import_device("127.0.0.1", "1-3", port) as dev:
        await dev.control(0x80, 6, 0x0100, 0, 18)
        await dev.control(0x80, 6, 0x0200, 0, 255)
        await dev.control(0x00, 9, 1, 0, b"")
        await dev.bulk_out(2, b"ping" * 100)
        await dev.bulk_in(1, 512)
        seq, _ = dev.submit_nowait(3, Direction.IN, 16)
        await dev.unlink(seq)
    async with await import_device("127.0.0.1", "1-2", port) as dev:
        await dev.control(0x00, 9, 1, 0, b"")
        cbw = bytes.fromhex("55534243010000002400000080000612000000240000000000000000000000")
        await dev.bulk_out(2, cbw)
        await dev.bulk_in(1, 36)
        await dev.bulk_in(1, 13)


def test_tshark_decodes_a_session(usbipyd: Usbipyd, tmp_path: Path) -> None:
    dumpcap = require("dumpcap")
    tshark = require("tshark")
    if os.geteuid() != 0:
        pytest.skip("capturing on lo needs root")
    pcap = tmp_path / "session.pcapng"
    capture = subprocess.Popen([dumpcap, "-q", "-i", "lo", "-f", f"tcp port {usbipyd.port}",
                                "-w", str(pcap)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not pcap.exists() or pcap.stat().st_size == 0:
            assert capture.poll() is None and time.monotonic() < deadline, capture.stderr
            time.sleep(0.1)
        time.sleep(0.5)
        asyncio.run(session(usbipyd.port))
        time.sleep(1)
    finally:
        capture.terminate()
        capture.communicate(timeout=20)
    decode = ["-d", f"tcp.port=={usbipyd.port},usbip", "-r", str(pcap)]
    fields = subprocess.run(
        [tshark, *decode, "-Y", "usbip", "-T", "fields", "-e", "usbip.operation",
         "-e", "usbip.urb"],
        capture_output=True, text=True, timeout=60, check=True).stdout.split()
    ops = {int(v, 16) for v in fields if "," not in v}
    ops |= {int(x, 16) for v in fields if "," in v for x in v.split(",")}
    # OP_REQ/REP_DEVLIST, OP_REQ/REP_IMPORT, CMD/RET_SUBMIT and CMD/RET_UNLINK all decoded
    assert {0x8005, 0x0005, 0x8003, 0x0003, 1, 2, 4} <= ops, fields
    malformed = subprocess.run(
        [tshark, *decode, "-Y", "_ws.malformed || _ws.expert.severity >= error"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    assert malformed.strip() == "", malformed
