"""The server against the userspace client: handshake, URB dispatch, UNLINK, isolation."""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from usbipy.client import ImportRefused, import_device, list_devices
from usbipy.client.errors import UrbError
from usbipy.protocol import Direction, IsoPacket, LocalProtocolError, OpStatus
from usbipy.server import UsbipServer

HOST = "127.0.0.1"
GET_DEVICE_DESCRIPTOR = (0x80, 6, 0x0100, 0, 18)


def test_devlist_shows_the_demo_devices(serve) -> None:
    async def test(server: UsbipServer) -> None:
        devices = await list_devices(HOST, server.port)
        triples = {d.busid: [(i.bInterfaceClass, i.bInterfaceSubClass, i.bInterfaceProtocol)
                             for i in d.interfaces] for d in devices}
        assert triples == {"1-1": [(3, 1, 1)], "1-2": [(8, 6, 0x50)],
                           "1-3": [(2, 2, 1), (0x0A, 0, 0)]}
        assert [d.devid for d in devices] == [0x10002, 0x10003, 0x10004]

    serve(test)


def test_import_and_get_descriptor(serve) -> None:
    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-2", server.port) as dev:
            desc = await dev.control(*GET_DEVICE_DESCRIPTOR)
            assert len(desc) == 18 and desc[:2] == b"\x12\x01"
            assert struct.unpack_from("<HH", desc, 8) == (0x1209, 0x0002)
            # wLength shorter than the descriptor: the reply is cut
            assert len(await dev.control(0x80, 6, 0x0100, 0, 8)) == 8
            config = await dev.control(0x80, 6, 0x0200, 0, 255)
            assert config[1] == 2 and struct.unpack_from("<H", config, 2)[0] == len(config)
            product = await dev.control(0x80, 6, 0x0302, 0x0409, 255)
            assert product[2:].decode("utf-16-le") == "usbipy mass storage"

    serve(test)


def test_exclusive_import(serve) -> None:
    async def test(server: UsbipServer) -> None:
        first = await import_device(HOST, "1-1", server.port)
        with pytest.raises(ImportRefused) as refused:
            await import_device(HOST, "1-1", server.port)
        assert refused.value.status == OpStatus.DEV_BUSY
        # the first client is not disturbed
        assert len(await first.control(*GET_DEVICE_DESCRIPTOR)) == 18
        # and the device in use is not offered
        assert [d.busid for d in await list_devices(HOST, server.port)] == ["1-2", "1-3"]
        await first.close()
        await asyncio.sleep(0.05)
        second = await import_device(HOST, "1-1", server.port)
        assert len(await second.control(*GET_DEVICE_DESCRIPTOR)) == 18
        await second.close()

    serve(test)


def test_import_of_unknown_busid(serve) -> None:
    async def test(server: UsbipServer) -> None:
        with pytest.raises(ImportRefused, match="no such device") as refused:
            await import_device(HOST, "7-7", server.port)
        assert refused.value.status == OpStatus.NODEV

    serve(test)


def test_unlink_pending_and_completed(serve) -> None:
    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-1", server.port) as dev:
            await dev.control(0x00, 9, 1, 0, b"")  # SET_CONFIGURATION 1
            seqnum, pending = dev.submit_nowait(1, Direction.IN, 8)  # no key pressed: waits
            await asyncio.sleep(0.05)
            assert not pending.done()
            reply = await dev.unlink(seqnum)
            assert reply.status == -104  # -ECONNRESET
            assert pending.cancelled()  # and never a RET_SUBMIT
            done_seq, done = dev.submit_nowait(0, Direction.IN, 18,
                                               setup=bytes.fromhex("8006000100001200"))
            await done
            assert (await dev.unlink(done_seq)).status == 0
            # the connection still works after both
            assert len(await dev.control(*GET_DEVICE_DESCRIPTOR)) == 18

    serve(test)


