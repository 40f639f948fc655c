"""The relay of a resumable attachment, alone in a process: what `usbipy attach
--persistent` runs for vhci-hcd, here for bench/bench_resume.py's client.

    python bench/relay_peer.py PORT BUSID FD

Imports BUSID from 127.0.0.1:PORT offering resumption, prints "resumable" (or
"plain"), then relays between the stream socket FD and the server until FD's
other end closes.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from usbipy.client.handshake import connect, import_offering_resume  # noqa: E402
from usbipy.client.relay import Relay  # noqa: E402


def main() -> int:
    port, busid, fd = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    local = socket.socket(fileno=fd)
    remote = connect("127.0.0.1", port)
    _device, grant = import_offering_resume(remote, busid)
    print("resumable" if grant is not None else "plain", flush=True)
    if grant is None:
        return 1
    relay = Relay(local, remote, grant, lambda: connect("127.0.0.1", port))
    wake, _never = os.pipe()
    relay.run(wake)
    relay.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
