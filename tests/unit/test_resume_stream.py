"""The resumable stream (usbipy.protocol.resume) and its negotiation in the codec:
bytes survive a cut, a resend, a duplicate and a stale ACK; a gap, an
impossible count or an unknown frame is refused, never delivered."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usbipy.protocol import (
    ClientConnection,
    DeviceInfo,
    OpCode,
    OpRepImport,
    OpReqImport,
    OpStatus,
    Phase,
    ServerConnection,
    Speed,
    UnexpectedMessage,
    wire,
)
from usbipy.protocol.errors import BadFrame
from usbipy.protocol.messages import OpRepResume, OpReqResume, ResumeGrant
from usbipy.protocol.resume import ACK, ACK_EVERY, DATA, FIN, FRAME, MAX_FRAME, ResumableStream


def joined(pieces: list[memoryview] | list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in pieces)


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=3000), max_size=20),
       st.integers(min_value=1, max_value=5000))
def test_payload_arrives_whole_whatever_the_reads(pieces: list[bytes], read: int) -> None:
    a, b = ResumableStream(), ResumableStream()
    wire_bytes = joined(a.send(pieces))
    got = b"".join(joined(b.receive(c)) for c in chunks(wire_bytes, read))
    assert got == b"".join(pieces)
    assert b.received == a.sent == len(got)


def test_a_large_write_is_split_into_frames_of_at_most_a_mib() -> None:
    a, b = ResumableStream(), ResumableStream()
    data = bytes(range(256)) * ((3 * MAX_FRAME) // 256 + 7)
    out = a.send([data[:10], data[10:]])
    headers = [FRAME.unpack(bytes(p)) for p in out if len(p) == FRAME.size]
    assert [h[0] for h in headers] == [DATA] * 4
    assert all(h[1] <= MAX_FRAME for h in headers)
    assert joined(b.receive(joined(out))) == data


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=20000), st.integers(min_value=0, max_value=20000),
       st.integers(min_value=0, max_value=20000))
def test_bytes_lost_at_a_cut_are_sent_again(data: bytes, cut: int, acked: int) -> None:
    """The connection breaks after ``cut`` bytes of frames; the receiver had acked
    some of what came. The new connection carries exactly the rest."""
    a, b = ResumableStream(), ResumableStream()
    frames = joined(a.send(chunks(data, 1500)))
    cut = min(cut, len(frames))
    got = joined(b.receive(frames[:cut]))
    if acked % 2:
        a.receive(b.ack())  # an ACK that made it before the cut
    b.restart()
    a.restart()
    got += joined(b.receive(joined(a.resend_from(b.received))))
    assert got == data
    assert b.received == len(data)


def test_a_resent_frame_that_overlaps_gives_each_byte_once() -> None:
    """Duplication: the sender resends from an older count than the receiver has
    (an ACK lost in the cut); the bytes it already has are dropped."""
    a, b = ResumableStream(), ResumableStream()
    data = bytes(range(200)) * 50
    got = joined(b.receive(joined(a.send(chunks(data, 999)))))
    assert got == data
    # the receiver got everything, the sender heard nothing: all of it again
    resent = joined(a.resend_from(0))
    assert resent
    b.restart()
    assert joined(b.receive(resent)) == b""
    more = joined(a.send([b"after"]))
    assert joined(b.receive(more)) == b"after"


def test_a_gap_is_refused_not_delivered() -> None:
    """Reordering: a frame that starts past what came means bytes were lost."""
    a, b = ResumableStream(), ResumableStream()
    first = joined(a.send([b"x" * 100]))
    second = joined(a.send([b"y" * 100]))
    with pytest.raises(BadFrame, match="100 bytes were lost"):
        b.receive(second)
    assert b.received == 0
    b2 = ResumableStream()
    assert joined(b2.receive(second[:0] + first)) == b"x" * 100


def test_a_stale_ack_after_a_newer_one_changes_nothing() -> None:
    a, b = ResumableStream(), ResumableStream()
    b.receive(joined(a.send([b"x" * 1000])))
    early = FRAME.pack(ACK, 0, 400)
    a.receive(b.ack())
    assert a.unacked == 0
    a.receive(early)  # (resent, or from the old connection)
    assert a.acked == 1000


def test_acks_free_the_senders_buffer() -> None:
    a, b = ResumableStream(), ResumableStream()
    b.receive(joined(a.send([b"z" * (ACK_EVERY - 1)])))
    assert a.unacked == ACK_EVERY - 1 and b.ack_pending and not b.ack_due
    b.receive(joined(a.send([b"z"])))
    assert b.ack_due
    a.receive(b.ack())
    assert a.unacked == 0 and not b.ack_pending


@pytest.mark.parametrize(("peer_has", "error"), [
    (5000, "only 1000 were sent"),
    (100, "acknowledged 500 before"),
])
def test_an_impossible_resume_point_is_refused(peer_has: int, error: str) -> None:
    a = ResumableStream()
    a.send([b"q" * 1000])
    a.receive(FRAME.pack(ACK, 0, 500))
    with pytest.raises(BadFrame, match=error):
        a.resend_from(peer_has)


@pytest.mark.parametrize(("frame", "error"), [
    (FRAME.pack(0x51, 0, 0), "unknown frame kind 0x51"),
    (FRAME.pack(DATA, MAX_FRAME + 1, 0), "DATA frame of 1048577 bytes"),
    (FRAME.pack(DATA, 0, 0), "DATA frame of 0 bytes"),
    (FRAME.pack(ACK, 4, 0), "ACK frame with 4 bytes"),
    (FRAME.pack(ACK, 0, 1), "an ACK of 1 bytes, but only 0 were sent"),
    (FRAME.pack(FIN, 0, 7), "FIN after 7 bytes, but 0 came"),
])
def test_a_frame_that_cannot_be_is_refused(frame: bytes, error: str) -> None:
    with pytest.raises(BadFrame, match=error):
        ResumableStream().receive(frame)


def test_fin_ends_the_stream() -> None:
    a, b = ResumableStream(), ResumableStream()
    b.receive(joined(a.send([b"bye"])) + a.fin())
    assert b.finished
    with pytest.raises(BadFrame, match="after FIN"):
        b.receive(joined(a.send([b"more"])))


# --- the negotiation, inside the standard messages --------------------------------

DEVICE = DeviceInfo("/sys/devices/usbipy/1-1", "1-1", 1, 2, Speed.HIGH, 0x1D6B, 0x0104,
                    0x0100, 0, 0, 0, 1, 1, 1)


def test_the_offer_hides_after_the_busids_nul() -> None:
    """usbipd compares with strncmp and usbipd-win reads up to the NUL: both see
    "1-1"; usbipyd sees the offer."""
    request = ClientConnection().send(OpReqImport("1-1", resume=True))
    field = request[wire.OP_HEADER.size:]
    assert len(request) == 40 and field.split(b"\0", 1)[0] == b"1-1"
    assert field[24:] == b"usbipyR1"
    server = ServerConnection()
    server.receive_data(request)
    assert server.next_event() == OpReqImport("1-1", resume=True)
    plain = ServerConnection()
    plain.receive_data(ClientConnection().send(OpReqImport("1-1")))
    assert plain.next_event() == OpReqImport("1-1", resume=False)


def test_a_grant_rides_in_the_path_field_and_a_plain_reply_has_none() -> None:
    token = bytes(range(16))
    server = ServerConnection()
    server.receive_data(ClientConnection().send(OpReqImport("1-1", resume=True)))
    server.next_event()
    reply = server.send(OpRepImport(OpStatus.OK, DEVICE, ResumeGrant(token, 60)))
    assert len(reply) == wire.OP_REP_IMPORT_OK_SIZE
    path = reply[8:8 + 256]
    assert path.split(b"\0", 1)[0] == DEVICE.path.encode()
    client = ClientConnection()
    client.send(OpReqImport("1-1", resume=True))
    client.receive_data(reply)
    event = client.next_event()
    assert isinstance(event, OpRepImport)
    assert event.resume == ResumeGrant(token, 60) and event.device == DEVICE
    plain = ClientConnection()
    plain.send(OpReqImport("1-1", resume=True))
    plain.receive_data(wire.encode_op_rep_import(OpStatus.OK, DEVICE))
    assert plain.next_event() == OpRepImport(OpStatus.OK, DEVICE, None)


def test_resume_request_and_reply_walk_the_state_machine() -> None:
    client, server = ClientConnection(), ServerConnection()
    token = b"\x07" * 16
    server.receive_data(client.send(OpReqResume(token, 123456789012)))
    assert server.next_event() == OpReqResume(token, 123456789012)
    assert server.phase is Phase.RESUME
    client.receive_data(server.send(OpRepResume(OpStatus.OK, 42)))
    assert client.next_event() == OpRepResume(OpStatus.OK, 42)
    assert (client.phase, server.phase) == (Phase.RESUMED, Phase.RESUMED)
    refused_c, refused_s = ClientConnection(), ServerConnection()
    refused_s.receive_data(refused_c.send(OpReqResume(token, 0)))
    refused_s.next_event()
    refused_c.receive_data(refused_s.send(OpRepResume(OpStatus.NODEV)))
    assert refused_c.next_event() == OpRepResume(OpStatus.NODEV, 0)
    assert refused_c.phase is Phase.CLOSED


def test_a_resume_reply_out_of_turn_is_refused() -> None:
    client = ClientConnection()
    client.send(OpReqImport("1-1"))
    client.receive_data(wire.encode_op_rep_resume(OpStatus.OK, 0))
    with pytest.raises(UnexpectedMessage, match="OP_REP_RESUME"):
        client.next_event()
    assert int(OpCode.REQ_RESUME) == 0x80F1


def test_a_bad_frame_breaks_the_stream_for_good_and_delivers_nothing_of_its_read() -> None:
    """What came in the same read as a bad frame is not delivered, nor counted: a
    resume from that count would skip it."""
    a, b = ResumableStream(), ResumableStream()
    good = joined(a.send([b"A" * 100]))
    with pytest.raises(BadFrame, match="unknown frame kind 0x58"):
        b.receive(good + FRAME.pack(0x58, 0, 0))
    assert b.received == 0
    with pytest.raises(BadFrame, match="unknown frame kind 0x58"):
        b.receive(joined(a.send([b"more"])))


def test_an_empty_piece_is_never_a_frame_of_its_own_not_even_resent() -> None:
    a, b = ResumableStream(), ResumableStream()
    sent = joined(a.send([b"head", b"", b"tail"]))
    assert joined(b.receive(sent)) == b"headtail"
    c = ResumableStream()
    assert joined(c.receive(joined(a.resend_from(0)))) == b"headtail"
