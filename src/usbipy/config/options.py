"""usbipyd's settings, each written once: its option, its key in the configuration
file, the kind of its value and its default.

The command line (:func:`add_arguments`) and the file (:mod:`.file`) are both
built from :data:`SETTINGS`: a new setting is one entry here. The options
follow Linux usbipd where they overlap.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

from ..protocol.constants import USBIP_PORT
from .limits import Limits
from .values import (
    ADDRESSES,
    CAPTURE_FILES,
    CAPTURE_SIZES,
    COUNTS,
    DISK_SIZES,
    FILE,
    HOST_PORT,
    PORTS,
    RESUME_BUFFERS,
    SWITCH,
    TEXT,
    Kind,
    choice,
    hertz,
    rate,
    seconds,
    whole_number,
)

#: Loopback by default: USB/IP has no authentication, so exporting to the
#: network must be asked for (-a 0.0.0.0 or -a ::). usbipd listens everywhere.
DEFAULT_ADDRESS = "127.0.0.1"
#: Seconds a client has to finish its TLS handshake.
HANDSHAKE_TIMEOUT = 20.0
#: The demo's scratch disk, when no --disk is given.
DEMO_DISK_SIZE = 64 << 20


@dataclass(frozen=True)
class Group:
    """Options shown together in --help, with a word on what they do."""

    title: str
    description: str


@dataclass(frozen=True)
class Setting:
    """One setting: ``dest`` names it (argparse's dest, the Namespace's attribute)."""

    dest: str
    #: Its key in the file ("port", "devices.disk", "limits.max_connections"); None
    #: for what only the command line says.
    key: str | None
    #: Its options ("-t", "--tcp-port").
    flags: tuple[str, ...]
    #: None: an option that takes no value (store_true).
    kind: Kind | None
    help: str
    #: The value when neither an option nor the file gives one.
    default: Any = None
    metavar: str | None = None
    group: Group | None = None
    #: Options that set it to a constant: (flags, value, help).
    constants: tuple[tuple[tuple[str, ...], str, str], ...] = ()
    #: The value of the option given with no value (argparse's nargs="?").
    bare: str | None = None

    @property
    def table(self) -> str:
        """The file's table that holds its key ("" for the top)."""
        return self.key.rpartition(".")[0] if self.key else ""

    @property
    def name(self) -> str:
        """Its key within that table."""
        return self.key.rpartition(".")[2] if self.key else self.dest


STREAMING = Group("streaming devices", "An emulated headset (USB Audio 1.0) and webcam "
                  "(UVC 1.1), after the other emulated devices (also [devices] in the "
                  "configuration file).")
TLS = Group("mutual TLS", "With all three files, every client on the listen addresses must "
            "present a certificate signed by the CA, and the connection is encrypted. Where "
            "the kernel has TLS (modprobe tls), sessions go to kernel TLS, which devices bound "
            "to usbip-host need.")
DIAGNOSTICS = Group("diagnostics", "Captures and metrics (also [diagnostics] in the "
                    "configuration file).")
FLEET = Group("fleet", "Many servers in one view (also [server] in the configuration "
              "file).")
LIMITS = Group("limits", "What one client, or a flood of them, may hold (also [limits] in "
               "the configuration file).")

_BASE = Limits()

