"""Golden bytes for every USB/IP message, field by field.

Layouts from Documentation/usb/usbip_protocol.rst; the values are those that
Debian's usbip and the kernel's vhci-hcd/usbip-host put on the wire.
"""

from __future__ import annotations

import pytest

from tests.helpers import (
    DEVID,
    KEYBOARD,
    KEYBOARD_RECORD,
    h,
    imported_client,
    imported_server,
    padded,
)
from usbipy.protocol import (
    EOF,
    NEED_DATA,
    ClientConnection,
    CmdSubmit,
    CmdUnlink,
    Direction,
    IsoPacket,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    OpStatus,
    RetSubmit,
    RetUnlink,
    ServerConnection,
)


def test_device_record_is_312_bytes() -> None:
    assert len(KEYBOARD_RECORD) == 312


def test_op_req_devlist() -> None:
    wire = h("0111",  # version 1.1.1
             "8005",  # OP_REQ_DEVLIST
             "00000000")  # status: unused
    assert ClientConnection().send(OpReqDevlist()) == wire
    server = ServerConnection()
    server.receive_data(wire)
    assert server.next_event() == OpReqDevlist()


def test_op_rep_devlist() -> None:
    wire = h("0111",  # version
             "0005",  # OP_REP_DEVLIST
             "00000000",  # status OK
             "00000001") + KEYBOARD_RECORD + h(  # one device
             "03", "01", "01", "00")  # interface 0: HID / boot / keyboard, padding
    server = ServerConnection()
    server.receive_data(h("0111", "8005", "00000000"))
    server.next_event()
    assert server.send(OpRepDevlist((KEYBOARD,))) == wire
    client = ClientConnection()
    client.send(OpReqDevlist())
    client.receive_data(wire)
    assert client.next_event() == OpRepDevlist((KEYBOARD,))


def test_op_rep_devlist_empty() -> None:
    client = ClientConnection()
    client.send(OpReqDevlist())
    client.receive_data(h("0111", "0005", "00000000", "00000000"))
    assert client.next_event() == OpRepDevlist(())
    assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    assert client.next_event() is EOF


def test_op_req_import() -> None:
    wire = h("0111", "8003",  # OP_REQ_IMPORT
             "00000000",  # status: unused
             padded("3-2", 32))  # busid
    assert ClientConnection().send(OpReqImport("3-2")) == wire


def test_op_rep_import_ok_is_320_bytes() -> None:
    wire = h("0111", "0003", "00000000") + KEYBOARD_RECORD  # OP_REP_IMPORT, OK, device
    assert len(wire) == 320
    server = ServerConnection()
    server.receive_data(h("0111", "8003", "00000000", padded("3-2", 32)))
    server.next_event()
    # OP_REP_IMPORT carries no interface records.
    assert server.send(OpRepImport(OpStatus.OK, KEYBOARD)) == wire
    client = imported_client()
    assert client.device is not None and client.device.devid == DEVID


@pytest.mark.parametrize("status", [OpStatus.NA, OpStatus.DEV_BUSY, OpStatus.DEV_ERR,
                                    OpStatus.NODEV, OpStatus.ERROR])
def test_op_rep_import_error_is_8_bytes(status: OpStatus) -> None:
    wire = h("0111", "0003", f"{status:08x}")
    server = ServerConnection()
    server.receive_data(h("0111", "8003", "00000000", padded("9-9", 32)))
    server.next_event()
    assert server.send(OpRepImport(status)) == wire
    client = ClientConnection()
    client.send(OpReqImport("9-9"))
    client.receive_data(wire)
    assert client.next_event() == OpRepImport(status)


# GET_DESCRIPTOR(DEVICE) as vhci-hcd sends it
CMD_SUBMIT_CONTROL_IN = h(
    "00000001",  # command: USBIP_CMD_SUBMIT
    "00000001",  # seqnum
    "00030002",  # devid: busnum 3 << 16 | devnum 2
    "00000001",  # direction: IN
    "00000000",  # ep 0
    "00000200",  # transfer_flags: URB_DIR_IN
    "00000012",  # transfer_buffer_length: 18
    "00000000",  # start_frame
    "00000000",  # number_of_packets: 0 for non-iso, as vhci-hcd sends
    "00000000",  # interval
    "8006000100001200",  # setup: GET_DESCRIPTOR, wValue 0x0100, wIndex 0, wLength 18
)
RET_SUBMIT_CONTROL_IN = h(
    "00000003",  # command: USBIP_RET_SUBMIT
    "00000001",  # seqnum
    "00000000", "00000000", "00000000",  # devid, direction, ep: 0 from a server
    "00000000",  # status
    "00000012",  # actual_length
    "00000000",  # start_frame
    "00000000",  # number_of_packets, echoed
    "00000000",  # error_count
    "0000000000000000",  # padding
    "120100020000004009120100000101020301",  # the device descriptor
)


def test_cmd_submit_control_in() -> None:
    server = imported_server()
    server.receive_data(CMD_SUBMIT_CONTROL_IN)
    cmd = server.next_event()
    assert cmd == CmdSubmit(1, DEVID, Direction.IN, 0, 0x200, 18,
                            bytes.fromhex("8006000100001200"))
    client = imported_client()
    assert isinstance(cmd, CmdSubmit)
    assert client.send(cmd) == CMD_SUBMIT_CONTROL_IN


