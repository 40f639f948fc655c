"""Which devices are exported, and which client holds each: the one record of it.

A device a client imported is held here until the server has released it
(its ``detach`` finished), whatever the source that found it says meanwhile:
the registry alone answers "is it busy". Hand-off devices are the exception
by nature: once handed over, the kernel holds them (usbip-host's
usbip_status), so for those the registry asks the device.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator

from ..backends.base import AnyDevice, DeviceSource, ExportedDevice, HandOffDevice
from ..escape import printable
from ..protocol import OpStatus

log = logging.getLogger("usbipy.server")


class DeviceRegistry:
    """Exported devices by busid. A device is held by at most one connection."""

    #: Emulated devices appear on this virtual bus, like usbipd's "busnum-port".
    EMULATED_BUS = 1

    def __init__(self, sources: Iterable[DeviceSource] = ()) -> None:
        self._devices: dict[str, ExportedDevice] = {}
        #: busid -> (device, the connection that holds it)
        self._held: dict[str, tuple[ExportedDevice, object]] = {}
        self.sources = list(sources)
        self._warned: set[str] = set()

    def add_source(self, source: DeviceSource) -> None:
        self.sources.append(source)

    async def _from_sources(self) -> dict[str, AnyDevice]:
        found: dict[str, AnyDevice] = {}
        for source in self.sources:
            try:
                devices = await source.devices()
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
                                    printable(device.busid))
                    continue
                found.setdefault(device.busid, device)
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
        """Stop exporting an emulated device (its client, if any, keeps it until it goes)."""
        return self._devices.pop(busid)

    def __iter__(self) -> Iterator[ExportedDevice]:
        return iter(list(self._devices.values()))

    def __len__(self) -> int:
        return len(self._devices)

    def get(self, busid: str) -> ExportedDevice | None:
        return self._devices.get(busid)

    async def exported(self) -> list[AnyDevice]:
        """Every device this server exports, held or not (emulated, then the sources')."""
        found = await self._from_sources() if self.sources else {}
        return [*self._devices.values(),
                *(d for busid, d in found.items() if busid not in self._devices)]

    async def hand_offs(self) -> list[HandOffDevice]:
        """Every device another party (the kernel) serves, in use or not."""
        return [d for d in (await self._from_sources()).values()
                if isinstance(d, HandOffDevice)]

    async def available(self) -> list[AnyDevice]:
        """Devices a client may import now: the device list leaves out held ones."""
        candidates = [*self._devices.values(), *(await self._from_sources()).values()]
        hand_offs = [d for d in candidates if isinstance(d, HandOffDevice)]
        free_hand_offs: set[str] = set()
        if hand_offs:  # usbip_status is a sysfs read: off the loop
            free_hand_offs.update(await asyncio.to_thread(
                lambda: [d.busid for d in hand_offs if d.import_status() is OpStatus.OK]))
        return [d for d in candidates
                if (d.busid in free_hand_offs if isinstance(d, HandOffDevice)
                    else d.busid not in self._held)]

    async def claim(self, busid: str, owner: object,
                    permitted: Callable[[AnyDevice], bool] = lambda device: True,
                    ) -> tuple[OpStatus, AnyDevice | None]:
        """Hold ``busid`` for ``owner``: OK and the device, or why not and None.

        A device ``permitted`` refuses is NODEV, busy or not: a client learns
        nothing of devices it may not use."""
        # The sources are read whatever the busid: a denied device must take as long
        # to refuse as an unknown one, or the time tells them apart.
        found = await self._from_sources() if self.sources else {}
        held = self._held.get(busid)
        if held is not None:
            return (OpStatus.DEV_BUSY if permitted(held[0]) else OpStatus.NODEV), None
        device: AnyDevice | None = self._devices.get(busid)
        if device is None:
            device = found.get(busid)
        if device is None or not permitted(device):
            return OpStatus.NODEV, None
        if isinstance(device, HandOffDevice):
            status = await asyncio.to_thread(device.import_status)
            return status, device if status is OpStatus.OK else None
        if busid in self._held:  # claimed by another connection while we looked
            return OpStatus.DEV_BUSY, None
        self._held[busid] = (device, owner)
        return OpStatus.OK, device

    def release(self, busid: str, owner: object) -> None:
        held = self._held.get(busid)
        if held is not None and held[1] is owner:
            del self._held[busid]

    def owner(self, busid: str) -> object | None:
        held = self._held.get(busid)
        return held[1] if held is not None else None

    def held(self) -> list[ExportedDevice]:
        """The devices clients hold now."""
        return [device for device, _owner in self._held.values()]