def test_urbs_complete_out_of_order(serve) -> None:
    async def test(server: UsbipServer) -> None:
        keyboard = server.registry.get("1-1")
        async with await import_device(HOST, "1-1", server.port) as dev:
            await dev.control(0x00, 9, 1, 0, b"")
            _, key = dev.submit_nowait(1, Direction.IN, 8)
            descs = [dev.submit_nowait(0, Direction.IN, 18,
                                       setup=bytes.fromhex("8006000100001200"))[1]
                     for _ in range(32)]
            for ret in await asyncio.gather(*descs):
                assert ret.status == 0 and len(ret.data) == 18
            assert not key.done()
            keyboard.type_text("a")  # type: ignore[union-attr]
            report = await key
            assert report.data == bytes((0, 0, 4, 0, 0, 0, 0, 0))

    serve(test)


def test_hostile_peer_loses_only_its_connection(serve) -> None:
    async def test(server: UsbipServer) -> None:
        good = await import_device(HOST, "1-2", server.port)
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(bytes.fromhex("0111800300000000") + b"1-1".ljust(32, b"\0"))
        assert len(await reader.readexactly(320)) == 320
        writer.write(struct.pack("!IIIII", 1, 1, 0xBAD, 0, 0) + bytes(28))  # wrong devid
        assert await reader.read() == b""  # closed by the server
        writer.close()
        assert len(await good.control(*GET_DEVICE_DESCRIPTOR)) == 18
        # the hostile client's device is free again
        await asyncio.sleep(0.05)
        assert "1-1" in [d.busid for d in await list_devices(HOST, server.port)]
        await good.close()

    serve(test)


def test_garbage_in_the_op_phase(serve) -> None:
    async def test(server: UsbipServer) -> None:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await reader.read() == b""
        writer.close()
        assert len(await list_devices(HOST, server.port)) == 3

    serve(test)


def test_in_request_above_the_cap_gets_enomem(serve) -> None:
    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-2", server.port) as dev:
            await dev.control(0x00, 9, 1, 0, b"")
            ret = await dev.submit(1, Direction.IN, 1 << 30)
            assert ret.status == -12 and ret.data == b""  # -ENOMEM, nothing allocated
            assert len(await dev.control(*GET_DEVICE_DESCRIPTOR)) == 18

    serve(test)


def test_a_client_s_bad_urbs_are_warnings_at_most_once_per_interval(serve, caplog) -> None:
    """A client's bad request is not a server error, and a flood of them writes one
    line: 2,000 oversized IN URBs and 2,000 isochronous URBs to a bulk endpoint."""
    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-2", server.port) as dev:
            await dev.control(0x00, 9, 1, 0, b"")
            caplog.clear()
            for _ in range(2000):
                dev.submit_nowait(1, Direction.IN, (16 << 20) + 1)
            ret = await dev.submit(1, Direction.IN, (16 << 20) + 1)
            assert ret.status == -12
            iso = [IsoPacket(0, 512, 0, 0)]
            for _ in range(2000):
                dev.submit_nowait(2, Direction.OUT, data=bytes(512), iso_packets=iso)
            ret = await dev.submit(2, Direction.OUT, data=bytes(512), iso_packets=iso)
            assert ret.status == -22  # -EINVAL, this URB alone refused
            assert len(await dev.control(*GET_DEVICE_DESCRIPTOR)) == 18  # still served

    caplog.set_level(logging.INFO, logger="usbipy")
    serve(test)
    lines = [r for r in caplog.records if "refused with" in r.getMessage()]
    assert [r.levelname for r in lines] == ["WARNING"]
    assert lines[0].getMessage().endswith(
        "asks for 16777217 bytes IN, above the cap of 16777216: refused with -ENOMEM")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_standard_requests_and_stalls(serve) -> None:
    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-2", server.port) as dev:
            assert await dev.control(0x80, 8, 0, 0, 1) == b"\x00"  # unconfigured
            # a bulk URB before SET_CONFIGURATION: no such endpoint
            assert (await dev.submit(1, Direction.IN, 512)).status == -108
            await dev.control(0x00, 9, 1, 0, b"")
            assert await dev.control(0x80, 8, 0, 0, 1) == b"\x01"
            assert await dev.control(0x81, 10, 0, 0, 1) == b"\x00"  # GET_INTERFACE
            await dev.control(0x01, 11, 0, 0, b"")  # SET_INTERFACE 0/0
            with pytest.raises(UrbError) as stall:
                await dev.control(0x01, 11, 1, 0, b"")  # no alternate setting 1
            assert stall.value.ret.status == -32
            with pytest.raises(UrbError):
                await dev.control(0xC0, 0x42, 0, 0, 4)  # unknown vendor request
            with pytest.raises(UrbError):
                await dev.control(0x80, 6, 0x0700, 0, 9)  # no other-speed config
            # endpoint halt: SET_FEATURE, GET_STATUS, a stalled URB, CLEAR_FEATURE
            await dev.control(0x02, 3, 0, 0x81, b"")
            assert await dev.control(0x82, 0, 0, 0x81, 2) == b"\x01\x00"
            assert (await dev.submit(1, Direction.IN, 13)).status == -32
            await dev.control(0x02, 1, 0, 0x81, b"")
            assert await dev.control(0x82, 0, 0, 0x81, 2) == b"\x00\x00"
            qualifier = await dev.control(0x80, 6, 0x0600, 0, 10)
            assert qualifier[:2] == b"\x0a\x06"

    serve(test)


