"""usbip 0.7.0's side of the benchmark (the peer): the same device set on 127.0.0.1:PORT.

Runs in the benchmark's own virtual environment, where usbip==0.7.0 is installed.
A mass-storage disk (64 MiB, in memory), a CDC-ACM port that echoes, and 14 HID
keyboards: 16 devices, the most it exports on one port.
"""

import sys
import threading
from contextlib import ExitStack

import usbip  # type: ignore[import-not-found]
from usbip.classes.device import hid  # type: ignore[import-not-found]
from usbip.classes.device.cdc_acm import CDCACM  # type: ignore[import-not-found]
from usbip.classes.device.msc import MSC  # type: ignore[import-not-found]
from usbip.device import USBDevice  # type: ignore[import-not-found]

KEYBOARDS = 14


class MemoryStore:
    def __init__(self, size: int) -> None:
        self.block_size = 512
        self.num_blocks = size // 512
        self.data = bytearray(size)

    def read(self, lba: int, count: int) -> bytes:
        return bytes(self.data[lba * 512:(lba + count) * 512])

    def write(self, lba: int, count: int, data: bytes) -> None:
        self.data[lba * 512:lba * 512 + len(data)] = data


def main() -> None:
    port = int(sys.argv[1])
    transport = usbip.USBIP("127.0.0.1", port)
    disk = USBDevice(0x1209, 0x0002, product="peer disk")
    disk.add(MSC(MemoryStore(64 << 20)))
    serial = USBDevice(0x1209, 0x0003, product="peer serial")
    serial.add(CDCACM())  # no on_rx: it echoes
    devices = [disk, serial]
    for _ in range(KEYBOARDS):
        keyboard = USBDevice(0x1209, 0x0001, product="peer keyboard")
        keyboard.add(hid.HID(hid.keyboard_report_descriptor(), subclass=hid.SUBCLASS_BOOT,
                             protocol=hid.PROTOCOL_KEYBOARD))
        devices.append(keyboard)
    with ExitStack() as stack:
        for device in devices:
            stack.enter_context(device.plug(via=transport))
        print("ready", flush=True)
        threading.Event().wait()


main()
