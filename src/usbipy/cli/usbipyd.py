"""usbipyd: the USB/IP server. Options follow Linux usbipd where they overlap."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import threading
import wave
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..backends.base import ExportedDevice
from ..backends.kernel_stub import KernelStubSource
from ..backends.libusb.bindings import BindingError, BindingStore
from ..backends.libusb.events import libusb_available
from ..backends.libusb.source import LibusbSource
from ..capture import Capture
from ..capture.writer import check_writable
from ..config import DEFAULT_PATH, DaemonConfig
from ..config import load as load_config
from ..config.daemon import (
    CAPTURE_FILES,
    CAPTURE_SIZES,
    COUNTS,
    DISK_SIZES,
    MAX_RATE,
    MAX_SECONDS,
    PORTS,
    key_of,
)
from ..config.daemon import warnings as policy_warnings
from ..devices import CdcAcm, ImageFile, MassStorage, PtyBackend, StorageError
from ..devices.audio import UsbAudio
from ..devices.demo import DEMO_DISK_SIZE, demo_devices
from ..devices.sound import Tone, WavSink, WavSource
from ..devices.webcam import Webcam
from ..errors import UsbipError
from ..escape import printable
from ..linux import usbip_host
from ..pidfile import PidFile
from ..policy import OPEN, Policy
from ..protocol import USBIP_PORT
from ..server import UsbipServer, listen_sockets
from ..server.limits import Limits
from ..server.stats import ServerStats
from ..server.tls import HANDSHAKE_TIMEOUT, ServerTls
from ..state import state_dir
from ..tls import TlsError, TlsFiles, ktls, server_context
from .types import address_and_port, positive, whole

if TYPE_CHECKING:
    from ..server.metrics import MetricsEndpoint

#: The file read when no -c is given (tests point it elsewhere).
DEFAULT_CONFIG = DEFAULT_PATH

log = logging.getLogger("usbipyd")

#: Loopback by default: USB/IP has no authentication, so exporting to the
#: network must be asked for (-a 0.0.0.0 or -a ::). usbipd listens everywhere.
DEFAULT_ADDRESS = "127.0.0.1"


#: Every setting an option or the configuration file gives, when neither does.
DEFAULTS: dict[str, Any] = {
    "demo": False, "disk": None, "read_only": False, "disk_size": DEMO_DISK_SIZE,
    "serial": "echo", "usbip_host": True, "libusb": True, "state_dir": None,
    "address": None, "family": "any", "tcp_port": USBIP_PORT,
    "tls_cert": None, "tls_key": None, "tls_ca": None, "ktls": "auto",
    "tls_handshake_timeout": None, "plaintext_port": None,
    "loop": "auto", "daemon": False, "pid": None, "debug": False,
    "capture": None, "capture_size": 100, "capture_files": 5, "metrics": None,
    "audio": False, "microphone": None, "speaker": None, "tone": 1000.0, "webcam": None,
}

#: The options that set [limits] (argparse dest = the Limits field).
LIMIT_OPTIONS = ("max_connections", "max_connections_per_address", "accept_rate",
                 "accept_burst", "request_timeout", "idle_timeout",
                 "dead_peer_timeout")


def build_parser() -> argparse.ArgumentParser:
    # (no defaults here: an option not given leaves the configuration file's value)
    p = argparse.ArgumentParser(
        prog="usbipyd", description="Export USB devices over USB/IP (protocol 1.1.1).",
        argument_default=None)
    p.add_argument("-c", "--config", metavar="FILE",
                   help=f"read settings, access policy and limits from FILE (default: "
                        f"{DEFAULT_CONFIG} when it exists); options given here win over it")
    p.add_argument("--check-config", action="store_true",
                   help="check the configuration file, say what it sets, and exit")
    p.add_argument("--demo", action=argparse.BooleanOptionalAction,
                   help="export an emulated HID keyboard, mass-storage disk and CDC-ACM port")
    p.add_argument("--disk", metavar="PATH",
                   help="export a mass-storage device backed by this image file")
    p.add_argument("--read-only", action=argparse.BooleanOptionalAction,
                   help="export --disk write-protected")
    p.add_argument("--disk-size", type=whole(*DISK_SIZES), metavar="BYTES",
                   help="size of the demo's scratch disk when no --disk is given")
    p.add_argument("--serial", choices=("echo", "pty"),
                   help="where the demo serial port's bytes go (default: echo)")
    media = p.add_argument_group(
        "streaming devices", "An emulated headset (USB Audio 1.0) and webcam (UVC 1.1), after "
        "the other emulated devices (also [devices] in the configuration file).")
    media.add_argument("--audio", action=argparse.BooleanOptionalAction,
                       help="export a headset: a microphone playing a tone, and a speaker")
    media.add_argument("--tone", type=positive(20000), metavar="HZ",
                       help="the microphone's tone (default: 1000)")
    media.add_argument("--microphone", metavar="FILE.wav",
                       help="the microphone plays this mono 16-bit WAV file, looped, "
                            "rather than a tone (implies --audio)")
    media.add_argument("--speaker", metavar="FILE.wav",
                       help="write what the host plays to this WAV file (implies --audio)")
    media.add_argument("--webcam", nargs="?", const="iso", choices=("iso", "bulk"),
                       help="export a webcam showing a test pattern with the frame number, "
                            "YUY2 and MJPEG (MJPEG needs Pillow), streaming over iso "
                            "(the default) or bulk")
    p.add_argument("--usbip-host", action=argparse.BooleanOptionalAction,
                   help="export the devices bound to the kernel's usbip-host driver "
                        "(the default, as usbipd does)")
    p.add_argument("--libusb", action=argparse.BooleanOptionalAction,
                   help="export the devices bound with 'usbipy bind --libusb' (the default)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where the libusb bindings live (default: $USBIPY_STATE_DIR or "
                        "/var/lib/usbipy)")
    p.add_argument("-a", "--address", action="append", metavar="ADDR",
                   help=f"listen address, may repeat (default: {DEFAULT_ADDRESS})")
    p.add_argument("-4", "--ipv4", dest="family", action="store_const", const="ipv4",
                   help="listen on IPv4 only")
    p.add_argument("-6", "--ipv6", dest="family", action="store_const", const="ipv6",
                   help="listen on IPv6 only")
    p.add_argument("-t", "--tcp-port", type=whole(*PORTS), metavar="PORT",
                   help=f"TCP port to listen on (default: {USBIP_PORT})")
    tls = p.add_argument_group(
        "mutual TLS", "With all three files, every client on the listen addresses must present "
        "a certificate signed by the CA, and the connection is encrypted. Where the kernel has "
        "TLS (modprobe tls), sessions go to kernel TLS, which devices bound to usbip-host need.")
    tls.add_argument("--tls-cert", metavar="FILE", help="the server's certificate")
    tls.add_argument("--tls-key", metavar="FILE", help="its private key")
    tls.add_argument("--tls-ca", metavar="FILE", help="the CA that signs the clients' "
                                                      "certificates")
    tls.add_argument("--ktls", choices=("auto", "on", "off"),
                     help="hand sessions to kernel TLS: when available (auto, the default), "
                          "always (on: refuse to start without it), or never (off)")
    tls.add_argument("--tls-handshake-timeout", type=positive(MAX_SECONDS),
                     metavar="SECONDS",
                     help=f"time a client has for its handshake (default: {HANDSHAKE_TIMEOUT:g})")
    tls.add_argument("--plaintext-port", type=whole(*PORTS), metavar="PORT",
                     help="with TLS, also serve plaintext USB/IP on this port of 127.0.0.1 "
                          "(for local tools such as C usbip); never on other addresses")
    diagnostics = p.add_argument_group(
        "diagnostics", "Captures and metrics (also [diagnostics] in the configuration file).")
    diagnostics.add_argument(
        "--capture", metavar="FILE.pcapng",
        help="record every URB of the devices Python serves (emulated, libusb) for "
             "Wireshark (pcapng, Linux usbmon); usbip-host's go through the kernel: "
             "capture those on usbmonN with dumpcap")
    diagnostics.add_argument("--capture-size", type=whole(*CAPTURE_SIZES), metavar="MB",
                             help="start a new capture file at this size (default: 100)")
    diagnostics.add_argument("--capture-files", type=whole(*CAPTURE_FILES), metavar="N",
                             help="capture files kept, the newest FILE.pcapng, then "
                                  "FILE.1.pcapng... (default: 5)")
    diagnostics.add_argument("--metrics", type=address_and_port, metavar="ADDR:PORT",
                             help="serve Prometheus metrics at http://ADDR:PORT/metrics "
                                  "(a bare PORT: on 127.0.0.1; needs prometheus_client)")
    limits = p.add_argument_group(
        "limits", "What one client, or a flood of them, may hold (also [limits] in the "
        "configuration file).")
    base = Limits()
    limits.add_argument("--max-connections", type=whole(*COUNTS), metavar="N",
                        help=f"connections at once (default: {base.max_connections})")
    limits.add_argument("--max-connections-per-address", type=whole(*COUNTS), metavar="N",
                        help="connections at once from one address or IPv6 /64 "
                             f"(default: {base.max_connections_per_address})")
    limits.add_argument("--accept-rate", type=positive(MAX_RATE), metavar="PER_SECOND",
                        help="new connections a second from one address "
                             f"(default: {base.accept_rate:g}, bursts of --accept-burst)")
    limits.add_argument("--accept-burst", type=whole(*COUNTS), metavar="N",
                        help=f"(default: {base.accept_burst})")
    limits.add_argument("--request-timeout", type=positive(MAX_SECONDS), metavar="SECONDS",
                        help="time a connection has to send a whole request "
                             f"(default: {base.request_timeout:g})")
    limits.add_argument("--idle-timeout", type=positive(MAX_SECONDS), metavar="SECONDS",
                        help="time a connection may send nothing before its request "
                             f"(default: {base.idle_timeout:g})")
    limits.add_argument("--dead-peer-timeout", type=positive(MAX_SECONDS),
                        metavar="SECONDS",
                        help="time after which a client that stopped answering is taken "
                             "for dead and its device freed, also for usbip-host (TCP "
                             f"keepalive and user timeout; default: {base.dead_peer_timeout:g})")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"),
                   help="event loop: uvloop when installed (auto, the default), or asyncio's")
    p.add_argument("-D", "--daemon", action="store_true", default=None,
                   help="run in the background")
    p.add_argument("-P", "--pid", metavar="FILE", help="write the process id to FILE")
    p.add_argument("--version", action="version", version=f"usbipyd {__version__}")
    p.add_argument("-d", "--debug", action=argparse.BooleanOptionalAction,
                   help="log every connection")
    return p


@dataclass
class Settings:
    """The configuration in force: the file's, with the options given over it."""

    file: Path | None
    options: argparse.Namespace
    limits: Limits
    policy: Policy
    warnings: list[str]
    #: argparse dest -> "FILE:LINE: key", for the options whose value is the file's.
    origins: dict[str, str] = dataclasses.field(default_factory=dict)


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        return Path(args.config)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def _limits(args: argparse.Namespace, config: DaemonConfig) -> Limits:
    given = {name: getattr(args, name) for name in LIMIT_OPTIONS
             if getattr(args, name) is not None}
    return dataclasses.replace(config.limits_over(Limits()), **given)


