"""Stream-mutation fuzzing: valid message streams with bytes flipped, cut, repeated.

Random bytes mostly stop at the version check; mutating real streams reaches
the length, devid, seqnum and iso checks. Whatever the mutation, the codec
either decodes or raises a RemoteProtocolError, and the server codec's
bookkeeping stays bounded by what it was sent.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import DEVID, KEYBOARD, h, imported_client, imported_server, padded
from usbipy.protocol import (
    ClientConnection,
    CmdSubmit,
    CmdUnlink,
    Direction,
    IsoPacket,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    OpStatus,
    RemoteProtocolError,
    ServerConnection,
)


def _cmd_stream() -> bytes:
    """A client's URB-phase stream: control IN, bulk OUT, iso IN, an UNLINK."""
    client = imported_client()
    messages: list[CmdSubmit | CmdUnlink] = [
        CmdSubmit(1, DEVID, Direction.IN, 0, 0x200, 18, bytes.fromhex("8006000100001200")),
        CmdSubmit(2, DEVID, Direction.OUT, 2, 0, 4, bytes(8), b"abcd"),
        CmdSubmit(3, DEVID, Direction.IN, 3, 2, 24, bytes(8), b"", 0, 3, 1,
                  [IsoPacket(0, 8), IsoPacket(8, 8), IsoPacket(16, 8)]),
        CmdUnlink(4, DEVID, 1),
    ]
    return b"".join(client.send(m) for m in messages)


def _ret_stream() -> tuple[ClientConnection, bytes]:
    """A client that submitted three URBs, and the server's replies to them."""
    client, server = imported_client(), imported_server()
    cmds = [
        CmdSubmit(1, DEVID, Direction.IN, 0, 0, 18, bytes(8)),
        CmdSubmit(2, DEVID, Direction.OUT, 2, 0, 4, bytes(8), b"abcd"),
        CmdSubmit(3, DEVID, Direction.IN, 3, 0, 16, bytes(8), b"", 0, 2, 1,
                  [IsoPacket(0, 8), IsoPacket(8, 8)]),
    ]
    server.receive_data(b"".join(client.send(c) for c in cmds))
    urbs = [u for u in server.events() if isinstance(u, CmdSubmit)]
    replies = [
        server.reply_submit(urbs[0], 0, bytes(18)),
        server.reply_submit(urbs[1]),
        server.reply_submit(urbs[2], 0, b"x" * 12, None, 0, 0,
                            [IsoPacket(0, 8, 8, 0), IsoPacket(8, 8, 4, 0)]),
    ]
    return client, b"".join(bytes(reply) for reply in replies)


OP_REQUESTS = h("0111", "8005", "00000000") + h("0111", "8003", "00000000", padded("3-2", 32))
CMD_STREAM = _cmd_stream()

mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "cut", "dup", "insert"]),
              st.integers(0, 10_000), st.integers(0, 255)),
    min_size=1, max_size=4,
)


def mutate(data: bytes, steps: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, where, value in steps:
        if not buf:
            break
        i = where % len(buf)
        if kind == "flip":
            buf[i] ^= 1 << (value % 8)
        elif kind == "set":
            buf[i] = value
        elif kind == "cut":
            del buf[i:]
        elif kind == "dup":
            buf[i:i] = buf[i:i + 48]  # repeat a header-sized piece
        else:
            buf[i:i] = bytes((value,)) * (value % 5 + 1)
    return bytes(buf)


def decode_all(conn: ServerConnection | ClientConnection, data: bytes, chunk: int) -> None:
    try:
        for start in range(0, len(data), chunk):
            conn.receive_data(data[start:start + chunk])
            for _ in conn.events():
                pass
        conn.receive_data(b"")
        for _ in conn.events():
            pass
    except RemoteProtocolError:
        pass


@given(mutations, st.integers(1, 64))
def test_mutated_urb_streams_decode_or_raise_remote_protocol_error(
        steps: list[tuple[str, int, int]], chunk: int) -> None:
    server = imported_server()
    decode_all(server, mutate(CMD_STREAM, steps), chunk)
    assert server.in_flight <= 4  # never more than the stream could have submitted


@given(mutations, st.integers(1, 64))
def test_mutated_op_requests_decode_or_raise_remote_protocol_error(
        steps: list[tuple[str, int, int]], chunk: int) -> None:
    decode_all(ServerConnection(), mutate(OP_REQUESTS, steps), chunk)


@given(mutations, st.integers(1, 64))
def test_mutated_replies_decode_or_raise_remote_protocol_error(
        steps: list[tuple[str, int, int]], chunk: int) -> None:
    client, stream = _ret_stream()
    decode_all(client, mutate(stream, steps), chunk)


@given(mutations, st.integers(1, 400))
def test_mutated_op_replies_decode_or_raise_remote_protocol_error(
        steps: list[tuple[str, int, int]], chunk: int) -> None:
    import_server = ServerConnection()
    import_server.receive_data(OP_REQUESTS[8:])
    list(import_server.events())
    reply = import_server.send(OpRepImport(OpStatus.OK, KEYBOARD))
    devlist_server = ServerConnection()
    devlist_server.receive_data(OP_REQUESTS[:8])
    list(devlist_server.events())
    devlist = devlist_server.send(OpRepDevlist((KEYBOARD, KEYBOARD)))
    for wire, request in ((reply, "import"), (devlist, "devlist")):
        client = ClientConnection()
        client.send(OpReqImport("3-2") if request == "import" else OpReqDevlist())
        decode_all(client, mutate(wire, steps), chunk)
