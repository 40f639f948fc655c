"""PyUSB (the real library) over usbipy.pyusb, against usbipyd's demo devices."""

from __future__ import annotations

import errno
import struct
from array import array
from collections.abc import Callable, Iterator

import pytest

pytest.importorskip("usb.core")  # (pyusb is in the test set-up)
import usb.core  # noqa: E402
import usb.util  # noqa: E402

from usbipy import pyusb  # noqa: E402
from usbipy.backends import Completion, EmulatedDevice, ExportedDevice  # noqa: E402
from usbipy.client import sync  # noqa: E402
from usbipy.devices import CdcAcm, HidKeyboard, ImageFile, MassStorage  # noqa: E402
from usbipy.protocol import CmdSubmit, IsoPacket  # noqa: E402
from usbipy.server import ServerThread  # noqa: E402
from usbipy.usb import Configuration, Endpoint, Interface, TransferType  # noqa: E402
from usbipy.usb import Device as UsbDevice  # noqa: E402

from ..helpers import Cutter  # noqa: E402

HOST = "127.0.0.1"
Finder = Callable[[str], usb.core.Device]
KEYBOARD_ID = (0x1209, 0x0001)
DISK_ID = (0x1209, 0x0002)
SERIAL_ID = (0x1209, 0x0003)


@pytest.fixture
def devices() -> list[ExportedDevice]:
    return [HidKeyboard(), MassStorage(ImageFile.scratch(1 << 20)), CdcAcm()]


@pytest.fixture
def server(devices: list[ExportedDevice]) -> Iterator[ServerThread]:
    with ServerThread(devices, port=0) as srv:
        yield srv


@pytest.fixture
def find(server: ServerThread) -> Iterator[Finder]:
    """find(busid): the device through PyUSB; released at the end of the test."""
    found: list[usb.core.Device] = []

    def go(busid: str) -> usb.core.Device:
        backend = pyusb.get_backend(f"usbip://{HOST}:{server.port}/{busid}")
        dev = usb.core.find(backend=backend)
        assert dev is not None
        found.append(dev)
        return dev

    yield go
    for dev in found:
        usb.util.dispose_resources(dev)
        dev._ctx.backend.close()


# --- addresses ---------------------------------------------------------------------


@pytest.mark.parametrize(("address", "busid", "expected"), [
    ("10.0.0.2", None, ("10.0.0.2", 3240, None)),
    ("10.0.0.2:4000", "1-2", ("10.0.0.2", 4000, "1-2")),
    ("[::1]:4000", None, ("::1", 4000, None)),
    ("[::1]", None, ("::1", 3240, None)),
    ("::1", None, ("::1", 3240, None)),
    ("usbip://host.example/1-1.2", None, ("host.example", 3240, "1-1.2")),
    ("usbip://[fe80::1]:3241/2-1", "2-1", ("fe80::1", 3241, "2-1")),
    ("usbip://host.example:3240", "3-1", ("host.example", 3240, "3-1")),
    ("usbip://[fe80::1%25eth0]:3241/1-1", None, ("fe80::1%eth0", 3241, "1-1")),
])
def test_addresses_in_every_form(address: str, busid: str | None,
                                 expected: tuple[str, int, str | None]) -> None:
    assert pyusb.parse_address(address, busid) == expected


