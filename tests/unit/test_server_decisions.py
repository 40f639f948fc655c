"""The server's own decisions, on a fake transport: no sockets, every byte checked.

A client codec decodes what the server writes, so a reply that breaks the
stream fails the test where it is made.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable

import pytest

from tests.helpers import FakeTransport, settle, unlink, urb
from usbipy.backends import Completion, FunctionDevice
from usbipy.protocol import (
    ClientConnection,
    CmdSubmit,
    Direction,
    IsoPacket,
    OpRepImport,
    OpReqImport,
    OpStatus,
    RetSubmit,
    RetUnlink,
    wire,
)
from usbipy.server import DeviceRegistry, UsbipServerProtocol
from usbipy.server import connection as server_connection


class Session:
    """A server protocol on a fake transport with a client codec reading its output."""

    def __init__(self, device: FunctionDevice) -> None:
        self.registry = DeviceRegistry()
        self.device = self.registry.add(device)
        self.transport = FakeTransport()
        self.protocol = UsbipServerProtocol(self.registry, max_transfer_length=1 << 20,
                                            connections=set())
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]
        self.client = ClientConnection()
        self.devid = device.info.devid

    async def import_device(self) -> None:
        self.protocol.data_received(self.client.send(OpReqImport(self.device.busid)))
        await settle()
        assert self.transport.reading, "reading resumes once the import is answered"
        [reply] = self.replies()
        assert isinstance(reply, OpRepImport) and reply.status == OpStatus.OK

    def send(self, *messages: CmdSubmit | object) -> None:
        """Everything in one chunk, as one recv would bring it."""
        data = b"".join(self.client.send(m) for m in messages)  # type: ignore[arg-type]
        self.protocol.data_received(data)

    def replies(self) -> list[object]:
        data = self.transport.take()
        if data:  # (b"" would be the end of the stream)
            self.client.receive_data(data)
        return list(self.client.events())


def session_test(handler: Callable[[CmdSubmit], object],
                 test: Callable[[Session], Awaitable[None]]) -> None:
    async def main() -> None:
        session = Session(FunctionDevice(handler))  # type: ignore[arg-type]
        await session.import_device()
        await test(session)

    asyncio.run(main())


def pending_handler(futures: list[asyncio.Future[Completion]]
                    ) -> Callable[[CmdSubmit], asyncio.Future[Completion]]:
    """A device that leaves every URB pending; the test completes them."""
    def handler(cmd: CmdSubmit) -> asyncio.Future[Completion]:
        futures.append(asyncio.get_running_loop().create_future())
        return futures[-1]

    return handler


def in_urb(session: Session, seqnum: int, length: int = 8, ep: int = 1) -> CmdSubmit:
    return urb(seqnum, ep, Direction.IN, length, devid=session.devid)


def test_unlink_of_a_urb_done_but_not_yet_answered_still_delivers_it() -> None:
    """The race: the future is done, its done-callback has not run, an UNLINK arrives."""
    futures: list[asyncio.Future[Completion]] = []
    handler = pending_handler(futures)

    async def test(s: Session) -> None:
        s.send(in_urb(s, 1))
        futures[0].set_result(Completion(data=b"late"))  # callback scheduled, not run
        s.send(unlink(2, 1, s.devid))
        await settle()
        # As usbip-host: the RET_SUBMIT (already queued there) first, then RET_UNLINK(0).
        assert s.replies() == [RetSubmit(1, 0, 4, b"late", 0, 0), RetUnlink(2, 0)]
        assert s.protocol.conn.in_flight == 0 and s.client.pending == 0

    session_test(handler, test)


def test_unlink_of_a_pending_urb_cancels_it_and_sends_no_ret_submit() -> None:
    futures: list[asyncio.Future[Completion]] = []
    handler = pending_handler(futures)

    async def test(s: Session) -> None:
        s.send(in_urb(s, 5), unlink(6, 5, s.devid), unlink(7, 2, s.devid))
        await settle()
        assert futures[0].cancelled()
        # a URB never seen, before the newest: answered (or never sent), so 0
        assert s.replies() == [RetUnlink(6, -errno.ECONNRESET), RetUnlink(7, 0)]
        assert s.protocol.conn.in_flight == 0 and s.client.pending == 0

    session_test(handler, test)


def test_an_unlink_before_its_urb_is_answered_when_the_urb_comes() -> None:
    """vhci_hcd can send an UNLINK before its URB's CMD_SUBMIT (vhci_tx.c): the
    answer waits for the URB, which is then cancelled unserved."""
    futures: list[asyncio.Future[Completion]] = []
    handler = pending_handler(futures)

    async def test(s: Session) -> None:
        s.send(in_urb(s, 1), unlink(3, 2, s.devid))
        await settle()
        assert s.replies() == []  # URB 2 has not come: the answer waits
        s.send(in_urb(s, 2), in_urb(s, 4))
        await settle()
        assert s.replies() == [RetUnlink(3, -errno.ECONNRESET)]
        assert len(futures) == 2  # URBs 1 and 4 reached the device, 2 did not
        assert s.protocol.conn.in_flight == 2

    session_test(handler, test)


def test_an_unlink_whose_urb_never_comes_is_answered_0() -> None:
    futures: list[asyncio.Future[Completion]] = []
    handler = pending_handler(futures)

    async def test(s: Session) -> None:
        # a later URB came first: URB 5 will never come (vhci_hcd sends in order)
        s.send(in_urb(s, 1), unlink(6, 5, s.devid), in_urb(s, 7))
        await settle()
        assert s.replies() == [RetUnlink(6, 0)]
        assert len(futures) == 2
        # nothing comes after: answered 0 once the hold is over
        s.send(unlink(9, 8, s.devid))
        await settle()
        assert s.replies() == []
        await asyncio.sleep(0.1)
        assert s.replies() == [RetUnlink(9, 0)]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_connection, "EARLY_UNLINK_HOLD", 0.05)
        session_test(handler, test)


@pytest.mark.parametrize(("completion", "status", "data"), [
    # more IN data than the URB's buffer: a babble
    (Completion(data=bytes(9)), -errno.EOVERFLOW, b""),
    # a header that would promise 5 bytes with 2 on the wire
    (Completion(data=b"ab", actual_length=5), -errno.EPROTO, b""),
    (Completion(data=b"ab", actual_length=2), 0, b"ab"),
    (Completion(status=-errno.EPIPE), -errno.EPIPE, b""),
])
def test_in_replies_are_self_consistent(completion: Completion, status: int,
                                        data: bytes) -> None:
    async def test(s: Session) -> None:
        s.send(in_urb(s, 1), in_urb(s, 2))
        await settle()
        first, second = s.replies()  # the stream is intact after whatever the device did
        assert isinstance(first, RetSubmit) and isinstance(second, RetSubmit)
        assert (first.status, first.data, first.actual_length) == (status, data, len(data))
        assert second.seqnum == 2

    session_test(lambda cmd: completion, test)


def test_out_actual_length_beyond_the_buffer_is_eproto() -> None:
    async def test(s: Session) -> None:
        s.send(urb(1, 2, Direction.OUT, data=b"abcd", devid=s.devid))
        await settle()
        [reply] = s.replies()
        assert isinstance(reply, RetSubmit) and reply.status == -errno.EPROTO
        assert reply.actual_length == 0

    session_test(lambda cmd: Completion(actual_length=10), test)


def test_a_device_that_raises_answers_eproto_and_keeps_the_connection() -> None:
    def handler(cmd: CmdSubmit) -> Completion:
        if cmd.seqnum == 1:
            raise RuntimeError("device bug")
        return Completion(data=b"ok")

    async def test(s: Session) -> None:
        s.send(in_urb(s, 1), in_urb(s, 2))
        await settle()
        assert [(r.seqnum, r.status) for r in s.replies()] == [  # type: ignore[attr-defined]
            (1, -errno.EPROTO), (2, 0)]
        assert not s.transport.closed

    session_test(handler, test)


def test_an_awaitable_that_fails_answers_eproto() -> None:
    async def broken() -> Completion:
        raise OSError("gone")

    async def test(s: Session) -> None:
        s.send(in_urb(s, 1))
        await settle()
        [reply] = s.replies()
        assert isinstance(reply, RetSubmit) and reply.status == -errno.EPROTO

    session_test(lambda cmd: broken(), test)


def test_a_duplicate_seqnum_closes_the_connection() -> None:
    def handler(cmd: CmdSubmit) -> asyncio.Future[Completion]:
        return asyncio.get_running_loop().create_future()

    async def test(s: Session) -> None:
        wire = s.client.send(in_urb(s, 7))
        s.protocol.data_received(wire + wire)  # the same seqnum twice, the first pending
        assert s.transport.aborted

    session_test(handler, test)


def test_in_above_the_cap_is_enomem_without_reaching_the_device() -> None:
    async def test(s: Session) -> None:
        s.send(in_urb(s, 1, length=(1 << 20) + 1))
        await settle()
        [reply] = s.replies()
        assert isinstance(reply, RetSubmit) and reply.status == -errno.ENOMEM
        assert s.device.urbs == []  # type: ignore[attr-defined]

    session_test(lambda cmd: Completion(), test)


def test_reading_pauses_at_the_in_flight_limit_and_resumes(monkeypatch) -> None:
    monkeypatch.setattr(server_connection, "MAX_IN_FLIGHT", 4)
    futures: list[asyncio.Future[Completion]] = []
    handler = pending_handler(futures)

    async def test(s: Session) -> None:
        s.send(*(in_urb(s, n) for n in range(1, 5)))
        assert not s.transport.reading
        futures[0].set_result(Completion(data=b"x"))
        await settle()
        assert not s.transport.reading  # 3 in flight: not below half the limit yet
        for future in futures[1:3]:
            future.set_result(Completion(data=b"x"))
        await settle()
        assert s.transport.reading  # 1 in flight
        assert len(s.replies()) == 3

    session_test(handler, test)


def test_iso_replies_carry_the_urbs_packets() -> None:
    packets = [IsoPacket(0, 8), IsoPacket(8, 8), IsoPacket(16, 8)]

    def handler(cmd: CmdSubmit) -> Completion:
        if cmd.seqnum == 1:  # good: IN data packed, 3 + 0 + 8 bytes
            out = [IsoPacket(0, 8, 3, 0), IsoPacket(8, 8, 0, -errno.EXDEV),
                   IsoPacket(16, 8, 8, 0)]
            return Completion(data=b"abc" + b"12345678", iso_packets=out, error_count=1)
        # bad: two packets for a three-packet URB
        return Completion(data=b"", iso_packets=packets[:2])

    async def test(s: Session) -> None:
        s.send(urb(1, 3, Direction.IN, 24, devid=s.devid, iso=packets),
               urb(2, 3, Direction.IN, 24, devid=s.devid, iso=packets))
        await settle()
        good, bad = s.replies()
        assert isinstance(good, RetSubmit) and isinstance(bad, RetSubmit)
        assert good.actual_length == 11 and good.data == b"abc12345678"
        assert good.iso_packets is not None
        assert [p.actual_length for p in good.iso_packets] == [3, 0, 8]
        assert good.error_count == 1
        assert bad.status == -errno.EPROTO and bad.iso_packets is not None
        assert [p.status for p in bad.iso_packets] == [-errno.EPROTO] * 3

    session_test(handler, test)


def test_a_non_iso_reply_echoes_number_of_packets() -> None:
    async def test(s: Session) -> None:
        cmd = in_urb(s, 1)
        cmd.number_of_packets = 0xFFFFFFFF  # as the protocol document asks of a client
        s.send(cmd)
        await settle()
        [reply] = s.replies()
        assert isinstance(reply, RetSubmit) and reply.number_of_packets == 0xFFFFFFFF

    session_test(lambda cmd: Completion(data=b"x"), test)


def test_a_peer_busid_is_escaped_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        session = Session(FunctionDevice(lambda cmd: Completion()))
        forged = "9-9\nusbipy: INFO: \x1b[31mX"
        session.protocol.data_received(session.client.send(OpReqImport(forged)))
        await settle()

    with caplog.at_level(logging.INFO, logger="usbipy.server"):
        asyncio.run(main())
    text = caplog.text
    assert "refused" in text and "9-9\\nusbipy: INFO" in text
    assert "\x1b" not in text and text.count("\n") == len(caplog.records)


def test_a_client_that_leaves_during_a_slow_attach_leaves_nothing_held() -> None:
    class SlowAttach(FunctionDevice):
        async def attach(self) -> None:
            await asyncio.sleep(0.05)  # as a libusb open in a worker thread
            await super().attach()

    async def main() -> None:
        device = SlowAttach(lambda cmd: Completion())
        session = Session(device)
        session.protocol.data_received(session.client.send(OpReqImport(device.busid)))
        await settle()
        session.protocol.connection_lost(None)  # gone before the reply
        await asyncio.wait_for(session.protocol.finished, 5)
        assert (device.attached, device.detached) == (1, 1)
        assert session.registry.owner(device.busid) is None

    asyncio.run(main())


def test_a_seqnum_reused_after_its_unlink_gets_its_own_reply() -> None:
    futures: list[asyncio.Future[Completion]] = []
    handler = pending_handler(futures)

    async def test(s: Session) -> None:
        s.send(in_urb(s, 5))
        # one segment: cancel URB 5, then a new URB that reuses seqnum 5
        s.protocol.data_received(s.client.send(unlink(6, 5, s.devid))
                                 + wire.encode_cmd_submit(in_urb(s, 5)))
        await settle()  # the cancelled future's callback runs: it must not answer the new 5
        assert s.replies() == [RetUnlink(6, -errno.ECONNRESET)]
        s.client.send(in_urb(s, 5))  # (the client codec learns of the new 5 only now)
        futures[1].set_result(Completion(data=b"new"))
        await settle()
        assert s.replies() == [RetSubmit(5, 0, 3, b"new", 0, 0)]

    session_test(handler, test)


@pytest.mark.parametrize("completion", [
    Completion(status=-(1 << 40)),
    Completion(data=b"x", start_frame=1 << 33),
    Completion(data=b"x", error_count=-(1 << 35)),
])
def test_fields_that_do_not_fit_are_eproto_not_a_lost_urb(completion: Completion) -> None:
    async def test(s: Session) -> None:
        s.send(in_urb(s, 1), in_urb(s, 2))
        await settle()
        first, second = s.replies()
        assert isinstance(first, RetSubmit) and first.status == -errno.EPROTO
        assert isinstance(second, RetSubmit) and second.seqnum == 2

    session_test(lambda cmd: completion if cmd.seqnum == 1 else Completion(), test)


def test_an_iso_packet_at_a_negative_offset_is_eproto() -> None:
    packets = [IsoPacket(0, 8)]

    async def test(s: Session) -> None:
        s.send(urb(1, 3, Direction.IN, 8, devid=s.devid, iso=packets))
        await settle()
        [reply] = s.replies()
        assert isinstance(reply, RetSubmit) and reply.status == -errno.EPROTO

    session_test(lambda cmd: Completion(data=b"abc", iso_packets=[IsoPacket(-4, 8, 3, 0)]),
                 test)


def test_reading_pauses_when_pending_out_data_piles_up(monkeypatch) -> None:
    monkeypatch.setattr(server_connection, "MAX_PENDING_OUT_BYTES", 1000)
    futures: list[asyncio.Future[Completion]] = []
    handler = pending_handler(futures)

    async def test(s: Session) -> None:
        # a device that keeps OUT data and completes the URBs later (a serial port
        # whose reader is slow): 3 x 400 bytes held is above the budget
        s.send(*(urb(n, 2, Direction.OUT, data=bytes(400), devid=s.devid) for n in (1, 2, 3)))
        assert not s.transport.reading
        futures[0].set_result(Completion())
        futures[1].set_result(Completion())
        await settle()
        assert s.transport.reading  # 400 bytes held: below half the budget
        assert len(s.replies()) == 2

    session_test(handler, test)


def test_a_close_that_cannot_flush_is_cut_after_a_while(monkeypatch) -> None:
    # A client that never reads its last replies must not hold the socket for ever
    # (it no longer counts against any limit once the server closed it).
    monkeypatch.setattr(server_connection, "CLOSE_TIMEOUT", 0.05)

    async def main() -> None:
        session = Session(FunctionDevice(lambda cmd: Completion()))
        session.transport.unflushed = 1 << 20
        session.protocol.data_received(session.client.send(OpReqImport("9-9")))
        await settle()
        assert session.transport.closed and not session.transport.aborted
        await asyncio.sleep(0.2)
        assert session.transport.aborted

    asyncio.run(main())


def test_each_held_unlink_waits_its_own_time() -> None:
    """A hold that ended (its URB came) leaves no timer to cut the next one short."""
    futures: list[asyncio.Future[Completion]] = []
    handler = pending_handler(futures)

    async def test(s: Session) -> None:
        s.send(in_urb(s, 1), unlink(3, 2, s.devid))
        await asyncio.sleep(0.05)
        s.send(in_urb(s, 2))  # its URB comes: cancelled unserved
        await settle()
        assert s.replies() == [RetUnlink(3, -errno.ECONNRESET)]
        await asyncio.sleep(0.1)  # the first hold would end at 0.2 s
        s.send(unlink(5, 4, s.devid))
        await asyncio.sleep(0.1)
        assert s.replies() == []  # held 0.1 s of its own 0.2
        await asyncio.sleep(0.2)
        assert s.replies() == [RetUnlink(5, 0)]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_connection, "EARLY_UNLINK_HOLD", 0.2)
        session_test(handler, test)
