"""usbipyd as a service: the server its settings describe, run until a signal.

:meth:`Service.prepare` does everything that can be refused while the user
still reads the terminal (the devices, TLS and kernel TLS, the listening
sockets, the metrics port, the pid file's folder); :meth:`Service.run` then
serves, after ``-D`` detached if asked, and reads the configuration again on
SIGHUP.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import socket
import ssl
import wave
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..backends.base import ExportedDevice
from ..backends.kernel_stub import KernelStubSource
from ..backends.libusb.events import LibusbEvents, libusb_available
from ..backends.libusb.source import LibusbSource
from ..backends.vudc import VudcSource
from ..capture import Capture
from ..capture.writer import check_writable
from ..config import Limits, Settings, describe, read_settings
from ..config.options import DEFAULT_ADDRESS, HANDSHAKE_TIMEOUT, key_of
from ..daemonize import Daemon
from ..devices import CdcAcm, ImageFile, MassStorage, PtyBackend, StorageError
from ..devices.audio import UsbAudio
from ..devices.demo import demo_devices
from ..devices.sound import Tone, WavSink, WavSource
from ..devices.webcam import Webcam
from ..errors import UsbipError
from ..escape import printable
from ..exports import hotplug
from ..exports.admin import rules_of
from ..exports.engine import ExportEngine, HotplugEvent, RuleSources
from ..exports.rules import ExportRules, Via
from ..exports.store import NAME as STORE_NAME
from ..exports.store import RuleStore
from ..linux import sysfs, usbip_host, vudc
from ..linux.modules import load_hint
from ..netaddr import is_loopback
from ..pidfile import PidFile
from ..statedir import state_dir
from ..tls import TlsError, TlsFiles, ktls, server_context
from . import memory
from .server import UsbipServer, listen_sockets
from .stats import ServerStats
from .status import StatusBoard
from .tls import ServerTls

if TYPE_CHECKING:
    from ..discovery.advertise import Advertiser
    from ..discovery.browse import PeerWatcher
    from .http import HttpEndpoint

log = logging.getLogger("usbipyd")

#: What the queue of changes says when the rules changed (a reload, `usbipy bind`).
RULES_CHANGED = object()


def emulated_devices(options: argparse.Namespace, *, look_only: bool = False
                     ) -> list[ExportedDevice]:
    """The emulated devices the settings ask for, in busid order. ``look_only``: the
    same devices with nothing opened for writing and no pty (to learn their ids)."""
    read_only = options.read_only or look_only
    devices: list[ExportedDevice] = []
    if options.demo:
        devices += demo_devices(disk=options.disk, read_only=read_only,
                                serial="echo" if look_only else options.serial,
                                disk_size=options.disk_size)
    else:
        if options.disk:
            devices.append(MassStorage(ImageFile(options.disk, read_only=read_only)))
        if options.serial == "pty":
            devices.append(CdcAcm(None if look_only else PtyBackend()))
    try:
        if options.audio or options.microphone or options.speaker:
            microphone = (WavSource(options.microphone) if options.microphone
                          else Tone(options.tone))
            speaker = (WavSink(options.speaker) if options.speaker and not look_only
                       else None)
            devices.append(UsbAudio(microphone, speaker))
        if options.webcam:
            devices.append(Webcam(transport=options.webcam))
    except (ValueError, RuntimeError, EOFError, wave.Error) as exc:
        raise UsbipError(str(exc)) from None
    return devices


def server_tls(options: argparse.Namespace, origins: dict[str, str] | None = None
               ) -> ServerTls | None:
    """The TLS set-up the settings ask for; refuses what cannot work, before listening.
    ``origins``: where the configuration file set a setting (Settings.origins), so
    that a file it names that cannot be read is said at its line."""
    files = TlsFiles.from_options(options.tls_cert, options.tls_key, options.tls_ca)
    for dest in ("tls_cert", "tls_key", "tls_ca") if files is not None else ():
        where = (origins or {}).get(dest)
        if where is None:
            continue  # (given on the command line: its error needs no line)
        try:
            with open(getattr(options, dest), "rb"):
                pass
        except OSError as exc:
            raise TlsError(f"{where}: {printable(getattr(options, dest))}: "
                           f"{exc.strerror or exc}") from None
    if files is None:
        lonely = [option for option, given in (
            ("--ktls on", options.ktls == "on"), ("--plaintext-port", options.plaintext_port),
            ("--tls-handshake-timeout", options.tls_handshake_timeout)) if given is not None
            and given is not False]
        if lonely:
            raise TlsError(f"{', '.join(lonely)} needs --tls-cert, --tls-key and --tls-ca")
        return None
    kernel = False
    if options.ktls != "off":
        try:
            ktls.prepare()  # also loads the AEAD, before any client waits on it
            probe = server_context(files, kernel=True)
            probe.verify_mode = ssl.CERT_NONE
            ktls.check_openssl(probe)
            kernel = True
        except TlsError as exc:
            if options.ktls == "on":
                raise
            log.info("serving TLS in userspace: %s", exc)
    timeout = options.tls_handshake_timeout
    return ServerTls(server_context(files, kernel=kernel), kernel=kernel,
                     handshake_timeout=timeout if timeout is not None else HANDSHAKE_TIMEOUT)


def check(settings: Settings) -> None:
    """Everything a start would check without starting (--check-config): the TLS
    files load (and kernel TLS, when asked for), the disk image opens."""
    server_tls(settings.options, settings.origins)
    check_http(settings.options)
    devices = emulated_devices(settings.options, look_only=True)
    for device in devices:
        device.close()
    if settings.options.device_mode:
        _device_mode_alone(settings.options, bool(devices))


def check_http(options: argparse.Namespace) -> None:
    """What --http (and --advertise) need, said before a start binds anything."""
    address = http_address(options)
    if options.advertise:
        try:
            import zeroconf  # noqa: F401
        except ImportError:
            raise UsbipError("--advertise needs python-zeroconf: pip install "
                             "'usbipy[fleet]'") from None
    if address is None:
        return
    host, port = address
    if not is_loopback(host) and TlsFiles.from_options(
            options.tls_cert, options.tls_key, options.tls_ca) is None:
        older = " (--metrics is its older name: the metrics are on it)" if (
            options.http is None) else ""
        raise UsbipError(f"--http {host}:{port}{older}: a status page on an address other "
                         "than loopback needs mutual TLS (--tls-cert, --tls-key, --tls-ca): "
                         "it shows who uses what, and an admin may release devices there")
    if options.http is None:  # (asked for by its older name: the metrics, then)
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise UsbipError("--metrics needs prometheus_client: pip install "
                             "'usbipy[metrics]'") from None


def listen_hosts(options: argparse.Namespace) -> tuple[list[str], socket.AddressFamily]:
    family = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(options.family,
                                                                   socket.AF_UNSPEC)
    if options.address:
        return options.address, family
    if family == socket.AF_INET6:
        return ["::1"], family
    return [DEFAULT_ADDRESS], family


def _warn_if_exposed(sockets: Sequence[socket.socket]) -> None:
    for sock in sockets:
        host = sock.getsockname()[0]
        if not is_loopback(host):
            log.warning("serving plaintext USB/IP on %s: anyone who reaches it can take the "
                        "devices and read their traffic (use --tls-cert/--tls-key/--tls-ca)",
                        host)


def http_address(options: argparse.Namespace) -> tuple[str, int] | None:
    """Where --http (or its older name, --metrics) asks the HTTP listener to be."""
    http, metrics = options.http, options.metrics
    if http is not None and metrics is not None and tuple(http) != tuple(metrics):
        raise UsbipError("--http and --metrics name one listener: give one address")
    address = http if http is not None else metrics
    return tuple(address) if address is not None else None


def _http_endpoint(options: argparse.Namespace) -> HttpEndpoint | None:
    """The listener --http asks for, bound (before -D forks: a busy port is told)."""
    address = http_address(options)
    if address is None:
        return None
    from .http import HttpEndpoint

    host, port = address
    context = None
    if not is_loopback(host):
        files = TlsFiles.from_options(options.tls_cert, options.tls_key, options.tls_ca)
        assert files is not None
        try:
            context = server_context(files, kernel=False)
        except (TlsError, OSError, ssl.SSLError) as exc:
            raise UsbipError(f"--http {host}:{port}: {exc}") from None
    try:
        return HttpEndpoint(host, port, context)
    except OSError as exc:
        raise UsbipError(f"cannot serve HTTP on {host}:{port}: "
                         f"{exc.strerror or exc}") from None


def raise_file_limit(limits: Limits) -> None:
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


def _device_mode_alone(options: argparse.Namespace, emulated: bool) -> None:
    """Device mode serves the gadgets on usbip-vudc, as usbipd -e does, and nothing
    else: emulated devices or --rules-only asked for with it are refused, not dropped
    quietly (export rules are left alone, with a warning)."""
    if emulated:
        raise UsbipError("device mode (-e) exports the gadgets bound to usbip-vudc only: "
                         "drop --demo, --disk, --audio and --webcam (another usbipyd on "
                         "another port can serve them)")
    if options.rules_only:
        raise UsbipError("device mode (-e) serves gadgets; --rules-only serves nothing: "
                         "choose one")


def _check_device_mode(options: argparse.Namespace, devices: list[ExportedDevice],
                       rules: ExportRules) -> None:
    _device_mode_alone(options, bool(devices))
    if len(rules):
        log.warning("device mode: the export rules are not applied (they export this "
                    "host's devices; run another usbipyd for them)")
    if not vudc.driver_loaded():
        log.warning("device mode: the usbip-vudc driver is not loaded (%s): no gadget to "
                    "export until it is", load_hint("usbip-vudc"))
    elif not any(g.info is not None for g in vudc.gadgets()):
        log.warning("device mode: no gadget is bound to usbip-vudc yet (write usbip-vudc.N to "
                    "a configfs gadget's UDC file)")


def _unservable(rules: ExportRules, why: str) -> None:
    """Name each libusb rule this server cannot serve, and why."""
    for rule in rules:
        log.warning("not exporting %s: %s", printable(rule.spec or str(rule)), why)


def run_loop(main: Coroutine[Any, Any, None], loop: str) -> None:
    """Run ``main`` on uvloop when asked for or (``auto``) installed, else on asyncio's,
    with the heap kept for serving (memory.py)."""
    memory.keep_heap()
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


async def reload(server: UsbipServer, running: Settings) -> Settings:
    """Read the configuration file again (SIGHUP); the policy and limits take effect,
    the rest waits for a restart. A file with an error changes nothing."""
    if running.file is None:
        log.warning("reload: no configuration file (--config FILE) to read")
        return running
    try:
        # (the file usbipyd started with: one gone meanwhile is an error, never "none")
        new = await asyncio.to_thread(read_settings, running.file, running.given)
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
    raise_file_limit(new.limits)
    await server.reconfigure(new.policy, new.limits)
    log.info("reloaded %s", new.file)
    for line in describe(new):
        log.info("%s", line)
    return new


async def _watch(source: LibusbSource) -> None:
    # With neither hotplug events nor inotify to say so (no pyudev, not Linux): an
    # idle device has no transfer to fail when it is unplugged, and an unbind must
    # reach a device in use: look every second.
    while True:
        await asyncio.sleep(1.0)
        try:
            await source.check()
        except Exception:
            log.exception("checking the libusb devices failed")


class Service:
    """usbipyd's server, its sockets bound and its checks done; :meth:`run` serves."""

    def __init__(self, settings: Settings, server: UsbipServer, libusb: LibusbSource | None,
                 metrics: HttpEndpoint | None, pid_file: PidFile | None,
                 rules: RuleSources | None = None, state: Path | None = None) -> None:
        self.settings = settings
        self.server = server
        self._libusb = libusb
        self._metrics = metrics
        self._pid_file = pid_file
        #: The export rules in force, and where `usbipy bind` records its own.
        self.rules = rules if rules is not None else RuleSources(settings.exports)
        self._state = state
        self.engine: ExportEngine | None = None
        #: Hotplug events and rule changes, for the engine in the order they came.
        self._changes: asyncio.Queue[HotplugEvent | object] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Whether the loop began serving (then it closes everything as it ends).
        self._serving = False
        #: What the status API and page show (with --http).
        self.board: StatusBoard | None = None
        self._advertiser: Advertiser | None = None

    @classmethod
    def prepare(cls, settings: Settings) -> Service:
        """Everything a start can refuse, refused now with UsbipError (nothing left
        open); the warnings a start gives, logged."""
        options = settings.options
        for warning in settings.warnings:
            log.warning("%s", warning)
        try:
            devices = emulated_devices(options)
        except (StorageError, OSError) as exc:
            raise UsbipError(str(exc)) from None
        kernel = options.usbip_host and not options.device_mode
        state = Path(options.state_dir) if options.state_dir else state_dir()
        rules = RuleSources(settings.exports, RuleStore(state))
        if options.device_mode:
            _check_device_mode(options, devices, rules())
        elif options.rules_only:
            devices = []
        elif not devices and not (kernel and usbip_host.driver_loaded()) and not len(rules()):
            log.warning("no devices to export (try --demo, --audio, --webcam, --disk PATH, "
                        "or 'usbipy bind -b BUSID' with usbip-host loaded)")
        tls = server_tls(options, settings.origins)
        check_http(options)
        hosts, family = listen_hosts(options)
        opened: list[socket.socket] = []
        metrics = None
        try:
            try:
                if not options.rules_only:
                    opened += listen_sockets(hosts, options.tcp_port, family)
            except OSError as exc:
                raise UsbipError(f"cannot listen on {', '.join(hosts)} port "
                                 f"{options.tcp_port}: {exc.strerror or exc}") from None
            sockets = list(opened)
            plain_sockets: list[socket.socket] = []
            if (tls is not None and options.plaintext_port is not None
                    and not options.rules_only):
                try:
                    plain_sockets = listen_sockets([DEFAULT_ADDRESS], options.plaintext_port)
                except OSError as exc:
                    raise UsbipError(f"cannot listen on {DEFAULT_ADDRESS} port "
                                     f"{options.plaintext_port}: {exc.strerror or exc}"
                                     ) from None
                opened += plain_sockets
            if tls is None:
                _warn_if_exposed(sockets)
            elif not tls.kernel and ((kernel and usbip_host.driver_loaded())
                                     or options.device_mode):
                log.warning("kernel TLS is not available: %s cannot be exported over TLS "
                            "('modprobe tls', then restart usbipyd)",
                            "gadgets on usbip-vudc" if options.device_mode
                            else "devices bound to usbip-host")
            raise_file_limit(settings.limits)
            metrics = _http_endpoint(options)
            if options.capture is not None:
                try:  # (the capture itself is made after -D forks: its writer is a thread)
                    check_writable(options.capture)
                except OSError as exc:
                    raise UsbipError(f"cannot write {printable(options.capture)}: "
                                     f"{exc.strerror or exc}") from None
            pid_file = None
            if options.pid:
                try:  # checked before -D forks, so that a refusal is reported, not lost
                    pid_file = PidFile(options.pid)
                except OSError as exc:
                    raise UsbipError(f"cannot write {printable(options.pid)}: "
                                     f"{exc.strerror or exc}") from None
        except BaseException:
            if metrics is not None:
                metrics.close()
            for sock in opened:
                sock.close()
            raise
        for line in describe(settings):
            log.info("%s", line)
        server = UsbipServer(hosts=hosts, port=options.tcp_port, family=family,
                             sockets=sockets, tls=tls, plain_sockets=plain_sockets,
                             policy=settings.policy, limits=settings.limits,
                             stats=ServerStats() if metrics is not None else None)
        for device in devices:
            server.add(device)
        if kernel:
            server.registry.add_source(KernelStubSource())
        if options.device_mode:
            server.registry.add_source(VudcSource())
        libusb: LibusbSource | None = None
        if options.libusb and not options.rules_only and not options.device_mode:
            if libusb_available():
                libusb = LibusbSource(rules, rules.unbound)
                server.registry.add_source(libusb)
            else:
                _unservable(rules().via(Via.LIBUSB), "python-libusb1 is not installed: pip "
                                                     "install 'usbipy[libusb]'")
        return cls(settings, server, libusb, metrics, pid_file, rules, state)

    def run(self, daemon: Daemon | None = None) -> None:
        """Serve until SIGINT or SIGTERM. ``daemon``: told once serving, or why not.
        UsbipError when it cannot (told to ``daemon`` and logged too, when there is one:
        its stderr is gone)."""
        options = self.settings.options
        try:
            if options.capture is not None:
                try:
                    self.server.capture = Capture(options.capture,
                                                  max_bytes=options.capture_size * 1_000_000,
                                                  files=options.capture_files)
                except OSError as exc:
                    raise UsbipError(f"cannot write {printable(options.capture)}: "
                                     f"{exc.strerror or exc}") from None
                log.info("capturing the URBs of emulated and libusb devices to %s (%d MB a "
                         "file, %d files)", printable(options.capture), options.capture_size,
                         options.capture_files)
            try:
                if self._pid_file is not None:
                    try:
                        self._pid_file.write()
                    except OSError as exc:  # (its folder changed since the check)
                        raise UsbipError(f"cannot write {printable(options.pid)}: "
                                         f"{exc.strerror or exc}") from None
                run_loop(self._serve(daemon), options.loop)
            finally:
                if self._pid_file is not None:
                    self._pid_file.remove()
        except UsbipError as exc:
            if daemon is not None:
                # (after -D, stderr is gone: the log says it, and the process that waits)
                log.error("%s", exc)
                daemon.failed(str(exc))
            raise
        finally:
            if not self._serving:  # (what prepare() opened, closed: sockets, devices)
                asyncio.run(self.server.close())
                if self._metrics is not None:
                    self._metrics.close()

    async def _serve(self, daemon: Daemon | None) -> None:
        server, metrics = self.server, self._metrics
        self._serving = True
        if not self.settings.options.rules_only:
            await server.start()
        advertiser = self._advertiser = await self._advertise()
        peers = await self._watch_peers() if metrics is not None else None
        if metrics is not None:
            self.board = self._status_board(peers)
            metrics.start(server, asyncio.get_running_loop(), self.board)
            log.info("status page on %s/, metrics on %s", metrics.base, metrics.url)
        watchers = await self._watch_devices()
        polling = self._libusb is not None and len(watchers) < 2
        watcher = asyncio.create_task(_watch(self._libusb)) if (
            polling and self._libusb is not None) else None
        for device in server.registry:
            info = device.info
            extra = ""
            backend = getattr(device, "backend", None)
            if isinstance(backend, PtyBackend):
                extra = f" (pty {backend.path})"
            log.info("exporting %s: %04x:%04x %s%s", info.busid, info.idVendor,
                     info.idProduct, type(device).__name__, extra)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        hangups = asyncio.Queue[None]()
        loop.add_signal_handler(signal.SIGHUP, hangups.put_nowait, None)
        if daemon is not None:
            daemon.ready()  # (-D: the process that started usbipyd returns now)

        async def reloads() -> None:
            while True:
                await hangups.get()
                try:
                    self.settings = await reload(server, self.settings)
                    self.rules.configured = self.settings.exports
                    self._changes.put_nowait(RULES_CHANGED)
                except Exception:  # (a reload that fails must not end the next ones)
                    log.exception("reload failed: the running configuration stays in force")

        reloader = asyncio.create_task(reloads())
        try:
            await stop.wait()
        finally:
            reloader.cancel()
            log.info("shutting down")
            if watcher is not None:
                watcher.cancel()
            for each in watchers:
                each.close()
            for task in list(self._tasks):
                task.cancel()
            if self.engine is not None:
                await asyncio.to_thread(self.engine.close)
            if advertiser is not None:
                await advertiser.close()
            if peers is not None:
                await peers.close()
            await server.close()  # closes the sources and the capture too
            if metrics is not None:
                await asyncio.to_thread(metrics.close)


    # --- the status page and DNS-SD ----------------------------------------------------

    def _name(self) -> str:
        return self.settings.options.server_name or socket.gethostname()

    def _status_board(self, peers: PeerWatcher | None) -> StatusBoard:
        rules = self.rules

        def rule_of(busids: list[str]) -> dict[str, str]:
            """busid -> where the export rule that matched it is written (sysfs reads)."""
            if not sysfs.usb_devices_dir().is_dir():
                return {}
            return rules_of(rules(), busids)

        return StatusBoard(self.server, name=self._name(), version=__version__,
                           rule_of=rule_of, peers=peers.peers if peers is not None else list)

    async def _advertise(self) -> Advertiser | None:
        """DNS-SD for this server, when the settings ask for it (by default: when it
        listens on an address other than loopback)."""
        options = self.settings.options
        if options.rules_only:
            return None
        exposed = [host for host, _port in self.server.addresses
                   if not is_loopback(host)]
        wanted = options.advertise
        if wanted is False or (wanted is None and not exposed):
            return None
        if not exposed:
            log.warning("not advertised by DNS-SD: usbipyd listens on loopback only")
            return None
        try:
            from ..discovery.advertise import Advertiser
        except ImportError:
            message = "not advertised by DNS-SD: pip install 'usbipy[fleet]' (python-zeroconf)"
            if wanted:
                raise UsbipError(message) from None
            log.warning("%s, or say --no-advertise", message)
            return None
        page = page_host = None
        if self._metrics is not None and not is_loopback(self._metrics.host):
            page = self._metrics.port
            if self._metrics.host not in ("0.0.0.0", "::"):
                page_host = self._metrics.host
        advertiser = Advertiser(self._name(), self.server.port, exposed,
                                tls=self.server.tls is not None, page_port=page,
                                page_host=page_host)
        try:
            await advertiser.start()
        except (OSError, ValueError) as exc:
            log.warning("not advertised by DNS-SD: %s", exc)
            return None
        log.info("advertised by DNS-SD as %s", printable(advertiser.instance))
        return advertiser

    async def _watch_peers(self) -> PeerWatcher | None:
        """The other servers DNS-SD finds, for the page (only where this one is on the
        network: a loopback-only server has no peers to show)."""
        if not any(not is_loopback(host) for host, _port in self.server.addresses):
            return None
        try:
            from ..discovery.browse import PeerWatcher
            from ..discovery.records import SERVICE_TYPE, instance_label
        except ImportError:
            return None
        own = (self._advertiser.instance if self._advertiser is not None
               else f"{instance_label(self._name())}.{SERVICE_TYPE}")
        watcher = PeerWatcher(own)
        try:
            await watcher.start()
        except OSError as exc:
            log.warning("cannot browse DNS-SD for other servers: %s", exc)
            return None
        return watcher

    # --- devices that come and go -------------------------------------------------------

    async def _watch_devices(self) -> list[hotplug.UdevWatcher | hotplug.LibusbWatcher
                                          | hotplug.StoreWatcher]:
        """The watchers of what changes (hotplug events, udev's else libusb's, and `usbipy
        bind` writing its rules, by inotify) started, then the rule engine, which is
        handed every change in order by one task. The watchers started; none polls."""
        options = self.settings.options
        watchers: list[hotplug.UdevWatcher | hotplug.LibusbWatcher | hotplug.StoreWatcher] = []
        if options.device_mode:  # (the host's devices are not this server's business)
            return watchers
        linux = sysfs.usb_devices_dir().is_dir()
        stats = self.server.stats
        if linux:
            self.engine = ExportEngine(
                self.rules, store=self.rules.store, gone=self._gone,
                on_bind=(lambda _busid: setattr(stats, "rule_binds", stats.rule_binds + 1))
                if stats is not None else None,
                usbip_host_rules=options.usbip_host)
        events: hotplug.UdevWatcher | hotplug.LibusbWatcher | None = None
        if linux and hotplug.udev_available():
            try:
                events = hotplug.UdevWatcher(self._changes.put_nowait)
                events.start()
            except Exception as exc:  # (no netlink: a container without it)
                log.warning("hotplug: udev's events cannot be read (%s)", exc)
                events = None
        if events is None and self._libusb is not None:
            try:
                # (a context of its own: the source's is made anew when libusb's list of
                # devices goes stale, and a callback registered on it would go with it)
                context = await asyncio.to_thread(LibusbEvents)
                events = hotplug.LibusbWatcher(context, self._changes.put_nowait)
                events.start()
            except Exception as exc:
                log.warning("hotplug: libusb's callbacks are not available (%s)", exc)
                events = None
        if events is not None:
            watchers.append(events)
        elif linux:
            log.warning("hotplug: no events to watch (pip install 'usbipy[hotplug]' for "
                        "udev's): export rules apply at start and on SIGHUP only")
        if self._state is not None:
            store = hotplug.StoreWatcher(self._state, STORE_NAME,
                                         lambda: self._changes.put_nowait(RULES_CHANGED))
            if store.start():
                watchers.append(store)
        self._spawn(self._apply_changes())
        return watchers

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply_changes(self) -> None:
        """The engine's start, then each change in the order it came: one at a time (the
        engine's state is not for two events at once)."""
        if self.engine is not None:
            try:
                await self.engine.start()
            except Exception:
                log.exception("applying the export rules at start failed")
        while True:
            change = await self._changes.get()
            try:
                if change is RULES_CHANGED:
                    await self._rules_changed()
                    continue
                assert isinstance(change, HotplugEvent)
                if self.engine is not None:
                    await self.engine.event(change)
                if change.action == "remove" and self._libusb is not None:
                    await self._libusb.check()
            except Exception:
                log.exception("applying a change of the devices or rules failed")

    async def _rules_changed(self) -> None:
        if self.engine is not None:
            await self.engine.reload()
        if self._libusb is not None:
            await self._libusb.check()
        rules = await asyncio.to_thread(self.rules)
        log.info("export rules applied again (%d in force)", len(rules))

    def _gone(self, busid: str) -> None:
        """A device left: if a client held it, its session ends; the log, the metrics
        and the status page say so."""
        if self.board is not None:
            self.board.gone(busid)
        access = self.server.access
        holder = access.handed_off.get(busid)
        owner = self.server.registry.owner(busid)
        if holder is None and owner is None:
            return
        who = holder.client.name if holder is not None else getattr(
            getattr(owner, "client", None), "name", "a client")
        log.warning("%s: unplugged while %s used it: its session ends", printable(busid), who)
        if self.server.stats is not None:
            self.server.stats.unplugged[busid] += 1