def read_settings(args: argparse.Namespace, path: Path | None = None) -> Settings:
    """The file (``path``, else the one ``args`` name, if any) with ``args`` over it;
    UsbipError for anything wrong."""
    if path is None:
        path = _config_path(args)
    config = load_config(path) if path is not None else DaemonConfig()
    options = dict(DEFAULTS)
    options.update(config.options)
    options.update({key: value for key, value in vars(args).items()
                    if key in DEFAULTS and value is not None})
    # (the file and the options together: each may give a part)
    try:
        tls = TlsFiles.from_options(options["tls_cert"], options["tls_key"],
                                    options["tls_ca"])
    except TlsError as exc:
        if path is None:
            raise
        raise TlsError(f"{exc} ([tls] cert, key and ca in {path})") from None
    policy = config.policy if config.policy is not None else OPEN
    origins = {dest: where for dest, where in config.origins.items()
               if getattr(args, dest, None) is None}
    return Settings(path, argparse.Namespace(**options), _limits(args, config), policy,
                    policy_warnings(policy, tls is not None,
                                    written=config.policy is not None), origins)


def _describe(settings: Settings) -> list[str]:
    """What --check-config says, and the server logs at start."""
    lines = []
    policy = settings.policy
    if policy.open and policy.default_reason == OPEN.default_reason:
        lines.append("access policy: none: every client may list and import every device")
    else:
        n = len(policy.rules)
        lines.append(f"access policy: {n} rule{'' if n == 1 else 's'}, then "
                     f"{policy.default_reason}")
        lines += [f"  {rule}" for rule in policy.rules]
    limits = settings.limits
    lines.append(
        f"limits: {limits.max_connections} connections, {limits.max_connections_per_address} "
        f"per address, {limits.accept_rate:g} new a second per address (bursts of "
        f"{limits.accept_burst}); a request within {limits.request_timeout:g} s, "
        f"silence at most {limits.idle_timeout:g} s; a peer silent for "
        f"{limits.dead_peer_timeout:g} s is dead")
    return lines