def test_ret_submit_control_in() -> None:
    descriptor = bytes.fromhex("120100020000004009120100000101020301")
    server = imported_server()
    server.receive_data(CMD_SUBMIT_CONTROL_IN)
    assert isinstance(server.next_event(), CmdSubmit)
    assert server.send(RetSubmit(1, 0, 18, descriptor)) == RET_SUBMIT_CONTROL_IN
    client = imported_client()
    client.send(CmdSubmit(1, DEVID, Direction.IN, 0, 0x200, 18, bytes.fromhex("8006000100001200")))
    client.receive_data(RET_SUBMIT_CONTROL_IN)
    ret = client.next_event()
    assert isinstance(ret, RetSubmit)
    assert (ret.seqnum, ret.status, ret.actual_length, ret.data) == (1, 0, 18, descriptor)


def test_bulk_out_carries_data_and_its_ret_none() -> None:
    cmd_wire = h(
        "00000001", "00000007", "00030002",
        "00000000",  # direction OUT
        "00000002",  # ep 2
        "00000000", "00000004", "00000000",
        "ffffffff",  # number_of_packets: 0xffffffff, as the protocol document says for non-iso
        "00000000", "0000000000000000",
        "deadbeef",  # transfer_buffer: 4 bytes
    )
    server = imported_server()
    server.receive_data(cmd_wire)
    cmd = server.next_event()
    assert isinstance(cmd, CmdSubmit)
    assert (cmd.data, cmd.number_of_packets, cmd.is_iso) == (b"\xde\xad\xbe\xef", 0xFFFFFFFF, False)
    ret_wire = h("00000003", "00000007", "00000000", "00000000", "00000000",
                 "00000000", "00000004", "00000000", "ffffffff", "00000000", "0000000000000000")
    assert server.send(RetSubmit(7, 0, 4, number_of_packets=0xFFFFFFFF)) == ret_wire
    client = imported_client()
    client.send(CmdSubmit(7, DEVID, Direction.OUT, 2, 0, 4, data=b"\xde\xad\xbe\xef"))
    client.receive_data(ret_wire)
    ret = client.next_event()
    assert isinstance(ret, RetSubmit) and ret.data == b"" and ret.actual_length == 4


def test_iso_in_submit_and_ret() -> None:
    cmd_wire = h(
        "00000001", "00000009", "00030002", "00000001", "00000003",
        "00000202",  # URB_DIR_IN | URB_ISO_ASAP
        "00000040",  # transfer_buffer_length 64
        "00000000",  # start_frame
        "00000002",  # number_of_packets 2
        "00000001", "0000000000000000",
        # iso descriptors: offset, length, actual_length, status
        "00000000", "00000020", "00000000", "00000000",
        "00000020", "00000020", "00000000", "00000000",
    )
    server = imported_server()
    server.receive_data(cmd_wire)
    cmd = server.next_event()
    assert isinstance(cmd, CmdSubmit) and cmd.iso_packets == [
        IsoPacket(0, 32, 0, 0), IsoPacket(32, 32, 0, 0)]
    # The server sends only the packets' actual data, with no padding between them.
    ret_wire = h(
        "00000003", "00000009", "00000000", "00000000", "00000000",
        "00000000",  # status
        "00000018",  # actual_length: 16 + 8
        "00000000", "00000002", "00000000", "0000000000000000",
        "11" * 16, "22" * 8,
        "00000000", "00000020", "00000010", "00000000",
        "00000020", "00000020", "00000008", "00000000",
    )
    packets = [IsoPacket(0, 32, 16, 0), IsoPacket(32, 32, 8, 0)]
    assert server.send(RetSubmit(9, 0, 24, b"\x11" * 16 + b"\x22" * 8, 0, 2, 0,
                                 packets)) == ret_wire
    client = imported_client()
    client.send(cmd)
    client.receive_data(ret_wire)
    ret = client.next_event()
    assert isinstance(ret, RetSubmit) and ret.iso_packets == packets


def test_unlink_and_ret_unlink() -> None:
    cmd_wire = h("00000002",  # USBIP_CMD_UNLINK
                 "00000005", "00030002", "00000000", "00000000",
                 "00000004",  # unlink_seqnum
                 "00" * 24)  # padding
    ret_wire = h("00000004",  # USBIP_RET_UNLINK
                 "00000005", "00000000", "00000000", "00000000",
                 "ffffff98",  # status: -ECONNRESET (-104)
                 "00" * 24)
    server = imported_server()
    server.receive_data(cmd_wire)
    assert server.next_event() == CmdUnlink(5, DEVID, 4)
    assert server.send(RetUnlink(5, -104)) == ret_wire
    client = imported_client()
    client.send(CmdSubmit(4, DEVID, Direction.IN, 1, 0, 8))
    assert client.send(CmdUnlink(5, DEVID, 4)) == cmd_wire
    client.receive_data(ret_wire)
    assert client.next_event() == RetUnlink(5, -104)
    assert client.pending == 0  # cancelled: no RET_SUBMIT will come for seqnum 4


def test_ret_unlink_with_status_0_ends_a_urb_still_pending() -> None:
    # usbip-host (stub_complete) answers a URB it was unlinking as it completed with
    # RET_UNLINK alone, status 0; vhci_rx.c gives the URB back on it. No RET_SUBMIT.
    client = imported_client()
    client.send(CmdSubmit(4, DEVID, Direction.IN, 1, 0, 8))
    client.send(CmdUnlink(5, DEVID, 4))
    client.receive_data(h("00000004", "00000005", "00000000", "00000000", "00000000",
                          "00000000", "00" * 24))
    assert client.next_event() == RetUnlink(5, 0)
    assert client.pending == 0
