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
from usbipy.client.userspace import _iso_results
from usbipy.devices.audio import UsbAudio
from usbipy.devices.sound import Tone
from usbipy.protocol import CmdSubmit, Direction, IsoPacket, RetSubmit, Speed
from usbipy.protocol.constants import EMSGSIZE, EXDEV
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
    header, body = server.reply_submit(
        received, 0, b"a" * 100 + b"b" * 40, start_frame=77, error_count=1,
        iso_packets=[IsoPacket(0, 100, 100, 0), IsoPacket(100, 100, 40, 0),
                     IsoPacket(200, 100, 0, EXDEV), IsoPacket(300, 100, 0, 0)])
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
    results = _iso_results(reply, sent.iso_packets or [], Direction.IN)
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
    header, body = server.reply_submit(received, 0, b"x" * 5,
                                       iso_packets=[IsoPacket(0, 10, 10), IsoPacket(10, 10, 0)])
    assert server.fault is not None and "add up" in server.fault
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
    third = schedule.place(iso_urb(3, [98] * 8))
    assert third.start_frame == clock.frame() + 1 > second.start_frame + 8


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

