"""Descriptors as a device sends them, parsed (USB 2.0 sections 9.6.1 to 9.6.6).

The other way from :mod:`usbipy.usb.descriptors`: bytes from a remote device
in, typed records out, for clients (the PyUSB backend). Strict, because the
bytes come from a peer: a descriptor whose bLength runs past the end, a
configuration whose wTotalLength disagrees with what came, or a record of the
wrong type raises :class:`DescriptorError` naming what was wrong.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .descriptors import DescriptorType

_DEVICE = struct.Struct("<BBHBBBBHHHBBBB")
_CONFIGURATION = struct.Struct("<BBHBBBBB")
_INTERFACE = struct.Struct("<BBBBBBBBB")
_ENDPOINT = struct.Struct("<BBBBHB")


class DescriptorError(ValueError):
    """Descriptor bytes that do not parse."""


@dataclass(frozen=True)
class DeviceDescriptor:
    bLength: int
    bDescriptorType: int
    bcdUSB: int
    bDeviceClass: int
    bDeviceSubClass: int
    bDeviceProtocol: int
    bMaxPacketSize0: int
    idVendor: int
    idProduct: int
    bcdDevice: int
    iManufacturer: int
    iProduct: int
    iSerialNumber: int
    bNumConfigurations: int


@dataclass(frozen=True)
class EndpointDescriptor:
    bLength: int
    bDescriptorType: int
    bEndpointAddress: int
    bmAttributes: int
    wMaxPacketSize: int
    bInterval: int
    #: Audio endpoints (USB Audio 1.0 4.6.1.1) are 9 bytes long with these two.
    bRefresh: int = 0
    bSynchAddress: int = 0
    #: Class-specific descriptors that follow it, as libusb's ``extra``.
    extra: bytes = field(default=b"", kw_only=True)

    @property
    def bytes_per_interval(self) -> int:
        """Bytes the endpoint moves per service interval: wMaxPacketSize bits 10..0
        times 1 + bits 12..11 (high-bandwidth, USB 2.0 9.6.6); at SuperSpeed, the
        companion descriptor's bursts and, for isochronous, Mult (USB 3.2 9.6.7)."""
        size = (self.wMaxPacketSize & 0x7FF) * (1 + ((self.wMaxPacketSize >> 11) & 3))
        extra = self.extra
        if len(extra) >= 6 and extra[1] == DescriptorType.SUPERSPEED_ENDPOINT_COMPANION:
            bursts = extra[2] + 1
            mult = (extra[3] & 3) + 1 if self.bmAttributes & 3 == 1 else 1
            size = (self.wMaxPacketSize & 0x7FF) * bursts * mult
        return size


@dataclass(frozen=True)
class InterfaceDescriptor:
    bLength: int
    bDescriptorType: int
    bInterfaceNumber: int
    bAlternateSetting: int
    bNumEndpoints: int
    bInterfaceClass: int
    bInterfaceSubClass: int
    bInterfaceProtocol: int
    iInterface: int
    endpoints: tuple[EndpointDescriptor, ...] = field(default=(), kw_only=True)
    extra: bytes = field(default=b"", kw_only=True)


@dataclass(frozen=True)
class ConfigurationDescriptor:
    bLength: int
    bDescriptorType: int
    wTotalLength: int
    bNumInterfaces: int
    bConfigurationValue: int
    iConfiguration: int
    bmAttributes: int
    bMaxPower: int
    #: Each interface's alternate settings, in the order the device lists them
    #: (a "logical index" in libusb's and PyUSB's words).
    interfaces: tuple[tuple[InterfaceDescriptor, ...], ...] = field(default=(), kw_only=True)
    extra: bytes = field(default=b"", kw_only=True)
    #: Every endpoint of every alternate setting.
    all_endpoints: tuple[EndpointDescriptor, ...] = field(default=(), repr=False,
                                                          kw_only=True)


