"""usbipyd: the USB/IP server. Options follow Linux usbipd where they overlap."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from .. import __version__
from ..config import DEFAULT_PATH, config_path, describe, read_settings
from ..config.options import add_arguments
from ..daemonize import DaemonFailed, daemonize
from ..errors import UsbipError
from ..escape import printable


def build_parser() -> argparse.ArgumentParser:
    # (no defaults here: an option not given leaves the configuration file's value)
    p = argparse.ArgumentParser(
        prog="usbipyd", description="Export USB devices over USB/IP (protocol 1.1.1).",
        argument_default=None)
    p.add_argument("-c", "--config", metavar="FILE",
                   help=f"read settings, access policy and limits from FILE (default: "
                        f"{DEFAULT_PATH} when it exists); options given here win over it")
    p.add_argument("--check-config", action="store_true",
                   help="check the configuration file, say what it sets, and exit")
    add_arguments(p)
    p.add_argument("--version", action="version", version=f"usbipyd {__version__}")
    return p


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
        settings = read_settings(config_path(cli.config), vars(cli))
    except UsbipError as exc:
        print(f"usbipyd: {printable(str(exc))}", file=sys.stderr)
        return 1
    # (loaded once the settings are read: --help, and a file with an error, stay quick)
    from ..server import service

    try:
        if cli.check_config:
            service.check(settings)
    except (UsbipError, OSError) as exc:
        print(f"usbipyd: {printable(str(exc))}", file=sys.stderr)
        return 1
    if cli.check_config:
        where = settings.file if settings.file is not None else "no configuration file"
        print(f"usbipyd: {where}: ok")
        for line in [*settings.warnings, *describe(settings)]:
            print(f"usbipyd: {line}")
        return 0
    logging.basicConfig(level=logging.DEBUG if settings.options.debug else logging.INFO,
                        format="usbipyd: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        prepared = service.Service.prepare(settings)
    except UsbipError as exc:
        print(f"usbipyd: {printable(str(exc))}", file=sys.stderr)
        return 1
    daemon = None
    if settings.options.daemon:
        try:
            started = daemonize(chdir=False)  # (relative paths stay the user's)
        except DaemonFailed as exc:
            print(f"usbipyd: {printable(str(exc))}", file=sys.stderr)
            os._exit(1)
        if isinstance(started, int):  # the process that was started: the daemon serves
            os._exit(0)
        daemon = started
    try:
        prepared.run(daemon)
    except UsbipError as exc:
        print(f"usbipyd: {printable(str(exc))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
