"""A lean, synchronous USB/IP client for benchmarks: pipelined URBs, no asyncio.

The benchmark must measure servers, not its own client. This client uses the
codec only for the OP handshake; on the URB path it patches the seqnum into a
prebuilt CMD_SUBMIT and reads RET_SUBMIT headers straight off a buffer, so it
costs a few microseconds per URB.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from usbipy.client.handshake import connect, request_import
from usbipy.protocol import DeviceInfo

CMD_SUBMIT = struct.Struct(">IIIIIIIiii8s")  # 48 bytes, USBIP_CMD_SUBMIT header
RET_HEADER = struct.Struct(">IIIIIiiiii8x")  # 48 bytes, RET_SUBMIT / RET_UNLINK
USBIP_CMD_SUBMIT, USBIP_RET_SUBMIT = 1, 3
OUT, IN = 0, 1


@dataclass(frozen=True)
class Reply:
    seqnum: int
    status: int
    actual_length: int
    data: bytes = b""


class FastClient:
    """One imported device over one TCP connection."""

    def __init__(self, host: str, port: int, busid: str) -> None:
        self.sock: socket.socket = connect(host, port)
        self._imported(request_import(self.sock, busid))
        self.sock.settimeout(60)

    def _imported(self, device: DeviceInfo) -> None:
        """Ready to submit URBs to ``device``."""
        self.device = device
        self.devid = device.devid
        self._seqnum = 0
        self._directions: dict[int, int] = {}
        self._buf = bytearray(1 << 22)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def request(self, direction: int, ep: int, length: int, setup: bytes = bytes(8),
                data: bytes = b"") -> bytes:
        """The bytes of one CMD_SUBMIT (not sent), with the next seqnum."""
        self._seqnum += 1
        self._directions[self._seqnum] = direction
        header = CMD_SUBMIT.pack(USBIP_CMD_SUBMIT, self._seqnum, self.devid, direction, ep, 0,
                                 length, 0, 0, 0, setup)
        return header + data if data else header

    def send(self, *requests: bytes) -> None:
        self.sock.sendall(b"".join(requests) if len(requests) > 1 else requests[0])

    def _fill(self, need: int) -> None:
        if self._start + need > len(self._buf):  # compact what is left to the front
            left = self._end - self._start
            self._buf[:left] = self._buf[self._start:self._end]
            self._start, self._end = 0, left
        while self._end - self._start < need:
            n = self.sock.recv_into(self._view[self._end:])
            if not n:
                raise ConnectionError("the server closed the connection")
            self._end += n

    def reply(self, keep: bool = False) -> Reply:
        """The next RET_SUBMIT; its IN data is dropped unless ``keep``."""
        self._fill(48)
        (command, seqnum, _devid, _dir, _ep, status, actual, _sf, npackets,
         _errors) = RET_HEADER.unpack_from(self._buf, self._start)
        self._start += 48
        if command != USBIP_RET_SUBMIT:
            raise ConnectionError(f"unexpected command {command:#x}")
        payload = actual if self._directions.pop(seqnum) == IN else 0
        if keep and payload:
            self._fill(payload)
            data = bytes(self._buf[self._start:self._start + payload])
            self._start += payload
            return Reply(seqnum, status, actual, data)
        if npackets not in (0, 0xFFFFFFFF, -1) and npackets > 0:
            payload += 16 * npackets
        while payload:
            chunk = min(payload, len(self._buf) // 2)
            self._fill(chunk)
            self._start += chunk
            payload -= chunk
        return Reply(seqnum, status, actual)

    def close(self) -> None:
        self.sock.close()
