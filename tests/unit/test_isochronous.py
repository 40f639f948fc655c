"""Isochronous URBs: the RET_SUBMIT layout of their packets, and their schedule on
an emulated device's bus (usbipy.backends.isochronous)."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest

from tests.helpers import DEVID, imported_pair, urb
from usbipy.backends.base import Completion
from usbipy.backends.isochronous import (
    BusClock,
    IsoSchedule,
    in_completion,
    out_completion,
    out_packets,
)
from usbipy.client.transfers import iso_results
from usbipy.devices.audio import UsbAudio
from usbipy.devices.sound import Tone
from usbipy.protocol import CmdSubmit, Direction, IsoPacket, RetSubmit, Speed
from usbipy.protocol.constants import EFBIG, EMSGSIZE, EXDEV
from usbipy.usb.descriptors import Endpoint, TransferType
from usbipy.usb.urb import UrbFlag

ISO = TransferType.ISOCHRONOUS


def iso_urb(seqnum: int, lengths: list[int], direction: Direction = Direction.IN,
            ep: int = 2, data: bytes = b"") -> CmdSubmit:
    packets, offset = [], 0
    for length in lengths:
        packets.append(IsoPacket(offset, length))
        offset += length
    return urb(seqnum, ep, direction, offset, data=data, iso=packets,
               flags=UrbFlag.ISO_ASAP)


# --- the wire ---------------------------------------------------------------------


def test_ret_submit_packs_iso_in_data_and_describes_every_packet() -> None:
    client, server = imported_pair()
    sent = iso_urb(7, [100, 100, 100, 100])
    server.receive_data(client.send_submit(7, DEVID, Direction.IN, 2, sent.transfer_flags, 400,
                                           iso_packets=sent.iso_packets))
    received = server.next_event()
    assert isinstance(received, CmdSubmit)
    # a full packet, a short one, a missed one (-EXDEV), an empty one
    sent_reply = server.reply_submit(
        received, 0, b"a" * 100 + b"b" * 40, start_frame=77, error_count=1,
        iso_packets=[IsoPacket(0, 100, 100, 0), IsoPacket(100, 100, 40, 0),
                     IsoPacket(200, 100, 0, EXDEV), IsoPacket(300, 100, 0, 0)])
    header, body = sent_reply.header, sent_reply.data + sent_reply.iso_descriptors
    # what the reply says is what its bytes say
    assert (sent_reply.status, sent_reply.actual_length, sent_reply.start_frame,
            sent_reply.error_count, sent_reply.fault) == (0, 140, 77, 1, None)
    assert sent_reply.iso_packets == [IsoPacket(0, 100, 100, 0), IsoPacket(100, 100, 40, 0),
                                      IsoPacket(200, 100, 0, EXDEV), IsoPacket(300, 100, 0, 0)]
    # usbip_header_ret_submit: status, actual_length, start_frame, number_of_packets,
    # error_count, all network byte order (usbip_common.h)
    assert struct.unpack("!IIIIIiiiii8x", header) == (3, 7, 0, 0, 0, 0, 140, 77, 4, 1)
    # the data packed (only the actual bytes, stub_tx.c), then the descriptors
    assert body[:140] == b"a" * 100 + b"b" * 40
    assert [struct.unpack_from("!IIIi", body, 140 + 16 * i) for i in range(4)] == [
        (0, 100, 100, 0), (100, 100, 40, 0), (200, 100, 0, EXDEV), (300, 100, 0, 0)]
    assert len(body) == 140 + 4 * 16
    # and the client cuts each packet's data back out
    client.receive_data(header + body)
    reply = client.next_event()
    assert isinstance(reply, RetSubmit)
    assert (reply.start_frame, reply.error_count) == (77, 1)
    results = iso_results(reply, sent.iso_packets or [], Direction.IN)
    assert [(r.status, r.data) for r in results] == [
        (0, b"a" * 100), (0, b"b" * 40), (EXDEV, b""), (0, b"")]


def test_an_iso_reply_that_does_not_match_its_urb_fails_every_packet() -> None:
    client, server = imported_pair()
    sent = iso_urb(8, [10, 10])
    server.receive_data(client.send_submit(8, DEVID, Direction.IN, 2, 0, 20,
                                           iso_packets=sent.iso_packets))
    received = server.next_event()
    assert isinstance(received, CmdSubmit)
    # one packet claims more than the data there is
    reply = server.reply_submit(received, 0, b"x" * 5,
                                iso_packets=[IsoPacket(0, 10, 10), IsoPacket(10, 10, 0)])
    assert reply.fault is not None and "add up" in reply.fault
    header, body = reply.header, reply.data + reply.iso_descriptors
    assert reply.status == -71
    assert reply.iso_packets == [IsoPacket(0, 10, 0, -71), IsoPacket(10, 10, 0, -71)]
    assert struct.unpack("!IIIIIiiiii8x", header)[5:] == (-71, 0, 0, 2, 2)
    assert [struct.unpack_from("!IIIi", body, 16 * i)[3] for i in range(2)] == [-71, -71]


# --- the schedule --------------------------------------------------------------------


def test_urbs_follow_each_other_on_the_bus_and_restart_after_idling() -> None:
    clock = BusClock(Speed.FULL)
    schedule = IsoSchedule(clock, Endpoint(0x82, ISO, 98, 1))
    first = schedule.place(iso_urb(1, [98] * 8))
    second = schedule.place(iso_urb(2, [98] * 8))
    assert first.frames == list(range(first.start_frame, first.start_frame + 8))
    assert second.start_frame == first.start_frame + 8  # right after, as queued
    assert second.due - first.due == pytest.approx(8 * clock.period)
    # the endpoint went idle (its URBs' frames passed): the next starts at the next frame
    clock.origin -= 1.0
    before = clock.frame()
    third = schedule.place(iso_urb(3, [98] * 8))
    # (the bus clock is real time: a frame may begin between the two readings)
    assert before + 1 <= third.start_frame <= clock.frame() + 1
    assert third.start_frame > second.start_frame + 8


def test_a_high_speed_interval_spaces_packets_in_microframes() -> None:
    clock = BusClock(Speed.HIGH)
    assert clock.period == 125e-6
    # bInterval 4: every 2**3 microframes (USB 2.0 9.6.6)
    window = IsoSchedule(clock, Endpoint(0x81, ISO, 1024, 4)).place(iso_urb(1, [64] * 3))
    assert [f - window.start_frame for f in window.frames] == [0, 8, 16]


def test_a_packet_above_the_endpoint_size_refuses_the_urb() -> None:
    # 2 x 1024 a microframe at most (wMaxPacketSize bits 12..11 = 1)
    schedule = IsoSchedule(BusClock(Speed.HIGH), Endpoint(0x81, ISO, 0x0C00, 1))
    assert schedule.max_packet == 2048
    assert schedule.place(iso_urb(1, [2048, 2048])).status == 0
    assert schedule.place(iso_urb(2, [2048, 2049])).status == EMSGSIZE


def test_completions_carry_the_packets_as_laid_out() -> None:
    schedule = IsoSchedule(BusClock(Speed.FULL), Endpoint(0x82, ISO, 98, 1))
    sent = iso_urb(1, [98, 98, 98])
    window = schedule.place(sent)
    # payloads longer than their packet are cut; short and empty ones stay so
    done = in_completion(sent, window, [b"x" * 120, b"y" * 10, b""])
    assert done.data == b"x" * 98 + b"y" * 10
    assert [(p.offset, p.length, p.actual_length, p.status) for p in done.iso_packets or []] \
        == [(0, 98, 98, 0), (98, 98, 10, 0), (196, 98, 0, 0)]
    assert done.start_frame == window.start_frame
    out = iso_urb(2, [4, 0, 6], Direction.OUT, ep=1, data=b"abcd" + b"efghij")
    out_window = schedule.place(out)
    assert out_packets(out) == [b"abcd", b"", b"efghij"]
    assert [p.actual_length for p in out_completion(out, out_window).iso_packets or []] \
        == [4, 0, 6]


def test_overdue_urbs_complete_in_the_order_they_were_placed() -> None:
    """A URB whose time has passed by the time it is served must not overtake one
    queued before it: the host would get the stream out of order."""

    async def main() -> list[int]:
        tone = Tone(441.0)
        device = UsbAudio(tone)
        for setup in (bytes((0, 9, 1, 0, 0, 0, 0, 0)),          # SET_CONFIGURATION 1
                      bytes((1, 11, 1, 0, 2, 0, 0, 0))):        # SET_INTERFACE 2, alt 1
            result = device.submit(urb(90, 0, Direction.OUT, setup=setup))
            assert isinstance(result, Completion) and result.status == 0
        order: list[int] = []
        data: dict[int, bytes] = {}

        def track(seqnum: int, future: asyncio.Future[Completion]) -> None:
            order.append(seqnum)
            data[seqnum] = future.result().data

        first = asyncio.ensure_future(device.submit(iso_urb(1, [98])))  # type: ignore[arg-type]
        first.add_done_callback(lambda f: track(1, f))
        await asyncio.sleep(0)  # the first is waiting for its frame
        second = asyncio.ensure_future(device.submit(iso_urb(2, [98])))  # type: ignore[arg-type]
        second.add_done_callback(lambda f: track(2, f))
        time.sleep(0.02)  # noqa: ASYNC251 (the loop runs late: both are overdue when it wakes)
        await asyncio.gather(first, second)
        assert data[1] + data[2] == tone.samples(0, 96, 48000)
        return order

    assert asyncio.run(main()) == [1, 2]


def test_an_unlinked_urb_takes_no_samples() -> None:
    async def main() -> None:
        tone = Tone(441.0)
        device = UsbAudio(tone)
        for setup in (bytes((0, 9, 1, 0, 0, 0, 0, 0)), bytes((1, 11, 1, 0, 2, 0, 0, 0))):
            device.submit(urb(90, 0, Direction.OUT, setup=setup))
        cancelled = device.submit(iso_urb(1, [98] * 4))
        kept = device.submit(iso_urb(2, [98] * 4))
        assert isinstance(cancelled, asyncio.Future) and isinstance(kept, asyncio.Future)
        cancelled.cancel()  # what the server does on USBIP_CMD_UNLINK
        done = await kept
        # the samples go to the URB that completed, from where the tone was
        assert done.data == tone.samples(0, 4 * 48, 48000)
        assert device.frames_recorded == 4 * 48

    asyncio.run(main())



def test_start_frame_stays_in_its_signed_field_after_days() -> None:
    """RET_SUBMIT's start_frame is a signed 32-bit field: at high speed a count
    of microframes passes 2**31 after 74.6 hours of uptime."""
    clock = BusClock(Speed.HIGH)
    clock.origin -= 75 * 3600
    sent = iso_urb(1, [64])
    window = IsoSchedule(clock, Endpoint(0x81, ISO, 1024, 1)).place(sent)
    assert 0 <= window.start_frame < 2**31
    client, server = imported_pair()
    server.receive_data(client.send_submit(1, DEVID, Direction.IN, 1, 0, 64,
                                           iso_packets=sent.iso_packets))
    received = server.next_event()
    assert isinstance(received, CmdSubmit)
    done = in_completion(received, window, [b"x" * 64])
    reply = server.reply_submit(received, done.status, done.data,
                                start_frame=done.start_frame, iso_packets=done.iso_packets)
    assert reply.fault is None
    header = reply.header
    assert struct.unpack("!IIIIIiiiii8x", header)[5:8] == (0, 64, window.start_frame)


def test_a_urb_far_ahead_is_refused_and_unlinked_urbs_do_not_hold_the_bus() -> None:
    async def main() -> None:
        schedule = IsoSchedule(BusClock(Speed.FULL), Endpoint(0x82, ISO, 98, 1))
        # a client that queues and unlinks again and again: the schedule does not
        # run ahead, and its queue does not grow
        for i in range(500):
            window = schedule.place(iso_urb(i, [98] * 1024))
            assert window.status == 0
            schedule.complete(window, lambda: Completion()).cancel()
            await asyncio.sleep(0)  # (the done-callbacks run)
        assert len(schedule._pending) <= 64
        live = schedule.place(iso_urb(600, [98]))
        assert live.due - time.monotonic() < 0.1  # not 500 seconds away
        await asyncio.wait_for(schedule.complete(live, lambda: Completion()), 5)
        # nothing starts more than a second ahead (as ehci-sched.c refuses it)
        windows = [schedule.place(iso_urb(700 + i, [98] * 400)) for i in range(4)]
        assert [w.status for w in windows] == [0, 0, 0, EFBIG]

    asyncio.run(main())


def test_a_whole_iso_urb_refused_reaches_the_client_with_its_status(serve) -> None:
    from usbipy.client import import_device
    from usbipy.client.errors import UrbError

    async def test(server) -> None:
        dev = await import_device("127.0.0.1", "1-1", server.port)
        await dev.control(0x00, 9, 1, 0, b"")
        await dev.control(0x01, 11, 1, 2, b"")
        # a packet above wMaxPacketSize (98): usb_submit_urb() says -EMSGSIZE, and so
        # does the reply (not -EPROTO for a device bug)
        try:
            await dev.iso_read(0x82, [200])
        except UrbError as exc:
            assert exc.errno_name == "EMSGSIZE"
        else:
            raise AssertionError("a 200-byte packet was accepted")
        # another alternate setting: a URB still queued ends -ESHUTDOWN
        pending = asyncio.ensure_future(dev.iso_read(0x82, [98] * 200))
        await asyncio.sleep(0.05)
        await dev.control(0x01, 11, 0, 2, b"")
        try:
            await asyncio.wait_for(pending, 5)
        except UrbError as exc:
            assert exc.errno_name == "ESHUTDOWN"
        else:
            raise AssertionError("the flushed URB completed")
        await dev.close()

    serve(test, [UsbAudio()])


def test_a_urb_after_every_queued_one_was_unlinked_is_not_held_back() -> None:
    async def main() -> None:
        schedule = IsoSchedule(BusClock(Speed.FULL), Endpoint(0x82, ISO, 98, 1))
        far = schedule.place(iso_urb(1, [98] * 1000))  # a second of packets
        schedule.complete(far, lambda: Completion()).cancel()
        await asyncio.sleep(0)
        near = schedule.place(iso_urb(2, [98] * 2))
        started = time.monotonic()
        await asyncio.wait_for(schedule.complete(near, lambda: Completion()), 5)
        # done in milliseconds; not a second on, the unlinked URB's time (a busy
        # machine's timers may run late, hence the room)
        assert time.monotonic() - started < 0.8
        assert schedule.idle_frames == 0

    asyncio.run(main())


def test_an_iso_answer_to_a_non_iso_urb_is_a_fault_and_not_iso() -> None:
    """What capture and metrics read of the reply is what the client gets: a non-iso
    URB's reply carries no iso packets, even when the device answered with some."""
    client, server = imported_pair()
    server.receive_data(client.send_submit(9, DEVID, Direction.IN, 1, 0, 8))
    received = server.next_event()
    assert isinstance(received, CmdSubmit)
    reply = server.reply_submit(received, 0, b"x" * 8, iso_packets=[IsoPacket(0, 8, 8)])
    assert reply.fault is not None and reply.status == -71
    assert reply.iso_packets is None and reply.iso_descriptors == b""
