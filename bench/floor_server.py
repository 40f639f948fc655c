"""The floor: the least a USB/IP server can do to serve a 64 KiB READ(10), on 127.0.0.1:PORT.

    python bench/floor_server.py PORT

One Bulk-Only mass-storage device (bus id 1-1) with no disk and no checks: a
CBW's tag is kept for its CSW, every IN data stage is answered from one
preallocated buffer (the header and a memoryview of the buffer in one
sendmsg), and OUT data is read into another and dropped. A thread per
connection, blocking sockets, no event loop. What it costs per MB is what the
kernel's TCP copies and Python's least work cost: usbipyd's disk is measured
against it (bench/bench_floor.py).

It speaks only what the benchmark's client sends (OP_REQ_DEVLIST,
OP_REQ_IMPORT, GET_DESCRIPTOR of the configuration, SET_CONFIGURATION,
CMD_SUBMIT on the bulk endpoints): it is a yardstick, not a server.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading

VERSION = 0x0111
OP_HEADER = struct.Struct("!HHI")
DEVICE = struct.Struct("!256s32sIIIHHHBBBBBB")
CMD = struct.Struct("!IIIIIIiiii8s")  # USBIP_CMD_SUBMIT
RET = struct.Struct("!IIIIIiiiii8x")  # USBIP_RET_SUBMIT
CBW = struct.Struct("<IIIBBB")
CSW = struct.Struct("<IIIB")
BUSID, BUSNUM, DEVNUM = b"1-1", 1, 1
EP_IN, EP_OUT = 1, 2
#: Configuration, interface (mass storage, SCSI, Bulk-Only) and its two bulk endpoints.
CONFIG = bytes.fromhex("09022000010100c032" "0904000002080650 00"
                       "0705810200020007050202000200".replace(" ", ""))
DATA = bytes(1 << 20)  # every IN data stage, from here


def device(with_interface: bool) -> bytes:
    info = DEVICE.pack(b"/sys/devices/floor/1-1", BUSID, BUSNUM, DEVNUM, 3,  # high speed
                       0x1209, 0x0002, 0x0100, 0, 0, 0, 1, 1, 1)
    return info + (bytes([8, 6, 0x50, 0]) if with_interface else b"")


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("closed")
        got += n


def send_all(sock: socket.socket, pieces: list[bytes | memoryview]) -> None:
    """The pieces in one sendmsg (a blocking socket sends them all unless a signal
    cuts it short: then the rest)."""
    total = sum(len(p) for p in pieces)
    sent = sock.sendmsg(pieces)
    if sent < total:
        sock.sendall(b"".join(pieces)[sent:])


def serve(sock: socket.socket) -> None:
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = bytearray(OP_HEADER.size)
        recv_exactly(sock, memoryview(head))
        _version, code, _status = OP_HEADER.unpack(head)
        if code == 0x8005:  # OP_REQ_DEVLIST
            sock.sendall(OP_HEADER.pack(VERSION, 0x0005, 0) + struct.pack("!I", 1)
                         + device(True))
            return
        busid = bytearray(32)
        recv_exactly(sock, memoryview(busid))  # OP_REQ_IMPORT: there is one device
        sock.sendall(OP_HEADER.pack(VERSION, 0x0003, 0) + device(False))
        urbs(sock)


def urbs(sock: socket.socket) -> None:
    header = bytearray(CMD.size)
    header_view = memoryview(header)
    sink = bytearray(1 << 20)
    sink_view = memoryview(sink)
    data = memoryview(DATA)
    tag = 0
    while True:
        try:
            recv_exactly(sock, header_view)
        except ConnectionError:
            return
        (_cmd, seqnum, devid, direction, ep, _flags, length, _start, _packets, _interval,
         setup) = CMD.unpack(header)
        reply = b""
        assert length <= len(DATA), "the floor serves transfers of 1 MiB at most"
        if direction == 0 and length:
            recv_exactly(sock, sink_view[:length])
        if ep == 0:
            if direction == 1 and setup[1] == 6:  # GET_DESCRIPTOR (of the configuration)
                reply = CONFIG[:length]
            length = len(reply)
        elif direction == 0:
            if length == CBW.size + 16:
                tag = CBW.unpack_from(sink)[1]
        elif length == CSW.size:
            reply = CSW.pack(0x53425355, tag, 0, 0)
        else:
            send_all(sock, [RET.pack(3, seqnum, devid, direction, ep, 0, length, 0, 0, 0),
                            data[:length]])
            continue
        sock.sendall(RET.pack(3, seqnum, devid, direction, ep, 0, length, 0, 0, 0) + reply)


def main(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port))
    print("ready", flush=True)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[-1]))
