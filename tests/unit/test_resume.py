"""Resumable attachments end to end: usbipyd and the client's relay, with a proxy
between them that cuts the TCP connection (a reset both ways, as a network that
drops the flow). Transfers in flight go on after the cut with every byte; a
token that is not the client's is refused and logged; the window and the
buffer bound end the attachment cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from usbipy.client import sync
from usbipy.client.errors import ServerGone
from usbipy.client.handshake import ResumeRefused, import_offering_resume, request_resume
from usbipy.config.limits import Limits
from usbipy.devices import CdcAcm, HidKeyboard, ImageFile, MassStorage
from usbipy.protocol import ClientConnection, Direction
from usbipy.protocol.resume import ResumableStream
from usbipy.server import ServerThread

from ..helpers import Cutter, reset, scsi

HOST = "127.0.0.1"
WINDOW = 8.0


@pytest.fixture
def server() -> Iterator[ServerThread]:
    devices = [HidKeyboard(), MassStorage(ImageFile.scratch(1 << 20)), CdcAcm()]
    with ServerThread(devices, port=0, limits=Limits(resume_window=WINDOW)) as srv:
        yield srv


@pytest.fixture
def cutter(server: ServerThread) -> Iterator[Cutter]:
    proxy = Cutter(server.port)
    yield proxy
    proxy.close()


def wait_for(condition: object, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def attachments(server: ServerThread) -> int:
    assert server.server is not None
    return len(server.server.access.resumables)


def test_transfers_in_flight_go_on_after_a_cut(server: ServerThread, cutter: Cutter,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """The serial port echoes; reads wait on the server while the connection is cut
    twice; every byte comes back, in order, on the same Device."""
    caplog.set_level(logging.INFO)
    with sync.connect(HOST, "1-3", cutter.port, resume=True) as dev:
        dev.control(0x00, 9, 1, 0, b"")
        assert attachments(server) == 1
        payload = bytes(range(256)) * 512  # 128 KiB
        reads = [dev.submit(1, Direction.IN, 4096) for _ in range(32)]
        cutter.cut()  # before the write: the URBs wait on the server
        dev.bulk_write(0x02, payload[:65536], timeout=20)
        cutter.cut()  # while the echoes come back
        dev.bulk_write(0x02, payload[65536:], timeout=20)
        got = b"".join(dev.wait(s, timeout=20).data for s in reads)
        assert got == payload
        assert cutter.accepted >= 3
    assert "resumed 1-3" in caplog.text
    wait_for(lambda: attachments(server) == 0)  # closed: the FIN released it at once


def test_a_disk_written_across_cuts_reads_back(server: ServerThread, cutter: Cutter) -> None:
    with sync.connect(HOST, "1-2", cutter.port, resume=True) as dev:
        dev.control(0x00, 9, 1, 0, b"")

        records = {}
        for n in range(24):
            block = bytes([n]) * 512 * 16
            scsi(dev, n * 2 + 1, struct.pack(">BBIBHB", 0x2A, 0, n * 16, 0, 16, 0),
                 data_out=block, timeout=20)
            records[n] = block
            if n % 5 == 2:
                cutter.cut()
        for n, block in records.items():
            assert scsi(dev, 100 + n, struct.pack(">BBIBHB", 0x28, 0, n * 16, 0, 16, 0),
                        data_in=len(block), timeout=20) == block


def test_a_server_that_does_not_resume_gets_plain_usbip(server: ServerThread) -> None:
    """resume_window 0: no grant; the device works as ever, and a cut ends it."""
    assert server.server is not None
    server.server.access.limits = Limits(resume_window=0)
    cutter = Cutter(server.port)
    try:
        with sync.connect(HOST, "1-1", cutter.port, resume=True) as dev:
            assert dev._relay is None
            dev.control(0x00, 9, 1, 0, b"")
            assert attachments(server) == 0
            cutter.cut()
            with pytest.raises(ServerGone):
                dev.control(0x80, 6, 0x100, 0, 18, timeout=10)
    finally:
        cutter.close()


def test_the_window_passes_and_the_device_is_released(
        server: ServerThread, cutter: Cutter, caplog: pytest.LogCaptureFixture) -> None:
    with sync.connect(HOST, "1-1", cutter.port, resume=True) as dev:
        dev.control(0x00, 9, 1, 0, b"")
        cutter.refusing = True  # (the network stays down)
        cutter.cut()
        started = time.monotonic()
        wait_for(lambda: attachments(server) == 0, WINDOW + 20)
        assert time.monotonic() - started >= WINDOW - 1
        assert "not resumed within 8 s (resume_window): 1-1 released" in caplog.text
        with pytest.raises(ServerGone):
            dev.control(0x80, 6, 0x100, 0, 18, timeout=WINDOW + 20)
    # and the device is free again for anyone
    with sync.connect(HOST, "1-1", server.port) as again:
        again.control(0x00, 9, 1, 0, b"")


def _granted(port: int, busid: str = "1-1"
             ) -> tuple[socket.socket, bytes, ClientConnection, int]:
    """An import that was granted a resumable stream: the socket, the token, the
    codec (in the URB phase) and the devid."""
    sock = socket.create_connection((HOST, port))
    conn = ClientConnection()
    info, grant = import_offering_resume(sock, busid, conn=conn)
    assert grant is not None and len(grant.token) == 16 and grant.window == WINDOW
    return sock, grant.token, conn, info.devid


def test_a_resume_with_an_unknown_token_is_refused_and_logged(
        server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    held = _granted(server.port)[0]
    try:
        stranger = socket.create_connection((HOST, server.port))
        with pytest.raises(ResumeRefused, match="NODEV"):
            request_resume(stranger, b"\x01" * 16, 0)
        stranger.close()
        assert "resume refused: unknown or expired token" in caplog.text
    finally:
        held.close()


def test_a_token_from_another_address_is_refused_in_plaintext(
        server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    """127.0.0.2 is another address of loopback: the token's thief, in plaintext."""
    held, token, _conn, _devid = _granted(server.port)
    reset(held)  # lost: the attachment waits for its client
    wait_for(lambda: "kept for 8 s" in caplog.text)
    thief = socket.socket()
    thief.bind(("127.0.0.2", 0))
    thief.connect((HOST, server.port))
    with pytest.raises(ResumeRefused, match="NODEV"):
        request_resume(thief, token, 0)
    thief.close()
    assert "the token was issued to 127.0.0.1" in caplog.text
    owner = socket.create_connection((HOST, server.port))
    assert request_resume(owner, token, 0) == 0  # (and its owner may)
    owner.close()


