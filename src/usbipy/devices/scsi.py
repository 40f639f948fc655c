"""A SCSI direct-access block device (SBC-3/SPC-4 subset) as USB mass storage needs it.

Sans-IO: :meth:`ScsiDisk.command` turns a CDB into a :class:`ScsiCommand` that
says which data moves in which direction; the transport (Bulk-Only) moves it.
Errors leave sense data for REQUEST SENSE, as a real disk does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from .storage import ImageFile

GOOD = 0x00
CHECK_CONDITION = 0x02


class Op(IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_FORMAT_CAPACITIES = 0x23
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    SYNCHRONIZE_CACHE_16 = 0x91
    SERVICE_ACTION_IN_16 = 0x9E  # READ CAPACITY(16) is service action 0x10


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7


@dataclass(frozen=True, slots=True)
class Sense:
    key: SenseKey
    asc: int
    ascq: int = 0

    def fixed_format(self) -> bytes:
        """Fixed-format sense data (SPC-4 4.5.3), 18 bytes."""
        return struct.pack(">BBBIBIBBBBBB", 0x70, 0, self.key, 0, 10, 0, self.asc, self.ascq,
                           0, 0, 0, 0)


NO_SENSE = Sense(SenseKey.NO_SENSE, 0x00)
INVALID_OPCODE = Sense(SenseKey.ILLEGAL_REQUEST, 0x20)
LBA_OUT_OF_RANGE = Sense(SenseKey.ILLEGAL_REQUEST, 0x21)
INVALID_FIELD_IN_CDB = Sense(SenseKey.ILLEGAL_REQUEST, 0x24)
WRITE_PROTECTED = Sense(SenseKey.DATA_PROTECT, 0x27)
MEDIUM_NOT_PRESENT = Sense(SenseKey.NOT_READY, 0x3A)
WRITE_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x0C)
READ_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x11)


@dataclass(slots=True)
class ScsiCommand:
    """What one CDB asks of the transport."""

    status: int = GOOD
    #: Data for the host (small replies), already cut to the allocation length.
    data_in: bytes = b""
    #: A READ: byte offset and length on the storage, streamed by the transport.
    read: tuple[int, int] | None = None
    #: A WRITE: byte offset and length the host is going to send.
    write: tuple[int, int] | None = None
    #: SYNCHRONIZE CACHE: the transport flushes before reporting status.
    flush: bool = False

    @property
    def data_in_length(self) -> int:
        return self.read[1] if self.read else len(self.data_in)


class ScsiDisk:
    """One logical unit backed by an :class:`ImageFile`."""

    def __init__(self, storage: ImageFile, *, vendor: str = "usbipy", product: str = "Virtual Disk",
                 revision: str = "0001", serial: str = "USBIPY0001") -> None:
        self.storage = storage
        self.vendor = vendor
        self.product = product
        self.revision = revision
        self.serial = serial
        self.sense = NO_SENSE
        self.medium_present = True
        self.prevent_removal = False

    @property
    def read_only(self) -> bool:
        return self.storage.read_only

    def fail(self, sense: Sense) -> ScsiCommand:
        self.sense = sense
        return ScsiCommand(status=CHECK_CONDITION)

    def command(self, cdb: bytes) -> ScsiCommand:
        if not cdb:
            return self.fail(INVALID_OPCODE)
        op = cdb[0]
        if op == Op.REQUEST_SENSE:
            sense, self.sense = self.sense, NO_SENSE
            return ScsiCommand(data_in=sense.fixed_format()[: cdb[4] if len(cdb) > 4 else 18])
        if op == Op.INQUIRY:
            return self._inquiry(cdb)
        handler = _MEDIUM_COMMANDS.get(op)
        if handler is not None:
            if not self.medium_present:
                return self.fail(MEDIUM_NOT_PRESENT)
            try:
                return handler(self, cdb)
            except (struct.error, IndexError):
                return self.fail(INVALID_FIELD_IN_CDB)
        if op == Op.PREVENT_ALLOW_MEDIUM_REMOVAL:
            self.prevent_removal = bool(cdb[4] & 1) if len(cdb) > 4 else False
            return ScsiCommand()
        if op == Op.START_STOP_UNIT and len(cdb) > 4:
            load_eject, start = cdb[4] & 2, cdb[4] & 1
            if load_eject:
                self.medium_present = bool(start) or self.prevent_removal
            return ScsiCommand()
        return self.fail(INVALID_OPCODE)

    # --- commands --------------------------------------------------------------

    def _inquiry(self, cdb: bytes) -> ScsiCommand:
        if len(cdb) < 6:
            return self.fail(INVALID_FIELD_IN_CDB)
        allocation = struct.unpack_from(">H", cdb, 3)[0]
        if cdb[1] & 1:  # EVPD
            page = cdb[2]
            if page == 0x00:
                data = bytes((0, 0x00, 0, 2, 0x00, 0x80))
            elif page == 0x80:
                serial = self.serial.encode()
                data = bytes((0, 0x80, 0, len(serial))) + serial
            else:
                return self.fail(INVALID_FIELD_IN_CDB)
            return ScsiCommand(data_in=data[:allocation])
        if cdb[2]:
            return self.fail(INVALID_FIELD_IN_CDB)
        data = struct.pack(
            ">BBBBBBBB8s16s4s",
            0x00,  # peripheral: direct-access block device, connected
            0x80,  # RMB: removable medium, as USB sticks report
            0x04,  # SPC-2
            0x02,  # response data format 2
            31,  # additional length: 36 bytes in all
            0, 0, 0,
            self.vendor.encode().ljust(8)[:8],
            self.product.encode().ljust(16)[:16],
            self.revision.encode().ljust(4)[:4],
        )
        return ScsiCommand(data_in=data[:allocation])

    def _test_unit_ready(self, cdb: bytes) -> ScsiCommand:
        return ScsiCommand()

    def _read_capacity_10(self, cdb: bytes) -> ScsiCommand:
        last = min(self.storage.blocks - 1, 0xFFFFFFFF)
        return ScsiCommand(data_in=struct.pack(">II", last, self.storage.block_size))

    def _service_action_in(self, cdb: bytes) -> ScsiCommand:
        if cdb[1] & 0x1F != 0x10:  # READ CAPACITY(16)
            return self.fail(INVALID_FIELD_IN_CDB)
        allocation = struct.unpack_from(">I", cdb, 10)[0]
        data = struct.pack(">QI", self.storage.blocks - 1, self.storage.block_size).ljust(32, b"\0")
        return ScsiCommand(data_in=data[:allocation])

    def _read_format_capacities(self, cdb: bytes) -> ScsiCommand:
        allocation = struct.unpack_from(">H", cdb, 7)[0]
        data = struct.pack(">BBBBIB", 0, 0, 0, 8, self.storage.blocks, 0x02)  # formatted media
        data += self.storage.block_size.to_bytes(3, "big")
        return ScsiCommand(data_in=data[:allocation])

    def _mode_sense(self, cdb: bytes) -> ScsiCommand:
        six = cdb[0] == Op.MODE_SENSE_6
        page = cdb[2] & 0x3F
        # Caching mode page (SBC-3 6.4.5): write cache disabled, so the host
        # needs no SYNCHRONIZE CACHE for its writes to reach the image.
        caching = bytes((0x08, 0x12)) + bytes(18)
        if page == 0x08 or page == 0x3F:
            pages = caching
        elif page == 0x00:
            pages = b""
        else:
            return self.fail(INVALID_FIELD_IN_CDB)
        wp = 0x80 if self.read_only else 0x00
        if six:
            allocation = cdb[4]
            data = bytes((3 + len(pages), 0, wp, 0)) + pages
        else:
            allocation = struct.unpack_from(">H", cdb, 7)[0]
            data = struct.pack(">HBBBBH", 6 + len(pages), 0, wp, 0, 0, 0) + pages
        return ScsiCommand(data_in=data[:allocation])

    def _extent(self, lba: int, blocks: int) -> tuple[int, int] | None:
        if lba + blocks > self.storage.blocks:
            return None
        size = self.storage.block_size
        return lba * size, blocks * size

    def _read(self, cdb: bytes) -> ScsiCommand:
        if cdb[0] == Op.READ_10:
            lba, blocks = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
        else:
            lba, blocks = struct.unpack_from(">QI", cdb, 2)
        extent = self._extent(lba, blocks)
        if extent is None:
            return self.fail(LBA_OUT_OF_RANGE)
        return ScsiCommand(read=extent)

    def _write(self, cdb: bytes) -> ScsiCommand:
        if cdb[0] == Op.WRITE_10:
            lba, blocks = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
        else:
            lba, blocks = struct.unpack_from(">QI", cdb, 2)
        if self.read_only:
            return self.fail(WRITE_PROTECTED)
        extent = self._extent(lba, blocks)
        if extent is None:
            return self.fail(LBA_OUT_OF_RANGE)
        return ScsiCommand(write=extent)

    def _verify(self, cdb: bytes) -> ScsiCommand:
        return ScsiCommand()

    def _synchronize_cache(self, cdb: bytes) -> ScsiCommand:
        return ScsiCommand(flush=True)


_MEDIUM_COMMANDS: dict[int, Callable[[ScsiDisk, bytes], ScsiCommand]] = {
    Op.TEST_UNIT_READY: ScsiDisk._test_unit_ready,
    Op.READ_CAPACITY_10: ScsiDisk._read_capacity_10,
    Op.SERVICE_ACTION_IN_16: ScsiDisk._service_action_in,
    Op.READ_FORMAT_CAPACITIES: ScsiDisk._read_format_capacities,
    Op.MODE_SENSE_6: ScsiDisk._mode_sense,
    Op.MODE_SENSE_10: ScsiDisk._mode_sense,
    Op.READ_10: ScsiDisk._read,
    Op.READ_16: ScsiDisk._read,
    Op.WRITE_10: ScsiDisk._write,
    Op.WRITE_16: ScsiDisk._write,
    Op.VERIFY_10: ScsiDisk._verify,
    Op.SYNCHRONIZE_CACHE_10: ScsiDisk._synchronize_cache,
    Op.SYNCHRONIZE_CACHE_16: ScsiDisk._synchronize_cache,
}