def emulated_devices(args: argparse.Namespace, *, look_only: bool = False
                     ) -> list[ExportedDevice]:
    """The emulated devices the settings ask for, in busid order. ``look_only``: the
    same devices with nothing opened for writing and no pty (to learn their ids)."""
    read_only = args.read_only or look_only
    devices: list[ExportedDevice] = []
    if args.demo:
        devices += demo_devices(disk=args.disk, read_only=read_only,
                                serial="echo" if look_only else args.serial,
                                disk_size=args.disk_size)
    else:
        if args.disk:
            devices.append(MassStorage(ImageFile(args.disk, read_only=read_only)))
        if args.serial == "pty":
            devices.append(CdcAcm(None if look_only else PtyBackend()))
    try:
        if args.audio or args.microphone or args.speaker:
            microphone = (WavSource(args.microphone) if args.microphone
                          else Tone(args.tone))
            speaker = WavSink(args.speaker) if args.speaker and not look_only else None
            devices.append(UsbAudio(microphone, speaker))
        if args.webcam:
            devices.append(Webcam(transport=args.webcam))
    except (ValueError, RuntimeError, EOFError, wave.Error) as exc:
        raise UsbipError(str(exc)) from None
    return devices


def _hosts(args: argparse.Namespace) -> tuple[list[str], socket.AddressFamily]:
    family = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(args.family,
                                                                   socket.AF_UNSPEC)
    if args.address:
        return args.address, family
    if family == socket.AF_INET6:
        return ["::1"], family
    return [DEFAULT_ADDRESS], family


