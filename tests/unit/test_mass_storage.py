"""Bulk-Only Transport and the SCSI commands, through a real server connection."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

from usbipy.client import import_device
from usbipy.client.userspace import RemoteDevice
from usbipy.devices import ImageFile, MassStorage
from usbipy.server import UsbipServer

HOST = "127.0.0.1"
BLOCK = 512


class Bot:
    """A minimal Bulk-Only host, as usb-storage drives one."""

    def __init__(self, dev: RemoteDevice) -> None:
        self.dev = dev
        self.tag = 0

    async def command(self, cdb: bytes, *, data_in: int = 0, data_out: bytes = b""
                      ) -> tuple[bytes, int, int]:
        self.tag += 1
        length = data_in or len(data_out)
        flags = 0x80 if data_in else 0
        cbw = struct.pack("<IIIBBB16s", 0x43425355, self.tag, length, flags, 0, len(cdb), cdb)
        assert (await self.dev.bulk_out(2, cbw)).status == 0
        data = b""
        if data_in:
            ret = await self.dev.bulk_in(1, data_in)
            if ret.status == -32:
                await self.dev.control(0x02, 1, 0, 0x81, b"")  # clear the halt, read the CSW
            data = ret.data
        elif data_out:
            ret = await self.dev.bulk_out(2, data_out)
            if ret.status == -32:
                await self.dev.control(0x02, 1, 0, 0x02, b"")
        csw = await self.dev.bulk_in(1, 13)
        signature, tag, residue, status = struct.unpack("<IIIB", csw.data)
        assert (signature, tag) == (0x53425355, self.tag)
        return data, status, residue

    async def sense(self) -> tuple[int, int]:
        data, status, _ = await self.command(bytes((0x03, 0, 0, 0, 18, 0)), data_in=18)
        assert status == 0
        return data[2] & 0x0F, data[12]


def with_disk(serve, tmp_path: Path, test, *, read_only: bool = False, blocks: int = 2048):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(blocks * BLOCK))

    async def wrapped(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-1", server.port) as dev:
            await dev.control(0x00, 9, 1, 0, b"")
            await test(Bot(dev))

    serve(wrapped, [MassStorage(ImageFile(path, read_only=read_only))])
    return path


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def test_inquiry_capacity_and_sense(serve, tmp_path: Path) -> None:
    async def test(bot: Bot) -> None:
        assert await bot.dev.control(0xA1, 0xFE, 0, 0, 1) == b"\x00"  # GET MAX LUN
        data, status, residue = await bot.command(bytes((0x12, 0, 0, 0, 36, 0)), data_in=36)
        assert status == 0 and residue == 0
        assert data[0] == 0 and data[1] & 0x80 and data[8:16] == b"usbipy  "
        # a longer allocation than the 36 bytes: a short reply and the residue in the CSW
        data, status, residue = await bot.command(bytes((0x12, 0, 0, 0, 96, 0)), data_in=96)
        assert (len(data), status, residue) == (36, 0, 60)
        data, status, _ = await bot.command(bytes((0x25,)) + bytes(9), data_in=8)
        assert struct.unpack(">II", data) == (2047, 512)
        data, status, _ = await bot.command(
            bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + bytes(2), data_in=32)
        assert struct.unpack_from(">QI", data) == (2047, 512)
        data, status, _ = await bot.command(bytes((0x23,)) + bytes(6) + b"\x00\xfc" + bytes(3),
                                            data_in=252)
        assert struct.unpack_from(">I", data, 4)[0] == 2048 and data[8] == 0x02
        assert (await bot.command(bytes(6)))[1] == 0  # TEST UNIT READY
        data, status, _ = await bot.command(bytes((0x1A, 0, 0x3F, 0, 192, 0)), data_in=192)
        assert status == 0 and data[2] & 0x80 == 0  # not write protected
        _, status, _ = await bot.command(bytes((0xFF,)) + bytes(5))  # unknown opcode
        assert status == 1
        assert await bot.sense() == (0x5, 0x20)  # ILLEGAL REQUEST, INVALID COMMAND OPCODE
        _, status, _ = await bot.command(read10(5000, 1), data_in=512)
        assert status == 1 and await bot.sense() == (0x5, 0x21)  # LBA OUT OF RANGE
        assert (await bot.command(bytes((0x1E, 0, 0, 0, 1, 0))))[1] == 0  # PREVENT
        assert (await bot.command(bytes((0x1B, 0, 0, 0, 1, 0))))[1] == 0  # START

    with_disk(serve, tmp_path, test)


def test_write_read_back_and_durable(serve, tmp_path: Path) -> None:
    payload = os.urandom(64 * 1024)

    async def test(bot: Bot) -> None:
        _, status, residue = await bot.command(write10(100, 128), data_out=payload)
        assert (status, residue) == (0, 0)
        data, status, _ = await bot.command(read10(100, 128), data_in=len(payload))
        assert status == 0 and data == payload
        # READ(16)/WRITE(16)
        _, status, _ = await bot.command(struct.pack(">BBQIBB", 0x8A, 0, 7, 1, 0, 0),
                                         data_out=b"\x5a" * 512)
        data, status, _ = await bot.command(struct.pack(">BBQIBB", 0x88, 0, 7, 1, 0, 0),
                                            data_in=512)
        assert data == b"\x5a" * 512
        assert (await bot.command(bytes((0x35,)) + bytes(9)))[1] == 0  # SYNCHRONIZE CACHE

    path = with_disk(serve, tmp_path, test)
    image = path.read_bytes()
    assert image[100 * BLOCK:100 * BLOCK + len(payload)] == payload
    assert image[7 * BLOCK:8 * BLOCK] == b"\x5a" * 512


def test_read_in_several_urbs(serve, tmp_path: Path) -> None:
    async def test(bot: Bot) -> None:
        await bot.command(write10(0, 8), data_out=bytes(range(256)) * 16)
        bot.tag += 1
        cbw = struct.pack("<IIIBBB16s", 0x43425355, bot.tag, 4096, 0x80, 0, 10, read10(0, 8))
        await bot.dev.bulk_out(2, cbw)
        parts = await asyncio.gather(*(bot.dev.bulk_in(1, 1024) for _ in range(4)))
        assert b"".join(p.data for p in parts) == bytes(range(256)) * 16
        csw = await bot.dev.bulk_in(1, 13)
        assert struct.unpack("<IIIB", csw.data)[2:] == (0, 0)

    with_disk(serve, tmp_path, test)


def test_read_only_refuses_writes_with_data_protect(serve, tmp_path: Path) -> None:
    async def test(bot: Bot) -> None:
        data, _, _ = await bot.command(bytes((0x1A, 0, 0x3F, 0, 192, 0)), data_in=192)
        assert data[2] & 0x80  # WP bit: the host mounts read-only
        _, status, residue = await bot.command(write10(0, 1), data_out=b"\xff" * 512)
        assert (status, residue) == (1, 512)
        assert await bot.sense() == (0x7, 0x27)  # DATA PROTECT, WRITE PROTECTED

    path = with_disk(serve, tmp_path, test, read_only=True)
    assert path.read_bytes() == bytes(2048 * BLOCK)


def test_invalid_cbw_needs_reset_recovery(serve, tmp_path: Path) -> None:
    async def test(bot: Bot) -> None:
        await bot.dev.bulk_out(2, b"not a CBW")
        assert (await bot.dev.bulk_in(1, 13)).status == -32
        assert (await bot.dev.bulk_out(2, b"x" * 31)).status == -32
        await bot.dev.control(0x21, 0xFF, 0, 0, b"")  # Bulk-Only Mass Storage Reset
        await bot.dev.control(0x02, 1, 0, 0x81, b"")  # CLEAR_FEATURE(HALT) IN
        await bot.dev.control(0x02, 1, 0, 0x02, b"")  # and OUT
        data, status, _ = await bot.command(bytes((0x12, 0, 0, 0, 36, 0)), data_in=36)
        assert status == 0 and len(data) == 36

    with_disk(serve, tmp_path, test)


class FailingImage(ImageFile):
    """An image whose reads fail at one offset, as a bad sector would."""

    bad_offset = 4 * BLOCK

    def read(self, offset: int, length: int) -> bytes:
        if offset <= self.bad_offset < offset + length:
            raise OSError(5, "Input/output error")
        return super().read(offset, length)


def test_a_read_error_is_check_condition_with_medium_error(serve, tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * BLOCK))

    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-1", server.port) as dev:
            await dev.control(0x00, 9, 1, 0, b"")
            bot = Bot(dev)
            data, status, residue = await bot.command(read10(4, 2), data_in=2 * BLOCK)
            # Not "PASSED with no data": the command failed and sense says why.
            assert (data, status, residue) == (b"", 1, 2 * BLOCK)
            assert await bot.sense() == (0x3, 0x11)  # MEDIUM ERROR, UNRECOVERED READ ERROR
            data, status, _ = await bot.command(read10(0, 1), data_in=BLOCK)
            assert (status, len(data)) == (0, BLOCK)  # the disk goes on

    serve(test, [MassStorage(FailingImage(path))])
