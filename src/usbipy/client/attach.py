"""`usbip attach`: import a remote device over TCP, then hand the socket to vhci-hcd."""

from __future__ import annotations

from dataclasses import dataclass

from ..linux import vhci
from ..protocol import DeviceInfo
from .handshake import connect, request_import


@dataclass(frozen=True)
class Attached:
    port: int
    host: str
    tcp_port: int
    device: DeviceInfo


def attach(host: str, busid: str, tcp_port: int) -> Attached:
    """`usbip attach -r HOST -b BUSID`: import over TCP, then hand the socket to vhci-hcd."""
    vhci.require_vhci()  # fail before the server marks the device as imported
    sock = connect(host, tcp_port)
    try:
        device = request_import(sock, busid)
        port = vhci.attach_socket(sock, device)
    finally:
        sock.close()  # vhci-hcd holds its own reference now
    vhci.write_record(port, vhci.Record(host, str(tcp_port), busid))
    return Attached(port, host, tcp_port, device)
