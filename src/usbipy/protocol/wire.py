"""Fixed layouts of USB/IP 1.1.1 as precompiled structs, and the encoders.

Every multi-byte field is big-endian (network byte order). The layouts follow
Documentation/usb/usbip_protocol.rst and include/uapi/linux/usbip.h.
"""

from __future__ import annotations

from collections.abc import Sequence
from struct import Struct

from ..usb.speed import Speed
from .constants import (
    BUSID_SIZE,
    PATH_SIZE,
    USBIP_VERSION,
    OpCode,
    OpStatus,
    UrbCommand,
)
from .errors import LocalProtocolError
from .messages import CmdSubmit, CmdUnlink, DeviceInfo, InterfaceInfo, IsoPacket, ResumeGrant

#: version, code, status
OP_HEADER = Struct("!HHI")
#: OP_REP_DEVLIST: the header plus the number of devices
OP_DEVLIST_HEADER = Struct("!HHII")
#: usbip_usb_device: path, busid, busnum, devnum, speed, idVendor, idProduct,
#: bcdDevice, bDeviceClass, bDeviceSubClass, bDeviceProtocol,
#: bConfigurationValue, bNumConfigurations, bNumInterfaces
DEVICE = Struct(f"!{PATH_SIZE}s{BUSID_SIZE}sIIIHHHBBBBBB")
#: usbip_usb_interface: class, subclass, protocol, padding
INTERFACE = Struct("!BBBx")
BUSID = Struct(f"!{BUSID_SIZE}s")

#: usbip_header_basic: command, seqnum, devid, direction, ep
URB_BASIC = Struct("!IIIII")
#: basic + transfer_flags, transfer_buffer_length, start_frame,
#: number_of_packets (unsigned: 0xffffffff marks non-iso), interval, setup
CMD_SUBMIT = Struct("!IIIIIIiiIi8s")
#: basic + status, actual_length, start_frame, number_of_packets, error_count, padding
RET_SUBMIT = Struct("!IIIIIiiiIi8x")
#: basic + unlink_seqnum, padding
CMD_UNLINK = Struct("!IIIIII24x")
#: basic + status, padding
RET_UNLINK = Struct("!IIIIIi24x")
#: offset, length, actual_length, status
ISO_PACKET = Struct("!IIIi")

URB_HEADER_SIZE = 48
assert CMD_SUBMIT.size == RET_SUBMIT.size == CMD_UNLINK.size == RET_UNLINK.size == 48
assert DEVICE.size == 312
ISO_PACKET_SIZE = ISO_PACKET.size
#: OP_REP_IMPORT when the import succeeded: the OP header and the device record.
OP_REP_IMPORT_OK_SIZE = OP_HEADER.size + DEVICE.size
#: A device record's interface records are 4 bytes each.
INTERFACE_SIZE = INTERFACE.size

#: usbipy's resumable stream is offered and granted inside the standard import
#: messages, in their NUL-padded string fields after the string's NUL: usbipd
#: compares busids with strncmp (usbipd.c, recv_request_import), usbipd-win
#: reads up to the first NUL, usbip reads the path with "%s". So a server that
#: does not know the offer imports as ever, and a client sees no grant.
RESUME_MAGIC = b"usbipyR1"
#: The offer: the magic in the busid field's last 8 bytes (a busid of up to 23).
RESUME_OFFER_AT = BUSID_SIZE - len(RESUME_MAGIC)
#: The grant: magic, token, window (seconds), from byte 192 of the device's path
#: field (a path of up to 191).
RESUME_GRANT = Struct("!8s16sI")
RESUME_GRANT_AT = PATH_SIZE - 64
RESUME_TOKEN_SIZE = 16
#: OP_REQ_RESUME: the OP header, the token, the bytes of the server's stream received.
OP_REQ_RESUME = Struct("!HHI16sQ")
#: OP_REP_RESUME: the OP header, the bytes of the client's stream received.
OP_REP_RESUME = Struct("!HHIQ")

