"""Properties: encode/decode round trips, and no input makes the codec fail any other way."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import DEVID, imported_client, imported_server
from usbipy.protocol import (
    NEED_DATA,
    ClientConnection,
    CmdSubmit,
    CmdUnlink,
    Direction,
    IsoPacket,
    Message,
    RemoteProtocolError,
    RetSubmit,
    ServerConnection,
)

u32 = st.integers(0, 2**32 - 1)
seqnums = st.integers(1, 2**32 - 1)


@st.composite
def iso_packets(draw: st.DrawFn, length: int) -> list[IsoPacket]:
    count = draw(st.integers(1, 8))
    size = length // count
    return [IsoPacket(i * size, size, 0, 0) for i in range(count)]


@st.composite
def cmd_submits(draw: st.DrawFn) -> CmdSubmit:
    direction = draw(st.sampled_from(Direction))
    iso = draw(st.booleans())
    length = draw(st.integers(0 if not iso else 8, 4096))
    data = draw(st.binary(min_size=length, max_size=length)) if direction is Direction.OUT else b""
    return CmdSubmit(
        seqnum=draw(seqnums), devid=DEVID, direction=direction, ep=draw(st.integers(0, 15)),
        transfer_flags=draw(u32), transfer_buffer_length=length,
        setup=draw(st.binary(min_size=8, max_size=8)), data=data,
        start_frame=draw(st.integers(0, 2**31 - 1)) if iso else 0,
        number_of_packets=draw(st.sampled_from([0, 0xFFFFFFFF])) if not iso else 0,
        interval=draw(st.integers(0, 255)),
        iso_packets=draw(iso_packets(length)) if iso else None,
    )


def split_feed(conn: ServerConnection | ClientConnection, data: bytes,
               cuts: list[int]) -> list[Message]:
    """Feed ``data`` cut at ``cuts``; collect every event."""
    events: list[Message] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in zip(points, points[1:], strict=False):
        conn.receive_data(data[a:b])
        events.extend(conn.events())
    return events


@given(cmd_submits(), st.lists(st.integers(0, 10_000), max_size=6))
def test_cmd_submit_round_trip(cmd: CmdSubmit, cuts: list[int]) -> None:
    if cmd.is_iso:
        cmd.number_of_packets = len(cmd.iso_packets or ())
    wire = imported_client().send(cmd)
    assert split_feed(imported_server(), wire, cuts) == [cmd]


@given(cmd_submits(), st.integers(-200, 0), st.lists(st.integers(0, 10_000), max_size=6))
def test_ret_submit_round_trip(cmd: CmdSubmit, status: int, cuts: list[int]) -> None:
    if cmd.is_iso:
        cmd.number_of_packets = len(cmd.iso_packets or ())
    client = imported_client()
    server = imported_server()
    server.receive_data(client.send(cmd))
    assert server.next_event() == cmd
    iso = None
    if cmd.iso_packets is not None:
        iso = [IsoPacket(p.offset, p.length, p.length // 2, status) for p in cmd.iso_packets]
    if cmd.direction is Direction.IN:
        actual = sum(p.actual_length for p in iso) if iso else cmd.transfer_buffer_length // 3
        data = bytes(range(256)) * (actual // 256) + bytes(actual % 256)
    else:
        actual = sum(p.actual_length for p in iso) if iso else cmd.transfer_buffer_length
        data = b""
    ret = RetSubmit(cmd.seqnum, status, actual, data, 0,
                    len(iso) if iso else cmd.number_of_packets, 0, iso, cmd.direction)
    reply = server.reply_submit(cmd, status, data, actual, 0, 0, iso)
    assert reply.fault is None
    assert (reply.status, reply.actual_length, reply.data, reply.iso_packets) == (
        ret.status, ret.actual_length, ret.data, ret.iso_packets)
    wire = bytes(reply)
    assert split_feed(client, wire, cuts) == [ret]
    assert client.pending == 0 and server.in_flight == 0


@given(seqnums, seqnums)
def test_cmd_unlink_round_trip(seqnum: int, target: int) -> None:
    cmd = CmdUnlink(seqnum, DEVID, target)
    server = imported_server()
    server.receive_data(imported_client().send(cmd))
    assert server.next_event() == cmd


def _drain(conn: ServerConnection | ClientConnection) -> None:
    try:
        for _ in conn.events():
            pass
    except RemoteProtocolError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=400), st.booleans())
def test_any_bytes_decode_or_raise_remote_protocol_error(data: bytes, imported: bool) -> None:
    """Fed whole and byte by byte: events, NEED_DATA, or RemoteProtocolError; nothing else."""
    for conn in (imported_server() if imported else ServerConnection(),
                 imported_client()):
        conn.receive_data(data)
        _drain(conn)
    for conn in (imported_server() if imported else ServerConnection(),
                 imported_client()):
        for i in range(len(data)):
            conn.receive_data(data[i:i + 1])
            try:
                for _ in conn.events():
                    pass
            except RemoteProtocolError:
                break


@settings(max_examples=200)
@given(st.lists(cmd_submits(), min_size=1, max_size=4), st.binary(min_size=1, max_size=64))
def test_valid_stream_then_garbage(cmds: list[CmdSubmit], garbage: bytes) -> None:
    """Valid messages decode in order; trailing garbage only ever raises the codec's error."""
    client = imported_client()
    seen: set[int] = set()
    wire = b""
    kept = []
    for cmd in cmds:
        if cmd.seqnum in seen:
            continue
        seen.add(cmd.seqnum)
        if cmd.is_iso:
            cmd.number_of_packets = len(cmd.iso_packets or ())
        wire += client.send(cmd)
        kept.append(cmd)
    server = imported_server()
    server.receive_data(wire)
    assert list(server.events()) == kept
    server.receive_data(garbage)
    try:
        event = server.next_event()
        assert event is NEED_DATA or isinstance(event, (CmdSubmit, CmdUnlink))
    except RemoteProtocolError:
        pass


@given(st.lists(cmd_submits(), min_size=1, max_size=5),
       st.lists(st.integers(0, 100_000), max_size=12),
       st.lists(st.sampled_from(["bytes", "bytearray", "memoryview"]), min_size=1))
def test_a_stream_cut_anywhere_in_any_buffer_type(cmds: list[CmdSubmit], cuts: list[int],
                                                  kinds: list[str]) -> None:
    """Chunks are parsed in place (bytes) or kept in a growing buffer (a partial
    message, or a buffer the caller may reuse): every path gives the same messages."""
    client = imported_client()
    for n, cmd in enumerate(cmds):
        cmd.seqnum = n + 1  # in flight together: distinct seqnums
        if cmd.is_iso:
            cmd.number_of_packets = len(cmd.iso_packets or ())
    wire = b"".join(client.send(cmd) for cmd in cmds)
    server = imported_server()
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    events: list[Message] = []
    for n, (a, b) in enumerate(zip(points, points[1:], strict=False)):
        chunk = wire[a:b]
        kind = kinds[n % len(kinds)]
        reusable = bytearray(chunk)
        server.receive_data(chunk if kind == "bytes" else
                            reusable if kind == "bytearray" else memoryview(reusable))
        reusable[:] = b"\xff" * len(reusable)  # the caller reuses its buffer at once
        events.extend(server.events())
    assert events == cmds
