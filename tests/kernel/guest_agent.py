"""Runs inside the guest: executes the host's commands and answers over virtio-serial.

Protocol: one JSON object per line each way. Request {"id": int, "cmd": str,
"timeout": s}; reply {"id": int, "rc": int, "out": str}, the request's id echoed so
that the host can tell a late reply (to a command it gave up on) from the one it
waits for. Commands run with bash, stdout and stderr merged.
A command that leaves a process in the background must redirect its output,
or the reply waits for that process.
"""

import glob
import json
import os
import signal
import subprocess
import time


def main() -> None:
    deadline = time.monotonic() + 60
    while not glob.glob("/dev/vport*p1"):
        if time.monotonic() > deadline:
            raise SystemExit("no virtio-serial port")
        time.sleep(0.1)
    port = open(glob.glob("/dev/vport*p1")[0], "r+b", buffering=0)

    def send(obj: dict[str, object]) -> None:
        data = memoryview(json.dumps(obj).encode() + b"\n")
        while data:  # a virtio port takes a long line in pieces
            written = port.write(data)
            data = data[written or 0:]

    send({"ready": True})
    buf = b""
    while True:
        chunk = port.read(65536)
        if not chunk:
            time.sleep(0.05)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            request = json.loads(line)
            proc = subprocess.Popen(["bash", "-c", request["cmd"]], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=request.get("timeout", 120))
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                rc = 124
            send({"id": request.get("id"), "rc": rc, "out": out.decode("utf-8", "replace")})


main()