#: The URB commands as the header's first field carries them.
CMD_SUBMIT_CODE = int(UrbCommand.CMD_SUBMIT)
RET_SUBMIT_CODE = int(UrbCommand.RET_SUBMIT)
CMD_UNLINK_CODE = int(UrbCommand.CMD_UNLINK)
RET_UNLINK_CODE = int(UrbCommand.RET_UNLINK)


def _c_string(raw: bytes) -> str:
    """A NUL-terminated, NUL-padded field as text."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _c_field(text: str, size: int) -> bytes:
    raw = text.encode()
    if len(raw) >= size:
        raise LocalProtocolError(f"{text!r} does not fit a {size}-byte field with its NUL")
    return raw


# --- OP phase -------------------------------------------------------------


def encode_device(dev: DeviceInfo, grant: ResumeGrant | None = None) -> bytes:
    path = _c_field(dev.path, PATH_SIZE)
    if grant is not None:
        if len(path) >= RESUME_GRANT_AT:
            raise LocalProtocolError(f"a path of {len(path)} bytes leaves no room for a "
                                     "resume grant")
        path = path.ljust(RESUME_GRANT_AT, b"\0") + RESUME_GRANT.pack(
            RESUME_MAGIC, grant.token, grant.window)
    return DEVICE.pack(
        path,
        _c_field(dev.busid, BUSID_SIZE),
        dev.busnum,
        dev.devnum,
        dev.speed,
        dev.idVendor,
        dev.idProduct,
        dev.bcdDevice,
        dev.bDeviceClass,
        dev.bDeviceSubClass,
        dev.bDeviceProtocol,
        dev.bConfigurationValue,
        dev.bNumConfigurations,
        dev.bNumInterfaces,
    )


def decode_device(buf: bytes | bytearray | memoryview, offset: int) -> DeviceInfo:
    (path, busid, busnum, devnum, speed, vid, pid, bcd, cls, sub, proto, cfg, ncfg, nif) = (
        DEVICE.unpack_from(buf, offset)
    )
    try:
        speed_value = Speed(speed)
    except ValueError:
        speed_value = Speed.UNKNOWN
    return DeviceInfo(
        _c_string(path), _c_string(busid), busnum, devnum, speed_value, vid, pid, bcd,
        cls, sub, proto, cfg, ncfg, nif,
    )


def decode_grant(buf: bytes | bytearray | memoryview, offset: int) -> ResumeGrant | None:
    """The resume grant in the path field of the device record at ``offset``, if any."""
    end = offset + RESUME_GRANT_AT
    magic, token, window = RESUME_GRANT.unpack_from(buf, end)
    if magic != RESUME_MAGIC or 0 not in bytes(buf[offset:end]):
        return None
    return ResumeGrant(token, window)


def encode_op_req_devlist() -> bytes:
    return OP_HEADER.pack(USBIP_VERSION, OpCode.REQ_DEVLIST, 0)


def encode_op_rep_devlist(devices: Sequence[DeviceInfo], status: OpStatus = OpStatus.OK) -> bytes:
    parts = [OP_DEVLIST_HEADER.pack(USBIP_VERSION, OpCode.REP_DEVLIST, status, len(devices))]
    for dev in devices:
        if len(dev.interfaces) != dev.bNumInterfaces:
            raise LocalProtocolError(
                f"{dev.busid}: bNumInterfaces is {dev.bNumInterfaces} "
                f"but {len(dev.interfaces)} interface records are given"
            )
        parts.append(encode_device(dev))
        parts.extend(
            INTERFACE.pack(i.bInterfaceClass, i.bInterfaceSubClass, i.bInterfaceProtocol)
            for i in dev.interfaces
        )
    return b"".join(parts)


def encode_op_req_import(busid: str, resume: bool = False) -> bytes:
    raw = _c_field(busid, BUSID_SIZE)
    if resume:
        if len(raw) >= RESUME_OFFER_AT:
            raise LocalProtocolError(f"a busid of {len(raw)} bytes leaves no room for the "
                                     "offer of a resumable stream")
        raw = raw.ljust(RESUME_OFFER_AT, b"\0") + RESUME_MAGIC
    return OP_HEADER.pack(USBIP_VERSION, OpCode.REQ_IMPORT, 0) + BUSID.pack(raw)


def offers_resume(raw_busid: bytes) -> bool:
    """Whether an OP_REQ_IMPORT's busid field carries the offer."""
    return raw_busid.endswith(RESUME_MAGIC) and 0 in raw_busid[:RESUME_OFFER_AT]


