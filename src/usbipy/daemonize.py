"""Going to the background as daemon(3) does, with the caller told the outcome.

Used by ``usbipyd -D`` and ``usbipy attach --persistent --background``: the
process that was started returns only once the daemon says it is ready (or
why it cannot run), so that its exit status means something (systemd's
Type=forking, a script's ``&&``).
"""

from __future__ import annotations

import os

from .errors import UsbipError

_READY = b"\0ready"


class DaemonFailed(UsbipError):
    """The daemon said why it cannot run, or ended before it was ready."""

    def __init__(self, why: str, pid: int | None) -> None:
        super().__init__(why)
        #: The daemon's pid, when it got as far as saying it.
        self.pid = pid


class Daemon:
    """In the daemon: what it tells the process that started it, once."""

    def __init__(self, pipe: int) -> None:
        self._pipe: int | None = pipe

    def ready(self) -> None:
        """Serving: the process that started it returns now."""
        self._say(_READY)

    def failed(self, why: str) -> None:
        """It cannot run: the process that started it exits 1 with ``why``."""
        self._say(why.encode())

    def _say(self, what: bytes) -> None:
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            os.write(pipe, what)
            os.close(pipe)


def daemonize(*, chdir: bool = True) -> Daemon | int:
    """Detach: two forks, a session of its own, stdin, stdout and stderr on
    /dev/null, and (``chdir``) the root as working directory.

    Returns twice. In the process that called it: the daemon's pid, once the
    daemon called :meth:`Daemon.ready`; :class:`DaemonFailed` when it called
    :meth:`Daemon.failed` or ended first. In the daemon: its :class:`Daemon`.
    The daemon must end with ``os._exit``: nothing of it may return into the
    code that called its program (a test runner, say).
    """
    read_end, write_end = os.pipe()
    child = os.fork()
    if child:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            said = pipe.read()
        try:
            os.waitpid(child, 0)
        except ChildProcessError:  # (SIGCHLD ignored, as a supervisor may leave it)
            pass
        pid_text, _, rest = said.partition(b"\n")
        pid = int(pid_text) if pid_text.isdigit() else None
        if rest == _READY and pid is not None:
            return pid
        raise DaemonFailed(rest.decode(errors="replace")
                           or "it ended before it was ready (see its log)", pid)
    try:
        os.close(read_end)
        os.setsid()
        if os.fork():
            os._exit(0)
        if chdir:
            os.chdir("/")
        os.write(write_end, f"{os.getpid()}\n".encode())
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        if devnull > 2:
            os.close(devnull)
    except BaseException:
        os._exit(1)
    return Daemon(write_end)
