"""Names for USB vendors, products and classes, from the system's usb.ids.

The C usbip tools print "vendor : product (vvvv:pppp)" and
"class / subclass / protocol (cc/ss/pp)" from the same database; so does usbipy,
and it falls back to "unknown ..." exactly as they do when a name is missing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

#: Where distributions install usb.ids (hwdata on Fedora/Arch, usbutils on Debian).
USB_IDS_PATHS = (
    Path("/usr/share/hwdata/usb.ids"),
    Path("/usr/share/misc/usb.ids"),
    Path("/var/lib/usbutils/usb.ids"),
    Path("/usr/share/usb.ids"),
)


@dataclass
class UsbIds:
    vendors: dict[int, str] = field(default_factory=dict)
    products: dict[tuple[int, int], str] = field(default_factory=dict)
    classes: dict[int, str] = field(default_factory=dict)
    subclasses: dict[tuple[int, int], str] = field(default_factory=dict)
    protocols: dict[tuple[int, int, int], str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> UsbIds:
        ids = cls()
        section = ""  # "" for vendors, "C" for classes, anything else is skipped
        vendor = klass = subclass = -1
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            tabs = len(line) - len(line.lstrip("\t"))
            body = line[tabs:]
            try:
                if tabs == 0:
                    if body.startswith("C "):
                        section = "C"
                        klass = int(body[2:4], 16)
                        ids.classes[klass] = body[4:].strip()
                    elif len(body) > 4 and body[4] in " \t" and section in ("", "V"):
                        section = "V"
                        vendor = int(body[:4], 16)
                        ids.vendors[vendor] = body[4:].strip()
                    else:
                        section = "skip"  # AT, HID, R, BIAS, PHY, HUT, L, HCC, VT
                elif section == "V" and tabs == 1:
                    ids.products[(vendor, int(body[:4], 16))] = body[4:].strip()
                elif section == "C" and tabs == 1:
                    subclass = int(body[:2], 16)
                    ids.subclasses[(klass, subclass)] = body[2:].strip()
                elif section == "C" and tabs == 2:
                    ids.protocols[(klass, subclass, int(body[:2], 16))] = body[2:].strip()
            except ValueError:
                continue  # a malformed line names nothing; the rest still does
        return ids

    @classmethod
    def load(cls, path: Path | None = None) -> UsbIds:
        """The database at ``path``, or the first system one; empty if there is none."""
        for candidate in (path,) if path is not None else USB_IDS_PATHS:
            try:
                return cls.parse(candidate.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
        return cls()

    def product_name(self, vendor: int, product: int) -> str:
        """As usbip_names_get_product: "Vendor : Product (vvvv:pppp)"."""
        v = self.vendors.get(vendor, "unknown vendor")
        p = self.products.get((vendor, product), "unknown product")
        return f"{v} : {p} ({vendor:04x}:{product:04x})"

    def class_name(self, klass: int, subclass: int, protocol: int) -> str:
        """As usbip_names_get_class: "Class / Subclass / Protocol (cc/ss/pp)"."""
        triple = f"({klass:02x}/{subclass:02x}/{protocol:02x})"
        if klass == subclass == protocol == 0:
            return f"(Defined at Interface level) {triple}"
        c = self.classes.get(klass, "unknown class")
        s = self.subclasses.get((klass, subclass), "unknown subclass")
        p = self.protocols.get((klass, subclass, protocol), "unknown protocol")
        return f"{c} / {s} / {p} {triple}"


@functools.cache
def system_ids() -> UsbIds:
    """The system's database, read once per process."""
    return UsbIds.load()
