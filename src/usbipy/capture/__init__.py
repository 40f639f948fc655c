"""Captures of the URBs a Python-served device handles, as pcapng Wireshark decodes.

Link type 220 (LINKTYPE_USB_LINUX_MMAPPED, Linux usbmon): the format dumpcap
writes for usbmonN and usbipd-win for its captures. Devices that the kernel
serves (usbip-host) pass no URB through Python: capture those with dumpcap on
the server's usbmonN interface.
"""

from .usbmon import UrbRecorder
from .writer import Capture

__all__ = ["Capture", "UrbRecorder"]