def _tls(args: argparse.Namespace, origins: dict[str, str] | None = None
         ) -> ServerTls | None:
    """The TLS set-up the options ask for; refuses what cannot work, before listening.
    ``origins``: where the configuration file set an option (Settings.origins), so
    that a file it names that cannot be read is said at its line."""
    files = TlsFiles.from_options(args.tls_cert, args.tls_key, args.tls_ca)
    for dest in ("tls_cert", "tls_key", "tls_ca") if files is not None else ():
        where = (origins or {}).get(dest)
        if where is None:
            continue  # (given on the command line: its error needs no line)
        try:
            with open(getattr(args, dest), "rb"):
                pass
        except OSError as exc:
            raise TlsError(f"{where}: {printable(getattr(args, dest))}: "
                           f"{exc.strerror or exc}") from None
    if files is None:
        lonely = [option for option, given in (
            ("--ktls on", args.ktls == "on"), ("--plaintext-port", args.plaintext_port),
            ("--tls-handshake-timeout", args.tls_handshake_timeout)) if given is not None
            and given is not False]
        if lonely:
            raise TlsError(f"{', '.join(lonely)} needs --tls-cert, --tls-key and --tls-ca")
        return None
    kernel = False
    if args.ktls != "off":
        try:
            ktls.prepare()  # also loads the AEAD, before any client waits on it
            probe = server_context(files, kernel=True)
            probe.verify_mode = ssl.CERT_NONE
            ktls.check_openssl(probe)
            kernel = True
        except TlsError as exc:
            if args.ktls == "on":
                raise
            log.info("serving TLS in userspace: %s", exc)
    timeout = args.tls_handshake_timeout
    if timeout is not None and not 0 < timeout <= 3600:
        raise TlsError(f"--tls-handshake-timeout {timeout:g}: from 0 to 3600 seconds")
    return ServerTls(server_context(files, kernel=kernel), kernel=kernel,
                     handshake_timeout=timeout if timeout is not None else HANDSHAKE_TIMEOUT)


