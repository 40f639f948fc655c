"""The access policy as clients meet it: what a list shows, how an import is refused,
and what a new policy does to sessions in progress."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Sequence

import pytest

from usbipy.backends.base import DeviceSource, HandOffDevice
from usbipy.client import ImportRefused, import_device, list_devices
from usbipy.config import Limits
from usbipy.devices import HidKeyboard
from usbipy.policy import Action, ClientSelector, DeviceSelector, Policy, Rule
from usbipy.protocol import (
    ClientConnection,
    DeviceInfo,
    Message,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    OpStatus,
)
from usbipy.server import UsbipServer

from ..helpers import KEYBOARD


def network(text: str) -> ClientSelector:
    return ClientSelector(network=(ipaddress.ip_network(text),))


#: 127.0.0.1 may use the disk (1-2); nobody else may use anything.
LOCAL_DISK = Policy((Rule(Action.ALLOW, DeviceSelector(busid=("1-2",)), network("127.0.0.1/32"),
                          number=1),),
                    Action.DENY, "the default (deny)")


async def request(port: int, message: OpReqDevlist | OpReqImport,
                  source: str = "127.0.0.2") -> Message:
    """One OP request from ``source`` (another loopback address than 127.0.0.1)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    conn = ClientConnection()
    try:
        writer.write(conn.send(message))
        async with asyncio.timeout(10):
            while True:
                data = await reader.read(1 << 16)
                assert data, "closed with no reply"
                conn.receive_data(data)
                for event in conn.events():
                    return event
    finally:
        writer.close()


