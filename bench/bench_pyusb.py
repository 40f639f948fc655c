"""PyUSB over usbipy.pyusb against pyusb-usbip-backend 0.0.1, on one server, in one run.

    python bench/bench_pyusb.py [--seconds 3] [--rounds 3] [--json results.json]

usbipyd (bench/server_usbipy.py) runs pinned to one core; each client runs in
its own process pinned to the other, with the same PyUSB, in
bench/.venv-pyusb (made on first use). Rounds alternate the backends so that
the machine's drift hits both alike; the table gives each one's median and
the ratio. "floor" is bench/fastclient.py doing the same URBs with no PyUSB at
all: the most any PyUSB backend could reach against this server, one
transfer at a time as PyUSB's API goes.

Workloads: control round trips (GET_DESCRIPTOR, 18 bytes) per second, and
SCSI READ(10)/WRITE(10) of 64 KiB through the disk's bulk endpoints (a CBW,
the data and the CSW, one after another) in MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv-pyusb"
ALTERNATIVE = "pyusb-usbip-backend==0.0.1"
BLOCK = 64 * 1024
GET_DEVICE = (0x80, 6, 0x0100, 0, 18)
BACKENDS = ("usbipy", "alternative", "floor")
WORKLOADS = ("control", "read", "write")
UNITS = {"control": "round trips/s", "read": "MB/s", "write": "MB/s"}


def venv_python() -> str:
    python = VENV / "bin/python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "pyusb>=1.2.1",
                        ALTERNATIVE], check=True)
    return str(python)


# --- the worker: one backend, every workload ----------------------------------------


def cbw(tag: int, write: bool) -> bytes:
    lba = (tag * 128) % ((64 << 20) // 512 - 128)
    cdb = struct.pack(">BBIBHB", 0x2A if write else 0x28, 0, lba, 0, BLOCK // 512, 0)
    return struct.pack("<IIIBBB16s", 0x43425355, tag, BLOCK, 0 if write else 0x80, 0, 10, cdb)


def pyusb_worker(backend_name: str, port: int, keyboard: str, disk: str,
                 seconds: float) -> dict[str, float]:
    import usb.core
    import usb.util

    def backend(busid: str) -> object:
        if backend_name == "usbipy":
            from usbipy import pyusb

            return pyusb.get_backend(f"usbip://127.0.0.1:{port}/{busid}")
        from usbip_backend import get_backend  # pyusb-usbip-backend

        return get_backend("127.0.0.1", port)

    results = {}
    be = backend(keyboard)
    dev = usb.core.find(backend=be, idVendor=0x1209, idProduct=0x0001)  # a keyboard
    assert dev is not None, "no keyboard"
    dev.ctrl_transfer(*GET_DEVICE)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        dev.ctrl_transfer(*GET_DEVICE)
        n += 1
    results["control"] = n / (time.perf_counter() - start)
    usb.util.dispose_resources(dev)

    be = backend(disk)
    dev = usb.core.find(backend=be, idVendor=0x1209, idProduct=0x0002)
    assert dev is not None, "no disk"
    dev.set_configuration()
    payload = os.urandom(BLOCK)
    for write in (False, True):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            n += 1
            dev.write(0x02, cbw(n, write), timeout=10000)
            if write:
                dev.write(0x02, payload, timeout=10000)
            else:
                assert len(dev.read(0x81, BLOCK, timeout=10000)) == BLOCK
            assert bytes(dev.read(0x81, 13, timeout=10000))[12] == 0
        results["write" if write else "read"] = n * BLOCK / (time.perf_counter() - start) / 1e6
    usb.util.dispose_resources(dev)
    return results


def floor_worker(port: int, keyboard: str, disk: str, seconds: float) -> dict[str, float]:
    sys.path.insert(0, str(ROOT.parent))
    from bench.fastclient import IN, OUT, FastClient

    results = {}
    client = FastClient("127.0.0.1", port, keyboard)
    setup = struct.pack("<BBHHH", *GET_DEVICE)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        client.send(client.request(IN, 0, 18, setup))
        client.reply(keep=True)
        n += 1
    results["control"] = n / (time.perf_counter() - start)
    client.close()
    client = FastClient("127.0.0.1", port, disk)
    client.send(client.request(OUT, 0, 0, struct.pack("<BBHHH", 0, 9, 1, 0, 0)))
    client.reply()
    payload = os.urandom(BLOCK)
    for write in (False, True):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            n += 1
            client.send(client.request(OUT, 2, 31, data=cbw(n, write)))
            client.reply()
            if write:
                client.send(client.request(OUT, 2, BLOCK, data=payload))
                client.reply()
            else:
                client.send(client.request(IN, 1, BLOCK))
                client.reply(keep=True)
            client.send(client.request(IN, 1, 13))
            client.reply(keep=True)
        results["write" if write else "read"] = n * BLOCK / (time.perf_counter() - start) / 1e6
    client.close()
    return results


# --- the run ----------------------------------------------------------------------------


def run_worker(python: str, name: str, port: int, keyboard: str, disk: str,
               seconds: float) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent / "src"))
    out = subprocess.run(
        [python, str(Path(__file__).resolve()), "--worker", name, "--port", str(port),
         "--keyboard", keyboard, "--disk", disk, "--seconds", str(seconds)],
        check=True, capture_output=True, text=True, env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    return dict(json.loads(out.stdout))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--keyboard", help=argparse.SUPPRESS)
    parser.add_argument("--disk", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if args.worker == "floor":
            result = floor_worker(args.port, args.keyboard, args.disk, args.seconds)
        else:
            result = pyusb_worker(args.worker, args.port, args.keyboard, args.disk,
                                  args.seconds)
        print(json.dumps(result))
        return 0

    sys.path.insert(0, str(ROOT.parent))
    from bench.bench import Server

    python = venv_python()
    server = Server("usbipy", [sys.executable, str(ROOT / "server_usbipy.py")])
    try:
        keyboard = server.busid(0x03)
        disk = server.busid(0x08)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in BACKENDS}
        for _ in range(args.rounds):
            for name in BACKENDS:
                runs[name].append(run_worker(python, name, server.port, keyboard, disk,
                                             args.seconds))
    finally:
        server.stop()
    medians = {name: {w: statistics.median(r[w] for r in runs[name]) for w in WORKLOADS}
               for name in BACKENDS}
    print(f"PyUSB {'':8} {'usbipy':>10} {'pyusb-usbip-backend':>20} {'ratio':>7}"
          f" {'floor':>10} {'floor/alt':>9}")
    for w in WORKLOADS:
        ours, alt, floor = (medians[n][w] for n in BACKENDS)
        print(f"{w:<7} {UNITS[w]:>13}: {ours:10.0f} {alt:20.0f} {ours / alt:6.2f}x"
              f" {floor:10.0f} {floor / alt:8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"seconds": args.seconds, "rounds": args.rounds, "runs": runs,
             "medians": medians}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