@pytest.mark.parametrize(("address", "busid", "error"), [
    ("http://host/1-1", None, "not a usbip:// URL"),
    ("usbip://host:99999/1-1", None, "bad port|out of range"),
    ("host:port", None, "bad port"),
    ("usbip:///1-1", None, "no host"),
    ("usbip://host/1-1", "1-2", "the URL names busid 1-1, busid= says 1-2"),
    ("[::1]x", None, "bad address"),
    ("host:0", None, "out of range"),
    ("usbip://host:0/1-1", None, "out of range"),
    ("usbip://host/1-1/2-2", None, "no '/'"),
    ("usbip://me@host/1-1", None, "a host, a port and a busid only"),
    ("usbip://host/1-1?x=1", None, "a host, a port and a busid only"),
    ("[::1", None, "bad address"),
])
def test_bad_addresses_are_named(address: str, busid: str | None, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        pyusb.parse_address(address, busid)


# --- descriptors ---------------------------------------------------------------------


def test_descriptors_and_strings_are_what_the_server_exports(
        server: ServerThread, devices: list[ExportedDevice]) -> None:
    backend = pyusb.get_backend(f"{HOST}:{server.port}")
    found = list(usb.core.find(find_all=True, backend=backend))
    assert [(d.idVendor, d.idProduct) for d in found] == [KEYBOARD_ID, DISK_ID, SERIAL_ID]
    # find() read the descriptors and let the devices go: another client can import each
    for busid in ("1-1", "1-2", "1-3"):
        with sync.connect(HOST, busid, server.port):
            pass
    for dev, exported in zip(found, devices, strict=True):
        assert isinstance(exported, (HidKeyboard, MassStorage, CdcAcm))
        descriptors = exported.descriptors
        raw = descriptors.device_descriptor
        assert (dev.bLength, dev.bDescriptorType, dev.bcdUSB, dev.bMaxPacketSize0,
                dev.bcdDevice, dev.bNumConfigurations) == (
            18, 1, int.from_bytes(raw[2:4], "little"), raw[7],
            int.from_bytes(raw[12:14], "little"), raw[17])
        assert (dev.bus, dev.address) == (exported.info.busnum, exported.info.devnum)
        assert usb.util.get_string(dev, dev.iProduct) == exported.descriptor.product
        assert usb.util.get_string(dev, dev.iManufacturer) == exported.descriptor.manufacturer
        cfg = dev[0]
        wire = descriptors.configuration_descriptors[0]
        assert cfg.wTotalLength == len(wire) and cfg.bConfigurationValue == wire[5]
        declared = exported.descriptor.configurations[0]
        got = [(i.bInterfaceNumber, i.bAlternateSetting, i.bInterfaceClass,
                [(e.bEndpointAddress, e.bmAttributes, e.wMaxPacketSize) for e in i])
               for i in cfg]
        assert got == [(i.bInterfaceNumber, i.bAlternateSetting, i.bInterfaceClass,
                        [(e.bEndpointAddress, e.bmAttributes, e.wMaxPacketSize)
                         for e in i.endpoints])
                       for i in declared.interfaces]
        # class-specific descriptors (HID, CDC) reach PyUSB as extra_descriptors
        for intf, declared_intf in zip(cfg, declared.interfaces, strict=True):
            assert bytes(intf.extra_descriptors) == declared_intf.class_descriptors
    # reading strings opened them: held until disposed
    assert sync.list_devices(HOST, server.port) == ()
    for dev in found:
        usb.util.dispose_resources(dev)
    assert len(sync.list_devices(HOST, server.port)) == 3


def listed(server: ServerThread) -> list[str]:
    return [d.busid for d in sync.list_devices(HOST, server.port)]


def test_a_device_is_held_while_open(server: ServerThread, find: Finder) -> None:
    dev = find("1-2")
    assert (dev.idVendor, dev.idProduct) == DISK_ID
    assert "1-2" in listed(server)  # found, not opened
    dev.set_configuration()
    assert "1-2" not in listed(server)  # ours
    usb.util.dispose_resources(dev)
    assert "1-2" in listed(server)  # released
    assert bytes(dev.ctrl_transfer(0x80, 8, 0, 0, 1)) == b"\x00"  # imported afresh
    assert "1-2" not in listed(server)
    dev._finalize_object()  # what PyUSB does when the Device is collected
    assert "1-2" in listed(server)


def test_a_server_with_no_such_busid_finds_nothing(server: ServerThread) -> None:
    backend = pyusb.get_backend(f"usbip://{HOST}:{server.port}/9-9")
    assert usb.core.find(backend=backend) is None


def test_an_unreachable_server_is_a_usb_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    backend = pyusb.get_backend(f"{HOST}:{port}")
    with pytest.raises(usb.core.USBError, match=f"connection refused: nothing listens on "
                       f"127.0.0.1:{port} \\(is usbipyd running\\? see usbipy doctor -r "
                       f"127.0.0.1:{port}\\)") as error:
        usb.core.find(backend=backend)
    assert error.value.errno == errno.ENODEV


# --- transfers -----------------------------------------------------------------------


def test_scsi_write_and_read_on_the_demo_disk(server: ServerThread, find: Finder) -> None:
    dev = find("1-2")
    dev.set_configuration()
    intf = dev.get_active_configuration()[(0, 0)]
    out = usb.util.find_descriptor(intf, custom_match=lambda e: (
        usb.util.endpoint_direction(e.bEndpointAddress) == usb.util.ENDPOINT_OUT))
    into = usb.util.find_descriptor(intf, custom_match=lambda e: (
        usb.util.endpoint_direction(e.bEndpointAddress) == usb.util.ENDPOINT_IN))
    usb.util.claim_interface(dev, 0)

    def command(tag: int, cdb: bytes, length: int, direction_in: bool) -> None:
        cbw = struct.pack("<IIIBBB16s", 0x43425355, tag, length, 0x80 if direction_in else 0,
                          0, len(cdb), cdb)
        assert out.write(cbw, timeout=5000) == 31

    def status(tag: int) -> None:
        csw = bytes(into.read(13, timeout=5000))
        assert struct.unpack("<IIIB", csw) == (0x53425355, tag, 0, 0)

    blocks = bytes(range(256)) * 8  # 4 blocks of 512
    command(1, struct.pack(">BBIBHB", 0x2A, 0, 100, 0, 4, 0), len(blocks), False)  # WRITE(10)
    assert out.write(blocks, timeout=5000) == len(blocks)
    status(1)
    command(2, struct.pack(">BBIBHB", 0x28, 0, 100, 0, 4, 0), len(blocks), True)  # READ(10)
    assert bytes(into.read(len(blocks), timeout=5000)) == blocks
    status(2)
    command(3, struct.pack(">BBIBHB", 0x28, 0, 101, 0, 1, 0), 512, True)  # one block, LBA 101
    assert bytes(into.read(512, timeout=5000)) == blocks[512:1024]
    status(3)
    usb.util.release_interface(dev, 0)
    usb.util.dispose_resources(dev)


def test_cdc_echo(server: ServerThread, find: Finder) -> None:
    dev = find("1-3")
    dev.set_configuration()
    dev.ctrl_transfer(0x21, 0x20, 0, 0, struct.pack("<IBBB", 115200, 0, 0, 8))  # line coding
    assert bytes(dev.ctrl_transfer(0xA1, 0x21, 0, 0, 7)) == struct.pack("<IBBB", 115200, 0, 0, 8)
    payload = b"hello over USB/IP, through PyUSB\n" * 100
    assert dev.write(0x02, payload, timeout=5000) == len(payload)
    got = b""
    while len(got) < len(payload):
        got += bytes(dev.read(0x81, 4096, timeout=5000))
    assert got == payload


def test_a_stall_is_epipe_and_clear_halt_clears_it(server: ServerThread, find: Finder) -> None:
    dev = find("1-3")
    dev.set_configuration()
    with pytest.raises(usb.core.USBError) as stall:
        dev.ctrl_transfer(0xC0, 0x42, 0, 0, 4)  # a vendor request the device refuses
    assert stall.value.errno == errno.EPIPE and stall.value.backend_error_code == -9
    assert not isinstance(stall.value, usb.core.USBTimeoutError)
    # a halted endpoint: its URBs stall until CLEAR_FEATURE(ENDPOINT_HALT)
    dev.ctrl_transfer(0x02, 0x03, 0, 0x81, None)  # SET_FEATURE(ENDPOINT_HALT)
    with pytest.raises(usb.core.USBError) as halted:
        dev.read(0x81, 64, timeout=2000)
    assert halted.value.errno == errno.EPIPE
    dev.clear_halt(0x81)
    dev.write(0x02, b"back", timeout=2000)
    assert bytes(dev.read(0x81, 64, timeout=2000)) == b"back"


def test_a_timeout_is_pyusbs_timeout_error_and_the_urb_is_unlinked(
        server: ServerThread, devices: list[ExportedDevice], find: Finder) -> None:
    keyboard = devices[0]
    assert isinstance(keyboard, HidKeyboard)
    dev = find("1-1")
    dev.set_configuration()
    with pytest.raises(usb.core.USBTimeoutError) as timeout:
        dev.read(0x81, 8, timeout=200)
    assert timeout.value.errno == errno.ETIMEDOUT and timeout.value.backend_error_code == -7
    keyboard.type_text("a")
    assert bytes(dev.read(0x81, 8, timeout=5000)) == bytes((0, 0, 4, 0, 0, 0, 0, 0))


def test_alternate_setting_reset_and_configuration(server: ServerThread, find: Finder) -> None:
    dev = find("1-2")
    dev.set_configuration(1)
    assert dev.get_active_configuration().bConfigurationValue == 1
    dev.set_interface_altsetting(interface=0, alternate_setting=0)
    backend, handle = dev._ctx.backend, dev._ctx.handle
    with pytest.raises(usb.core.USBError) as refused:  # there is no alternate setting 1
        backend.set_interface_altsetting(handle, 0, 1)
    assert refused.value.errno == errno.EPIPE
    # the reset reaches the device on the same import (PORT_RESET, as vhci-hcd sends
    # it): it is left unconfigured (USB 2.0 9.1.1.5), and working
    backend.reset_device(handle)
    assert backend.get_configuration(handle) == 0
    backend.set_configuration(handle, 1)
    assert backend.get_configuration(handle) == 1
    dev.reset()  # PyUSB's own, which closes the device after it
    assert bytes(dev.ctrl_transfer(0x80, 8, 0, 0, 1)) == b"\x00"
    assert not dev.is_kernel_driver_active(0)
    usb.util.dispose_resources(dev)


def test_a_server_that_goes_away_is_enodev(server: ServerThread, find: Finder) -> None:
    dev = find("1-3")
    dev.set_configuration()
    server.stop()
    with pytest.raises(usb.core.USBError) as gone:
        dev.read(0x81, 64, timeout=5000)
    assert gone.value.errno == errno.ENODEV
    assert "was lost" in str(gone.value)


# --- what the review found -------------------------------------------------------------


class Streamer(EmulatedDevice):
    """An isochronous IN endpoint whose packet size depends on the alternate setting
    (as an audio interface's), and an interrupt OUT endpoint."""

    descriptor = UsbDevice(
        idVendor=0x1209, idProduct=0x5A5A, product="Streamer",
        configurations=(Configuration(interfaces=(
            Interface(0, 0xFF),
            Interface(0, 0xFF, bAlternateSetting=1, endpoints=(
                Endpoint(0x81, TransferType.ISOCHRONOUS, 192, 1),
                Endpoint(0x02, TransferType.INTERRUPT, 64, 1))),
            Interface(0, 0xFF, bAlternateSetting=2, endpoints=(
                Endpoint(0x81, TransferType.ISOCHRONOUS, 288, 1),
                Endpoint(0x02, TransferType.INTERRUPT, 64, 1))),
        )),),
    )

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.packet_lengths: list[list[int]] = []

    def transfer(self, endpoint: Endpoint, urb: CmdSubmit) -> Completion:
        if endpoint.bEndpointAddress == 0x02:
            self.written.append(urb.data)
            return Completion()
        assert urb.iso_packets is not None
        self.packet_lengths.append([p.length for p in urb.iso_packets])
        # each packet half full, with its index; the second one lost (-EXDEV)
        packets, data = [], b""
        for i, p in enumerate(urb.iso_packets):
            got = bytes([i]) * (p.length // 2) if i != 1 else b""
            packets.append(IsoPacket(p.offset, p.length, len(got), 0 if i != 1 else -18))
            data += got
        return Completion(data=data, iso_packets=packets, error_count=1)


def test_isochronous_reads_use_the_alternate_setting_in_force(
        devices: list[ExportedDevice]) -> None:
    streamer = Streamer()
    with ServerThread([streamer], port=0) as srv:
        dev = usb.core.find(backend=pyusb.get_backend(f"usbip://{HOST}:{srv.port}/1-1"))
        assert dev is not None
        try:
            dev.set_configuration()
            dev.set_interface_altsetting(0, 1)
            got = bytes(dev.read(0x81, 500, timeout=2000))
            assert streamer.packet_lengths[-1] == [192, 192, 116]
            assert got == bytes([0]) * 96 + bytes([2]) * 58  # (the lost packet adds nothing)
            dev.set_interface_altsetting(0, 2)
            dev.read(0x81, 576, timeout=2000)
            assert streamer.packet_lengths[-1] == [288, 288]
            assert dev.read(0x81, 0, timeout=2000).tobytes() == b""
            assert dev.write(0x02, b"led on", timeout=2000) == 6
            assert streamer.written == [b"led on"]
            dev.set_interface_altsetting(0, 0)
            with pytest.raises(usb.core.USBError, match="moves no data"):
                dev._ctx.backend.iso_read(dev._ctx.handle, 0x81, 0, array("B", bytes(10)), 100)
        finally:
            usb.util.dispose_resources(dev)


def test_a_device_found_twice_is_one_import_until_both_are_disposed(
        server: ServerThread) -> None:
    backend = pyusb.get_backend(f"usbip://{HOST}:{server.port}/1-3")
    first = usb.core.find(backend=backend)
    first.set_configuration()
    second = usb.core.find(backend=backend)  # listed though held: it is ours
    assert second is not None and second.idProduct == 0x0003
    second.write(0x02, b"x", timeout=2000)
    assert "1-3" not in listed(server)
    usb.util.dispose_resources(first)
    assert bytes(second.read(0x81, 64, timeout=2000)) == b"x"  # still imported
    assert "1-3" not in listed(server)
    usb.util.dispose_resources(second)
    assert "1-3" in listed(server)


def test_another_device_at_the_same_busid_is_not_taken_for_the_old_one() -> None:
    keyboard = HidKeyboard()
    with ServerThread([keyboard], port=0) as srv:
        backend = pyusb.get_backend(f"usbip://{HOST}:{srv.port}/1-1")
        old = usb.core.find(backend=backend)
        assert old is not None and old.idProduct == 0x0001
        # unplugged, and a serial port plugged in at 1-1 (a new device number)
        serial = CdcAcm()

        def swap() -> None:
            assert srv.server is not None
            srv.server.registry.remove("1-1")
            serial.busid, serial.devnum = "1-1", keyboard.devnum + 1
            srv.server.registry._devices["1-1"] = serial

        srv.call(swap)
        with pytest.raises(usb.core.USBError, match="another device now") as gone:
            old.ctrl_transfer(0x80, 6, 0x0100, 0, 18)
        assert gone.value.errno == errno.ENODEV
        new = usb.core.find(backend=backend)
        assert new is not None and new.idProduct == 0x0003
        assert new[0][(0, 0)].bInterfaceClass == 2
        usb.util.dispose_resources(new)


def test_ports_speed_and_indexes_as_libusb_gives_them(server: ServerThread,
                                                       find: Finder) -> None:
    dev = find("1-2")
    assert (dev.port_number, dev.port_numbers) == (2, (2,))
    assert dev.speed == 3  # libusb's high speed
    with pytest.raises(usb.core.USBError) as missing:
        dev._ctx.backend.get_configuration_descriptor(dev._ctx.dev, 1)
    assert missing.value.backend_error_code == -5
    with pytest.raises(IndexError):
        dev._ctx.backend.get_interface_descriptor(dev._ctx.dev, -1, 0, 0)
    assert pyusb._port_numbers("3-1.4.2") == (1, 4, 2)
    assert pyusb._port_numbers("usbipy") == ()


def test_a_pyusb_device_resumes_a_cut_connection(server: ServerThread) -> None:
    """get_backend(..., resume=True): the serial port's echo read after the cut
    comes back whole, on the same PyUSB device."""
    cutter = Cutter(server.port)
    try:
        backend = pyusb.get_backend(f"usbip://{HOST}:{cutter.port}/1-3", resume=True)
        dev = usb.core.find(backend=backend)
        assert dev is not None
        dev.set_configuration()
        assert dev.write(0x02, b"through the cut") == 15
        cutter.cut()
        assert bytes(dev.read(0x81, 64, timeout=20000)) == b"through the cut"
        assert cutter.accepted >= 2  # (it did reconnect)
        usb.util.dispose_resources(dev)
        backend.close()
    finally:
        cutter.close()
