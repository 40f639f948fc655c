"""Which devices are exported, and which client holds each (exclusive import)."""

from __future__ import annotations

from collections.abc import Iterator

from ..devices.base import ExportedDevice
from ..protocol import OpStatus


class DeviceRegistry:
    """Exported devices by busid. A device is held by at most one connection."""

    #: Emulated devices appear on this virtual bus, like usbipd's "busnum-port".
    EMULATED_BUS = 1

    def __init__(self) -> None:
        self._devices: dict[str, ExportedDevice] = {}
        self._owners: dict[str, object] = {}

    def add(self, device: ExportedDevice) -> ExportedDevice:
        """Export ``device``; one without a busid gets the next port on the emulated bus."""
        if not device.busid:
            port = 1
            while f"{self.EMULATED_BUS}-{port}" in self._devices:
                port += 1
            device.busid = f"{self.EMULATED_BUS}-{port}"
            device.busnum = self.EMULATED_BUS
            device.devnum = port + 1  # devnum 1 is the root hub
        if device.busid in self._devices:
            raise ValueError(f"busid {device.busid} is already exported")
        self._devices[device.busid] = device
        return device

    def remove(self, busid: str) -> ExportedDevice:
        self._owners.pop(busid, None)
        return self._devices.pop(busid)

    def __iter__(self) -> Iterator[ExportedDevice]:
        return iter(list(self._devices.values()))

    def __len__(self) -> int:
        return len(self._devices)

    def get(self, busid: str) -> ExportedDevice | None:
        return self._devices.get(busid)

    def available(self) -> list[ExportedDevice]:
        """Devices no client holds: usbipd's device list leaves out imported ones."""
        return [d for b, d in self._devices.items() if b not in self._owners]

    def claim(self, busid: str, owner: object) -> tuple[OpStatus, ExportedDevice | None]:
        device = self._devices.get(busid)
        if device is None:
            return OpStatus.NODEV, None
        if busid in self._owners:
            return OpStatus.DEV_BUSY, None
        self._owners[busid] = owner
        return OpStatus.OK, device

    def release(self, busid: str, owner: object) -> None:
        if self._owners.get(busid) is owner:
            del self._owners[busid]

    def owner(self, busid: str) -> object | None:
        return self._owners.get(busid)