#: Every setting, in the order --help shows them.
SETTINGS: tuple[Setting, ...] = (
    Setting("demo", "devices.demo", ("--demo",), SWITCH,
            "export an emulated HID keyboard, mass-storage disk and CDC-ACM port", False),
    Setting("disk", "devices.disk", ("--disk",), FILE,
            "export a mass-storage device backed by this image file", metavar="PATH"),
    Setting("read_only", "devices.read_only", ("--read-only",), SWITCH,
            "export --disk write-protected", False),
    Setting("disk_size", "devices.disk_size", ("--disk-size",), whole_number(*DISK_SIZES),
            "size of the demo's scratch disk when no --disk is given", DEMO_DISK_SIZE,
            metavar="BYTES"),
    Setting("serial", "devices.serial", ("--serial",), choice("echo", "pty"),
            "where the demo serial port's bytes go (default: echo)", "echo"),
    Setting("audio", "devices.audio", ("--audio",), SWITCH,
            "export a headset: a microphone playing a tone, and a speaker", False,
            group=STREAMING),
    Setting("tone", "devices.tone", ("--tone",), hertz(),
            "the microphone's tone (default: 1000)", 1000.0, metavar="HZ", group=STREAMING),
    Setting("microphone", "devices.microphone", ("--microphone",), FILE,
            "the microphone plays this mono 16-bit WAV file, looped, rather than a tone "
            "(implies --audio)", metavar="FILE.wav", group=STREAMING),
    Setting("speaker", "devices.speaker", ("--speaker",), FILE,
            "write what the host plays to this WAV file (implies --audio)",
            metavar="FILE.wav", group=STREAMING),
    Setting("webcam", "devices.webcam", ("--webcam",), choice("iso", "bulk"),
            "export a webcam showing a test pattern with the frame number, YUY2 and MJPEG "
            "(MJPEG needs Pillow), streaming over iso (the default) or bulk",
            group=STREAMING, bare="iso"),
    Setting("usbip_host", "usbip_host", ("--usbip-host",), SWITCH,
            "export the devices bound to the kernel's usbip-host driver (the default, as "
            "usbipd does)", True),
    Setting("libusb", "libusb", ("--libusb",), SWITCH,
            "export through libusb the devices export rules say so (the default)", True),
    Setting("device_mode", "device_mode", ("-e", "--device-mode"), SWITCH,
            "device mode, as usbipd -e: export the gadgets bound to the kernel's virtual "
            "UDC, usbip-vudc (modprobe usbip-vudc, then bind a gadget to usbip-vudc.N), "
            "and nothing else", False),
    Setting("state_dir", "state_dir", ("--state-dir",), FILE,
            "where the export rules 'usbipy bind' records live (default: $USBIPY_STATE_DIR "
            "or /var/lib/usbipy)", metavar="DIR"),
    Setting("rules_only", "rules_only", ("--rules-only",), SWITCH,
            "apply the export rules as devices come and go (bind them to usbip-host), and "
            "serve nothing: next to the C usbipd, which serves them", False),
    Setting("advertise", "server.advertise", ("--advertise",), SWITCH,
            "advertise this server by DNS-SD (multicast DNS, as _usbip._tcp) for 'usbipy "
            "list --all' (default: when it listens on an address other than loopback; needs "
            "python-zeroconf)", group=FLEET),
    Setting("server_name", "server.name", ("--name",), TEXT,
            "the name DNS-SD and the status page show (default: the host name)",
            metavar="NAME", group=FLEET),
    Setting("address", "listen", ("-a", "--address"), ADDRESSES,
            f"listen address, may repeat (default: {DEFAULT_ADDRESS})", metavar="ADDR"),
    Setting("family", "family", (), choice("any", "ipv4", "ipv6"),
            "", "any", constants=((("-4", "--ipv4"), "ipv4", "listen on IPv4 only"),
                                  (("-6", "--ipv6"), "ipv6", "listen on IPv6 only"))),
    Setting("tcp_port", "port", ("-t", "--tcp-port"), whole_number(*PORTS),
            f"TCP port to listen on (default: {USBIP_PORT})", USBIP_PORT, metavar="PORT"),
    Setting("tls_cert", "tls.cert", ("--tls-cert",), FILE, "the server's certificate",
            metavar="FILE", group=TLS),
    Setting("tls_key", "tls.key", ("--tls-key",), FILE, "its private key", metavar="FILE",
            group=TLS),
    Setting("tls_ca", "tls.ca", ("--tls-ca",), FILE,
            "the CA that signs the clients' certificates", metavar="FILE", group=TLS),
    Setting("ktls", "tls.ktls", ("--ktls",), choice("auto", "on", "off"),
            "hand sessions to kernel TLS: when available (auto, the default), always (on: "
            "refuse to start without it), or never (off)", "auto", group=TLS),
    Setting("tls_handshake_timeout", "tls.handshake_timeout", ("--tls-handshake-timeout",),
            seconds(), f"time a client has for its handshake (default: {HANDSHAKE_TIMEOUT:g})",
            metavar="SECONDS", group=TLS),
    Setting("plaintext_port", "tls.plaintext_port", ("--plaintext-port",),
            whole_number(*PORTS), "with TLS, also serve plaintext USB/IP on this port of "
            "127.0.0.1 (for local tools such as C usbip); never on other addresses",
            metavar="PORT", group=TLS),
    Setting("capture", "diagnostics.capture", ("--capture",), FILE,
            "record every URB of the devices Python serves (emulated, libusb) for Wireshark "
            "(pcapng, Linux usbmon); usbip-host's go through the kernel: capture those on "
            "usbmonN with dumpcap", metavar="FILE.pcapng", group=DIAGNOSTICS),
    Setting("capture_size", "diagnostics.capture_size", ("--capture-size",),
            whole_number(*CAPTURE_SIZES), "start a new capture file at this size (default: "
            "100)", 100, metavar="MB", group=DIAGNOSTICS),
    Setting("capture_files", "diagnostics.capture_files", ("--capture-files",),
            whole_number(*CAPTURE_FILES), "capture files kept, the newest FILE.pcapng, then "
            "FILE.1.pcapng... (default: 5)", 5, metavar="N", group=DIAGNOSTICS),
    Setting("http", "diagnostics.http", ("--http",), HOST_PORT,
            "serve the status page at http://ADDR:PORT/, its JSON API at /api/v1/, and "
            "Prometheus metrics at /metrics (with prometheus_client); a bare PORT: on "
            "127.0.0.1, where local users are its admins; other addresses need the TLS "
            "files, and the policy's grant rules say who may view and release",
            metavar="ADDR:PORT", group=DIAGNOSTICS),
    Setting("metrics", "diagnostics.metrics", ("--metrics",), HOST_PORT,
            "the same listener as --http (its older name)", metavar="ADDR:PORT",
            group=DIAGNOSTICS),
    Setting("max_connections", "limits.max_connections", ("--max-connections",),
            whole_number(*COUNTS), f"connections at once (default: {_BASE.max_connections})",
            metavar="N", group=LIMITS),
    Setting("max_connections_per_address", "limits.max_connections_per_address",
            ("--max-connections-per-address",), whole_number(*COUNTS),
            "connections at once from one address or IPv6 /64 (default: "
            f"{_BASE.max_connections_per_address})", metavar="N", group=LIMITS),
    Setting("accept_rate", "limits.accept_rate", ("--accept-rate",), rate(),
            f"new connections a second from one address (default: {_BASE.accept_rate:g}, "
            "bursts of --accept-burst)", metavar="PER_SECOND", group=LIMITS),
    Setting("accept_burst", "limits.accept_burst", ("--accept-burst",), whole_number(*COUNTS),
            f"(default: {_BASE.accept_burst})", metavar="N", group=LIMITS),
    Setting("request_timeout", "limits.request_timeout", ("--request-timeout",), seconds(),
            "time a connection has to send a whole request (default: "
            f"{_BASE.request_timeout:g})", metavar="SECONDS", group=LIMITS),
    Setting("idle_timeout", "limits.idle_timeout", ("--idle-timeout",), seconds(),
            "time a connection may send nothing before its request (default: "
            f"{_BASE.idle_timeout:g})", metavar="SECONDS", group=LIMITS),
    Setting("dead_peer_timeout", "limits.dead_peer_timeout", ("--dead-peer-timeout",),
            seconds(), "time after which a client that stopped answering is taken for dead "
            "and its device freed, also for usbip-host (TCP keepalive and user timeout; "
            f"default: {_BASE.dead_peer_timeout:g})", metavar="SECONDS", group=LIMITS),
    Setting("resume_window", "limits.resume_window", ("--resume-window",),
            seconds(zero=True),
            "time a resumable attachment (usbipy's client) outlives a lost connection, its "
            f"device held for the client to resume; 0: none (default: "
            f"{_BASE.resume_window:g})", metavar="SECONDS", group=LIMITS),
    Setting("resume_buffer", "limits.resume_buffer", ("--resume-buffer",),
            whole_number(*RESUME_BUFFERS), "bytes one resumable attachment keeps for a resend "
            f"(default: {_BASE.resume_buffer})", metavar="BYTES", group=LIMITS),
    Setting("resume_buffers", "limits.resume_buffers", ("--resume-buffers",),
            whole_number(*RESUME_BUFFERS), "...and all of them together (default: "
            f"{_BASE.resume_buffers})", metavar="BYTES", group=LIMITS),
    Setting("loop", "loop", ("--loop",), choice("auto", "asyncio", "uvloop"),
            "event loop: uvloop when installed (auto, the default), or asyncio's", "auto"),
    Setting("daemon", None, ("-D", "--daemon"), None, "run in the background", False),
    Setting("pid", "pid_file", ("-P", "--pid"), FILE, "write the process id to FILE",
            metavar="FILE"),
    Setting("debug", "debug", ("-d", "--debug"), SWITCH, "log every connection", False),
)

