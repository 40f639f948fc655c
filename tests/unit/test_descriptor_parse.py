"""usb/parse.py: descriptors from a remote device, parsed strictly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usbipy.devices import CdcAcm, HidKeyboard, ImageFile, MassStorage
from usbipy.usb import Configuration, DescriptorSet, Device, Endpoint, Interface
from usbipy.usb.parse import DescriptorError, parse_configuration, parse_device

#: A UAC1 streaming interface's isochronous endpoint: 9 bytes (bRefresh, bSynchAddress)
#: and a class-specific endpoint descriptor after it.
AUDIO_CONFIG = bytes.fromhex(
    "09 02 3d00 02 01 00 80 32"  # configuration: 61 bytes, 2 interfaces
    "09 04 00 00 00 01 01 00 00"  # interface 0: audio control
    "09 24 01 0001 0900 01 01"  # class-specific AC header (extra of interface 0)
    "09 04 01 00 00 01 02 00 00"  # interface 1 alt 0: no bandwidth
    "09 04 01 01 01 01 02 00 00"  # interface 1 alt 1
    "09 05 81 05 c000 01 02 83"  # iso IN, 192 bytes, bRefresh 2, bSynchAddress 0x83
    "07 25 01 01 00 0000"  # class-specific endpoint (extra of the endpoint)
    .replace(" ", ""))


def test_demo_devices_parse_back_to_what_they_declare() -> None:
    for device in (HidKeyboard(), MassStorage(ImageFile.scratch(1 << 16)), CdcAcm()):
        ds = device.descriptors
        d = parse_device(ds.device_descriptor)
        assert (d.idVendor, d.idProduct, d.bNumConfigurations) == (
            device.descriptor.idVendor, device.descriptor.idProduct, 1)
        config = parse_configuration(ds.configuration_descriptors[0])
        declared = device.descriptor.configurations[0]
        flat = [alt for alts in config.interfaces for alt in alts]
        assert [(i.bInterfaceNumber, i.bAlternateSetting, i.extra) for i in flat] == [
            (i.bInterfaceNumber, i.bAlternateSetting, i.class_descriptors)
            for i in declared.interfaces]
        assert [[(e.bEndpointAddress, e.wMaxPacketSize) for e in i.endpoints]
                for i in flat] == [[(e.bEndpointAddress, e.wMaxPacketSize) for e in i.endpoints]
                                   for i in declared.interfaces]


def test_alternate_settings_group_by_interface_and_extras_stay_with_their_owner() -> None:
    config = parse_configuration(AUDIO_CONFIG)
    assert config.bNumInterfaces == 2 and config.extra == b""
    [control], [idle, streaming] = config.interfaces
    assert control.extra == bytes.fromhex("092401000109000101")
    assert (idle.bAlternateSetting, idle.endpoints) == (0, ())
    [iso] = streaming.endpoints
    assert (iso.bEndpointAddress, iso.bmAttributes, iso.wMaxPacketSize, iso.bLength,
            iso.bRefresh, iso.bSynchAddress) == (0x81, 0x05, 192, 9, 2, 0x83)
    assert iso.extra == bytes.fromhex("07250101000000")
    assert config.all_endpoints == (iso,)


def test_superspeed_isochronous_bursts_and_mult() -> None:
    raw = bytes.fromhex("09021f000101008032" "090400000100000000" "070581010004" "01"
                        "0630" "03" "02" "000c")  # 1024 bytes, 4 bursts, Mult 2 (3)
    assert parse_configuration(raw).all_endpoints[0].bytes_per_interval == 1024 * 4 * 3


def test_high_bandwidth_packet_size() -> None:
    raw = DescriptorSet(Device(1, 2, (Configuration((Interface(0, 0xFF, endpoints=(
        Endpoint(0x81, 0x01, 0x1400),)),)),))).configuration_descriptors[0]
    # 1024 bytes, 3 transactions per microframe (USB 2.0 table 9-14)
    assert parse_configuration(raw).all_endpoints[0].bytes_per_interval == 3072


@pytest.mark.parametrize(("raw", "error"), [
    (bytes(17), "18 bytes, 17 came"),
    (bytes.fromhex("120200020000004009120100000101020301"), "where a device descriptor"),
    (bytes.fromhex("110100020000004009120100000101020301"), "bLength says 17"),
])
def test_bad_device_descriptors_are_named(raw: bytes, error: str) -> None:
    with pytest.raises(DescriptorError, match=error):
        parse_device(raw)


@pytest.mark.parametrize(("raw", "error"), [
    (AUDIO_CONFIG[:40], "wTotalLength says 61 bytes, 40 came"),
    (bytes.fromhex("0902") + bytes(5), "at least 9 bytes"),
    (bytes.fromhex("090412000101008032"), "where a configuration"),
    (bytes.fromhex("09020c00010100803200ff00"), "bLength 0"),
    (bytes.fromhex("09020e000101008032" "0905810200"), "runs past wTotalLength"),
    (bytes.fromhex("090210000101008032" "07058102400000"), "before any interface"),
    (bytes.fromhex("090210000101008032" "07040000000000"), "interface descriptor at offset 9"),
    (bytes.fromhex("0902" "0a00" "0101008032" "00"), "1 byte left"),
    (bytes.fromhex("ff0209000101008032"), "bLength 255"),
    (bytes.fromhex("090212000101008032" "090400000200000000"),
     "interface 0 setting 0 says 2 endpoints, 0 follow"),
])
def test_bad_configurations_are_named(raw: bytes, error: str) -> None:
    with pytest.raises(DescriptorError, match=error):
        parse_configuration(raw)


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_descriptor_error(raw: bytes) -> None:
    # (a peer's bytes: nothing but DescriptorError may come out, whatever they are)
    for data in (raw, bytes((9, 2)) + len(raw).to_bytes(2, "little") + raw[4:]):
        try:
            parse_configuration(data)
        except DescriptorError:
            pass
        try:
            parse_device(data)
        except DescriptorError:
            pass


endpoints = st.builds(Endpoint, st.integers(0, 255), st.integers(0, 3), st.integers(0, 0xFFFF),
                      st.integers(0, 255))
interfaces = st.builds(Interface, st.integers(0, 7), st.integers(0, 255),
                       endpoints=st.lists(endpoints, max_size=4).map(tuple),
                       bAlternateSetting=st.integers(0, 3),
                       class_descriptors=st.lists(st.binary(min_size=0, max_size=10).map(
                           lambda b: bytes((len(b) + 2, 0x24)) + b), max_size=2).map(
                               lambda parts: b"".join(parts)))


@given(st.lists(interfaces, min_size=1, max_size=5))
def test_every_encoded_configuration_parses_back(declared: list[Interface]) -> None:
    raw = DescriptorSet(Device(1, 2, (Configuration(tuple(declared)),))
                        ).configuration_descriptors[0]
    config = parse_configuration(raw)
    got = [(i.bInterfaceNumber, i.bAlternateSetting, i.bInterfaceClass, i.extra,
            tuple((e.bEndpointAddress, e.bmAttributes, e.wMaxPacketSize, e.bInterval)
                  for e in i.endpoints)) for alts in config.interfaces for i in alts]
    want = [(i.bInterfaceNumber, i.bAlternateSetting, i.bInterfaceClass, i.class_descriptors,
             tuple((e.bEndpointAddress, e.bmAttributes, e.wMaxPacketSize, e.bInterval)
                   for e in i.endpoints)) for i in declared]
    # grouped by interface number, in the order each number first appears
    order = list(dict.fromkeys(i.bInterfaceNumber for i in declared))
    assert got == sorted(want, key=lambda w: order.index(w[0]))
