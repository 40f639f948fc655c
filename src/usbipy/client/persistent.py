"""`usbipy attach --persistent`: keep a remote device attached through losses.

A :class:`Keeper` attaches the device into vhci-hcd and then waits, without
polling the device or the network, for the attachment to end:

- it keeps a duplicate of the socket it handed to vhci-hcd and poll()s it for
  POLLHUP/POLLERR/POLLRDHUP. vhci-hcd shuts the socket down the moment its
  side fails (vhci_shutdown_connection in drivers/usb/usbip/vhci_hcd.c): the
  server closed it, reset it, or stopped answering for the dead-peer timeout
  (keepalive and TCP_USER_TIMEOUT, set before the hand-off);
- a slow read of vhci-hcd's status table is the backstop (a port freed with no
  event on the socket).

Then it connects and imports again, with exponential backoff and jitter,
through a server that does not listen yet or still answers "busy" while it
reaps the old session. A port detached by someone (its record in
/var/run/vhci_hcd removed, as `usbip detach` does) ends the keeper for good, as
does SIGTERM or SIGINT, which also detach the device.

Each keeper describes itself in a small JSON file in the run directory, for
`usbipy port` and `usbipy detach`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import UsbipError
from ..escape import printable
from ..linux import vhci
from .attach import Attached
from .backoff import Backoff

log = logging.getLogger("usbipy.persistent")

#: Where keepers describe themselves; USBIPY_RUN_DIR overrides it.
DEFAULT_RUN_DIR = Path("/run/usbipy/attach")
#: Seconds between reads of vhci-hcd's status table (the backstop).
BACKSTOP = 5.0
#: An attachment that lasted this long starts the next backoff from the start.
STABLE = 30.0

_LOST = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0x2000)


def run_dir() -> Path:
    return Path(os.environ.get("USBIPY_RUN_DIR", DEFAULT_RUN_DIR))


@dataclass(frozen=True)
class KeeperState:
    """What one keeper is doing, as `usbipy port` shows it."""

    pid: int
    host: str
    tcp_port: int
    busid: str
    #: "connecting", "attached" or "waiting" (for the next attempt)
    state: str
    #: The vhci port while attached; the last one it had while waiting.
    port: int | None = None
    devid: int | None = None
    #: Wall-clock times (seconds since the epoch).
    since: float = field(default_factory=time.time)
    retry_at: float | None = None
    #: Attempts since the last success.
    attempts: int = 0
    last_error: str | None = None
    #: Times the device came back after a loss.
    reattached: int = 0
    #: The keeper process's start time (see :func:`process_start`).
    started: int | None = None
    #: A resumable attachment (the server granted it): a loss of the network is
    #: resumed in place, the device staying on its port.
    resumable: bool = False
    #: While the connection is down and being resumed: since when (wall clock).
    down_since: float | None = None
    #: Times the connection was resumed.
    resumed: int = 0
    #: How the device is found at each attempt, for one attached by identity
    #: ("device 0483:df11:SERIAL on HOST1:3240, HOST2:3240"); None: by busid.
    match: str | None = None

    @property
    def url(self) -> str:
        return f"usbip://{self.host}:{self.tcp_port}/{self.busid}"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> KeeperState:
        """A state read back from its file; ValueError unless every field has its type
        (the file is only root's to write, but a pid read from it is signalled)."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        kinds: dict[str, tuple[type, ...]] = {
            "pid": (int,), "host": (str,), "tcp_port": (int,), "busid": (str,),
            "state": (str,), "port": (int, type(None)), "devid": (int, type(None)),
            "since": (int, float), "retry_at": (int, float, type(None)),
            "attempts": (int,), "last_error": (str, type(None)), "reattached": (int,),
            "started": (int, type(None)), "resumable": (bool,),
            "down_since": (int, float, type(None)), "resumed": (int,),
            "match": (str, type(None)),
        }
        for name, value in data.items():
            if name not in kinds or (isinstance(value, bool) and bool not in kinds[name]) or (
                    not isinstance(value, kinds[name])):
                raise ValueError(f"{name}: unexpected")
        state = cls(**data)
        if state.pid <= 1:
            raise ValueError(f"pid {state.pid}")
        return state


def _path(pid: int) -> Path:
    return run_dir() / f"{pid}.json"


def write_state(state: KeeperState) -> None:
    """Replace this keeper's file at once (a reader never sees half of it)."""
    directory = run_dir()
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    partial = directory / f".{state.pid}.tmp"
    partial.write_text(json.dumps(state.as_dict()) + "\n")
    partial.replace(_path(state.pid))


