"""Just enough of python-libusb1's objects to drive LibusbDevice without hardware.

A test completes a submitted transfer by setting its result and calling
:meth:`FakeTransfer.complete`, as libusb's event thread would.
"""

from __future__ import annotations

from typing import Any


class FakeUsbError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


class FakeEndpoint:
    def __init__(self, address: int, attributes: int) -> None:
        self.address, self.attributes = address, attributes

    def getAddress(self) -> int:
        return self.address

    def getAttributes(self) -> int:
        return self.attributes


class FakeSetting:
    def __init__(self, number: int, alt: int, triple: tuple[int, int, int],
                 endpoints: list[FakeEndpoint]) -> None:
        self.number, self.alt, self.triple, self.endpoints = number, alt, triple, endpoints

    def __iter__(self) -> Any:
        return iter(self.endpoints)

    def getNumber(self) -> int:
        return self.number

    def getAlternateSetting(self) -> int:
        return self.alt

    def getClass(self) -> int:
        return self.triple[0]

    def getSubClass(self) -> int:
        return self.triple[1]

    def getProtocol(self) -> int:
        return self.triple[2]


class FakeConfig:
    def __init__(self, value: int, interfaces: list[list[FakeSetting]]) -> None:
        self.value, self.interfaces = value, interfaces

    def __iter__(self) -> Any:
        return iter(self.interfaces)

    def getConfigurationValue(self) -> int:
        return self.value


class FakeTransfer:
    def __init__(self, handle: FakeHandle, iso_packets: int) -> None:
        self.handle = handle
        self.iso_packets = iso_packets
        self.kind = ""
        self.submitted = False
        self.cancelled = False
        self.status = 0
        self.actual_length = 0
        self.buffer = b""
        self.iso_results: list[tuple[int, bytes]] = []
        self.add_zero_packet = False

    def _set(self, kind: str, endpoint: int, buffer: int | bytes, callback: Any,
             user_data: Any) -> None:
        self.kind, self.endpoint, self.request = kind, endpoint, buffer
        self.callback, self.user_data = callback, user_data

    def setControl(self, request_type: int, request: int, value: int, index: int,
                   buffer: int | bytes, callback: Any, user_data: Any, timeout: int) -> None:
        self.setup = (request_type, request, value, index)
        self._set("control", 0, buffer, callback, user_data)

    def setBulk(self, endpoint: int, buffer: int | bytes, callback: Any, user_data: Any,
                timeout: int) -> None:
        self._set("bulk", endpoint, buffer, callback, user_data)

    def setInterrupt(self, endpoint: int, buffer: int | bytes, callback: Any, user_data: Any,
                     timeout: int) -> None:
        self._set("interrupt", endpoint, buffer, callback, user_data)

    def setIsochronous(self, endpoint: int, buffer: int | bytes, callback: Any,
                       user_data: Any, timeout: int, lengths: list[int]) -> None:
        self._set("iso", endpoint, buffer, callback, user_data)
        self.iso_lengths = lengths

    def setAddZeroPacket(self, value: bool) -> None:
        self.add_zero_packet = value

    def submit(self) -> None:
        if self.handle.submit_error is not None:
            raise FakeUsbError(self.handle.submit_error)
        self.submitted = True
        self.handle.submitted.append(self)

    def cancel(self) -> None:
        if not self.submitted:
            raise FakeUsbError(-5)
        self.cancelled = True

    def isSubmitted(self) -> bool:
        return self.submitted

    def getUserData(self) -> Any:
        return self.user_data

    def getStatus(self) -> int:
        return self.status

    def getActualLength(self) -> int:
        return self.actual_length

    def getBuffer(self) -> memoryview:
        return memoryview(self.buffer)

    def iterISO(self) -> Any:
        return iter(self.iso_results)

    def close(self) -> None:
        pass

    def complete(self, status: int = 0, data: bytes = b"", actual_length: int | None = None,
                 iso: list[tuple[int, bytes]] | None = None) -> None:
        self.status, self.buffer = status, data
        self.actual_length = len(data) if actual_length is None else actual_length
        self.iso_results = iso or []
        self.submitted = False
        self.callback(self)


class FakeHandle:
    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.calls: list[tuple[Any, ...]] = []
        self.submitted: list[FakeTransfer] = []
        self.configuration = device.configs[0].value
        self.submit_error: int | None = None
        self.kernel_drivers = {0}

    def getTransfer(self, iso_packets: int = 0) -> FakeTransfer:
        return FakeTransfer(self, iso_packets)

    def getConfiguration(self) -> int:
        return self.configuration

    def setConfiguration(self, value: int) -> None:
        self.calls.append(("setConfiguration", value))
        self.configuration = value

    def setInterfaceAltSetting(self, interface: int, alt: int) -> None:
        self.calls.append(("setInterfaceAltSetting", interface, alt))

    def clearHalt(self, endpoint: int) -> None:
        self.calls.append(("clearHalt", endpoint))

    def resetDevice(self) -> None:
        self.calls.append(("resetDevice",))

    def kernelDriverActive(self, interface: int) -> bool:
        return interface in self.kernel_drivers

    def detachKernelDriver(self, interface: int) -> None:
        self.calls.append(("detachKernelDriver", interface))
        self.kernel_drivers.discard(interface)

    def attachKernelDriver(self, interface: int) -> None:
        self.calls.append(("attachKernelDriver", interface))
        self.kernel_drivers.add(interface)

    def claimInterface(self, interface: int) -> None:
        self.calls.append(("claimInterface", interface))

    def releaseInterface(self, interface: int) -> None:
        self.calls.append(("releaseInterface", interface))

    def close(self) -> None:
        self.calls.append(("close",))


class FakeDevice:
    """A high-speed device: interface 0 with bulk 0x81/0x02 and interrupt 0x83,
    alt setting 1 adding iso IN 0x84; configurations 1 and 2."""

    def __init__(self) -> None:
        alt0 = FakeSetting(0, 0, (0xFF, 0, 0), [FakeEndpoint(0x81, 2), FakeEndpoint(0x02, 2),
                                                FakeEndpoint(0x83, 3)])
        alt1 = FakeSetting(0, 1, (0xFF, 0, 0), [FakeEndpoint(0x84, 1)])
        self.configs = [FakeConfig(1, [[alt0, alt1]]), FakeConfig(2, [[alt0]])]
        self.handle: FakeHandle | None = None

    def open(self) -> FakeHandle:
        self.handle = FakeHandle(self)
        return self.handle

    def iterConfigurations(self) -> Any:
        return iter(self.configs)

    def getPortNumberList(self) -> list[int]:
        return [3, 1]

    def getBusNumber(self) -> int:
        return 2

    def getDeviceAddress(self) -> int:
        return 7

    def getDeviceSpeed(self) -> int:
        return 3

    def getVendorID(self) -> int:
        return 0x1209

    def getProductID(self) -> int:
        return 0xBEEF

    def getbcdDevice(self) -> int:
        return 0x0100

    def getDeviceClass(self) -> int:
        return 0

    def getDeviceSubClass(self) -> int:
        return 0

    def getDeviceProtocol(self) -> int:
        return 0

    def getNumConfigurations(self) -> int:
        return 2
