"""The HID keyboard and the CDC-ACM port through a real server connection."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from usbipy.client import import_device
from usbipy.devices import CdcAcm, HidKeyboard, PtyBackend
from usbipy.devices.hid import KEYMAP
from usbipy.protocol import Direction
from usbipy.server import UsbipServer

HOST = "127.0.0.1"


def test_keyboard_reports_and_leds(serve) -> None:
    keyboard = HidKeyboard()

    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-1", server.port) as dev:
            await dev.control(0x00, 9, 1, 0, b"")
            report_desc = await dev.control(0x81, 6, 0x2200, 0, 255)
            assert report_desc[:6] == bytes.fromhex("05010906a101") and report_desc[-1] == 0xC0
            await dev.control(0x21, 0x0A, 0, 0, b"")  # SET_IDLE
            await dev.control(0x21, 0x0B, 0, 0, b"")  # SET_PROTOCOL boot
            assert await dev.control(0xA1, 0x03, 0, 0, 1) == b"\x00"
            await dev.control(0x21, 0x09, 0x0200, 0, b"\x02")  # SET_REPORT: caps lock LED
            assert keyboard.led_state["caps_lock"] and not keyboard.led_state["num_lock"]
            keyboard.type_text("Hi!")
            reports = [(await dev.submit(1, Direction.IN, 8)).data for _ in range(6)]
            assert reports == [
                bytes((0x02, 0, 0x0B, 0, 0, 0, 0, 0)), bytes(8),  # shift + h
                bytes((0x00, 0, 0x0C, 0, 0, 0, 0, 0)), bytes(8),  # i
                bytes((0x02, 0, 0x1E, 0, 0, 0, 0, 0)), bytes(8),  # shift + 1
            ]
            with pytest.raises(ValueError, match="no key"):
                keyboard.type_text("é")

    serve(test, [keyboard])


def test_serial_echo_and_line_coding(serve) -> None:
    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-1", server.port) as dev:
            await dev.control(0x00, 9, 1, 0, b"")
            coding = struct.pack("<IBBB", 9600, 0, 0, 8)
            await dev.control(0x21, 0x20, 0, 0, coding)
            assert await dev.control(0xA1, 0x21, 0, 0, 7) == coding
            await dev.control(0x21, 0x22, 3, 0, b"")  # DTR | RTS
            notify_seq, notify = dev.submit_nowait(3, Direction.IN, 16)
            payload = os.urandom(64 * 1024)
            pending = [dev.submit_nowait(1, Direction.IN, 4096)[1] for _ in range(16)]
            assert (await dev.bulk_out(2, payload)).actual_length == len(payload)
            got = b"".join(r.data for r in await asyncio.gather(*pending))
            assert got == payload
            assert not notify.done()
            assert (await dev.unlink(notify_seq)).status == -104

    serve(test, [CdcAcm()])


def test_serial_pty_bridges_both_ways(serve) -> None:
    backend = PtyBackend()

    async def test(server: UsbipServer) -> None:
        fd = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
        try:
            async with await import_device(HOST, "1-1", server.port) as dev:
                await dev.control(0x00, 9, 1, 0, b"")
                await dev.bulk_out(2, b"hello from the client\n")
                loop = asyncio.get_running_loop()
                line = await loop.run_in_executor(None, os.read, fd, 100)
                assert line == b"hello from the client\n"
                os.write(fd, b"hello from the server\n")
                ret = await dev.bulk_in(1, 512)
                assert ret.data == b"hello from the server\n"
        finally:
            os.close(fd)

    serve(test, [CdcAcm(backend)])


def test_typing_from_a_thread_waits_for_room_and_loses_nothing(serve) -> None:
    keyboard = HidKeyboard()
    keyboard.MAX_QUEUED_REPORTS = 8
    text = "the quick brown fox"  # 38 reports, far above the cap

    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-1", server.port) as dev:
            await dev.control(0x00, 9, 1, 0, b"")
            typist = asyncio.get_running_loop().run_in_executor(
                None, lambda: keyboard.type_text(text, timeout=30))
            reports = [(await dev.submit(1, Direction.IN, 8)).data for _ in range(2 * len(text))]
            await typist
            pressed = [r[2] for r in reports[::2]]
            assert pressed == [KEYMAP[ch][0] for ch in text]
            assert all(r == bytes(8) for r in reports[1::2])

    serve(test, [keyboard])


def test_typing_is_bounded_before_any_import() -> None:
    keyboard = HidKeyboard()
    keyboard.MAX_QUEUED_REPORTS = 8
    keyboard.type_text("abcd", timeout=1)  # 8 reports: fits
    with pytest.raises(TimeoutError):
        keyboard.type_text("e", timeout=0.05)  # no client will ever read: no unbounded queue
    assert len(keyboard._reports) == 8


def test_typing_on_the_loop_never_waits(serve) -> None:
    keyboard = HidKeyboard()
    keyboard.MAX_QUEUED_REPORTS = 8

    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-1", server.port):
            keyboard.type_text("abcd")
            with pytest.raises(OverflowError):
                keyboard.type_text("e")

    serve(test, [keyboard])


def test_typing_on_a_loop_before_any_import_raises_rather_than_blocks() -> None:
    keyboard = HidKeyboard()
    keyboard.MAX_QUEUED_REPORTS = 8

    async def main() -> None:  # e.g. a program's own loop, before a client imports
        keyboard.type_text("abcd")
        with pytest.raises(OverflowError):
            keyboard.type_text("e")

    asyncio.run(asyncio.wait_for(main(), 10))
