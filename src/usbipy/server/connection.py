"""One client connection: the OP handshake, then URB dispatch with UNLINK.

Each URB in flight is a future or task, completed in any order. A URB that a
device finishes at once is answered without creating a task at all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable
from typing import cast

from ..devices.base import Completion, ExportedDevice, HandOffDevice
from ..protocol import (
    CmdSubmit,
    CmdUnlink,
    Direction,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    OpStatus,
    RemoteProtocolError,
    ServerConnection,
    wire,
)
from ..protocol.constants import ECONNRESET, ENOMEM, EOVERFLOW, EPROTO
from .registry import DeviceRegistry

log = logging.getLogger("usbipy.server")

_RET_SUBMIT_PACK = wire.RET_SUBMIT.pack

#: Beyond this many URBs in flight on one connection, stop reading from it.
MAX_IN_FLIGHT = 4096


class UsbipServerProtocol(asyncio.Protocol):
    """asyncio protocol for one client; the codec is a :class:`ServerConnection`."""

    def __init__(self, registry: DeviceRegistry, *, max_transfer_length: int,
                 connections: set[UsbipServerProtocol]) -> None:
        self.registry = registry
        self.conn = ServerConnection(max_transfer_length=max_transfer_length)
        self.device: ExportedDevice | None = None
        self.peer = "?"
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._in_flight: dict[int, asyncio.Future[Completion]] = {}
        self._paused_reading = False
        self._paused_writing = False
        self._closed = False
        #: Replies made while one batch of input is handled, sent with one write:
        #: at depth 32 one recv carries many URBs, and one send per reply would
        #: cost more than the URBs themselves.
        self._batch: list[bytes] | None = None

    # --- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not derive from asyncio.Transport)
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # URBs are small and latency-bound: never wait for Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._connections.add(self)
        log.debug("%s: connected", self.peer)

    def data_received(self, data: bytes) -> None:
        self._batch = []
        try:
            self._handle(data)
        finally:
            self._flush()
            self._batch = None

    def _handle(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data)
        try:
            for event in conn.events():
                if type(event) is CmdSubmit:
                    self._submit(event)
                elif type(event) is CmdUnlink:
                    self._unlink(event)
                elif type(event) is OpReqDevlist:
                    self._devlist()
                elif type(event) is OpReqImport:
                    self._import(event.busid)
                if self._closed:
                    return
        except RemoteProtocolError as exc:
            log.warning("%s: closing the connection: %s: %s", self.peer,
                        type(exc).__name__, exc)
            self._abort()
            return
        if len(self._in_flight) >= MAX_IN_FLIGHT and not self._paused_reading:
            self._pause_reading()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._connections.discard(self)
        for future in self._in_flight.values():
            future.cancel()
        self._in_flight.clear()
        if self.device is not None:
            device, self.device = self.device, None
            device.drop_client = None
            try:
                device.detach()
            finally:
                self.registry.release(device.busid, self)
            log.info("%s: released %s", self.peer, device.busid)
        log.debug("%s: disconnected (%s)", self.peer, exc or "closed")

    def pause_writing(self) -> None:
        # The client does not read its replies: stop taking new URBs from it.
        self._paused_writing = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._maybe_resume_reading()

    # --- OP phase ----------------------------------------------------------------

    def _devlist(self) -> None:
        devices = tuple(d.info for d in self.registry.available())
        self._write(self.conn.send(OpRepDevlist(devices)))
        log.info("%s: sent the list of %d devices", self.peer, len(devices))
        self._close()

    def _import(self, busid: str) -> None:
        status, device = self.registry.claim(busid, self)
        if device is None:
            log.info("%s: import of %s refused: %s", self.peer, busid, status.name)
            self._write(self.conn.send(OpRepImport(status)))
            self._close()
            return
        if isinstance(device, HandOffDevice):
            self._hand_off(device)
            return
        try:
            device.attach()
            info = device.info
        except Exception:
            log.exception("%s: attaching %s failed", self.peer, busid)
            self.registry.release(busid, self)
            self._write(self.conn.send(OpRepImport(OpStatus.DEV_ERR)))
            self._close()
            return
        self.device = device
        device.drop_client = self._close
        self._write(self.conn.send(OpRepImport(OpStatus.OK, info)))
        log.info("%s: imported %s", self.peer, busid)

    def _hand_off(self, device: HandOffDevice) -> None:
        # As usbipd: give the socket to the kernel, then reply, then close our
        # copy. The client sends no URB before it has the reply, so the kernel
        # reads the first one; we must not read anything past this point.
        assert self._transport is not None
        self._transport.pause_reading()
        sock = self._transport.get_extra_info("socket")
        fd = sock.fileno()
        try:
            # The kernel's usbip threads expect a blocking socket, as usbipd gives it.
            os.set_blocking(fd, True)
            device.hand_off(fd)
        except OSError as exc:
            log.error("%s: handing %s to the kernel failed: %s", self.peer, device.busid,
                      exc.strerror or exc)
            os.set_blocking(fd, False)
            self._write(self.conn.send(OpRepImport(OpStatus.NA)))
            self._close()
            return
        self._write(self.conn.send(OpRepImport(OpStatus.OK, device.info)))
        log.info("%s: imported %s (served by the kernel)", self.peer, device.busid)
        self._close()

    # --- URB phase ---------------------------------------------------------------

    def _submit(self, urb: CmdSubmit) -> None:
        device = self.device
        assert device is not None
        seqnum = urb.seqnum
        if seqnum in self._in_flight:
            raise RemoteProtocolError(f"seqnum {seqnum} is already in flight")
        if urb.direction is Direction.IN and urb.transfer_buffer_length > (
            self.conn.max_transfer_length
        ):
            # Never allocate what a peer asks for without a cap.
            log.warning("%s: seqnum %d asks for %d bytes IN, above the cap of %d", self.peer,
                        seqnum, urb.transfer_buffer_length, self.conn.max_transfer_length)
            self._reply(urb, Completion(status=ENOMEM))
            return
        try:
            result = device.submit(urb)
        except Exception:
            log.exception("%s: %s failed on seqnum %d", self.peer, device.busid, seqnum)
            result = Completion(status=EPROTO)
        if type(result) is Completion:
            self._reply(urb, result)
            return
        assert isinstance(result, Awaitable)
        future: asyncio.Future[Completion] = asyncio.ensure_future(result)
        self._in_flight[seqnum] = future
        future.add_done_callback(lambda f: self._completed(urb, f))

    def _completed(self, urb: CmdSubmit, future: asyncio.Future[Completion]) -> None:
        if self._in_flight.pop(urb.seqnum, None) is None or future.cancelled():
            return  # unlinked: RET_UNLINK answered it, no RET_SUBMIT (as usbip-host)
        exc = future.exception()
        if exc is not None:
            log.error("%s: seqnum %d failed", self.peer, urb.seqnum, exc_info=exc)
            result = Completion(status=EPROTO)
        else:
            result = future.result()
        self._reply(urb, result)
        self._maybe_resume_reading()

    def _reply(self, urb: CmdSubmit, result: Completion) -> None:
        if self._closed:
            return
        iso = result.iso_packets
        if urb.direction is Direction.IN:
            data = result.data
            if len(data) > urb.transfer_buffer_length:
                log.error("%s: device returned %d bytes for a %d-byte URB", self.peer,
                          len(data), urb.transfer_buffer_length)
                data, status = b"", EOVERFLOW  # as a babbling device
            else:
                status = result.status
            actual = result.actual_length if result.actual_length is not None else len(data)
        else:
            data, status = b"", result.status
            actual = (result.actual_length if result.actual_length is not None
                      else urb.transfer_buffer_length)
        if iso is not None:
            self._write(wire.encode_ret_submit(
                urb.seqnum, status, actual, data, result.start_frame, len(iso),
                result.error_count, iso,
            ))
            return
        # Non-iso: echo number_of_packets as usbip-host does (it copies the CMD's value).
        header = _RET_SUBMIT_PACK(3, urb.seqnum, 0, 0, 0, status, actual, result.start_frame,
                                  urb.number_of_packets, result.error_count)
        batch = self._batch
        if batch is not None:
            batch.append(header)  # header and data joined once, with the whole batch
            if data:
                batch.append(data)
        elif self._transport is not None:
            self._transport.write(header + data if data else header)

    def _unlink(self, cmd: CmdUnlink) -> None:
        future = self._in_flight.pop(cmd.unlink_seqnum, None)
        if future is not None and not future.done():
            future.cancel()
            status = ECONNRESET
        else:
            # Already completed (its RET_SUBMIT is sent) or never seen: usbip-host answers 0.
            status = 0
        self._write(wire.encode_ret_unlink(cmd.seqnum, status))
        self._maybe_resume_reading()

    # --- transport ---------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._batch is not None:
            self._batch.append(data)
        elif self._transport is not None and not self._closed:
            self._transport.write(data)

    def _flush(self) -> None:
        batch = self._batch
        if batch:
            self._batch = []
            if self._transport is not None and not self._closed:
                # uvloop sends the pieces with one writev; asyncio joins them first
                self._transport.writelines(batch)

    def _close(self) -> None:
        self._flush()  # the last replies go out before the FIN
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    def _abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    def _pause_reading(self) -> None:
        if self._transport is not None and not self._paused_reading and not self._closed:
            self._paused_reading = True
            self._transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        if (self._paused_reading and not self._paused_writing and not self._closed
                and len(self._in_flight) < MAX_IN_FLIGHT // 2):
            self._paused_reading = False
            assert self._transport is not None
            self._transport.resume_reading()

    def close(self) -> None:
        """Drop this client (server shutdown)."""
        self._abort()
