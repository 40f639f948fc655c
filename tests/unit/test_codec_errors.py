"""The codec refuses bad input with an error that names what was wrong."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from tests.helpers import DEVID, h, imported_client, imported_server
from usbipy.protocol import (
    BadDevid,
    BadIsoDescriptors,
    BadLength,
    ClientConnection,
    CmdSubmit,
    CmdUnlink,
    Direction,
    LocalProtocolError,
    OpReqDevlist,
    RemoteProtocolError,
    RetSubmit,
    ServerConnection,
    TooManyIsoPackets,
    UnexpectedMessage,
    UnknownCommand,
    UnsupportedVersion,
)


def submit_header(*, devid: int = DEVID, direction: int = 0, ep: int = 1, length: int = 0,
                  npackets: int = 0, seqnum: int = 1) -> bytes:
    return struct.pack("!IIIIIIiiIi8s", 1, seqnum, devid, direction, ep, 0, length, 0,
                       npackets, 0, bytes(8))


def feed(conn: ServerConnection | ClientConnection, data: bytes) -> None:
    conn.receive_data(data)
    conn.next_event()


def test_wrong_version() -> None:
    with pytest.raises(UnsupportedVersion, match="0x0106"):
        feed(ServerConnection(), h("0106", "8005", "00000000"))


def test_unknown_op_code() -> None:
    with pytest.raises(UnknownCommand, match="0x8009"):
        feed(ServerConnection(), h("0111", "8009", "00000000"))


def test_reply_sent_to_a_server_is_unexpected() -> None:
    with pytest.raises(UnexpectedMessage, match="REP_DEVLIST"):
        feed(ServerConnection(), h("0111", "0005", "00000000"))


def test_urb_before_import_names_role_phase_and_message() -> None:
    # Not "unsupported version 0x0000": a CMD_SUBMIT header where an OP header belongs.
    with pytest.raises(UnexpectedMessage, match="server did not expect CMD_SUBMIT in phase OP"):
        feed(ServerConnection(), submit_header())


def test_unknown_urb_command() -> None:
    with pytest.raises(UnknownCommand, match="0x00000009"):
        feed(imported_server(), struct.pack("!I", 9) + bytes(44))


def test_ret_submit_from_client_is_unexpected() -> None:
    with pytest.raises(UnexpectedMessage, match="RET_SUBMIT"):
        feed(imported_server(), struct.pack("!I", 3) + bytes(44))


def test_bad_devid() -> None:
    with pytest.raises(BadDevid, match="0x00010001"):
        feed(imported_server(), submit_header(devid=0x10001))


def test_negative_length() -> None:
    with pytest.raises(BadLength, match="negative"):
        feed(imported_server(), submit_header(length=-5))


def test_oversized_out_length_is_refused_before_buffering() -> None:
    server = ServerConnection(max_transfer_length=1024)
    server.receive_data(h("0111", "8003", "00000000") + b"3-2".ljust(32, b"\0"))
    server.next_event()
    from tests.helpers import KEYBOARD
    from usbipy.protocol import OpRepImport, OpStatus
    server.send(OpRepImport(OpStatus.OK, KEYBOARD))
    with pytest.raises(BadLength, match="above the cap of 1024"):
        feed(server, submit_header(length=1025))


def test_too_many_iso_packets() -> None:
    with pytest.raises(TooManyIsoPackets, match="1025"):
        feed(imported_server(), submit_header(direction=1, length=64, npackets=1025))


def test_iso_descriptor_past_the_buffer() -> None:
    iso = struct.pack("!IIIi", 60, 8, 0, 0)
    with pytest.raises(BadIsoDescriptors, match="past the 64-byte buffer"):
        feed(imported_server(), submit_header(direction=1, length=64, npackets=1) + iso)


def test_iso_actual_lengths_must_add_up() -> None:
    client = imported_client()
    from usbipy.protocol import IsoPacket
    client.send(CmdSubmit(1, DEVID, Direction.IN, 3, 0, 64, iso_packets=[IsoPacket(0, 32),
                                                                            IsoPacket(32, 32)]))
    ret = struct.pack("!IIIIIiiiIi8x", 3, 1, 0, 0, 0, 0, 10, 0, 2, 0) + bytes(10)
    ret += struct.pack("!IIIi", 0, 32, 4, 0) + struct.pack("!IIIi", 32, 32, 4, 0)
    with pytest.raises(BadIsoDescriptors, match="do not add up to 10"):
        feed(client, ret)


def test_ret_submit_for_unknown_seqnum() -> None:
    with pytest.raises(UnexpectedMessage, match="seqnum 77"):
        feed(imported_client(), struct.pack("!IIIIIiiiIi8x", 3, 77, 0, 0, 0, 0, 0, 0, 0, 0))


def test_ret_submit_longer_than_requested() -> None:
    client = imported_client()
    client.send(CmdSubmit(1, DEVID, Direction.IN, 1, 0, 8))
    with pytest.raises(BadLength, match="actual_length 9 outside 0..8"):
        feed(client, struct.pack("!IIIIIiiiIi8x", 3, 1, 0, 0, 0, 0, 9, 0, 0, 0) + bytes(9))


def test_eof_inside_a_message() -> None:
    server = imported_server()
    server.receive_data(submit_header()[:20])
    server.receive_data(b"")
    with pytest.raises(BadLength, match="inside a message"):
        server.next_event()


def test_error_is_sticky() -> None:
    server = ServerConnection()
    server.receive_data(h("0106", "8005", "00000000"))
    with pytest.raises(UnsupportedVersion):
        server.next_event()
    with pytest.raises(UnsupportedVersion):
        server.next_event()


def test_local_errors_name_role_phase_and_message_and_stick() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError, match="client cannot send CMD_SUBMIT in phase OP"):
        client.send(CmdSubmit(1, DEVID, Direction.IN, 1, 0, 8))
    # sticky: the connection refuses everything after an illegal send
    with pytest.raises(LocalProtocolError, match="broken"):
        client.send(OpReqDevlist())
    client = ClientConnection()
    client.send(OpReqDevlist())
    with pytest.raises(LocalProtocolError, match="OP_REQ_DEVLIST in phase DEVLIST"):
        client.send(OpReqDevlist())


def test_a_server_never_sends_a_request() -> None:
    server = imported_server()
    with pytest.raises(LocalProtocolError, match="a server never sends CMD_UNLINK"):
        server.send(CmdUnlink(1, DEVID, 1))  # type: ignore[arg-type]


def test_a_reply_is_only_for_a_urb_in_flight() -> None:
    server = imported_server()
    with pytest.raises(LocalProtocolError, match="seqnum 5, which is not in flight"):
        server.send(RetSubmit(5, 0, 0))


def test_every_error_is_a_remote_protocol_error() -> None:
    for cls in (BadDevid, BadIsoDescriptors, BadLength, TooManyIsoPackets, UnexpectedMessage,
                UnknownCommand, UnsupportedVersion):
        assert issubclass(cls, RemoteProtocolError)


def _broken_server_with_a_urb_and_held_unlinks() -> tuple[ServerConnection, CmdSubmit]:
    """A server that took URB 1, holds UNLINKs for URBs 2 and 3 (not come yet), then
    received garbage: it is in phase ERROR."""
    server = imported_server()
    server.receive_data(submit_header(seqnum=1, direction=1, length=8))
    urb = server.next_event()
    assert isinstance(urb, CmdSubmit)
    for seqnum, target in ((10, 2), (11, 3)):
        assert server.hold_unlink(CmdUnlink(seqnum, DEVID, target))
    server.receive_data(struct.pack("!I44x", 9))
    with pytest.raises(UnknownCommand):
        server.next_event()
    return server, urb


@pytest.mark.parametrize("send", ["reply_submit", "reply_unlink", "release_unlink",
                                  "submit_after_unlinks"])
def test_error_is_sticky_for_every_reply(send: str) -> None:
    """Nothing is encoded once the connection is broken: every send consults the
    state table (states.py: ERROR is sticky), the fast paths too."""
    server, urb = _broken_server_with_a_urb_and_held_unlinks()
    later = CmdSubmit(2, DEVID, Direction.IN, 1, 0, 8)
    calls: dict[str, Callable[[], object]] = {
        "reply_submit": lambda: server.reply_submit(urb, 0, b"12345678"),
        "reply_unlink": lambda: server.reply_unlink(CmdUnlink(12, DEVID, 1), -104),
        "release_unlink": lambda: server.release_unlink(2),
        "submit_after_unlinks": lambda: server.submit_after_unlinks(later),
    }
    with pytest.raises(LocalProtocolError, match="broken by an earlier protocol error"):
        calls[send]()
