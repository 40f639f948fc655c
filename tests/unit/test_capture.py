"""Captures: the pcapng blocks, the usbmon records, rotation and the bounded queue."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import pytest

from usbipy.capture import Capture, UrbRecorder
from usbipy.capture.pcapng import (
    BYTE_ORDER_MAGIC,
    EPB_TYPE,
    IDB_TYPE,
    LINKTYPE_USB_LINUX_MMAPPED,
    SHB_TYPE,
    enhanced_packet,
)
from usbipy.capture.writer import rotated_name
from usbipy.client import sync
from usbipy.devices import HidKeyboard, ImageFile, MassStorage
from usbipy.protocol import CmdSubmit, Direction, IsoPacket
from usbipy.server import ServerThread

USBMON = struct.Struct("<QBBBBHbbqiiII8siiII")
GET_DEVICE = bytes.fromhex("8006000100001200")


def blocks(data: bytes) -> list[tuple[int, bytes]]:
    """(type, body) of every block; each block's two lengths must agree."""
    out = []
    at = 0
    while at < len(data):
        kind, total = struct.unpack_from("<II", data, at)
        assert total % 4 == 0 and at + total <= len(data), (at, total)
        assert struct.unpack_from("<I", data, at + total - 4)[0] == total
        out.append((kind, data[at + 8:at + total - 4]))
        at += total
    return out


def packets(data: bytes) -> list[tuple[tuple[Any, ...], bytes]]:
    """Each enhanced packet's usbmon header fields and what follows the header."""
    found = []
    for kind, body in blocks(data):
        if kind == EPB_TYPE:
            _if, _hi, _lo, captured, original = struct.unpack_from("<IIIII", body)
            assert captured == original
            packet = body[20:20 + captured]
            found.append((USBMON.unpack_from(packet), packet[64:]))
    return found


def test_a_file_is_a_section_an_interface_and_packets(tmp_path: Path) -> None:
    capture = Capture(tmp_path / "c.pcapng")
    recorder = capture.recorder(busnum=1, devnum=3)
    urb = CmdSubmit(5, 0x10003, Direction.IN, 0, 0, 18, GET_DEVICE)
    recorder.submitted(urb)
    recorder.completed(urb, 0, b"\x12\x01" + bytes(16), 18)
    capture.close()
    data = (tmp_path / "c.pcapng").read_bytes()
    kinds = [kind for kind, _ in blocks(data)]
    assert kinds == [SHB_TYPE, IDB_TYPE, EPB_TYPE, EPB_TYPE]
    shb = blocks(data)[0][1]
    assert struct.unpack_from("<IHHq", shb) == (BYTE_ORDER_MAGIC, 1, 0, -1)
    assert struct.unpack_from("<HHI", blocks(data)[1][1]) == (LINKTYPE_USB_LINUX_MMAPPED, 0, 0)
    (s, s_data), (c, c_data) = packets(data)
    # id, event, transfer type (control 2), endpoint, device, bus, setup and data
    # flags, ..., status, urb_len, data_len, setup
    assert s[:8] == (1 << 32 | 5, ord("S"), 2, 0x80, 3, 1, 0, ord("<"))
    assert s[10:14] == (-115, 18, 0, GET_DEVICE) and s_data == b""
    assert c[:8] == (1 << 32 | 5, ord("C"), 2, 0x80, 3, 1, ord("-"), 0)
    assert c[10:13] == (0, 18, 18) and c_data == b"\x12\x01" + bytes(16)


def test_transfer_types_come_from_the_configuration_the_client_read(tmp_path: Path) -> None:
    emitted: list[bytes] = []
    recorder = UrbRecorder(emitted.append, 1, 2, 1)
    interrupt_in = CmdSubmit(1, 0, Direction.IN, 1, 0, 8)
    recorder.submitted(interrupt_in)  # not known yet, and no interval: bulk
    config = MassStorage(ImageFile.scratch(1 << 16)).descriptors.configuration_descriptors[0]
    hid = HidKeyboard().descriptors.configuration_descriptors[0]
    assert config  # (the disk's, for contrast: bulk endpoints)
    get_config = CmdSubmit(2, 0, Direction.IN, 0, 0, len(hid), bytes.fromhex(
        "80060002000022") + bytes(1))
    recorder.completed(get_config, 0, hid, len(hid))
    recorder.submitted(CmdSubmit(3, 0, Direction.IN, 1, 0, 8))
    recorder.submitted(CmdSubmit(4, 0, Direction.OUT, 2, 0, 3, data=b"abc"))
    types = [USBMON.unpack_from(r, 28)[2] for r in emitted]
    assert types == [3, 2, 1, 3]  # bulk (a guess), control, interrupt (learned), bulk
    out = USBMON.unpack_from(emitted[3], 28)
    assert out[7] == 0 and emitted[3][28 + 64:28 + 64 + 3] == b"abc"  # OUT data in 'S'


