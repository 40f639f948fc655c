"""A device's speed, as Linux numbers it."""

from __future__ import annotations

from enum import IntEnum


class Speed(IntEnum):
    """enum usb_device_speed (include/uapi/linux/usb/ch9.h); USB/IP's device record
    carries it as is."""

    UNKNOWN = 0
    LOW = 1
    FULL = 2
    HIGH = 3
    WIRELESS = 4
    SUPER = 5
    SUPER_PLUS = 6
