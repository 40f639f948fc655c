"""Guest-side checks that speak USB/IP with usbipy's userspace client.

Run in the guest as ``python -m tests.kernel.libusb_client CHECK BUSID``; prints
one JSON line for the test on the host to assert on.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from usbipy.client import import_device, list_devices
from usbipy.protocol import Direction, IsoPacket

SET_CONFIGURATION = (0x00, 9, 1, 0)
# QEMU's usb-audio: interface 1 is the stream, alt 1 has the iso OUT endpoint 1
SET_STREAMING_ALT = (0x01, 11, 1, 1)
ISO_PACKET = 192  # 48 kHz, 2 channels, 16 bits: one millisecond
PACKETS = 8


async def iso_out(busid: str) -> dict[str, object]:
    async with await import_device("127.0.0.1", busid) as dev:
        await dev.control(*SET_CONFIGURATION, b"")
        await dev.control(*SET_STREAMING_ALT, b"")
        # four URBs in flight at once, as an audio driver keeps them
        futures = [dev.submit_nowait(1, Direction.OUT, data=bytes(range(192)) * PACKETS,
                                     iso_packets=[IsoPacket(i * ISO_PACKET, ISO_PACKET)
                                                  for i in range(PACKETS)],
                                     transfer_flags=0x2)[1]  # URB_ISO_ASAP
                   for _ in range(4)]
        replies = [await f for f in futures]
        # one more, unlinked while in flight or just completed: either answer is valid
        seqnum, future = dev.submit_nowait(
            1, Direction.OUT, data=bytes(ISO_PACKET * PACKETS),
            iso_packets=[IsoPacket(i * ISO_PACKET, ISO_PACKET) for i in range(PACKETS)],
            transfer_flags=0x2)
        unlink = await dev.unlink(seqnum)
        return {
            "replies": [{"status": r.status, "actual_length": r.actual_length,
                         "error_count": r.error_count,
                         "packets": [[p.offset, p.length, p.actual_length, p.status]
                                     for p in r.iso_packets or []]} for r in replies],
            "unlink": unlink.status,
            "unlinked_completed": future.done() and not future.cancelled(),
        }


async def pending_when_unplugged(busid: str) -> dict[str, object]:
    """A bulk IN URB that waits on the mass-storage gadget (no command was sent, so
    no data will come) while the harness unplugs the gadget."""
    async with await import_device("127.0.0.1", busid) as dev:
        await dev.control(*SET_CONFIGURATION, b"")
        _seqnum, future = dev.submit_nowait(1, Direction.IN, 512)
        # tell the harness to unplug now (a blocking touch is fine in a one-shot tool)
        Path("/run/urb-pending").touch()  # noqa: ASYNC240
        # (generous ceilings: the guest's Python is slow, and slower on a slow host)
        ret = await asyncio.wait_for(future, 100)
        closed = True
        try:
            await asyncio.wait_for(dev.wait_closed(), 60)
        except TimeoutError:
            closed = False
    return {"status": ret.status, "closed": closed}


async def listed(busid: str) -> dict[str, object]:
    return {"busids": [d.busid for d in await list_devices("127.0.0.1")]}


CHECKS = {"iso_out": iso_out, "pending_when_unplugged": pending_when_unplugged,
          "listed": listed}

if __name__ == "__main__":
    check, busid = sys.argv[1], sys.argv[2]
    print(json.dumps(asyncio.run(CHECKS[check](busid))))