def parse_device(raw: bytes) -> DeviceDescriptor:
    if len(raw) < _DEVICE.size:
        raise DescriptorError(f"a device descriptor is 18 bytes, {len(raw)} came")
    fields = _DEVICE.unpack_from(raw)
    if fields[0] != _DEVICE.size:
        raise DescriptorError(f"a device descriptor is 18 bytes, bLength says {fields[0]}")
    if fields[1] != DescriptorType.DEVICE:
        raise DescriptorError(f"descriptor type {fields[1]:#04x} where a device descriptor "
                              "(0x01) belongs")
    return DeviceDescriptor(*fields)


def parse_configuration(raw: bytes) -> ConfigurationDescriptor:
    """A whole configuration (wTotalLength bytes) with its interfaces and endpoints."""
    if len(raw) < _CONFIGURATION.size:
        raise DescriptorError(f"a configuration descriptor is at least 9 bytes, {len(raw)} came")
    head = _CONFIGURATION.unpack_from(raw)
    if head[1] != DescriptorType.CONFIGURATION:
        raise DescriptorError(f"descriptor type {head[1]:#04x} where a configuration "
                              "descriptor (0x02) belongs")
    total = head[2]
    if total != len(raw):
        raise DescriptorError(f"wTotalLength says {total} bytes, {len(raw)} came")
    groups: dict[int, list[InterfaceDescriptor]] = {}
    extra = bytearray()
    # the interface being read: its fields, endpoints and extra bytes so far
    current: tuple[tuple[int, ...], list[EndpointDescriptor], bytearray] | None = None
    endpoint: tuple[tuple[int, ...], bytearray] | None = None

    def close_endpoint() -> None:
        nonlocal endpoint
        if endpoint is not None:
            assert current is not None
            values, ep_extra = endpoint
            current[1].append(EndpointDescriptor(*values, extra=bytes(ep_extra)))
            endpoint = None

    def close_interface() -> None:
        nonlocal current
        close_endpoint()
        if current is not None:
            values, eps, intf_extra = current
            if values[4] != len(eps):  # (libusb refuses such a configuration too)
                raise DescriptorError(f"interface {values[2]} setting {values[3]} says "
                                      f"{values[4]} endpoints, {len(eps)} follow")
            groups.setdefault(values[2], []).append(
                InterfaceDescriptor(*values, endpoints=tuple(eps), extra=bytes(intf_extra)))
            current = None

    offset = head[0]
    if not _CONFIGURATION.size <= head[0] <= total:
        raise DescriptorError(f"configuration descriptor bLength {head[0]}")
    while offset < total:
        if total - offset < 2:
            raise DescriptorError(f"1 byte left at offset {offset}")
        length, kind = raw[offset], raw[offset + 1]
        if length < 2 or offset + length > total:
            raise DescriptorError(f"descriptor at offset {offset}: bLength {length} runs "
                                  f"past wTotalLength {total}" if length >= 2 else
                                  f"descriptor at offset {offset}: bLength {length}")
        piece = raw[offset:offset + length]
        if kind == DescriptorType.INTERFACE:
            if length < _INTERFACE.size:
                raise DescriptorError(f"interface descriptor at offset {offset} is "
                                      f"{length} bytes")
            close_interface()
            current = (_INTERFACE.unpack_from(piece), [], bytearray())
        elif kind == DescriptorType.ENDPOINT:
            if current is None:
                raise DescriptorError(f"endpoint descriptor at offset {offset} before any "
                                      "interface")
            if length < _ENDPOINT.size:
                raise DescriptorError(f"endpoint descriptor at offset {offset} is "
                                      f"{length} bytes")
            close_endpoint()
            values = _ENDPOINT.unpack_from(piece)
            if length >= 9:
                values += (piece[7], piece[8])
            endpoint = (values, bytearray())
        elif endpoint is not None:
            endpoint[1].extend(piece)
        elif current is not None:
            current[2].extend(piece)
        else:
            extra += piece
        offset += length
    close_interface()
    interfaces = tuple(tuple(alts) for alts in groups.values())
    return ConfigurationDescriptor(
        *head, interfaces=interfaces, extra=bytes(extra),
        all_endpoints=tuple(ep for alts in interfaces for alt in alts for ep in alt.endpoints))
