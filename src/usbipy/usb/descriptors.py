"""Declarative USB descriptors (USB 2.0 chapter 9) and their byte encodings.

Describe a device with these dataclasses; :class:`DescriptorSet` turns them
into the bytes that GET_DESCRIPTOR returns, numbering the strings itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from .speed import Speed


class DescriptorType(IntEnum):
    DEVICE = 0x01
    CONFIGURATION = 0x02
    STRING = 0x03
    INTERFACE = 0x04
    ENDPOINT = 0x05
    DEVICE_QUALIFIER = 0x06
    OTHER_SPEED_CONFIGURATION = 0x07
    INTERFACE_ASSOCIATION = 0x0B
    HID = 0x21
    HID_REPORT = 0x22
    CS_INTERFACE = 0x24
    #: After a SuperSpeed endpoint: bursts and streams (USB 3.2 9.6.7).
    SUPERSPEED_ENDPOINT_COMPANION = 0x30


class TransferType(IntEnum):
    """bmAttributes bits 1..0 of an endpoint."""

    CONTROL = 0
    ISOCHRONOUS = 1
    BULK = 2
    INTERRUPT = 3


@dataclass(frozen=True)
class Endpoint:
    bEndpointAddress: int
    bmAttributes: int
    wMaxPacketSize: int
    bInterval: int = 0
    #: Fields past the standard seven bytes, inside the endpoint descriptor itself:
    #: an audio endpoint's bRefresh and bSynchAddress (USB Audio 1.0, 4.6.1.1).
    extra: bytes = b""
    #: Class-specific descriptors that follow the endpoint descriptor (USB Audio's
    #: CS_ENDPOINT, a SuperSpeed companion ...).
    class_descriptors: bytes = b""

    @property
    def number(self) -> int:
        return self.bEndpointAddress & 0x0F

    @property
    def is_in(self) -> bool:
        return bool(self.bEndpointAddress & 0x80)

    @property
    def transfer_type(self) -> TransferType:
        return TransferType(self.bmAttributes & 0x03)


@dataclass(frozen=True)
class Interface:
    bInterfaceNumber: int
    bInterfaceClass: int
    bInterfaceSubClass: int = 0
    bInterfaceProtocol: int = 0
    endpoints: tuple[Endpoint, ...] = ()
    bAlternateSetting: int = 0
    #: Class-specific descriptors that follow the interface descriptor (HID, CDC ...).
    class_descriptors: bytes = b""
    name: str | None = None


@dataclass(frozen=True)
class InterfaceAssociation:
    """An interface association descriptor (USB 2.0 ECN, "IAD"): interfaces that
    make one function, such as a webcam's control and streaming interfaces.
    Written before the first of them."""

    bFirstInterface: int
    bInterfaceCount: int
    bFunctionClass: int
    bFunctionSubClass: int = 0
    bFunctionProtocol: int = 0
    name: str | None = None


@dataclass(frozen=True)
class Configuration:
    interfaces: tuple[Interface, ...]
    bConfigurationValue: int = 1
    #: D7 is reserved and set; D6 self-powered; D5 remote wakeup.
    bmAttributes: int = 0x80
    #: In units of 2 mA.
    bMaxPower: int = 50
    name: str | None = None
    associations: tuple[InterfaceAssociation, ...] = ()

    @property
    def bNumInterfaces(self) -> int:
        return len({i.bInterfaceNumber for i in self.interfaces})


@dataclass(frozen=True)
class Device:
    idVendor: int
    idProduct: int
    configurations: tuple[Configuration, ...]
    bcdUSB: int = 0x0200
    bDeviceClass: int = 0
    bDeviceSubClass: int = 0
    bDeviceProtocol: int = 0
    bMaxPacketSize0: int = 64
    bcdDevice: int = 0x0100
    manufacturer: str | None = None
    product: str | None = None
    serial_number: str | None = None
    speed: Speed = Speed.HIGH


LANGID_EN_US = 0x0409


@dataclass
class DescriptorSet:
    """The encoded descriptors of one :class:`Device`."""

    device: Device
    strings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index: dict[str, int] = {}
        d = self.device
        self._i_manufacturer = self._string(d.manufacturer)
        self._i_product = self._string(d.product)
        self._i_serial = self._string(d.serial_number)
        self.device_descriptor = struct.pack(
            "<BBHBBBBHHHBBBB", 18, DescriptorType.DEVICE, d.bcdUSB, d.bDeviceClass,
            d.bDeviceSubClass, d.bDeviceProtocol, d.bMaxPacketSize0, d.idVendor, d.idProduct,
            d.bcdDevice, self._i_manufacturer, self._i_product, self._i_serial,
            len(d.configurations),
        )
        self.configuration_descriptors = [self._encode_config(c) for c in d.configurations]
        # Only a high-speed capable device has a qualifier (USB 2.0 9.6.2).
        self.device_qualifier: bytes | None = None
        if d.speed == Speed.HIGH:
            self.device_qualifier = struct.pack(
                "<BBHBBBBBB", 10, DescriptorType.DEVICE_QUALIFIER, d.bcdUSB, d.bDeviceClass,
                d.bDeviceSubClass, d.bDeviceProtocol, d.bMaxPacketSize0,
                len(d.configurations), 0,
            )

    def _string(self, text: str | None) -> int:
        if text is None:
            return 0
        if text not in self._index:
            self.strings.append(text)
            self._index[text] = len(self.strings)
        return self._index[text]

    def _encode_config(self, config: Configuration) -> bytes:
        body = bytearray()
        associations = {a.bFirstInterface: a for a in config.associations}
        for intf in config.interfaces:
            iad = associations.pop(intf.bInterfaceNumber, None)
            if iad is not None:
                body += struct.pack(
                    "<BBBBBBBB", 8, DescriptorType.INTERFACE_ASSOCIATION, iad.bFirstInterface,
                    iad.bInterfaceCount, iad.bFunctionClass, iad.bFunctionSubClass,
                    iad.bFunctionProtocol, self._string(iad.name),
                )
            body += struct.pack(
                "<BBBBBBBBB", 9, DescriptorType.INTERFACE, intf.bInterfaceNumber,
                intf.bAlternateSetting, len(intf.endpoints), intf.bInterfaceClass,
                intf.bInterfaceSubClass, intf.bInterfaceProtocol, self._string(intf.name),
            )
            body += intf.class_descriptors
            for ep in intf.endpoints:
                body += struct.pack(
                    "<BBBBHB", 7 + len(ep.extra), DescriptorType.ENDPOINT, ep.bEndpointAddress,
                    ep.bmAttributes, ep.wMaxPacketSize, ep.bInterval,
                )
                body += ep.extra
                body += ep.class_descriptors
        header = struct.pack(
            "<BBHBBBBB", 9, DescriptorType.CONFIGURATION, 9 + len(body),
            config.bNumInterfaces, config.bConfigurationValue, self._string(config.name),
            config.bmAttributes, config.bMaxPower,
        )
        return header + bytes(body)

    def string_descriptor(self, index: int, langid: int) -> bytes | None:
        """String ``index``; index 0 is the list of supported LANGIDs."""
        if index == 0:
            return struct.pack("<BBH", 4, DescriptorType.STRING, LANGID_EN_US)
        if not 1 <= index <= len(self.strings):
            return None
        text = self.strings[index - 1].encode("utf-16-le")
        return bytes((2 + len(text), DescriptorType.STRING)) + text
