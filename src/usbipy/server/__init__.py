"""The asyncio USB/IP server: a thin layer around the codec."""

from .connection import UsbipServerProtocol
from .registry import DeviceRegistry
from .server import ServerThread, UsbipServer, listen_sockets

__all__ = [
    "DeviceRegistry",
    "ServerThread",
    "UsbipServer",
    "UsbipServerProtocol",
    "listen_sockets",
]