#: The tables of the file that hold settings, and each one's keys.
TABLES: dict[str, dict[str, Setting]] = {}
for _setting in SETTINGS:
    if _setting.key is not None:
        TABLES.setdefault(_setting.table, {})[_setting.name] = _setting

#: What the [limits] table sets: Limits' fields, every one.
LIMIT_SETTINGS = tuple(TABLES["limits"].values())
assert [s.dest for s in LIMIT_SETTINGS] == [f.name for f in fields(Limits)]

#: Every setting but the limits (those are a :class:`Limits`), at its default.
DEFAULTS: dict[str, Any] = {s.dest: s.default for s in SETTINGS if s.table != "limits"}


def key_of(dest: str) -> str:
    """The file's key for a setting ("listen" for "address", "tls.cert"...)."""
    for setting in SETTINGS:
        if setting.dest == dest and setting.key is not None:
            return setting.key
    return dest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting's options, with no defaults: an option not given is None, and
    leaves the file's value (or the default) in force (:func:`.settings.read_settings`)."""
    groups: dict[Group, argparse._ArgumentGroup] = {}
    for setting in SETTINGS:
        where: argparse.ArgumentParser | argparse._ArgumentGroup = parser
        if setting.group is not None:
            if setting.group not in groups:
                groups[setting.group] = parser.add_argument_group(
                    setting.group.title, setting.group.description)
            where = groups[setting.group]
        for flags, value, text in setting.constants:
            where.add_argument(*flags, dest=setting.dest, action="store_const", const=value,
                               help=text)
        if setting.flags:
            where.add_argument(*setting.flags, dest=setting.dest, default=None,
                               help=setting.help, **_argparse_options(setting))


def _argparse_options(setting: Setting) -> dict[str, Any]:
    kind = setting.kind
    if kind is None:
        return {"action": "store_true"}
    if kind.switch:
        return {"action": argparse.BooleanOptionalAction}
    options: dict[str, Any] = {}
    if kind.repeats:
        options["action"] = "append"
    if setting.bare is not None:
        options.update(nargs="?", const=setting.bare)
    if kind.parse is not None:
        options["type"] = kind.parse
    if kind.choices is not None:
        options["choices"] = kind.choices
    if setting.metavar is not None:
        options["metavar"] = setting.metavar
    return options


def settings_in(table: str) -> Iterator[Setting]:
    """The settings the file's ``table`` holds."""
    yield from TABLES.get(table, {}).values()