def test_the_server_on_uvloop() -> None:
    """usbipyd runs on uvloop when it is installed: the same behaviour there."""
    uvloop = pytest.importorskip("uvloop")
    from usbipy.devices.demo import demo_devices

    async def main() -> None:
        server = UsbipServer(port=0)
        for device in demo_devices(disk_size=1 << 20):
            server.add(device)
        async with server:
            assert [d.busid for d in await list_devices(HOST, server.port)] == [
                "1-1", "1-2", "1-3"]
            async with await import_device(HOST, "1-1", server.port) as dev:
                desc = await dev.control(*GET_DEVICE_DESCRIPTOR)
                assert struct.unpack_from("<HH", desc, 8) == (0x1209, 0x0001)
                await dev.control(0x00, 9, 1, 0, b"")
                # the keyboard's interrupt IN waits for a key: UNLINK cancels it
                seqnum, pending = dev.submit_nowait(1, Direction.IN, 8)
                assert (await dev.unlink(seqnum)).status == -104
                assert pending.cancelled()
            with pytest.raises(ImportRefused):
                async with await import_device(HOST, "9-9", server.port):
                    pass

    uvloop.run(main())


def test_a_submit_the_codec_refuses_leaves_nothing_waiting(serve) -> None:
    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-1", server.port) as dev:
            protocol = dev._protocol

            def refuse(*message: object) -> bytes:
                raise LocalProtocolError("refused")

            send, protocol.conn.send = protocol.conn.send, refuse  # type: ignore[method-assign, assignment]
            send_submit = protocol.conn.send_submit
            protocol.conn.send_submit = refuse  # type: ignore[method-assign, assignment]
            with pytest.raises(LocalProtocolError):
                dev.submit_nowait(1, Direction.IN, 8)
            with pytest.raises(LocalProtocolError):
                await dev.unlink(1)
            assert protocol.waiting == {}  # no future left that nothing will ever resolve
            protocol.conn.send = send  # type: ignore[method-assign]
            protocol.conn.send_submit = send_submit  # type: ignore[method-assign]
            assert len(await dev.control(*GET_DEVICE_DESCRIPTOR)) == 18

    serve(test)


