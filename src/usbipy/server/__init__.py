"""The asyncio USB/IP server: a thin layer around the codec."""

from .connection import UsbipServerProtocol
from .daemon import ServerThread, UsbipServer, listen_sockets
from .registry import DeviceRegistry

__all__ = [
    "DeviceRegistry",
    "ServerThread",
    "UsbipServer",
    "UsbipServerProtocol",
    "listen_sockets",
]
