"""The asyncio USB/IP server."""

from .connection import UsbipServerProtocol
from .daemon import USBIP_PORT, ServerThread, UsbipServer
from .registry import DeviceRegistry

__all__ = ["USBIP_PORT", "DeviceRegistry", "ServerThread", "UsbipServer", "UsbipServerProtocol"]