def encode_op_rep_import(status: OpStatus, device: DeviceInfo | None,
                         grant: ResumeGrant | None = None) -> bytes:
    header = OP_HEADER.pack(USBIP_VERSION, OpCode.REP_IMPORT, status)
    if status != OpStatus.OK:
        # usbipd sends only the 8-byte header when the import failed.
        return header
    if device is None:
        raise LocalProtocolError("OP_REP_IMPORT with status OK needs the device record")
    return header + encode_device(device, grant)


def encode_op_req_resume(token: bytes, received: int) -> bytes:
    if len(token) != RESUME_TOKEN_SIZE:
        raise LocalProtocolError(f"a resume token is {RESUME_TOKEN_SIZE} bytes, not "
                                 f"{len(token)}")
    return OP_REQ_RESUME.pack(USBIP_VERSION, OpCode.REQ_RESUME, 0, token, received)


def encode_op_rep_resume(status: OpStatus, received: int) -> bytes:
    return OP_REP_RESUME.pack(USBIP_VERSION, OpCode.REP_RESUME, status,
                              received if status == OpStatus.OK else 0)


def decode_interfaces(
    buf: bytes | bytearray | memoryview, offset: int, count: int
) -> tuple[InterfaceInfo, ...]:
    unpack = INTERFACE.unpack_from
    return tuple(InterfaceInfo(*unpack(buf, offset + INTERFACE_SIZE * i)) for i in range(count))


# --- URB phase ------------------------------------------------------------


def encode_iso_packets(packets: Sequence[IsoPacket]) -> bytes:
    pack = ISO_PACKET.pack
    return b"".join(pack(p.offset, p.length, p.actual_length, p.status) for p in packets)


def encode_cmd_submit(cmd: CmdSubmit) -> bytes:
    return encode_submit_fields(cmd.seqnum, cmd.devid, cmd.direction, cmd.ep,
                                cmd.transfer_flags, cmd.transfer_buffer_length, cmd.setup,
                                cmd.data, cmd.start_frame, cmd.number_of_packets, cmd.interval,
                                cmd.iso_packets)


def encode_submit_fields(seqnum: int, devid: int, direction: int, ep: int,
                         transfer_flags: int, transfer_buffer_length: int, setup: bytes,
                         data: bytes, start_frame: int, number_of_packets: int, interval: int,
                         iso: Sequence[IsoPacket] | None) -> bytes:
    """CMD_SUBMIT: the header, the OUT data, then the iso packet descriptors."""
    header = CMD_SUBMIT.pack(
        CMD_SUBMIT_CODE, seqnum, devid, direction, ep, transfer_flags, transfer_buffer_length,
        start_frame, len(iso) if iso is not None else number_of_packets, interval, setup)
    if iso is None:
        return header + data if data else header
    return b"".join((header, data, encode_iso_packets(iso)))


def encode_cmd_unlink(cmd: CmdUnlink) -> bytes:
    return CMD_UNLINK.pack(
        CMD_UNLINK_CODE, cmd.seqnum, cmd.devid, cmd.direction, cmd.ep, cmd.unlink_seqnum
    )


def encode_ret_unlink(seqnum: int, status: int) -> bytes:
    return RET_UNLINK.pack(RET_UNLINK_CODE, seqnum, 0, 0, 0, status)