def test_the_serve_fixture_fails_a_test_that_blocks_the_loop(serve) -> None:
    import time

    from usbipy.backends import Completion, FunctionDevice

    def blocking(urb: object) -> Completion:
        time.sleep(0.6)  # a blocking call on the loop, as a careless device would make
        return Completion()

    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-1", server.port) as dev:
            await dev.bulk_in(1, 4)

    with pytest.raises(AssertionError, match="the event loop was blocked"):
        serve(test, [FunctionDevice(blocking)])


def test_an_unlink_answered_0_for_a_pending_urb_frees_its_waiter() -> None:
    """Against a server that behaves as usbip-host when an unlink meets a completion."""
    from usbipy.protocol import CmdUnlink, OpReqImport, ServerConnection

    async def main() -> None:
        async def serve_one(reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
            from tests.helpers import KEYBOARD
            from usbipy.protocol import OpRepImport

            conn = ServerConnection()
            while True:
                data = await reader.read(4096)
                if not data:
                    break
                conn.receive_data(data)
                for event in conn.events():
                    if isinstance(event, OpReqImport):
                        writer.write(conn.send(OpRepImport(OpStatus.OK, KEYBOARD)))
                    elif isinstance(event, CmdUnlink):
                        writer.write(conn.reply_unlink(event, 0))  # and no RET_SUBMIT
            writer.close()

        listener = await asyncio.start_server(serve_one, HOST, 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener:
            dev = await import_device(HOST, "3-2", port)
            seqnum, pending = dev.submit_nowait(1, Direction.IN, 8)
            assert (await dev.unlink(seqnum)).status == 0
            await asyncio.sleep(0)
            assert pending.cancelled()  # not left waiting forever
            await dev.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_unlink_before_its_submit_cancels_the_urb_that_comes_after() -> None:
    """vhci_hcd can send a URB's CMD_UNLINK before its CMD_SUBMIT (vhci_tx.c sends
    the unlink queue after a submit queue it found empty). Answering 0, as for a
    URB already answered, would have vhci_hcd give the URB back and then drop the
    device when the RET_SUBMIT finds no URB."""
    import socket

    from usbipy.backends import Completion
    from usbipy.backends.function import FunctionDevice
    from usbipy.protocol import CmdSubmit, CmdUnlink, wire
    from usbipy.protocol.constants import ECONNRESET
    from usbipy.server import ServerThread

    device = FunctionDevice(lambda urb: Completion(data=bytes(urb.transfer_buffer_length)))

    def submit(seqnum: int, devid: int) -> bytes:
        return wire.encode_cmd_submit(CmdSubmit(seqnum, devid, Direction.IN, 1, 0, 8))

    def read(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the server closed the connection"
            data += chunk
        return data

    with ServerThread([device], port=0) as server, \
            socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(wire.encode_op_req_import("1-1"))
        reply = read(sock, 8 + 312)
        devid = wire.decode_device(reply, 8).devid
        sock.sendall(submit(5, devid))  # one URB answered, as before
        assert struct.unpack_from("!II", read(sock, 48 + 8)) == (3, 5)
        # UNLINK of seqnum 10, which has not come yet: its answer waits for it
        sock.sendall(wire.encode_cmd_unlink(CmdUnlink(11, devid, 10, Direction.IN, 1)))
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.settimeout(10)
        # then its CMD_SUBMIT, and another URB: the first is cancelled unserved
        # (RET_UNLINK -ECONNRESET, no RET_SUBMIT), the other one is served
        sock.sendall(submit(10, devid) + submit(12, devid))
        assert struct.unpack_from("!IIIIIi", read(sock, 48))[::5] == (4, ECONNRESET)
        assert struct.unpack_from("!II", read(sock, 48 + 8)) == (3, 12)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        # and an unlink of a URB answered long ago is answered 0, as usbip-host does
        sock.settimeout(10)
        sock.sendall(wire.encode_cmd_unlink(CmdUnlink(13, devid, 5, Direction.IN, 1)))
        assert struct.unpack_from("!IIIIIi", read(sock, 48))[::5] == (4, 0)
    assert [urb.seqnum for urb in device.urbs] == [5, 12]