def test_an_impossible_resume_point_is_refused(server: ServerThread,
                                               caplog: pytest.LogCaptureFixture) -> None:
    held, token, _conn, _devid = _granted(server.port)
    try:
        again = socket.create_connection((HOST, server.port))
        with pytest.raises(ResumeRefused, match="ERROR"):
            request_resume(again, token, 1 << 40)  # more than the server ever sent
        again.close()
        assert "which cannot be" in caplog.text
    finally:
        held.close()


def test_the_frames_of_one_read_are_answered_in_one_write(server: ServerThread) -> None:
    """Four requests, each in a DATA frame of its own (the relay frames each read
    of vhci-hcd's), sent at once: the server handles them as a plain connection
    handles one read, and its four replies come back in one DATA frame (one
    write), not one a frame: a system call each would be a cost of resuming."""
    sock, _token, conn, devid = _granted(server.port)
    try:
        stream = ResumableStream()
        frames: list[bytes | memoryview] = []
        for n in range(4):
            urb = conn.send_submit(1 + n, devid, Direction.IN, 0, 0, 18,
                                   bytes.fromhex("8006000100001200"))
            frames += stream.send([urb])
        sock.sendall(b"".join(bytes(f) for f in frames))
        header = b""
        while len(header) < 13:
            header += sock.recv(13 - len(header))
        kind, length, offset = struct.unpack("!BIQ", header)
        assert (kind, offset) == (ord("D"), 0)
        assert length == 4 * (48 + 18)
    finally:
        sock.close()


