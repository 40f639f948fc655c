"""A private Ethernet of network namespaces, for the fleet and mDNS tests.

``NetLab(n)`` makes a "switch" (a namespace holding a Linux bridge with multicast
snooping off) and ``n`` hosts, each a namespace with ``lo`` and ``eth0`` (a veth
whose other end is a port of the bridge), ``eth0`` at 10.77.0.(10+i)/24. Multicast,
mDNS among it, floods from each host to all the others; nothing reaches this machine's
own network, whose namespace is never touched. Every name carries this process's id and
a random part, so two runs never collide; leaving the ``with`` block (after an error
too) ends every process still in the namespaces and deletes them.

``Host.avahi()`` starts avahi-daemon inside a host, on a private D-Bus bus of its own,
so that avahi-browse can be asked what that host sees.

    with NetLab(3) as lab:
        server = lab.hosts[0].popen([...])
        with lab.hosts[2].avahi() as avahi:
            found = avahi.wait_for("_usbip._tcp", lambda services: len(services) == 1)

Needs root and iproute2; ``NetLab.available()`` and ``Avahi.available()`` give the
reason to skip when the machine cannot.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypedDict

#: The hosts' /24: host i is SUBNET.(FIRST + i).
SUBNET = "10.77.0"
FIRST = 10
MAX_HOSTS = 200

#: Seconds a process has between SIGTERM and SIGKILL when a lab or daemon stops.
GRACE = 5.0
#: The ceiling of any wait for a daemon to be ready.
READY_TIMEOUT = 20.0

# netlab-<creator pid>-<random>-sw / -h<i>
_NAME = re.compile(r"^netlab-(\d+)-[0-9a-f]{6}-(?:sw|h\d+)$")
# The UTS namespace wrapper: "$0" is the host name, "$@" the command.
_SET_HOSTNAME = 'printf %s "$0" > /proc/sys/kernel/hostname && exec "$@"'


def _ip(*args: str, timeout: float = 30.0) -> str:
    """Runs iproute2's ip; its output, or RuntimeError with what it said."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _poll(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Whether condition() became true within timeout seconds (a bounded poll)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if condition():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return condition()


