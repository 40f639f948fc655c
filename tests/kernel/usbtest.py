"""The kernel's own USB test driver, usbtest, driven as its testusb tool drives it.

Run in the guest as ``python -m tests.kernel.usbtest BUSID CASE[,CASE...]``: for
each case, one USBTEST_REQUEST through USBDEVFS_IOCTL on interface 0 of the
device at BUSID (usbtest must be bound to it), and one JSON line:
``{"case": N, "errno": 0 or the error, "seconds": S}``.

The structures and request codes are those of tools/usb/testusb.c and
drivers/usb/misc/usbtest.c (struct usbtest_param_64, USBTEST_REQUEST_64 on a
64-bit kernel); the cases' parameters are testusb's defaults, with fewer
iterations, so the whole run stays short under TCG.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import struct
import sys
import time

_IOC_WRITE, _IOC_READ = 1, 2


def _iowr(kind: str, number: int, size: int) -> int:
    return ((_IOC_READ | _IOC_WRITE) << 30) | (size << 16) | (ord(kind) << 8) | number


#: struct usbtest_param_64: test_num, iterations, length, vary, sglen (u32 each), then
#: duration_sec, duration_usec (s64), aligned to 8.
PARAM = struct.Struct("=IIIII4xqq")
USBTEST_REQUEST = _iowr("U", 100, PARAM.size)
#: struct usbdevfs_ioctl { int ifno; int ioctl_code; void *data; }
USBDEVFS_IOCTL = _iowr("U", 18, struct.calcsize("@iIP"))

#: testusb.c's defaults: iterations 1000, length 1024, vary 1024, sglen 32. Fewer here.
ITERATIONS = {0: 1, 9: 100, 10: 100, 11: 20, 12: 20, 13: 10, 14: 100, 21: 100, 24: 10}
DEFAULT_ITERATIONS = 50


def run_case(fd: int, case: int) -> dict[str, object]:
    iterations = ITERATIONS.get(case, DEFAULT_ITERATIONS)
    param = ctypes.create_string_buffer(PARAM.pack(case, iterations, 1024, 512, 32, 0, 0),
                                        PARAM.size)
    request = struct.pack("@iIP", 0, USBTEST_REQUEST, ctypes.addressof(param))
    started = time.monotonic()
    try:
        fcntl.ioctl(fd, USBDEVFS_IOCTL, bytearray(request))
        error = 0
    except OSError as exc:
        error = exc.errno or -1
    return {"case": case, "errno": error, "seconds": round(time.monotonic() - started, 3)}


def device_node(busid: str) -> str:
    base = f"/sys/bus/usb/devices/{busid}"
    with open(f"{base}/busnum") as f:
        bus = int(f.read())
    with open(f"{base}/devnum") as f:
        dev = int(f.read())
    return f"/dev/bus/usb/{bus:03d}/{dev:03d}"


def main(argv: list[str]) -> int:
    busid, cases = argv[0], [int(c) for c in argv[1].split(",")]
    fd = os.open(device_node(busid), os.O_RDWR)
    try:
        for case in cases:
            print(json.dumps(run_case(fd, case)), flush=True)
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
