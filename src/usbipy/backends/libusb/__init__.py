"""Real devices exported through libusb, with no kernel module.

``events`` runs libusb's event thread, ``urbs`` turns URBs into transfers and
back, ``device`` is one exported device, ``unplug`` tells an unplug from an
error, ``source`` finds the devices the export rules say to export through
libusb (see :mod:`usbipy.exports`), and ``status`` maps libusb's results to
the kernel's errno values.
Importing this package does not need python-libusb1; using a device does.
"""

from .device import LibusbDevice
from .events import LibusbUnavailable, libusb_available
from .source import LibusbSource

__all__ = [
    "LibusbDevice",
    "LibusbSource",
    "LibusbUnavailable",
    "libusb_available",
]