def remove_state(pid: int) -> None:
    with contextlib.suppress(OSError):
        _path(pid).unlink()


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (the state) on."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # (the command name, field 2, is in parentheses and may hold spaces)
    return stat[stat.rindex(")") + 2:].split()


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22):
    with the pid, an identity that a reused pid does not share."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def _alive(state: KeeperState) -> bool:
    try:
        os.kill(state.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat(state.pid)
    if fields is None:  # (no /proc: the signal's answer is all there is)
        return True
    if fields[0] in ("Z", "X"):  # ended, not yet reaped by its parent
        return False
    return state.started is None or process_start(state.pid) == state.started


def read_states() -> list[KeeperState]:
    """The keepers that run, by pid; the files of keepers that died are removed."""
    states = []
    try:
        files = sorted(run_dir().glob("*.json"))
    except OSError:
        return []
    for path in files:
        try:
            state = KeeperState.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if not _alive(state):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        states.append(state)
    return sorted(states, key=lambda s: s.pid)


def find_keepers(port: int | None = None, busid: str | None = None,
                 host: str | None = None) -> list[KeeperState]:
    """The keepers attached on ``port``, or keeping ``busid`` (from ``host``)."""
    found = []
    for state in read_states():
        # (by port only while attached: a waiting keeper's last port may be another's now)
        if port is not None and state.port == port and state.state == "attached":
            found.append(state)
        elif busid is not None and state.busid == busid and host in (None, state.host):
            found.append(state)
    return found


def stop_keeper(state: KeeperState, timeout: float = 60.0) -> None:
    """SIGTERM the keeper and wait until it is gone (it detaches its device first)."""
    import signal

    try:
        os.kill(state.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(state):
        if time.monotonic() > deadline:
            raise UsbipError(f"the keeper of {printable(state.url)} (pid {state.pid}) did not "
                             f"stop within {timeout:g} s")
        time.sleep(0.05)


#: Attaches the device; calls ``before_hand_off()`` right before vhci-hcd gets the
#: socket (see :func:`usbipy.client.attach.attach`).
AttachFn = Callable[..., Attached]


class KeeperStopped(BaseException):
    """Raised by :meth:`Keeper.interrupt` to end an attach in progress."""


class Keeper:
    """Keeps one device attached: attach, watch, re-attach, until stopped.

    ``attach`` attaches the device and returns it with a watch socket (see
    :func:`usbipy.client.attach.attach` with ``watch=True``). Blocking: run it
    in the foreground of its own process; :meth:`stop` may be called from a
    signal handler.
    """

    def __init__(self, host: str, tcp_port: int, busid: str, attach: AttachFn, *,
                 match: str | None = None,
                 backoff: Backoff | None = None, backstop: float = BACKSTOP,
                 read_ports: Callable[[], list[vhci.VhciPort]] = vhci.read_ports,
                 detach: Callable[[int], None] = vhci.detach,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.tcp_port = tcp_port
        self.busid = busid
        self._attach = attach
        self.backoff = backoff or Backoff()
        self._backstop = backstop
        self._read_ports = read_ports
        self._detach = detach
        self._clock = clock
        #: Wakes a sleep or a watch at once on stop (made in run: in its own process).
        self._wake_r = self._wake_w = -1
        self.stopped = False
        self._attaching = False
        self._attached_before = False
        self.state = KeeperState(os.getpid(), host, tcp_port, busid, "connecting",
                                 started=process_start(os.getpid()), match=match)

    def stop(self) -> None:
        """Stop for good: detach, and do not come back. Safe from a signal handler;
        an attach in progress finishes first (see :meth:`interrupt`)."""
        self.stopped = True
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def _handing_off(self) -> None:
        # From here the kernel may own the port: a stop must not break off the
        # attach (no process would own the port), only be noticed once it is done.
        self._attaching = False
        if self.stopped:
            raise KeeperStopped  # (not handed off yet: nothing to undo)

    def interrupt(self) -> None:
        """:meth:`stop` from a signal handler, which also ends an attach in progress
        at once (its connect or import may otherwise take their whole timeouts)."""
        self.stop()
        if self._attaching:
            raise KeeperStopped

    def _set(self, **changes: object) -> None:
        self.state = replace(self.state, **changes)  # type: ignore[arg-type]
        try:
            write_state(self.state)
        except OSError as exc:  # (`usbipy port` will not see it; the device still works)
            log.debug("cannot write %s: %s", _path(self.state.pid), exc)

    def run(self) -> int:
        """Until stopped (0), detached by someone (0), or out of retries (1)."""
        what = printable(self.state.url)
        # (the process that runs it: after a fork into the background, not the parent)
        pid = os.getpid()
        self.state = replace(self.state, pid=pid, started=process_start(pid))
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        if self.stopped:
            os.write(self._wake_w, b"x")
        log.info("keeping %s attached", what)
        self._set(state="connecting")
        try:
            while not self.stopped:
                try:
                    self._attaching = True
                    try:
                        attached = self._attach(before_hand_off=self._handing_off)
                    finally:
                        self._attaching = False
                except KeeperStopped:
                    break
                except (UsbipError, OSError) as exc:
                    if self.stopped:
                        break
                    if not self._wait_to_retry(printable(str(exc) if isinstance(
                            exc, UsbipError) else (exc.strerror or str(exc)))):
                        return 1
                    continue
                status = self._keep(attached)
                if status is not None:
                    return status
            log.info("%s: stopped", what)
            return 0
        finally:
            remove_state(self.state.pid)
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1  # (a late signal writes nowhere)
            os.close(wake_r)
            os.close(wake_w)

    def _wait_to_retry(self, error: str) -> bool:
        """Wait for the next attempt; False once the retries have run out."""
        try:
            delay = self.backoff.next_delay()
        except StopIteration:
            log.error("%s: giving up after %d retries; the last error: %s",
                      printable(self.state.url), self.backoff.attempts, error)
            return False
        log.warning("attach %s failed: %s; again in %.1f s (attempt %d%s)",
                    printable(self.state.url), error, delay, self.backoff.attempts,
                    f" of {self.backoff.retries}" if self.backoff.retries is not None else "")
        self._set(state="waiting", retry_at=time.time() + delay, last_error=error,
                  attempts=self.backoff.attempts)
        self._sleep(delay)
        self._set(state="connecting", retry_at=None)
        return True

    def _sleep(self, seconds: float) -> None:
        """Sleep, woken at once by :meth:`stop`."""
        select.select([self._wake_r], [], [], max(0.0, seconds))

    def _keep(self, attached: Attached) -> int | None:
        """Watch an attachment until it ends. None: lost, attach again; else the exit
        status (stopped, detached by someone else, or out of retries)."""
        port = attached.port
        devid = attached.device.devid
        started = self._clock()
        again = self._attached_before
        self._attached_before = True
        log.info("attached %s on port %d%s", printable(self.state.url), port,
                 " again" if again else "")
        self.backoff.reset_count()  # (retries: failures in a row)
        relay = attached.relay
        # (by identity, the device may be somewhere else this time)
        self._set(host=attached.host, tcp_port=attached.tcp_port, busid=attached.device.busid,
                  state="attached", port=port, devid=devid, since=time.time(),
                  last_error=None, attempts=0, retry_at=None,
                  reattached=self.state.reattached + again, resumable=relay is not None,
                  down_since=None)
        try:
            if relay is not None:
                before = self.state.resumed  # (of earlier attachments)
                relay.on_change = lambda state: self._set(down_since=state.down_since,
                                                           resumed=before + state.resumed)
                reason = relay.run(self._wake_r)
            else:
                reason = self._watch(attached)
        finally:
            if attached.watch is not None:
                attached.watch.close()
        if reason is None:  # stopped: give the port back ourselves
            self._release(port, devid)
            if relay is not None:
                relay.finish()  # (the server releases the device now)
            log.info("stopped: port %d detached", port)
            return 0
        if relay is not None:
            relay.finish()  # (vhci-hcd sees its connection end, and frees the port)
            self._set(down_since=None)
        if vhci.read_record(port) is None:
            # `usbip detach` and `usbipy detach` remove the record before they detach
            log.info("port %d was detached by someone else: %s is no longer kept "
                     "attached", port, printable(self.state.url))
            return 0
        if self._clock() - started >= STABLE:
            self.backoff.reset()  # (it held: the next delay is the first again)
        self._forget(port)
        error = f"connection lost: {reason}"
        log.warning("%s on port %d: %s", printable(self.state.url), port, error)
        self._set(state="connecting", last_error=error)
        if not self.stopped and not self._wait_to_retry(error):
            return 1
        return None

    def _watch(self, attached: Attached) -> str | None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if attached.watch is not None:
            poller.register(attached.watch.fileno(), _LOST)
        while not self.stopped:
            events = poller.poll(int(self._backstop * 1000))
            if self.stopped:
                return None
            for fd, _mask in events:
                if attached.watch is not None and fd == attached.watch.fileno():
                    return self._socket_error(attached.watch)
            if self._port_holds(attached.port, attached.device.devid) is False:
                return "vhci-hcd freed the port"
        return None

    @staticmethod
    def _socket_error(sock: socket.socket) -> str:
        # (vhci-hcd's receive thread has often taken the error already)
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == errno.ETIMEDOUT:
            return "the server stopped answering (dead-peer timeout)"
        if code:
            return os.strerror(code)
        return ("vhci-hcd ended the connection (the server closed it, reset it, or "
                "stopped answering)")

    def _port_holds(self, port: int, devid: int) -> bool | None:
        """Whether vhci-hcd's port still holds our device (None: cannot tell)."""
        try:
            ports = {p.port: p for p in self._read_ports()}
        except (UsbipError, OSError):
            return None
        found = ports.get(port)
        if found is None or found.status is vhci.PortStatus.NULL:
            return False
        if found.status is vhci.PortStatus.NOTASSIGNED:
            return True  # still being set up (vhci shows no devid until it is in use)
        return found.devid == devid

    def _forget(self, port: int) -> None:
        """After a loss: the port's record, if it is still ours."""
        record = vhci.read_record(port)
        state = self.state
        if record is not None and (record.host, record.service, record.busid) == (
                state.host, str(state.tcp_port), state.busid):
            vhci.remove_record(port)

    def _release(self, port: int, devid: int) -> None:
        if self._port_holds(port, devid) is False:
            self._forget(port)
            return
        try:
            self._detach(port)
        except UsbipError as exc:
            log.warning("detaching port %d: %s", port, exc)
