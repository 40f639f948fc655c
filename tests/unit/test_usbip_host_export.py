"""usbipyd exporting devices bound to usbip-host: the IMPORT hands the socket over.

The fake sysfs holds a duplicate of whatever socket is written to usbip_sockfd,
as usbip-host does; the test then talks to the client through that socket.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from usbipy.backends.kernel_stub import KernelStubSource
from usbipy.client import ImportRefused
from usbipy.client.handshake import connect, request_devlist, request_import
from usbipy.protocol import OpStatus
from usbipy.server import ServerThread

from .fake_sysfs import FakeSysfs


def stub_device(fake: FakeSysfs, status: int = 1) -> Path:
    fake.load_usbip_host()
    path = fake.add_device("2-1", 0x46F4, 0x0001, speed="5000")
    fake.set_driver("2-1", "usbip-host")
    (path / "usbip_status").write_text(f"{status}\n")
    return path


def server_connections(srv: ServerThread) -> int:
    """Connections usbipyd still serves itself, once pending callbacks have run."""
    assert srv.server is not None
    server = srv.server
    count = -1
    for _ in range(100):
        result = srv.call(lambda: len(server.connections))
        assert isinstance(result, int)
        count = result
        if count == 0:
            break
        time.sleep(0.01)
    return count


def exporting_stub() -> ServerThread:
    srv = ServerThread([], port=0)
    srv.start()
    assert srv.server is not None
    srv.server.registry.add_source(KernelStubSource())
    return srv


def test_import_hands_the_connected_socket_to_the_kernel(fake: FakeSysfs) -> None:
    path = stub_device(fake)
    srv = exporting_stub()
    try:
        with connect("127.0.0.1", srv.port) as sock:
            [listed] = request_devlist(sock)
        assert (listed.busid, listed.speed.name, listed.devid) == ("2-1", "SUPER", 0x20002)
        with connect("127.0.0.1", srv.port) as client:
            device = request_import(client, "2-1")
            assert device.busid == "2-1" and device.interfaces == ()
            assert int((path / "usbip_sockfd").read_text()) > 2
            # usbip-host's threads expect a blocking socket, as usbipd gives them
            held = fake.held[-1]
            assert os.get_blocking(held)
            # usbipyd closed its copy; the connection lives on in the "kernel's"
            kernel = socket.socket(fileno=os.dup(held))
            kernel.settimeout(10)
            client.sendall(b"a URB for usbip-host")
            assert kernel.recv(100) == b"a URB for usbip-host"
            kernel.sendall(b"its reply")
            client.settimeout(10)
            assert client.recv(100) == b"its reply"
            kernel.close()
            assert server_connections(srv) == 0
    finally:
        srv.stop()


@pytest.mark.parametrize("status, expected", [(2, OpStatus.DEV_BUSY), (3, OpStatus.DEV_ERR)])
def test_a_device_in_use_is_busy_and_not_listed(fake: FakeSysfs, status: int,
                                                expected: OpStatus) -> None:
    stub_device(fake, status)
    srv = exporting_stub()
    try:
        with connect("127.0.0.1", srv.port) as sock:
            assert request_devlist(sock) == ()
        with connect("127.0.0.1", srv.port) as sock, pytest.raises(ImportRefused) as refused:
            request_import(sock, "2-1")
        assert refused.value.status is expected
        with connect("127.0.0.1", srv.port) as sock, pytest.raises(ImportRefused) as refused:
            request_import(sock, "9-9")
        assert refused.value.status is OpStatus.NODEV
    finally:
        srv.stop()


def test_a_device_bound_after_the_server_started_is_exported(fake: FakeSysfs) -> None:
    srv = exporting_stub()
    try:
        with connect("127.0.0.1", srv.port) as sock:
            assert request_devlist(sock) == ()
        stub_device(fake)
        with connect("127.0.0.1", srv.port) as sock:
            assert [d.busid for d in request_devlist(sock)] == ["2-1"]
    finally:
        srv.stop()
