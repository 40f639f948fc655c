"""The import workflow's checks for what changes while it waits: a client that
leaves, a reload that takes the device away, a hand-off the kernel refuses."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Iterator

import pytest

from tests.helpers import KEYBOARD
from usbipy.backends.base import Completion, ExportedDevice, HandOffDevice
from usbipy.config import Limits
from usbipy.policy import Action, Client, Policy
from usbipy.protocol import CmdSubmit, DeviceInfo, OpStatus
from usbipy.server.access import Access, HandedOff
from usbipy.server.importing import import_device
from usbipy.server.registry import DeviceRegistry
from usbipy.tls import TlsSession

ALLOW = Policy((), Action.ALLOW, "the default (allow)")
DENY = Policy((), Action.DENY, "the default (deny)")


class Device(ExportedDevice):
    """A device whose attach waits for the test, which may act meanwhile."""

    def __init__(self, during_attach: Callable[[], None] = lambda: None) -> None:
        self.during_attach = during_attach
        self.attached = self.detached = 0

    @property
    def info(self) -> DeviceInfo:
        return KEYBOARD

    async def attach(self) -> None:
        self.attached += 1
        await asyncio.sleep(0)
        self.during_attach()

    async def detach(self) -> None:
        self.detached += 1

    def submit(self, urb: CmdSubmit) -> Completion:
        return Completion()


class KernelDevice(HandOffDevice):
    """usbip-host as the import sees it: a hand-off (run in a thread), a take-back."""

    busid = "1-1"

    def __init__(self, during_hand_off: Callable[[], None] = lambda: None,
                 refuse: bool = False) -> None:
        self.during_hand_off = during_hand_off
        self.refuse = refuse
        self.handed: list[int] = []
        self.taken_back = 0

    @property
    def info(self) -> DeviceInfo:
        return KEYBOARD

    def import_status(self) -> OpStatus:
        return OpStatus.OK

    def hand_off(self, fd: int) -> None:
        self.during_hand_off()
        if self.refuse:
            raise OSError(16, "Device or resource busy")
        self.handed.append(fd)

    def take_back(self) -> None:
        self.taken_back += 1


class Source:
    """A device source with one hand-off device (as usbip-host's)."""

    def __init__(self, device: KernelDevice) -> None:
        self.device = device

    async def devices(self) -> list[KernelDevice]:
        return [self.device]

    async def check(self) -> None:
        return None

    def close(self) -> None:
        return None


class Connection:
    """What the import asks of its connection, recorded."""

    def __init__(self, registry: DeviceRegistry, access: Access,
                 tls: TlsSession | None = None) -> None:
        self.registry = registry
        self.access = access
        self.client = Client("127.0.0.1")
        self.peer = "127.0.0.1:40000"
        self.tls = tls
        self.closed = False
        self.client_key = "127.0.0.1"
        self.answers: list[OpStatus] = []
        self.served: ExportedDevice | HandOffDevice | None = None
        self.hung_up = False
        self._pair = socket.socketpair()
        self._pair[0].setblocking(False)  # (as the event loop's sockets are)

    def client_socket(self) -> socket.socket:
        return self._pair[0]

    def refuse(self, status: OpStatus) -> None:
        self.answers.append(status)

    def serve(self, device: ExportedDevice, info: DeviceInfo) -> None:
        self.answers.append(OpStatus.OK)
        self.served = device

    def served_by_kernel(self, device: HandOffDevice) -> None:
        self.answers.append(OpStatus.OK)
        self.served = device

    def hang_up(self) -> None:
        self.hung_up = True

    async def release(self, device: ExportedDevice) -> None:
        await device.detach()
        self.registry.release(device.busid, self)

    def close_socket(self) -> None:
        for end in self._pair:
            end.close()


@pytest.fixture
def access() -> Access:
    return Access(ALLOW, Limits())


@pytest.fixture
def connections() -> Iterator[list[Connection]]:
    made: list[Connection] = []
    yield made
    for conn in made:
        conn.close_socket()


def connect(registry: DeviceRegistry, access: Access, made: list[Connection],
            tls: TlsSession | None = None) -> Connection:
    conn = Connection(registry, access, tls)
    made.append(conn)
    return conn


def test_an_allowed_import_is_served(access: Access, connections: list[Connection]) -> None:
    registry = DeviceRegistry()
    device = Device()
    registry.add(device)
    conn = connect(registry, access, connections)
    asyncio.run(import_device(conn, "1-1"))
    assert conn.answers == [OpStatus.OK] and conn.served is device
    assert registry.owner("1-1") is conn and device.detached == 0


def test_a_client_that_leaves_during_the_attach_releases_the_device(
        access: Access, connections: list[Connection]) -> None:
    registry = DeviceRegistry()
    conn: Connection | None = None

    def leave() -> None:
        assert conn is not None
        conn.closed = True

    device = Device(during_attach=leave)
    registry.add(device)
    conn = connect(registry, access, connections)
    asyncio.run(import_device(conn, "1-1"))
    assert conn.answers == [] and conn.served is None  # nothing said to no one
    assert (device.attached, device.detached) == (1, 1)
    assert registry.owner("1-1") is None  # the next client may have it


def test_a_reload_during_the_attach_that_denies_the_device_refuses_it(
        access: Access, connections: list[Connection], caplog: pytest.LogCaptureFixture
) -> None:
    registry = DeviceRegistry()
    device = Device(during_attach=lambda: access.reconfigure(DENY, Limits()))
    registry.add(device)
    conn = connect(registry, access, connections)
    with caplog.at_level(logging.WARNING, logger="usbipy.server"):
        asyncio.run(import_device(conn, "1-1"))
    assert conn.answers == [OpStatus.NODEV]  # as an unknown device: nothing told
    assert device.detached == 1 and registry.owner("1-1") is None
    assert "denied by the default (deny) (reloaded during the import)" in caplog.text


def test_a_reload_during_the_attach_that_still_allows_it_serves_it(
        access: Access, connections: list[Connection]) -> None:
    registry = DeviceRegistry()
    device = Device(during_attach=lambda: access.reconfigure(ALLOW, Limits()))
    registry.add(device)
    conn = connect(registry, access, connections)
    asyncio.run(import_device(conn, "1-1"))
    assert conn.answers == [OpStatus.OK] and device.detached == 0


def test_a_device_the_policy_denies_is_refused_as_unknown(
        connections: list[Connection]) -> None:
    registry = DeviceRegistry()
    device = Device()
    registry.add(device)
    conn = connect(registry, Access(DENY, Limits()), connections)
    asyncio.run(import_device(conn, "1-1"))
    assert conn.answers == [OpStatus.NODEV] and device.attached == 0


def _kernel(device: KernelDevice) -> DeviceRegistry:
    registry = DeviceRegistry()
    registry.add_source(Source(device))  # type: ignore[arg-type]
    return registry


def test_a_hand_off_gives_the_socket_to_the_kernel(access: Access,
                                                   connections: list[Connection]) -> None:
    device = KernelDevice()
    conn = connect(_kernel(device), access, connections)
    asyncio.run(import_device(conn, "1-1"))
    assert device.handed == [conn.client_socket().fileno()]
    assert conn.answers == [OpStatus.OK] and conn.served is device
    entry = access.handed_off["1-1"]
    assert entry.device is device and not entry.pending


def test_a_reload_before_the_hand_off_refuses_it(access: Access,
                                                 connections: list[Connection]) -> None:
    device = KernelDevice()
    registry = _kernel(device)
    real_claim = registry.claim

    async def claim_then_reload(*args: object, **kw: object) -> object:
        found = await real_claim(*args, **kw)  # type: ignore[arg-type]
        access.reconfigure(DENY, Limits())  # (while the claim was awaited)
        return found

    registry.claim = claim_then_reload  # type: ignore[method-assign,assignment]
    conn = connect(registry, access, connections)
    asyncio.run(import_device(conn, "1-1"))
    assert conn.answers == [OpStatus.NODEV] and device.handed == []


def test_a_reload_during_the_hand_off_ends_the_kernels_session(
        access: Access, connections: list[Connection], caplog: pytest.LogCaptureFixture
) -> None:
    # The kernel has the socket by then: no reply can be taken back, so its session
    # is ended (usbip_sockfd -1) and nothing more is said.
    device = KernelDevice(during_hand_off=lambda: access.reconfigure(DENY, Limits()))
    conn = connect(_kernel(device), access, connections)
    with caplog.at_level(logging.WARNING, logger="usbipy.server"):
        asyncio.run(import_device(conn, "1-1"))
    assert device.taken_back == 1 and conn.answers == [] and conn.hung_up
    assert "1-1" not in access.handed_off
    assert "(reloaded during the import)" in caplog.text


def test_a_refused_hand_off_puts_back_the_session_it_would_have_replaced(
        access: Access, connections: list[Connection]) -> None:
    device = KernelDevice(refuse=True)
    earlier = HandedOff(device, Client("10.0.0.1"), "10.0.0.1:1")
    access.handed_off["1-1"] = earlier
    conn = connect(_kernel(device), access, connections)
    asyncio.run(import_device(conn, "1-1"))
    assert conn.answers == [OpStatus.NA]
    assert access.handed_off["1-1"] is earlier
    # non-blocking again, as the event loop needs it (the hand-off made it blocking)
    assert os.get_blocking(conn.client_socket().fileno()) is False


def test_a_userspace_tls_session_is_not_handed_to_the_kernel(
        access: Access, connections: list[Connection]) -> None:
    device = KernelDevice()
    session = TlsSession("TLSv1.3", "TLS_AES_128_GCM_SHA256", "CN=alice", kernel=False)
    registry = _kernel(device)
    conn = connect(registry, access, connections, tls=session)
    asyncio.run(import_device(conn, "1-1"))
    assert conn.answers == [OpStatus.NA] and device.handed == []
    assert registry.owner("1-1") is None


def test_a_client_that_leaves_during_the_claim_is_never_attached(
        access: Access, connections: list[Connection]) -> None:
    registry = DeviceRegistry()
    device = Device()
    registry.add(device)
    real_claim = registry.claim
    conn = connect(registry, access, connections)

    async def claim_then_leave(*args: object, **kw: object) -> object:
        found = await real_claim(*args, **kw)  # type: ignore[arg-type]
        conn.closed = True  # (the sources were read meanwhile: a sysfs walk)
        return found

    registry.claim = claim_then_leave  # type: ignore[method-assign,assignment]
    asyncio.run(import_device(conn, "1-1"))
    assert device.attached == 0 and conn.answers == []
    assert registry.owner("1-1") is None
