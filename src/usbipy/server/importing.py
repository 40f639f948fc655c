"""OP_REQ_IMPORT, from the claim to the reply: the policy's verdict, the device's
attach or the socket's hand-off to the kernel, and the checks for what changed
meanwhile.

An import waits (a libusb open, a write to usbip_sockfd), and while it waits
the client may leave and a reload (SIGHUP) may take the device from this
client. So the policy is asked again after each wait, and the answer is sent
only to a client still there, for a device it may still use:

* before the device is attached: a client gone releases the claim;
* after it is attached: a client gone, or a policy that now refuses it,
  detaches it again (a refused one gets NODEV, as an unknown device does);
* before the socket goes to usbip-host: a policy that now refuses it is NODEV;
* after the kernel took the socket: a policy that now refuses it ends the
  kernel's session (usbip-host's usbip_sockfd -1), and nothing more is said.

The connection (:class:`ImportingConnection`) sends the replies; this module
decides which.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Protocol

from ..backends.base import AnyDevice, ExportedDevice, HandOffDevice
from ..escape import printable
from ..policy import Client, Decision
from ..protocol import DeviceInfo, OpStatus
from ..tls import TlsSession
from .access import Access, HandedOff
from .registry import DeviceRegistry

log = logging.getLogger("usbipy.server")


class ImportingConnection(Protocol):
    """What an import needs of the connection that asked for it."""

    registry: DeviceRegistry
    access: Access
    #: Whom the policy judges, and the client in the log's words.
    client: Client
    peer: str
    tls: TlsSession | None

    @property
    def closed(self) -> bool:
        """Whether the client left (or the server dropped it)."""

    @property
    def client_key(self) -> str:
        """Whom the rate-limited log counts a refusal against (an address, a /64)."""

    def client_socket(self) -> socket.socket:
        """The connection's socket, for the kernel to take."""

    def refuse(self, status: OpStatus) -> None:
        """Answer OP_REP_IMPORT ``status`` and close."""

    def serve(self, device: ExportedDevice, info: DeviceInfo) -> None:
        """The device is this connection's: answer OK with ``info``, and its URBs
        follow."""

    def served_by_kernel(self, device: HandOffDevice) -> None:
        """The kernel took the socket: answer OK and close this copy of it."""

    def hang_up(self) -> None:
        """Close, sending what is queued first."""

    async def release(self, device: ExportedDevice) -> None:
        """Detach ``device`` and give its claim back."""


async def import_device(conn: ImportingConnection, busid: str) -> None:
    """Answer OP_REQ_IMPORT ``busid`` on ``conn``."""
    shown = printable(busid)
    access = conn.access
    decision: Decision | None = None
    generation = access.generation

    def permitted(device: AnyDevice) -> bool:
        nonlocal decision
        decision = access.decide(conn.client, device)
        return decision.allowed

    status, device = await conn.registry.claim(busid, conn, permitted)
    if device is None:
        if decision is not None and not decision.allowed:
            # Refused as an unknown device is (NODEV), so the reply tells the client
            # nothing about what it may not use; the log says which rule refused
            # (once per 10 s per client address: a client cannot flood the log).
            access.log.warning(f"denied {conn.client_key}",
                               f"{conn.peer}: import of {shown} denied by {decision.reason}")
        else:
            log.info("%s: import of %s refused: %s", conn.peer, shown, status.name)
        conn.refuse(status)
        return
    if isinstance(device, HandOffDevice):
        await _hand_off(conn, device, generation)
        return
    if conn.closed:  # the client left while we looked
        conn.registry.release(busid, conn)
        return
    try:
        await device.attach()
        info = device.info
    except Exception:
        log.exception("%s: attaching %s failed", conn.peer, shown)
        conn.registry.release(busid, conn)
        conn.refuse(OpStatus.DEV_ERR)
        return
    if conn.closed:
        await conn.release(device)
        return
    if revoked_meanwhile(conn, generation, device):
        try:
            await device.detach()
        except Exception:
            log.exception("%s: releasing %s failed", conn.peer, shown)
        finally:
            conn.registry.release(busid, conn)
        conn.refuse(OpStatus.NODEV)
        return
    conn.serve(device, info)
    log.info("%s: imported %s", conn.peer, shown)


def revoked_meanwhile(conn: ImportingConnection, generation: int, device: AnyDevice) -> bool:
    """Whether a reload since ``generation`` took the device from this client."""
    access = conn.access
    if access.generation == generation:
        return False
    decision = access.decide(conn.client, device)
    if decision.allowed:
        return False
    log.warning("%s: import of %s denied by %s (reloaded during the import)", conn.peer,
                printable(device.busid), decision.reason)
    return True


async def _hand_off(conn: ImportingConnection, device: HandOffDevice, generation: int
                    ) -> None:
    # As usbipd: give the socket to the kernel, then reply, then close our copy.
    # The client sends no URB before it has the reply, so the kernel reads the
    # first one; nothing may be read past this point (reading is paused since the
    # request came).
    shown = printable(device.busid)
    if conn.tls is not None and not conn.tls.kernel:
        # The kernel cannot take over a session whose keys live in this process.
        log.error("%s: cannot hand %s to %s over TLS: kernel TLS is not available "
                  "here ('modprobe tls', then restart usbipyd)", conn.peer, shown, device.via)
        conn.registry.release(device.busid, conn)
        conn.refuse(OpStatus.NA)
        return
    if revoked_meanwhile(conn, generation, device):
        conn.refuse(OpStatus.NODEV)
        return
    fd = conn.client_socket().fileno()
    # Recorded before the hand-off, as pending: a reload meanwhile leaves it to
    # revoked_meanwhile below, and a failed hand-off puts back what was there.
    handed = conn.access.handed_off
    previous = handed.get(device.busid)
    entry = HandedOff(device, conn.client, conn.peer, pending=True,
                      protected=conn.tls is not None)
    handed[device.busid] = entry
    try:
        # The kernel's usbip threads expect a blocking socket, as usbipd gives it.
        os.set_blocking(fd, True)
        await asyncio.to_thread(device.hand_off, fd)
    except OSError as exc:
        if handed.get(device.busid) is entry:
            if previous is not None:
                handed[device.busid] = previous
            else:
                del handed[device.busid]
        log.error("%s: handing %s to the kernel failed: %s", conn.peer, shown,
                  exc.strerror or exc)
        os.set_blocking(fd, False)
        conn.refuse(OpStatus.NA)
        return
    entry.pending = False
    if revoked_meanwhile(conn, generation, device):
        # The kernel has the socket: end its session, and say nothing more.
        if handed.get(device.busid) is entry:
            del handed[device.busid]
        try:
            await asyncio.to_thread(device.take_back)
        except OSError as exc:
            log.error("%s: cannot end the session on %s: %s", conn.peer, shown,
                      exc.strerror or exc)
        conn.hang_up()
        return
    conn.served_by_kernel(device)
    log.info("%s: imported %s (served by the kernel's %s)", conn.peer, shown, device.via)