def test_a_list_shows_only_what_the_client_may_import(serve, caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")

    async def test(server: UsbipServer) -> None:
        mine = await list_devices("127.0.0.1", server.port)  # (from 127.0.0.1)
        assert [d.busid for d in mine] == ["1-2"]
        other = await request(server.port, OpReqDevlist())
        assert isinstance(other, OpRepDevlist) and other.devices == ()

    serve(test, policy=LOCAL_DISK)
    assert "sent the list of 1 devices (2 not shown by the access policy)" in caplog.text


def test_a_forbidden_import_is_refused_as_an_unknown_device(serve, caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")

    async def test(server: UsbipServer) -> None:
        forbidden = await request(server.port, OpReqImport("1-1"), source="127.0.0.1")
        unknown = await request(server.port, OpReqImport("9-9"), source="127.0.0.1")
        assert forbidden == unknown == OpRepImport(OpStatus.NODEV)
        with pytest.raises(ImportRefused) as refused:
            await import_device("127.0.0.1", "1-3", server.port)
        assert str(refused.value) == "import of 1-3 refused: no such device (NODEV)"
        # a device the client may not use is "unknown" even while someone holds it
        async with await import_device("127.0.0.1", "1-2", server.port):
            assert await request(server.port, OpReqImport("1-2")) == OpRepImport(OpStatus.NODEV)
            assert (await request(server.port, OpReqImport("1-2"), source="127.0.0.1")
                    == OpRepImport(OpStatus.DEV_BUSY))

    serve(test, policy=LOCAL_DISK)
    assert "import of 1-1 denied by the default (deny)" in caplog.text
    assert ("127.0.0.2:" in caplog.text and
            "import of 1-2 denied by the default (deny)" in caplog.text)


def test_no_policy_lets_every_client_use_every_device(serve) -> None:
    async def test(server: UsbipServer) -> None:
        listed = await request(server.port, OpReqDevlist())
        assert isinstance(listed, OpRepDevlist) and len(listed.devices) == 3

    serve(test)


def test_a_new_policy_ends_the_sessions_it_no_longer_allows(serve, caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")
    everything_local = Policy((Rule(Action.ALLOW, client=network("127.0.0.1/32"), number=1),),
                              Action.DENY, "the default (deny)")

    async def test(server: UsbipServer) -> None:
        disk = await import_device("127.0.0.1", "1-2", server.port)
        keyboard = await import_device("127.0.0.1", "1-1", server.port)
        await server.reconfigure(LOCAL_DISK, Limits())
        async with asyncio.timeout(1):
            await keyboard.wait_closed()  # dropped at once
        # the disk's session goes on: a URB is still answered
        descriptor = await disk.control(0x80, 6, 0x0100, 0, 18)
        assert descriptor[:2] == b"\x12\x01"
        assert not disk.closed
        await disk.close()
        # and new requests see the new policy
        assert [d.busid for d in await list_devices("127.0.0.1", server.port)] == ["1-2"]

    serve(test, policy=everything_local)
    assert ("dropped from 1-1: no longer allowed by the default (deny)" in caplog.text)
    assert "dropped from 1-2" not in caplog.text


class _Stub(HandOffDevice):
    """A device "served by the kernel": records hand-offs and take-backs."""

    def __init__(self, busid: str) -> None:
        self.busid = busid
        self.serial = "STUB"
        self.handed: list[int] = []
        self.taken_back = 0

    @property
    def info(self) -> DeviceInfo:
        return dataclasses.replace(KEYBOARD, busid=self.busid)

    def import_status(self) -> OpStatus:
        return OpStatus.DEV_BUSY if len(self.handed) > self.taken_back else OpStatus.OK

    def hand_off(self, fd: int) -> None:
        self.handed.append(fd)

    def take_back(self) -> None:
        self.taken_back += 1


class _Stubs(DeviceSource):
    def __init__(self, devices: Sequence[_Stub]) -> None:
        self.stubs = list(devices)

    async def devices(self) -> Sequence[_Stub]:
        return self.stubs


def test_a_new_policy_ends_kernel_sessions_it_no_longer_allows(serve, caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")
    stubs = _Stubs([_Stub("5-1"), _Stub("5-2")])
    allow_all = Policy((), Action.ALLOW, "the default (allow)")
    only_5_2 = Policy((Rule(Action.ALLOW, DeviceSelector(busid=("5-2",)), number=1),),
                      Action.DENY, "the default (deny)")

    async def test(server: UsbipServer) -> None:
        server.registry.add_source(stubs)
        for busid in ("5-1", "5-2"):
            reply = await request(server.port, OpReqImport(busid), source="127.0.0.1")
            assert isinstance(reply, OpRepImport) and reply.status == OpStatus.OK
        await server.reconfigure(only_5_2, Limits())
        one, two = stubs.stubs
        assert (one.taken_back, two.taken_back) == (1, 0)
        # a session already over is not touched again
        await server.reconfigure(Policy((), Action.DENY, "the default (deny)"), Limits())
        assert (one.taken_back, two.taken_back) == (1, 1)
        await server.reconfigure(Policy((), Action.DENY, "the default (deny)"), Limits())
        assert (one.taken_back, two.taken_back) == (1, 1)

    serve(test, devices=[], policy=allow_all)
    assert "dropped from 5-1 (served by the kernel): no longer allowed by the default (deny)" \
        in caplog.text


class _SlowAttach(HidKeyboard):
    async def attach(self) -> None:
        await asyncio.sleep(0.3)
        await super().attach()


class _SlowStub(_Stub):
    def hand_off(self, fd: int) -> None:
        time.sleep(0.3)  # (in the server's worker thread, as a sysfs write is)
        super().hand_off(fd)


@pytest.mark.parametrize("kind", ["emulated", "kernel"])
def test_a_reload_during_an_import_is_not_missed(serve, caplog, kind: str) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")
    stub = _SlowStub("5-1")
    deny_all = Policy((), Action.DENY, "the default (deny)")

    async def test(server: UsbipServer) -> None:
        if kind == "kernel":
            server.registry.add_source(_Stubs([stub]))
        busid = "1-1" if kind == "emulated" else "5-1"
        reply = asyncio.ensure_future(request(server.port, OpReqImport(busid),
                                              source="127.0.0.1"))
        await asyncio.sleep(0.1)  # the import is under way (attach or hand-off)
        await server.reconfigure(deny_all, Limits())
        if kind == "emulated":
            assert await reply == OpRepImport(OpStatus.NODEV)
            assert server.registry.owner("1-1") is None
        else:  # the kernel had the socket already: its session is ended, no OK is sent
            with pytest.raises(AssertionError, match="closed with no reply"):
                await reply
            assert stub.handed and stub.taken_back == 1

    serve(test, devices=[_SlowAttach()] if kind == "emulated" else [],
          policy=Policy((), Action.ALLOW, "the default (allow)"))
    assert "denied by the default (deny) (reloaded during the import)" in caplog.text


def test_kernel_sessions_this_server_did_not_start_are_named(serve, caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")
    stranger = _Stub("5-3")
    stranger.handed.append(99)  # (in use since before this process)

    async def test(server: UsbipServer) -> None:
        server.registry.add_source(_Stubs([stranger]))
        await server.reconfigure(LOCAL_DISK, Limits())
        assert stranger.taken_back == 0  # (whose it is, nobody here knows)

    serve(test, devices=[])
    assert ("5-3: in use by a session this usbipyd did not start (before a restart, or by "
            "another server): the policy cannot tell whose; 'usbipy unbind -b 5-3' ends it"
            in caplog.text)


def test_a_reload_that_still_allows_a_hand_off_in_progress_keeps_its_record(
        serve, caplog) -> None:
    # A reload while the kernel is being handed the socket must not lose the session:
    # a later reload that revokes the client still ends it.
    stub = _SlowStub("5-1")
    allow_all = Policy((), Action.ALLOW, "the default (allow)")
    deny_all = Policy((), Action.DENY, "the default (deny)")

    async def test(server: UsbipServer) -> None:
        server.registry.add_source(_Stubs([stub]))
        reply = asyncio.ensure_future(request(server.port, OpReqImport("5-1"),
                                              source="127.0.0.1"))
        await asyncio.sleep(0.1)  # the hand-off is under way
        await server.reconfigure(allow_all, Limits())
        answer = await reply
        assert isinstance(answer, OpRepImport) and answer.status == OpStatus.OK
        assert stub.taken_back == 0
        await server.reconfigure(deny_all, Limits())
        assert stub.taken_back == 1

    serve(test, devices=[], policy=allow_all)


class _Refusing(_Stub):
    """The kernel refuses this hand-off (the device was taken meanwhile)."""

    def hand_off(self, fd: int) -> None:
        raise OSError(16, "Device or resource busy")


class _Stuck(_Stub):
    """Its first take-back fails (the session goes on)."""

    attempts = 0

    def take_back(self) -> None:
        self.attempts += 1
        if self.attempts == 1:
            raise OSError(5, "Input/output error")
        super().take_back()


def test_a_failed_hand_off_keeps_the_record_of_the_session_before_it(serve) -> None:
    first = _Stub("5-1")
    allow_all = Policy((), Action.ALLOW, "the default (allow)")

    async def test(server: UsbipServer) -> None:
        source = _Stubs([first])
        server.registry.add_source(source)
        ok = await request(server.port, OpReqImport("5-1"), source="127.0.0.1")
        assert isinstance(ok, OpRepImport) and ok.status == OpStatus.OK
        # a second import races in, sees it free and fails in the kernel
        source.stubs = [_Refusing("5-1")]
        refused = await request(server.port, OpReqImport("5-1"), source="127.0.0.1")
        assert refused == OpRepImport(OpStatus.NA)
        source.stubs = [first]
        await server.reconfigure(Policy((), Action.DENY, "the default (deny)"), Limits())
        assert first.taken_back == 1  # (the first session was still known)

    serve(test, devices=[], policy=allow_all)


def test_a_take_back_that_fails_is_tried_again_on_the_next_reload(serve) -> None:
    stub = _Stuck("5-1")
    deny_all = Policy((), Action.DENY, "the default (deny)")

    async def test(server: UsbipServer) -> None:
        server.registry.add_source(_Stubs([stub]))
        ok = await request(server.port, OpReqImport("5-1"), source="127.0.0.1")
        assert isinstance(ok, OpRepImport) and ok.status == OpStatus.OK
        await server.reconfigure(deny_all, Limits())
        assert (stub.attempts, stub.taken_back) == (1, 0)  # failed
        await server.reconfigure(deny_all, Limits())
        assert (stub.attempts, stub.taken_back) == (2, 1)

    serve(test, devices=[], policy=Policy((), Action.ALLOW, "the default (allow)"))


class _SlowAttachFailingDetach(_SlowAttach):
    async def detach(self) -> None:
        raise RuntimeError("the device would not let go")


def test_a_revoked_import_whose_detach_fails_still_frees_the_device(serve) -> None:
    async def test(server: UsbipServer) -> None:
        reply = asyncio.ensure_future(request(server.port, OpReqImport("1-1"),
                                              source="127.0.0.1"))
        await asyncio.sleep(0.1)
        await server.reconfigure(Policy((), Action.DENY, "the default (deny)"), Limits())
        assert await reply == OpRepImport(OpStatus.NODEV)
        assert server.registry.owner("1-1") is None

    serve(test, devices=[_SlowAttachFailingDetach()],
          policy=Policy((), Action.ALLOW, "the default (allow)"))