def test_iso_records_carry_their_descriptors_and_the_buffer_layout() -> None:
    emitted: list[bytes] = []
    recorder = UrbRecorder(emitted.append, 1, 2, 1)
    packets_sent = [IsoPacket(0, 4), IsoPacket(4, 4), IsoPacket(8, 4)]
    urb = CmdSubmit(9, 0, Direction.IN, 1, 2, 12, iso_packets=packets_sent, interval=1)
    recorder.completed(urb, 0, b"aaabb", 5, [IsoPacket(0, 4, 3, 0), IsoPacket(4, 4, 0, -18),
                                            IsoPacket(8, 4, 2, 0)], error_count=1)
    header = USBMON.unpack_from(emitted[0], 28)
    assert header[2] == 0 and header[17] == 3  # isochronous, 3 descriptors
    assert struct.unpack("<ii", header[13]) == (1, 3)  # error_count, numdesc
    body = emitted[0][28 + 64:]
    descs = [struct.unpack_from("<iIII", body, 16 * i) for i in range(3)]
    assert descs == [(0, 0, 3, 0), (-18, 4, 0, 0), (0, 8, 2, 0)]
    # the data as the buffer held it: each packet at its offset (usbmon's view)
    assert body[48:48 + 10] == b"aaa\0\0\0\0\0bb"
    assert header[12] == 48 + 10  # data_len counts the descriptors too (mon_bin.c)


def test_files_rotate_at_the_size_cap_and_each_opens_alone(tmp_path: Path) -> None:
    path = tmp_path / "ring.pcapng"
    capture = Capture(path, max_bytes=8192, files=3)
    recorder = capture.recorder(1, 2)
    for seqnum in range(1, 200):
        urb = CmdSubmit(seqnum, 0, Direction.OUT, 2, 0, 100, data=bytes(100))
        recorder.submitted(urb)
        recorder.completed(urb, 0, b"", 100)
    capture.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ring.1.pcapng", "ring.2.pcapng", "ring.pcapng"]
    seqnums = []
    for name in ("ring.2.pcapng", "ring.1.pcapng", "ring.pcapng"):
        data = (tmp_path / name).read_bytes()
        assert len(data) <= 8192
        assert [k for k, _ in blocks(data)][:2] == [SHB_TYPE, IDB_TYPE]
        seqnums += [h[0] & 0xFFFFFFFF for h, _ in packets(data)]
    # the newest records, in order, none missing across the files kept
    assert seqnums == sorted(seqnums) and seqnums[-1] == 199
    assert len(set(seqnums)) == seqnums[-1] - seqnums[0] + 1
    assert rotated_name(path, 2) == tmp_path / "ring.2.pcapng"


def test_a_writer_that_falls_behind_drops_and_counts(tmp_path: Path) -> None:
    capture = Capture(tmp_path / "slow.pcapng", max_queued=1000)  # bytes: 2 of these
    recorder = capture.recorder(1, 2)
    urb = CmdSubmit(1, 0, Direction.OUT, 2, 0, 600, data=bytes(600))
    for _ in range(5):  # (the writer drains every 50 ms: not between these)
        recorder.submitted(urb)
    assert 1 <= capture.dropped <= 3
    capture.close()
    assert len(packets((tmp_path / "slow.pcapng").read_bytes())) == 5 - capture.dropped


def test_capture_errors_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="4096"):
        Capture(tmp_path / "x.pcapng", max_bytes=100)
    with pytest.raises(ValueError, match="files"):
        Capture(tmp_path / "x.pcapng", files=0)
    with pytest.raises(FileNotFoundError):
        Capture(tmp_path / "no" / "such" / "x.pcapng")


