"""Which devices are exported, and which client holds each (exclusive import)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from ..devices.base import ExportedDevice, HandOffDevice
from ..protocol import OpStatus

log = logging.getLogger("usbipy.server")

#: A source of devices whose set changes under us (the kernel's usbip-host
#: bindings, libusb bindings and hotplug): asked afresh on every DEVLIST and
#: IMPORT, as usbipd does.
DeviceSource = Callable[[], Iterable[ExportedDevice]]


class DeviceRegistry:
    """Exported devices by busid. A device is held by at most one connection.

    Who holds a device is tracked here, except for hand-off devices, whose
    server tracks it (usbip-host keeps usbip_status): the registry asks them.
    """

    #: Emulated devices appear on this virtual bus, like usbipd's "busnum-port".
    EMULATED_BUS = 1

    def __init__(self, sources: Iterable[DeviceSource] = ()) -> None:
        self._devices: dict[str, ExportedDevice] = {}
        self._owners: dict[str, object] = {}
        self._sources = list(sources)
        self._warned: set[str] = set()

    def add_source(self, source: DeviceSource) -> None:
        self._sources.append(source)

    def _from_sources(self) -> dict[str, ExportedDevice]:
        found: dict[str, ExportedDevice] = {}
        for source in self._sources:
            try:
                devices = list(source())
            except Exception:
                # One broken source (an unreadable bindings file, libusb trouble)
                # must not take the emulated and kernel devices down with it.
                log.exception("listing the devices of %r failed", source)
                continue
            for device in devices:
                if device.busid in self._devices:
                    if device.busid not in self._warned:
                        self._warned.add(device.busid)
                        log.warning("not exporting %s: an emulated device has that busid",
                                    device.busid)
                    continue
                found[device.busid] = device
        return found

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
        """Devices no client holds: the device list leaves out imported ones."""
        result: list[ExportedDevice] = []
        for busid, device in [*self._devices.items(), *self._from_sources().items()]:
            if isinstance(device, HandOffDevice):
                if device.import_status() is OpStatus.OK:
                    result.append(device)
            elif busid not in self._owners:
                result.append(device)
        return result

    def claim(self, busid: str, owner: object) -> tuple[OpStatus, ExportedDevice | None]:
        device = self._devices.get(busid) or self._from_sources().get(busid)
        if device is None:
            return OpStatus.NODEV, None
        if isinstance(device, HandOffDevice):
            status = device.import_status()
            return status, device if status is OpStatus.OK else None
        if busid in self._owners:
            return OpStatus.DEV_BUSY, None
        self._owners[busid] = owner
        return OpStatus.OK, device

    def release(self, busid: str, owner: object) -> None:
        if self._owners.get(busid) is owner:
            del self._owners[busid]

    def owner(self, busid: str) -> object | None:
        return self._owners.get(busid)