def _stop(procs: Sequence[subprocess.Popen[Any]], grace: float = GRACE) -> None:
    """SIGTERM (and SIGCONT, for stopped ones), then SIGKILL after grace seconds."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
            p.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=GRACE)


def _netns_pids(name: str) -> list[int]:
    try:
        return [int(pid) for pid in _ip("netns", "pids", name, timeout=10).split()]
    except RuntimeError:
        return []  # gone already


def _kill_netns(name: str, grace: float = GRACE) -> None:
    """Ends every process in namespace name, then deletes the namespace."""
    pids = _netns_pids(name)
    for sig in (signal.SIGTERM, signal.SIGCONT):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    if pids and not _poll(lambda: not _netns_pids(name), grace, 0.1):
        for pid in _netns_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _poll(lambda: not _netns_pids(name), grace, 0.1)
    _ip("netns", "delete", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class Host:
    """One machine of a NetLab: a network namespace with lo and eth0."""

    def __init__(self, lab: NetLab, index: int, name: str) -> None:
        self.lab = lab
        self.index = index
        #: The namespace's name, for ip netns.
        self.name = name
        #: eth0's IPv4 address.
        self.address = f"{SUBNET}.{FIRST + index}"
        #: What gethostname() returns in this host's processes (when the lab has uts=True).
        self.hostname = name

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address!r})"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """The command line that runs argv in this host (the program keeps the pid)."""
        prefix = ["ip", "netns", "exec", self.name]
        if self.lab.uts:
            prefix += ["unshare", "--uts", "--", "sh", "-c", _SET_HOSTNAME, self.hostname]
        return [*prefix, *argv]

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run in this host; timeout defaults to 60 s."""
        kw.setdefault("timeout", 60.0)
        return subprocess.run(self.argv(argv), **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen in this host; the lab ends it at exit if it has not ended."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(argv), **kw)
        self.lab.track(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process in this host's network namespace."""
        return _netns_pids(self.name)

    def set_link(self, up: bool) -> None:
        """Unplugs (False) or plugs back (True) this host's cable: eth0 down or up."""
        _ip("-n", self.name, "link", "set", "eth0", "up" if up else "down")

    def avahi(self, *, publish: bool = False) -> Avahi:
        """avahi-daemon in this host, as a context manager; see Avahi."""
        return Avahi(self, publish=publish)


class NetLab:
    """A bridge and hosts, each in a network namespace of its own; a context manager.

    uts=True gives each host's processes a UTS namespace of their own, whose host name
    is Host.hostname, so that programs naming themselves after gethostname() differ.
    sweep=True first deletes namespaces that earlier labs left behind when their
    process died without cleaning up (those whose creator's pid is gone).
    A host's only route is 10.77.0.0/24 on eth0: sockets that name their interface
    (IP_MULTICAST_IF; python-zeroconf with InterfaceChoice.All or a list of addresses,
    avahi) multicast fine, but one bound to 0.0.0.0 that does not (python-zeroconf's
    InterfaceChoice.Default) gets ENODEV. multicast_route=True adds 224.0.0.0/4 dev eth0,
    as a default route does on most machines.
    """

    def __init__(
        self, hosts: int, *, uts: bool = True, sweep: bool = True, multicast_route: bool = False,
    ) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be 1 to {MAX_HOSTS}, not {hosts}")
        self.uts = uts
        self.sweep = sweep
        self.multicast_route = multicast_route
        self.prefix = f"netlab-{os.getpid()}-{secrets.token_hex(3)}"
        #: The namespace holding the bridge br0.
        self.switch = f"{self.prefix}-sw"
        self.hosts = [Host(self, i, f"{self.prefix}-h{i}") for i in range(hosts)]
        self._procs: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"NetLab({self.prefix!r}, {len(self.hosts)} hosts)"

    def __enter__(self) -> NetLab:
        atexit.register(self.close)
        try:
            if self.sweep:
                self.sweep_stale()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except RuntimeError as problem:
            if exc is None:
                raise
            exc.add_note(f"and cleaning up the NetLab failed: {problem}")

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def _build(self) -> None:
        sw = self.switch
        self._add_netns(sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        # Snooping would drop multicast to ports that never sent an IGMP report.
        _ip("-n", sw, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", sw, "link", "set", "br0", "up")
        for host in self.hosts:
            ns, port = host.name, f"p{host.index}"
            self._add_netns(ns)
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", sw, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.multicast_route:
                _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def track(self, proc: subprocess.Popen[Any]) -> None:
        """Ends proc (SIGTERM, then SIGKILL after GRACE s) when the lab closes."""
        self._procs.append(proc)

    def close(self) -> None:
        """Ends the lab's processes and deletes its namespaces; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        _stop(self._procs)
        problems = []
        # The hosts before the switch: deleting a namespace deletes its veth ends.
        for name in reversed(self._made):
            try:
                _kill_netns(name)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                problems.append(f"{name}: {e}")
        if problems:
            raise RuntimeError("; ".join(problems))

    @staticmethod
    def sweep_stale() -> list[str]:
        """Deletes the namespaces of labs whose process is gone; their names."""
        swept = []
        for line in _ip("netns", "list").splitlines():
            name = line.split(" ", 1)[0]
            m = _NAME.match(name)
            if m and not _alive(int(m.group(1))):
                with contextlib.suppress(RuntimeError, OSError, subprocess.SubprocessError):
                    _kill_netns(name)
                    swept.append(name)
        return swept

    @staticmethod
    def available(uts: bool = True) -> str | None:
        """None when this machine can make a lab, else why not (for pytest.skip)."""
        if not sys.platform.startswith("linux"):
            return "network namespaces are Linux's"
        if os.geteuid() != 0:
            return "network namespaces need root"
        for tool in ["ip", "sh"] + (["unshare"] if uts else []):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        try:
            with NetLab(1, uts=uts, sweep=False) as probe:
                done = probe.hosts[0].run(["true"], capture_output=True, text=True, timeout=20)
                if done.returncode != 0:
                    return f"cannot run in a network namespace: {done.stderr.strip()}"
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            return f"cannot make network namespaces: {e}"
        return None


class AvahiService(TypedDict):
    """A resolved service, one '=' line of avahi-browse -p."""

    interface: str
    protocol: str  # "IPv4" or "IPv6"
    name: str  # the instance name, unescaped
    type: str  # "_usbip._tcp"
    domain: str  # "local"
    hostname: str  # the SRV target, "h0.local"
    address: str
    port: int
    txt: list[str]  # "key=value" strings; avahi's order, not necessarily the wire's


def _unescape(text: str) -> str:
    r"""avahi's escaped label: \. and \\ for themselves, \DDD for any other byte."""

    def byte(m: re.Match[bytes]) -> bytes:
        code = m.group(1)
        return bytes([int(code) & 0xFF]) if code.isdigit() else code

    return re.sub(rb"\\(\d{3}|.)", byte, text.encode(), flags=re.DOTALL).decode(errors="replace")


def _parse_txt(text: str) -> list[str]:
    # avahi prints each string between double quotes, joined by spaces, unescaped.
    text = text.strip()
    if len(text) < 2 or not (text.startswith('"') and text.endswith('"')):
        return []
    return text[1:-1].split('" "')


def _apply(services: dict[tuple[str, ...], AvahiService], line: str) -> None:
    """Updates services with one line of avahi-browse -rp: '=' resolved, '-' removed."""
    fields = line.split(";", 9)
    key = tuple(fields[1:6])
    if fields[0] == "=" and len(fields) == 10:
        services[key] = AvahiService(
            interface=fields[1], protocol=fields[2], name=_unescape(fields[3]),
            type=fields[4], domain=fields[5], hostname=fields[6], address=fields[7],
            port=int(fields[8]), txt=_parse_txt(fields[9]))
    elif fields[0] == "-" and len(fields) == 6:
        services.pop(key, None)


def parse_browse(output: str) -> list[AvahiService]:
    """The services that avahi-browse -rp output leaves resolved."""
    services: dict[tuple[str, ...], AvahiService] = {}
    for line in output.splitlines():
        _apply(services, line)
    return list(services.values())


_BUS_CONFIG = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"/>
    <allow own="org.freedesktop.Avahi"/>
    <allow send_destination="org.freedesktop.Avahi"/>
  </policy>
</busconfig>
"""

_AVAHI_CONFIG = """\
[server]
host-name={hostname}
use-ipv4=yes
use-ipv6=no
allow-interfaces=eth0
enable-dbus=yes
ratelimit-interval-usec=1000000
ratelimit-burst=1000

[wide-area]
enable-wide-area=no

[publish]
disable-publishing={disable}
disable-user-service-publishing={disable}
publish-addresses={publish}
publish-hinfo=no
publish-workstation=no
publish-domain=no
publish-aaaa-on-ipv4=no
publish-a-on-ipv6=no

[reflector]
enable-reflector=no

[rlimits]
"""

# Runs in the private mount namespace that ip netns exec gives every command: an empty
# /run (avahi-daemon's pid file and socket are /run/avahi-daemon/{pid,socket}, and it
# refuses to start when the pid file names a live process) and an empty
# /etc/avahi/services (no static services from this machine). Nothing shows outside.
_AVAHI_SHELL = (
    "mount -t tmpfs -o mode=0755 netlab /run && mkdir /run/avahi-daemon"
    " && mount -t tmpfs -o mode=0755 netlab /etc/avahi/services"
    ' && exec "$@"'
)


class Avahi:
    """avahi-daemon in a host, on a private bus; a context manager.

    publish=False (the default) is a pure browser: it publishes nothing, not even its
    own address. publish=True lets publish_service() register services, and publishes
    the host's address record (host name Host.hostname) so that others resolve them.
    """

    def __init__(self, host: Host, *, publish: bool = False) -> None:
        self.host = host
        self.publish = publish
        self.dir: Path | None = None
        self.bus = ""
        self.dbus: subprocess.Popen[Any] | None = None
        self.daemon: subprocess.Popen[Any] | None = None
        self._logs: list[IO[Any]] = []
        self._children: list[subprocess.Popen[Any]] = []

    @staticmethod
    def available() -> str | None:
        """None when avahi-daemon, avahi-utils and D-Bus are installed, else what is not."""
        for tool in ["avahi-daemon", "avahi-browse", "avahi-publish", "dbus-daemon",
                     "dbus-send", "mount"]:
            if shutil.which(tool) is None:
                return f"{tool} is not installed (apt-get install avahi-daemon avahi-utils)"
        return None

    @property
    def env(self) -> dict[str, str]:
        """An environment whose system bus is this daemon's, for its clients."""
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus}

    def _log(self, name: str) -> IO[Any]:
        assert self.dir is not None
        f = open(self.dir / name, "wb")
        self._logs.append(f)
        return f

    def log(self) -> str:
        """What dbus-daemon and avahi-daemon said so far."""
        if self.dir is None:
            return ""
        logs = sorted(self.dir.glob("*.log"))
        return "".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in logs)

    def __enter__(self) -> Avahi:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="netlab-avahi-"))
        socket = self.dir / "bus"
        self.bus = f"unix:path={socket}"
        (self.dir / "bus.conf").write_text(_BUS_CONFIG.format(socket=socket))
        (self.dir / "avahi-daemon.conf").write_text(_AVAHI_CONFIG.format(
            hostname=self.host.hostname,
            disable="no" if self.publish else "yes",
            publish="yes" if self.publish else "no"))
        self.dbus = dbus = self.host.popen(
            ["dbus-daemon", f"--config-file={self.dir / 'bus.conf'}", "--nofork",
             "--nopidfile", "--nosyslog"],
            stdin=subprocess.DEVNULL, stdout=self._log("dbus.log"), stderr=subprocess.STDOUT)
        if not _poll(lambda: socket.exists() or dbus.poll() is not None, READY_TIMEOUT):
            raise RuntimeError(f"dbus-daemon made no socket in {READY_TIMEOUT} s\n{self.log()}")
        if dbus.poll() is not None:
            raise RuntimeError(f"dbus-daemon exited: {dbus.returncode}\n{self.log()}")
        self.daemon = self.host.popen(
            ["sh", "-c", _AVAHI_SHELL, "avahi", "avahi-daemon", "--no-chroot",
             "--no-drop-root", "--no-rlimits", "-f", str(self.dir / "avahi-daemon.conf")],
            env=self.env, stdin=subprocess.DEVNULL, stdout=self._log("avahi-daemon.log"),
            stderr=subprocess.STDOUT)
        if not _poll(self._running, READY_TIMEOUT, 0.1):
            raise RuntimeError(f"avahi-daemon was not running after {READY_TIMEOUT} s\n"
                               f"{self.log()}")

    def _running(self) -> bool:
        """Whether the daemon answers GetState with AVAHI_SERVER_RUNNING (2)."""
        if self.daemon is None or self.daemon.poll() is not None:
            raise RuntimeError(f"avahi-daemon exited\n{self.log()}")
        done = subprocess.run(
            ["dbus-send", f"--bus={self.bus}", "--print-reply", "--reply-timeout=2000",
             "--dest=org.freedesktop.Avahi", "/", "org.freedesktop.Avahi.Server.GetState"],
            capture_output=True, text=True, timeout=10)
        return done.returncode == 0 and done.stdout.split()[-2:] == ["int32", "2"]

    def stop(self) -> None:
        """Stops the daemon and its bus (and publish_service's clients); removes the files."""
        _stop(self._children)
        if self.daemon is not None:
            _stop([self.daemon])
        if self.dbus is not None:
            _stop([self.dbus])
        for f in self._logs:
            f.close()
        self._logs.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def browse_output(self, service_type: str, timeout: float = 10.0) -> str:
        """avahi-browse -rtp's output: what the daemon knows plus what answers now.

        -t ends it once the daemon says "all for now" (about a second after the
        query) and each service is resolved; timeout is only the ceiling, after which
        what it printed so far is returned.
        """
        try:
            done = self.host.run(
                ["avahi-browse", "-rtp", "--no-db-lookup", service_type],
                env=self.env, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as late:
            out = late.stdout or b""
            return out.decode(errors="replace") if isinstance(out, bytes) else out
        if done.returncode != 0:
            raise RuntimeError(
                f"avahi-browse failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
        return str(done.stdout.decode(errors="replace"))

    def browse(self, service_type: str, timeout: float = 10.0) -> list[AvahiService]:
        """The services of service_type ("_usbip._tcp") one avahi-browse -rtp resolves.

        It can miss services that are there (see wait_for); it also lists, from the
        daemon's cache, services whose process died without a goodbye, until their
        records expire (python-zeroconf's SRV/TXT/A: 120 s).
        """
        return parse_browse(self.browse_output(service_type, timeout))

    def wait_for(
        self, service_type: str, condition: Callable[[list[AvahiService]], bool],
        timeout: float = READY_TIMEOUT, settle: float = 1.2,
    ) -> list[AvahiService]:
        """Browses (avahi-browse -rp, not -t) until condition(services) holds; those services.

        The list follows the daemon: resolved services join it and withdrawn ones (a
        goodbye, or records expired from the cache) leave it. condition is first asked
        after settle seconds, when avahi has dumped its cache and heard the first
        answers, so that "not there" means something; then after each change and every
        0.1 s. TimeoutError after timeout seconds, with the list in its message.

        Prefer it to browse() when something else may browse the same type: avahi-daemon
        skips its own query for a second after hearing another host ask (RFC 6762's
        duplicate question suppression), even when that question was a QU one whose
        answers went by unicast to the asker (python-zeroconf's first query is QU), so a
        single browse() then comes back empty; this one hears the query a second later.
        """
        services: dict[tuple[str, ...], AvahiService] = {}
        proc = self.host.popen(
            ["avahi-browse", "-rp", "--no-db-lookup", service_type],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        start = time.monotonic()
        deadline = start + timeout
        pending = b""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(proc.stdout, selectors.EVENT_READ)
                for _ in range(int(timeout / 0.1) + 1000):
                    now = time.monotonic()
                    if now - start >= settle and condition(list(services.values())):
                        return list(services.values())
                    if now >= deadline:
                        break
                    if selector.select(min(0.1, deadline - now)):
                        data = os.read(proc.stdout.fileno(), 65536)
                        if not data:
                            raise RuntimeError(f"avahi-browse exited: {proc.wait(GRACE)}")
                        *lines, pending = (pending + data).split(b"\n")
                        for line in lines:
                            _apply(services, line.decode(errors="replace"))
        finally:
            _stop([proc])
            proc.stdout.close()
        raise TimeoutError(f"avahi-browse {service_type}: not as wanted after {timeout} s: "
                           f"{list(services.values())}")

    def publish_service(
        self, name: str, service_type: str, port: int, txt: Sequence[str] = (),
        timeout: float = READY_TIMEOUT,
    ) -> subprocess.Popen[Any]:
        """avahi-publish -s in this host, once established; stopping it withdraws it."""
        if not self.publish:
            raise RuntimeError("this Avahi was started with publish=False")
        assert self.dir is not None
        out = self.dir / f"publish-{len(self._children)}.out"
        with open(out, "wb") as f:
            proc = self.host.popen(
                ["avahi-publish", "-s", name, service_type, str(port), *txt],
                env=self.env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        self._children.append(proc)

        def established() -> bool:
            return b"Established" in out.read_bytes() or proc.poll() is not None

        if not _poll(established, timeout, 0.05) or proc.poll() is not None:
            raise RuntimeError(f"avahi-publish did not establish {name!r}: {out.read_text()}")
        return proc