def test_the_server_records_what_its_devices_did(tmp_path: Path) -> None:
    capture = Capture(tmp_path / "s.pcapng")
    keyboard = HidKeyboard()
    with ServerThread([keyboard], port=0, capture=capture) as srv:
        with sync.connect("127.0.0.1", "1-1", srv.port) as dev:
            dev.control(0x80, 6, 0x0100, 0, 18, timeout=5)
            dev.control(0x00, 9, 1, 0, b"", timeout=5)
            seqnum = dev.submit(1, Direction.IN, 8)
            dev.unlink(seqnum)  # recorded as usbmon shows it: completed, -ECONNRESET
            keyboard.type_text("a")
            assert dev.interrupt_read(0x81, 8, timeout=5)[2] == 0x04
    # (the server closed the capture: everything is on disk)
    found = packets((tmp_path / "s.pcapng").read_bytes())
    events = [(chr(h[1]), h[3], h[10]) for h, _ in found]
    assert events[:4] == [("S", 0x80, -115), ("C", 0x80, 0), ("S", 0x00, -115),
                          ("C", 0x00, 0)]
    assert ("C", 0x81, -104) in events
    last_in = [data for h, data in found if h[1] == ord("C") and h[3] == 0x81 and h[10] == 0]
    assert last_in[0][2] == 0x04  # the key, in the completion's data


def test_enhanced_packet_pads_to_four_bytes() -> None:
    block = enhanced_packet(b"abcde", 0x1_0000_0002)
    assert len(block) % 4 == 0
    assert struct.unpack_from("<IIIII", block, 8) == (0, 1, 2, 5, 5)
    assert time.time() > 0


def test_a_failed_rotation_keeps_the_file_and_closes_nothing_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from usbipy.capture import writer

    capture = Capture(tmp_path / "r.pcapng", max_bytes=4096, files=2)
    recorder = capture.recorder(1, 2)
    opened = capture._open_new

    def refuse() -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(capture, "_open_new", refuse)
    urb = CmdSubmit(1, 0, Direction.OUT, 2, 0, 900, data=bytes(900))
    for _ in range(10):  # past the cap: a rotation, which fails
        recorder.submitted(urb)
    capture._wake.set()
    deadline = time.monotonic() + 10
    while capture.dropped == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert capture.dropped > 0
    other = os.open(tmp_path / "other", os.O_CREAT | os.O_WRONLY)  # (may reuse a number)
    monkeypatch.setattr(capture, "_open_new", opened)
    monkeypatch.setattr(writer, "RETRY", 0.0)
    capture._failed_at = 0.0
    for _ in range(10):
        recorder.submitted(urb)
    capture.close()
    os.write(other, b"still mine")  # the writer did not close it
    os.close(other)
    assert (tmp_path / "r.1.pcapng").exists()


def test_files_are_private_and_a_link_is_refused(tmp_path: Path) -> None:
    from usbipy.capture.writer import check_writable

    path = tmp_path / "p.pcapng"
    Capture(path).close()
    assert path.stat().st_mode & 0o777 == 0o600
    link = tmp_path / "link.pcapng"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        Capture(link)
    with pytest.raises(OSError, match="symbolic link"):
        check_writable(link)


def test_a_restart_keeps_the_last_capture(tmp_path: Path) -> None:
    path = tmp_path / "k.pcapng"
    first = Capture(path)
    first.recorder(1, 2).submitted(CmdSubmit(7, 0, Direction.IN, 1, 0, 8))
    first.close()
    Capture(path).close()
    kept = packets((tmp_path / "k.1.pcapng").read_bytes())
    assert [h[0] & 0xFFFFFFFF for h, _ in kept] == [7]
    assert packets(path.read_bytes()) == []


def test_the_capture_shows_what_the_client_got_not_what_the_device_said(
        tmp_path: Path) -> None:
    """A device that babbles (100 bytes for 18): the client gets -EOVERFLOW, and so
    does the capture; one with a status beyond 32 bits: -EPROTO, connection kept."""
    from usbipy.backends import Completion, FunctionDevice
    from usbipy.client.errors import Overflow, UrbError

    answers = iter([Completion(data=bytes(100)), Completion(status=-(1 << 40))])
    device = FunctionDevice(lambda urb: next(answers))
    capture = Capture(tmp_path / "b.pcapng")
    with ServerThread([device], port=0, capture=capture) as srv:
        with sync.connect("127.0.0.1", "1-1", srv.port) as dev:
            with pytest.raises(Overflow):
                dev.control(0x80, 6, 0x0100, 0, 18, timeout=5)
            with pytest.raises(UrbError) as weird:
                dev.control(0x80, 6, 0x0100, 0, 18, timeout=5)
            assert weird.value.errno_name == "EPROTO"
    completions = [(h[10], h[12]) for h, _ in packets((tmp_path / "b.pcapng").read_bytes())
                   if h[1] == ord("C")]
    assert completions == [(-75, 0), (-71, 0)]