def test_a_full_buffer_while_away_ends_the_attachment(caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    """Replies complete into the buffer while the client is away (keys pressed on
    the server); past resume_buffer, the attachment ends with a line that says
    why, and the device is free again."""
    keyboard = HidKeyboard()
    with ServerThread([keyboard], port=0,
                      limits=Limits(resume_window=WINDOW, resume_buffer=600)) as srv:
        held, _token, conn, devid = _granted(srv.port)
        stream = ResumableStream()
        urbs = [conn.send_submit(1, devid, Direction.OUT, 0, 0, 0,
                                 bytes.fromhex("0009010000000000"))]
        urbs += [conn.send_submit(2 + n, devid, Direction.IN, 1, 0, 8) for n in range(40)]
        held.sendall(b"".join(bytes(p) for p in stream.send(urbs)))
        wait_for(lambda: held.recv(4096, socket.MSG_PEEK))  # SET_CONFIGURATION's reply
        reset(held)
        wait_for(lambda: "kept for 8 s" in caplog.text)
        for n in range(20):  # 20 presses and releases: 40 replies of 56 bytes
            keyboard.press(4 + n, timeout=5)
            keyboard.release(timeout=5)
        wait_for(lambda: attachments(srv) == 0)
        assert "its resume buffer is full" in caplog.text
        assert "while the client was away: 1-1 released" in caplog.text
        with sync.connect(HOST, "1-1", srv.port) as again:
            again.control(0x00, 9, 1, 0, b"")


def test_a_server_that_stopped_is_not_waited_for(server: ServerThread,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Connection refused is a server gone (its attachments were in its memory), not
    a network down: the client ends at once, and does not wait out the window."""
    dev = sync.connect(HOST, "1-1", server.port, resume=True)
    dev.control(0x00, 9, 1, 0, b"")
    started = time.monotonic()
    server.stop()
    with pytest.raises(ServerGone):
        dev.control(0x80, 6, 0x100, 0, 18, timeout=WINDOW + 20)
    assert time.monotonic() - started < WINDOW / 2
    assert "nothing listens on the server's port any more" in caplog.text
    dev.close()


def test_a_stale_token_is_refused_once_its_window_passed(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    with ServerThread([HidKeyboard()], port=0, limits=Limits(resume_window=1)) as srv:
        sock = socket.create_connection((HOST, srv.port))
        _info, grant = import_offering_resume(sock, "1-1")
        assert grant is not None and grant.window == 1
        reset(sock)
        wait_for(lambda: "not resumed within 1 s (resume_window): 1-1 released" in caplog.text)
        late = socket.create_connection((HOST, srv.port))
        with pytest.raises(ResumeRefused, match="NODEV"):
            request_resume(late, grant.token, 0)
        late.close()
        assert "resume refused: unknown or expired token" in caplog.text


def test_a_port_forward_to_a_server_gone_is_not_waited_for(server: ServerThread,
                                                           cutter: Cutter) -> None:
    """Through a port forward, a server that is gone does not refuse: the forward
    accepts and closes. Three of those in a row, and the client stops resuming."""
    dev = sync.connect(HOST, "1-1", cutter.port, resume=True)
    try:
        dev.control(0x00, 9, 1, 0, b"")
        cutter.closing = True
        started = time.monotonic()
        cutter.cut()
        with pytest.raises(ServerGone):
            dev.control(0x80, 6, 0x100, 0, 18, timeout=WINDOW + 20)
        assert time.monotonic() - started < WINDOW
    finally:
        dev.close()


def _disk_server(limits: Limits) -> tuple[ServerThread, bytes]:
    image = ImageFile.scratch(8 << 20)
    content = bytes(range(256)) * (8 << 12)  # 8 MiB
    image.write(0, content)
    return ServerThread([MassStorage(image)], port=0, limits=limits), content


def test_reads_larger_than_the_resume_buffer_flow(caplog: pytest.LogCaptureFixture) -> None:
    """1 MiB replies through a 256 KiB resume buffer: the server waits for the
    client's ACKs, and reads them while it waits (a server that stopped reading
    with its writes would never see them, and took the client for dead)."""
    server, content = _disk_server(Limits(resume_window=WINDOW, resume_buffer=256 << 10,
                                          dead_peer_timeout=3))
    with server, sync.connect(HOST, "1-1", server.port, resume=True) as dev:
        dev.control(0x00, 9, 1, 0, b"")
        for n in range(6):
            lba = n * 2048
            got = scsi(dev, n + 1, struct.pack(">BBIBHB", 0x28, 0, lba, 0, 2048, 0), 1 << 20,
                       timeout=20)
            assert got == content[lba * 512:lba * 512 + (1 << 20)]
    assert "lost" not in caplog.text


def test_a_cut_longer_than_the_dead_peer_timeout_during_large_reads(
        caplog: pytest.LogCaptureFixture) -> None:
    """The connection drops while the server is held back by its buffer, and stays
    down for longer than the dead-peer timeout: the attachment waits (its window,
    not the dead-peer rule of a paused connection), and the reads go on whole."""
    caplog.set_level(logging.INFO)
    server, content = _disk_server(Limits(resume_window=WINDOW, resume_buffer=256 << 10,
                                          dead_peer_timeout=1))
    with server:
        proxy = Cutter(server.port)
        try:
            with sync.connect(HOST, "1-1", proxy.port, resume=True) as dev:
                dev.control(0x00, 9, 1, 0, b"")

                def cut() -> None:
                    time.sleep(0.05)
                    proxy.silent = True
                    proxy.cut()
                    time.sleep(3)  # (longer than dead_peer_timeout)
                    proxy.silent = False

                cutting = threading.Thread(target=cut)
                cutting.start()
                for n in range(6):
                    lba = n * 2048
                    got = scsi(dev, n + 1, struct.pack(">BBIBHB", 0x28, 0, lba, 0, 2048, 0),
                               1 << 20, timeout=20)
                    assert got == content[lba * 512:lba * 512 + (1 << 20)]
                cutting.join()
        finally:
            proxy.close()
    assert "resumed 1-1" in caplog.text and proxy.accepted >= 2
    assert "while the client was away" not in caplog.text  # (the buffer it had is its own)
    assert "while its reading was paused" not in caplog.text  # (no dead-peer rule)


def test_a_failed_attach_after_a_grant_releases_the_device_at_once(
        server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """vhci-hcd refuses the socket after the server granted a resumable stream: the
    client says FIN, and the device is free at once (not held for the window)."""
    from usbipy.client import attach as attach_mod
    from usbipy.linux import vhci

    def refuse(_sock: socket.socket, _device: object) -> int:
        raise vhci.VhciError("no free port")

    monkeypatch.setattr(vhci, "require_vhci", lambda: None)
    monkeypatch.setattr(vhci, "attach_socket", refuse)
    with pytest.raises(vhci.VhciError):
        attach_mod.attach(HOST, "1-1", server.port, resume=True)
    wait_for(lambda: attachments(server) == 0, 5)
    with sync.connect(HOST, "1-1", server.port) as again:
        again.control(0x00, 9, 1, 0, b"")


def test_the_relay_hands_on_the_servers_last_replies_before_its_fin() -> None:
    """The server's last frames and its FIN come in one read: the local side (vhci-hcd)
    gets every byte before the relay ends."""
    from usbipy.client.relay import Relay
    from usbipy.protocol.messages import ResumeGrant

    local, vhci_end = socket.socketpair()
    remote, server_end = socket.socketpair()
    relay = Relay(local, remote, ResumeGrant(b"\0" * 16, 60),
                  lambda: socket.socket())  # (never dialled: nothing is lost)
    server = ResumableStream()
    last = bytes(range(256)) * 16  # 4 KiB
    server_end.sendall(b"".join(bytes(p) for p in server.send([last])) + server.fin())
    wake_r, wake_w = os.pipe()
    ended: list[str | None] = []
    runner = threading.Thread(target=lambda: ended.append(relay.run(wake_r)))
    runner.start()
    got = b""
    vhci_end.settimeout(10)
    while len(got) < len(last):
        got += vhci_end.recv(65536)
    runner.join(10)
    assert got == last and ended == ["the server ended the attachment"]
    relay.finish()
    for fd in (wake_r, wake_w):
        os.close(fd)
    for sock in (vhci_end, server_end):
        sock.close()


def test_the_asyncio_client_resumes_too(server: ServerThread, cutter: Cutter) -> None:
    from usbipy.client import import_device

    async def main() -> bytes:
        async with await import_device(HOST, "1-3", cutter.port, resume=True) as dev:
            await dev.control(0x00, 9, 1, 0, b"")
            reading = asyncio.ensure_future(dev.bulk_read(0x81, 64, timeout=20))
            await asyncio.sleep(0.1)  # (the read is on the server)
            cutter.cut()
            await dev.bulk_write(0x02, b"asyncio, through the cut", timeout=20)
            return await reading

    assert asyncio.run(main()) == b"asyncio, through the cut"
    assert cutter.accepted >= 2
    wait_for(lambda: attachments(server) == 0, 5)  # (its close said FIN)
