"""Run usbip 0.7.0's emulated mass-storage device (the peer) on 127.0.0.1:PORT.

Runs in the benchmark's own virtual environment, where usbip==0.7.0 is installed.
"""

import sys
import threading

import usbip  # type: ignore[import-not-found]
from usbip.classes.device.msc import MSC  # type: ignore[import-not-found]
from usbip.device import USBDevice  # type: ignore[import-not-found]


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
    dev = USBDevice(0x1209, 0x0002, product="peer disk")
    dev.add(MSC(MemoryStore(64 << 20)))
    with dev.plug(via=usbip.USBIP("127.0.0.1", port)):
        print("ready", flush=True)
        threading.Event().wait()


main()
