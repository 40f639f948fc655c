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


def test_a_capture_decodes_to_the_scsi_lbas_and_keys_sent(tmp_path: Path) -> None:
    """usbipyd's own capture (pcapng, Linux usbmon): Wireshark's USB dissectors show
    the SCSI commands with their LBAs, the key presses and the serial data."""
    import struct

    from usbipy.capture import Capture
    from usbipy.client import sync
    from usbipy.devices import CdcAcm, HidKeyboard, ImageFile, MassStorage
    from usbipy.server import ServerThread

    tshark = require("tshark")
    path = tmp_path / "usb.pcapng"
    keyboard = HidKeyboard()
    with ServerThread([keyboard, MassStorage(ImageFile.scratch(1 << 20)), CdcAcm()], port=0,
                      capture=Capture(path)) as srv:
        with sync.connect("127.0.0.1", "1-2", srv.port) as disk:
            # as a host enumerates: descriptors first (the capture learns the endpoints)
            disk.control(0x80, 6, 0x0100, 0, 18, timeout=5)
            disk.control(0x80, 6, 0x0200, 0, 9, timeout=5)
            disk.control(0x80, 6, 0x0200, 0, 32, timeout=5)
            disk.control(0x00, 9, 1, 0, b"", timeout=5)
            for tag, (opcode, lba) in enumerate([(0x2A, 1234), (0x28, 1234), (0x28, 77)], 1):
                write = opcode == 0x2A
                cdb = struct.pack(">BBIBHB", opcode, 0, lba, 0, 1, 0)
                disk.bulk_write(0x02, struct.pack("<IIIBBB16s", 0x43425355, tag, 512,
                                                  0 if write else 0x80, 0, 10, cdb), timeout=5)
                if write:
                    disk.bulk_write(0x02, b"w" * 512, timeout=5)
                else:
                    disk.bulk_read(0x81, 512, timeout=5)
                disk.bulk_read(0x81, 13, timeout=5)
        with sync.connect("127.0.0.1", "1-1", srv.port) as keys:
            keys.control(0x80, 6, 0x0200, 0, 34, timeout=5)
            keys.control(0x00, 9, 1, 0, b"", timeout=5)
            keys.control(0x81, 6, 0x2200, 0, 63, timeout=5)  # the report descriptor
            keyboard.type_text("usb")
            for _ in range(6):
                keys.interrupt_read(0x81, 8, timeout=5)
        with sync.connect("127.0.0.1", "1-3", srv.port) as serial:
            serial.control(0x00, 9, 1, 0, b"", timeout=5)
            serial.bulk_write(0x02, b"ping over usbip", timeout=5)
            serial.bulk_read(0x81, 64, timeout=5)

    def fields(*names: str, where: str) -> list[str]:
        out = subprocess.run([tshark, "-r", str(path), "-Y", where, "-T", "fields",
                              *(x for n in names for x in ("-e", n))],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return out.split("\n")[:-1]

    assert fields("frame.number", where="_ws.malformed || _ws.expert.severity >= error") == []
    commands = fields("scsi_sbc.opcode", "scsi_sbc.rdwr10.lba", where="scsi_sbc.rdwr10.lba")
    assert commands == ["0x2a\t1234", "0x28\t1234", "0x28\t77"], commands
    reports = fields("usbhid.data.array", where="usbhid.data.array && usb.urb_type == 'C'")
    pressed = [r.replace(":", "")[:2] for r in reports if not r.startswith("00")]
    assert pressed == ["18", "16", "05"], reports  # u, s, b (HID usage ids)
    data = fields("usb.capdata", where="usb.capdata && usb.transfer_type == 0x03")
    ping = b"ping over usbip".hex()
    assert [d.replace(":", "") for d in data].count(ping) == 2, data  # out, and echoed


def test_a_capture_of_the_headset_shows_its_class_and_iso_packets(tmp_path: Path) -> None:
    """Isochronous URBs in usbipyd's capture: Wireshark decodes the audio class
    descriptors and each packet's descriptor (offset, length, status) and data."""
    from usbipy.capture import Capture
    from usbipy.client import sync
    from usbipy.devices import Tone, UsbAudio
    from usbipy.server import ServerThread

    tshark = require("tshark")
    path = tmp_path / "audio.pcapng"
    tone = Tone(441.0)
    with ServerThread([UsbAudio(tone)], port=0, capture=Capture(path)) as srv, \
            sync.connect("127.0.0.1", "1-1", srv.port) as dev:
        dev.control(0x80, 6, 0x0100, 0, 18, timeout=5)
        total = int.from_bytes(dev.control(0x80, 6, 0x0200, 0, 9, timeout=5)[2:4], "little")
        dev.control(0x80, 6, 0x0200, 0, total, timeout=5)
        dev.control(0x00, 9, 1, 0, b"", timeout=5)
        dev.control(0x01, 11, 1, 2, b"", timeout=5)  # the microphone streams
        recorded = [dev.iso_read(0x82, [98] * 4, timeout=5) for _ in range(3)]
        dev.control(0x01, 11, 1, 1, b"", timeout=5)  # the speaker streams
        dev.iso_write(0x01, [b"\x01\x02\x03\x04" * 48] * 2, timeout=5)

    def fields(*names: str, where: str) -> list[list[str]]:
        out = subprocess.run([tshark, "-r", str(path), "-Y", where, "-T", "fields",
                              *(x for n in names for x in ("-e", n))],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return [line.split("\t") for line in out.split("\n")[:-1]]

    assert fields("frame.number", where="_ws.malformed || _ws.expert.severity >= error") == []
    # the AudioControl units and terminals, the AudioStreaming descriptors
    assert fields("usbaudio.ac_if_subtype", "usbaudio.as_if_subtype",
                  where="usbaudio.ac_if_subtype") == [
        ["0x01,0x02,0x06,0x03,0x02,0x06,0x03", "0x01,0x02,0x01,0x02"]]
    iso = fields("usb.urb_type", "usb.endpoint_address", "usb.iso.numdesc", "usb.iso.iso_off",
                 "usb.iso.iso_len", "usb.iso.iso_status", "usb.iso.data",
                 where="usb.transfer_type == 0x00 && usb.urb_type == 'C'")
    assert [row[:4] for row in iso] == [["'C'", "0x82", "4,4", "0,98,196,294"]] * 3 + [
        ["'C'", "0x01", "2,2", "0,192"]]
    for row, packets in zip(iso, recorded, strict=False):
        # each packet's length as the client got it, and the tone's samples in it
        assert row[4] == ",".join(str(p.actual_length) for p in packets)
        assert row[5] == "0,0,0,0"
        assert bytes.fromhex(row[6].replace(":", "").replace(",", "")) == b"".join(
            p.data for p in packets)
    assert b"".join(p.data for urb in recorded for p in urb) == tone.samples(
        0, sum(p.actual_length for urb in recorded for p in urb) // 2, 48000)