def _warn_if_exposed(sockets: Sequence[socket.socket]) -> None:
    for sock in sockets:
        host = sock.getsockname()[0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            log.warning("serving plaintext USB/IP on %s: anyone who reaches it can take the "
                        "devices and read their traffic (use --tls-cert/--tls-key/--tls-ca)",
                        host)


#: What a daemon says when it serves (-D): anything else is why it cannot.
_READY = b"\0ready"


def _in_the_foreground(why: str | None) -> None:
    """Without -D, nobody waits to hear that usbipyd is ready."""


def _daemonize() -> Callable[[str | None], None]:
    """Detach as daemon(3) does (two forks, a session of its own, stdio on /dev/null).
    The process that was started waits until the daemon calls the function returned
    (None: serving, its signal handlers set and its pid file written; else why it
    cannot run): so `usbipyd -D` returns with the daemon serving and its pid file
    there, or exits 1 with the reason on stderr."""
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            said = pipe.read()
        if said == _READY:
            os._exit(0)
        why = said.decode(errors="replace") or "it ended before it was ready (see its log)"
        print(f"usbipyd: {why}", file=sys.stderr)
        os._exit(1)
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    told = False

    def ready(why: str | None) -> None:
        nonlocal told
        if not told:
            told = True
            os.write(write_end, why.encode() if why else _READY)
            os.close(write_end)
    return ready


def _metrics_endpoint(args: argparse.Namespace) -> MetricsEndpoint | None:
    """The endpoint --metrics asks for, bound (before -D forks: a busy port is told)."""
    if args.metrics is None:
        return None
    try:
        from ..server.metrics import MetricsEndpoint
    except ImportError:
        raise UsbipError("--metrics needs prometheus_client: pip install "
                         "'usbipy[metrics]'") from None
    host, port = args.metrics
    return MetricsEndpoint(host, port)


async def _watch(source: LibusbSource) -> None:
    # An idle device has no transfer to fail when it is unplugged, and an unbind
    # must reach a device in use: look every second.
    while True:
        await asyncio.sleep(1.0)
        try:
            await source.check()
        except Exception:
            log.exception("checking the libusb devices failed")


async def _reload(server: UsbipServer, args: argparse.Namespace, running: Settings
                  ) -> Settings:
    """Read the configuration file again (SIGHUP); the policy and limits take effect,
    the rest waits for a restart. A file with an error changes nothing."""
    if running.file is None:
        log.warning("reload: no configuration file (--config FILE) to read")
        return running
    try:
        # (the file usbipyd started with: one gone meanwhile is an error, never "none")
        new = await asyncio.to_thread(read_settings, args, running.file)
    except UsbipError as exc:
        log.error("reload: %s: the running configuration stays in force", exc)
        return running
    changed = sorted(key_of(key) for key, value in vars(new.options).items()
                     if getattr(running.options, key) != value)
    if changed:
        log.warning("reload: %s changed: takes effect when usbipyd restarts",
                    ", ".join(changed))
    for warning in new.warnings:
        log.warning("%s", warning)
    _raise_file_limit(new.limits)
    await server.reconfigure(new.policy, new.limits)
    log.info("reloaded %s", new.file)
    for line in _describe(new):
        log.info("%s", line)
    return new


async def _serve(server: UsbipServer, libusb: LibusbSource | None,
                 args: argparse.Namespace, settings: Settings,
                 metrics: MetricsEndpoint | None = None,
                 ready: Callable[[str | None], None] = lambda why: None) -> None:
    await server.start()
    if metrics is not None:
        metrics.start(server, asyncio.get_running_loop())
        log.info("metrics on %s", metrics.url)
    watcher = asyncio.create_task(_watch(libusb)) if libusb is not None else None
    for device in server.registry:
        info = device.info
        extra = ""
        backend = getattr(device, "backend", None)
        if isinstance(backend, PtyBackend):
            extra = f" (pty {backend.path})"
        log.info("exporting %s: %04x:%04x %s%s", info.busid, info.idVendor, info.idProduct,
                 type(device).__name__, extra)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    hangups = asyncio.Queue[None]()
    loop.add_signal_handler(signal.SIGHUP, hangups.put_nowait, None)
    ready(None)  # (-D: the process that started usbipyd returns now)

    async def reloads(settings: Settings) -> None:
        while True:
            await hangups.get()
            try:
                settings = await _reload(server, args, settings)
            except Exception:  # (a reload that fails must not end the next ones)
                log.exception("reload failed: the running configuration stays in force")

    reloader = asyncio.create_task(reloads(settings))
    try:
        await stop.wait()
    finally:
        reloader.cancel()
        log.info("shutting down")
        if watcher is not None:
            watcher.cancel()
        await server.close()  # closes the sources and the capture too
        if metrics is not None:
            await asyncio.to_thread(metrics.close)


def run_loop(main: Coroutine[Any, Any, None], loop: str) -> None:
    """Run ``main`` on uvloop when asked for or (``auto``) installed, else on asyncio's."""
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise UsbipError("uvloop is not installed: pip install 'usbipy[fast]'") from None
        else:
            log.debug("event loop: uvloop")
            uvloop.run(main)
            return
    asyncio.run(main)


def _unservable(store: BindingStore, why: str) -> None:
    """Name each libusb binding this server cannot serve, and why."""
    try:
        bindings = store.load()
    except BindingError as exc:
        log.warning("%s", exc)
        return
    for binding in bindings:
        log.warning("not exporting %s: %s", printable(str(binding)), why)


def _raise_file_limit(limits: Limits) -> None:
    """Room for max_connections descriptors (and the devices'), within the hard limit."""
    needed = limits.max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
        if soft < needed:
            log.warning("max_connections %d: only %d file descriptors allowed (ulimit -n, "
                        "LimitNOFILE= in systemd): connections beyond fail to be accepted",
                        limits.max_connections, soft)


def main(argv: Sequence[str] | None = None) -> int:
    cli = build_parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _main(cli)
    # A SIGHUP before the loop handles it (systemd's reload right after start) must
    # not end the daemon: ignored until the loop's handler takes over, and the
    # caller's handler is back when main returns.
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return _main(cli)
    finally:
        signal.signal(signal.SIGHUP, previous)


def _main(cli: argparse.Namespace) -> int:
    try:
        settings = read_settings(cli)
    except UsbipError as exc:
        print(f"usbipyd: {exc}", file=sys.stderr)
        return 1
    args = settings.options
    if cli.check_config:
        # Everything a start would check: the TLS files load (and kTLS, when asked
        # for), the disk image opens.
        try:
            _tls(args, settings.origins)
            for device in emulated_devices(args, look_only=True):
                device.close()
        except (UsbipError, StorageError, OSError) as exc:
            print(f"usbipyd: {exc}", file=sys.stderr)
            return 1
        where = settings.file if settings.file is not None else "no configuration file"
        print(f"usbipyd: {where}: ok")
        for line in [*settings.warnings, *_describe(settings)]:
            print(f"usbipyd: {line}")
        return 0
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="usbipyd: %(levelname)s: %(message)s", stream=sys.stderr)
    for warning in settings.warnings:
        log.warning("%s", warning)
    try:
        devices = emulated_devices(args)
    except (UsbipError, StorageError, OSError) as exc:
        print(f"usbipyd: {exc}", file=sys.stderr)
        return 1
    kernel = args.usbip_host
    if not devices and not (kernel and usbip_host.driver_loaded()):
        log.warning("no devices to export (try --demo, --audio, --webcam, --disk PATH, or "
                    "'usbipy bind -b BUSID' with usbip-host loaded)")
    try:
        tls = _tls(args, settings.origins)
    except UsbipError as exc:
        print(f"usbipyd: {exc}", file=sys.stderr)
        return 1
    hosts, family = _hosts(args)
    try:
        sockets = listen_sockets(hosts, args.tcp_port, family)
    except OSError as exc:
        print(f"usbipyd: cannot listen on {', '.join(hosts)} port {args.tcp_port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    plain_sockets: list[socket.socket] = []
    if tls is not None and args.plaintext_port is not None:
        try:
            plain_sockets = listen_sockets([DEFAULT_ADDRESS], args.plaintext_port)
        except OSError as exc:
            print(f"usbipyd: cannot listen on {DEFAULT_ADDRESS} port {args.plaintext_port}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            for sock in sockets:
                sock.close()
            return 1
    if tls is None:
        _warn_if_exposed(sockets)
    elif not tls.kernel and kernel and usbip_host.driver_loaded():
        log.warning("kernel TLS is not available: devices bound to usbip-host cannot be "
                    "exported over TLS ('modprobe tls', then restart usbipyd)")
    _raise_file_limit(settings.limits)
    problem = None
    metrics = None
    try:
        metrics = _metrics_endpoint(args)
    except UsbipError as exc:
        problem = str(exc)
    except OSError as exc:
        problem = f"cannot serve metrics on {args.metrics[0]}:{args.metrics[1]}: " \
                  f"{exc.strerror or exc}"
    if problem is None and args.capture is not None:
        try:  # (the capture itself is made after -D forks: its writer is a thread)
            check_writable(args.capture)
        except OSError as exc:
            problem = f"cannot write {args.capture}: {exc.strerror or exc}"
    if problem is not None:
        print(f"usbipyd: {printable(problem)}", file=sys.stderr)
        if metrics is not None:
            metrics.close()
        for sock in [*sockets, *plain_sockets]:
            sock.close()
        return 1
    for line in _describe(settings):
        log.info("%s", line)
    server = UsbipServer(hosts=hosts, port=args.tcp_port, family=family, sockets=sockets,
                         tls=tls, plain_sockets=plain_sockets, policy=settings.policy,
                         limits=settings.limits,
                         stats=ServerStats() if metrics is not None else None)
    for device in devices:
        server.add(device)
    if kernel:
        server.registry.add_source(KernelStubSource())
    libusb: LibusbSource | None = None
    if args.libusb:
        state = Path(args.state_dir) if args.state_dir else state_dir()
        store = BindingStore(state / "libusb-bindings.json")
        if libusb_available():
            libusb = LibusbSource(store)
            server.registry.add_source(libusb)
        else:
            _unservable(store, "python-libusb1 is not installed: pip install 'usbipy[libusb]'")
    pid_file = None
    if args.pid:
        try:  # checked before -D forks, so that a refusal is reported, not lost
            pid_file = PidFile(args.pid)
        except OSError as exc:
            print(f"usbipyd: cannot write {printable(args.pid)}: {exc.strerror or exc}",
                  file=sys.stderr)
            for sock in sockets:
                sock.close()
            return 1
    ready = _daemonize() if args.daemon else _in_the_foreground
    if args.capture is not None:
        try:
            server.capture = Capture(args.capture, max_bytes=args.capture_size * 1_000_000,
                                     files=args.capture_files)
        except OSError as exc:
            # (after -D, stderr is gone: the log says it, and the parent too)
            why = f"cannot write {printable(args.capture)}: {exc.strerror or exc}"
            log.error("%s", why)
            ready(why)
            return 1
        log.info("capturing the URBs of emulated and libusb devices to %s (%d MB a file, "
                 "%d files)", printable(args.capture), args.capture_size, args.capture_files)
    try:
        if pid_file is not None:
            try:
                pid_file.write()
            except OSError as exc:  # (its folder changed since the check)
                why = f"cannot write {printable(args.pid)}: {exc.strerror or exc}"
                log.error("%s", why)
                ready(why)
                return 1
        run_loop(_serve(server, libusb, cli, settings, metrics, ready), args.loop)
    except UsbipError as exc:
        ready(str(exc))
        print(f"usbipyd: {exc}", file=sys.stderr)
        return 1
    finally:
        if pid_file is not None:
            pid_file.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
