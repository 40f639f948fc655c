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
import ipaddress
import logging
import resource
import signal
import socket
import ssl
import wave
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends.base import ExportedDevice
from ..backends.kernel_stub import KernelStubSource
from ..backends.libusb.bindings import BindingError, BindingStore
from ..backends.libusb.events import libusb_available
from ..backends.libusb.source import LibusbSource
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
from ..linux import usbip_host
from ..pidfile import PidFile
from ..statedir import state_dir
from ..tls import TlsError, TlsFiles, ktls, server_context
from .server import UsbipServer, listen_sockets
from .stats import ServerStats
from .tls import ServerTls

if TYPE_CHECKING:
    from .metrics import MetricsEndpoint

log = logging.getLogger("usbipyd")


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
    for device in emulated_devices(settings.options, look_only=True):
        device.close()


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
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            log.warning("serving plaintext USB/IP on %s: anyone who reaches it can take the "
                        "devices and read their traffic (use --tls-cert/--tls-key/--tls-ca)",
                        host)


def _metrics_endpoint(options: argparse.Namespace) -> MetricsEndpoint | None:
    """The endpoint --metrics asks for, bound (before -D forks: a busy port is told)."""
    if options.metrics is None:
        return None
    try:
        from .metrics import MetricsEndpoint
    except ImportError:
        raise UsbipError("--metrics needs prometheus_client: pip install "
                         "'usbipy[metrics]'") from None
    host, port = options.metrics
    try:
        return MetricsEndpoint(host, port)
    except OSError as exc:
        raise UsbipError(f"cannot serve metrics on {host}:{port}: "
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


def _unservable(store: BindingStore, why: str) -> None:
    """Name each libusb binding this server cannot serve, and why."""
    try:
        bindings = store.load()
    except BindingError as exc:
        log.warning("%s", exc)
        return
    for binding in bindings:
        log.warning("not exporting %s: %s", printable(str(binding)), why)


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
    # An idle device has no transfer to fail when it is unplugged, and an unbind
    # must reach a device in use: look every second.
    while True:
        await asyncio.sleep(1.0)
        try:
            await source.check()
        except Exception:
            log.exception("checking the libusb devices failed")


class Service:
    """usbipyd's server, its sockets bound and its checks done; :meth:`run` serves."""

    def __init__(self, settings: Settings, server: UsbipServer, libusb: LibusbSource | None,
                 metrics: MetricsEndpoint | None, pid_file: PidFile | None) -> None:
        self.settings = settings
        self.server = server
        self._libusb = libusb
        self._metrics = metrics
        self._pid_file = pid_file
        #: Whether the loop began serving (then it closes everything as it ends).
        self._serving = False

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
        kernel = options.usbip_host
        if not devices and not (kernel and usbip_host.driver_loaded()):
            log.warning("no devices to export (try --demo, --audio, --webcam, --disk PATH, "
                        "or 'usbipy bind -b BUSID' with usbip-host loaded)")
        tls = server_tls(options, settings.origins)
        hosts, family = listen_hosts(options)
        opened: list[socket.socket] = []
        metrics = None
        try:
            try:
                opened += listen_sockets(hosts, options.tcp_port, family)
            except OSError as exc:
                raise UsbipError(f"cannot listen on {', '.join(hosts)} port "
                                 f"{options.tcp_port}: {exc.strerror or exc}") from None
            sockets = list(opened)
            plain_sockets: list[socket.socket] = []
            if tls is not None and options.plaintext_port is not None:
                try:
                    plain_sockets = listen_sockets([DEFAULT_ADDRESS], options.plaintext_port)
                except OSError as exc:
                    raise UsbipError(f"cannot listen on {DEFAULT_ADDRESS} port "
                                     f"{options.plaintext_port}: {exc.strerror or exc}"
                                     ) from None
                opened += plain_sockets
            if tls is None:
                _warn_if_exposed(sockets)
            elif not tls.kernel and kernel and usbip_host.driver_loaded():
                log.warning("kernel TLS is not available: devices bound to usbip-host cannot "
                            "be exported over TLS ('modprobe tls', then restart usbipyd)")
            raise_file_limit(settings.limits)
            metrics = _metrics_endpoint(options)
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
        libusb: LibusbSource | None = None
        if options.libusb:
            state = Path(options.state_dir) if options.state_dir else state_dir()
            store = BindingStore(state / "libusb-bindings.json")
            if libusb_available():
                libusb = LibusbSource(store)
                server.registry.add_source(libusb)
            else:
                _unservable(store, "python-libusb1 is not installed: pip install "
                                   "'usbipy[libusb]'")
        return cls(settings, server, libusb, metrics, pid_file)

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
        await server.start()
        if metrics is not None:
            metrics.start(server, asyncio.get_running_loop())
            log.info("metrics on %s", metrics.url)
        watcher = (asyncio.create_task(_watch(self._libusb)) if self._libusb is not None
                   else None)
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

        async def reloads(settings: Settings) -> None:
            while True:
                await hangups.get()
                try:
                    settings = await reload(server, settings)
                except Exception:  # (a reload that fails must not end the next ones)
                    log.exception("reload failed: the running configuration stays in force")

        reloader = asyncio.create_task(reloads(self.settings))
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
