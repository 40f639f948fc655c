"""usbipy's server side by side with usbip 0.7.0 (the fastest Python peer), in one run.

    python bench/bench.py [--json results.json] [--compare earlier.json] [--quick]

Both servers export the same devices (bench/server_usbipy.py and
bench/peer_usbip070.py) and run pinned to one core; the client, a lean
synchronous USB/IP client (bench/fastclient.py), runs pinned to another. Each
workload runs for a fixed time against each server in turn. The table gives
the rate, the server's CPU time per URB (utime+stime from /proc, which counts
every thread, so a client-bound run still compares the servers fairly), and
the ratio usbipy/peer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from bench.fastclient import IN, OUT, FastClient  # noqa: E402
from usbipy.client.handshake import connect, request_devlist  # noqa: E402
from usbipy.protocol import DeviceInfo  # noqa: E402

ROOT = Path(__file__).resolve().parent
PEER_VENV = ROOT / ".venv-peer"
PEER_VERSION = "usbip==0.7.0"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
GET_DEVICE = bytes.fromhex("8006000100001200")
GET_CONFIG = bytes.fromhex("80060002000000ff")
BLOCK = 64 * 1024
HOG_LENGTH = 1 << 30
SERVER_CORE, CLIENT_CORE = 1, 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    # The process's utime + stime: every thread, the exited ones included.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 1e6


def peer_python() -> str:
    python = PEER_VENV / "bin/python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", PEER_VERSION], check=True)
    return str(python)


class Server:
    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.tls = tls
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*argv, str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, preexec_fn=lambda: os.sched_setaffinity(0, {SERVER_CORE}))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{name} did not start") from None
                time.sleep(0.1)
        sock = connect("127.0.0.1", self.port)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
        with sock:
            self.devices: tuple[DeviceInfo, ...] = request_devlist(sock)

    def busid(self, interface_class: int, nth: int = 0) -> str:
        found = [d.busid for d in self.devices
                 if d.interfaces and d.interfaces[0].bInterfaceClass == interface_class]
        return found[nth]

    def client(self, interface_class: int, nth: int = 0) -> FastClient:
        return FastClient("127.0.0.1", self.port, self.busid(interface_class, nth))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


# --- workloads: each runs for `duration` seconds and returns (operations, URBs) ----------


def bulk_endpoints(client: FastClient) -> tuple[int, int]:
    """Bulk IN and OUT endpoint numbers, from the configuration descriptor; configures."""
    client.send(client.request(IN, 0, 255, GET_CONFIG))
    config = client.reply(keep=True).data
    ep_in = ep_out = 0
    i = 0
    while i + 1 < len(config) and config[i]:
        if config[i + 1] == 5 and config[i + 3] & 3 == 2:
            if config[i + 2] & 0x80:
                ep_in = config[i + 2] & 0x0F
            else:
                ep_out = config[i + 2] & 0x0F
        i += config[i]
    set_config = struct.pack("<BBHHH", 0, 9, config[5], 0, 0)
    client.send(client.request(OUT, 0, 0, set_config))
    assert client.reply().status == 0
    return ep_in, ep_out


def read10(client: FastClient) -> Callable[[], list[bytes]]:
    """The URBs of one 64 KiB READ(10) (CBW, data, CSW), a new tag and block each
    time; configures the disk first."""
    ep_in, ep_out = bulk_endpoints(client)
    tag = 0

    def op() -> list[bytes]:
        nonlocal tag
        tag += 1
        lba = (tag * 128) % ((64 << 20) // 512 - 128)
        cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, BLOCK // 512, 0)
        cbw = struct.pack("<IIIBBB16s", 0x43425355, tag, BLOCK, 0x80, 0, 10, cdb)
        return [client.request(OUT, ep_out, len(cbw), data=cbw),
                client.request(IN, ep_in, BLOCK), client.request(IN, ep_in, 13)]

    return op


def pipelined(client: FastClient, make_op: Callable[[], list[bytes]], depth: int,
              duration: float) -> tuple[int, int]:
    """Keep ``depth`` operations (groups of URBs) in flight for ``duration`` seconds."""
    per_op = len(make_op())
    client._directions.clear()  # that operation was only counted, never sent
    for _ in range(depth):
        client.send(*make_op())
    in_flight, replies, ops = depth, 0, 0
    deadline = time.perf_counter() + duration
    while in_flight:
        reply = client.reply()
        if reply.status != 0:
            raise RuntimeError(f"URB {reply.seqnum} failed with {reply.status}")
        replies += 1
        if replies % per_op == 0:
            ops += 1
            in_flight -= 1
            if time.perf_counter() < deadline:
                client.send(*make_op())
                in_flight += 1
    return ops, ops * per_op


def control(server: Server, depth: int, duration: float) -> tuple[int, int]:
    client = server.client(0x03)
    try:
        return pipelined(client, lambda: [client.request(IN, 0, 18, GET_DEVICE)], depth,
                         duration)
    finally:
        client.close()


def bot(server: Server, depth: int, write: bool, duration: float) -> tuple[int, int]:
    client = server.client(0x08)
    try:
        ep_in, ep_out = bulk_endpoints(client)
        payload = os.urandom(BLOCK)
        tag = 0

        def op() -> list[bytes]:
            nonlocal tag
            tag += 1
            lba = (tag * 128) % ((64 << 20) // 512 - 128)
            cdb = struct.pack(">BBIBHB", 0x2A if write else 0x28, 0, lba, 0, BLOCK // 512, 0)
            cbw = struct.pack("<IIIBBB16s", 0x43425355, tag, BLOCK, 0 if write else 0x80, 0,
                              10, cdb)
            data = (client.request(OUT, ep_out, BLOCK, data=payload) if write
                    else client.request(IN, ep_in, BLOCK))
            return [client.request(OUT, ep_out, len(cbw), data=cbw), data,
                    client.request(IN, ep_in, 13)]

        return pipelined(client, op, depth, duration)
    finally:
        client.close()


def cdc_echo(server: Server, duration: float) -> tuple[int, int]:
    client = server.client(0x02)
    try:
        ep_in, ep_out = bulk_endpoints(client)
        payload = os.urandom(BLOCK)
        ops = urbs = 0
        deadline = time.perf_counter() + duration
        while time.perf_counter() < deadline:
            client.send(client.request(OUT, ep_out, BLOCK, data=payload))
            assert client.reply().status == 0
            echoed = 0
            for _ in range(10_000):  # bounded: a 64 KiB echo comes back in a few reads
                client.send(client.request(IN, ep_in, BLOCK))
                reply = client.reply()
                assert reply.status == 0, reply
                echoed += reply.actual_length
                urbs += 1
                if echoed >= BLOCK:
                    break
            if echoed != BLOCK:
                raise RuntimeError(f"{server.name} echoed {echoed} of {BLOCK} bytes")
            ops += 1
            urbs += 1
        return ops, urbs
    finally:
        client.close()


def many_clients(server: Server, duration: float) -> tuple[int, int]:
    """Every exported device imported at once (16 connections), GET_DESCRIPTOR on each."""
    clients = [FastClient("127.0.0.1", server.port, d.busid) for d in server.devices]
    selector = selectors.DefaultSelector()
    try:
        for client in clients:
            client.send(client.request(IN, 0, 18, GET_DEVICE))
            selector.register(client.sock, selectors.EVENT_READ, client)
        in_flight, urbs = len(clients), 0
        deadline = time.perf_counter() + duration
        while in_flight:
            for key, _ in selector.select(timeout=30):
                client = key.data
                assert client.reply().status == 0
                urbs += 1
                if time.perf_counter() < deadline:
                    client.send(client.request(IN, 0, 18, GET_DEVICE))
                else:
                    in_flight -= 1
                    selector.unregister(client.sock)
        return urbs, urbs
    finally:
        selector.close()
        for client in clients:
            client.close()


@dataclass
class VictimResult:
    worst_ms: float
    median_ms: float
    rss_before_mb: float
    rss_peak_mb: float
    hog_status: str


def victim(server: Server, duration: float) -> VictimResult:
    """One client asks for 1 GiB IN on the disk's bulk endpoint; another measures its own
    GET_DESCRIPTOR round trips meanwhile, and the server's RSS is sampled."""
    pid = server.proc.pid
    rss_before = rss_mb(pid)
    hog = server.client(0x08)
    victim_client = server.client(0x03, 1)
    try:
        ep_in, _ep_out = bulk_endpoints(hog)
        hog.send(hog.request(IN, ep_in, HOG_LENGTH))
        latencies: list[float] = []
        peak = rss_before
        deadline = time.perf_counter() + duration
        next_sample = 0.0
        while (now := time.perf_counter()) < deadline:
            victim_client.send(victim_client.request(IN, 0, 18, GET_DEVICE))
            assert victim_client.reply().status == 0
            latencies.append(time.perf_counter() - now)
            if now >= next_sample:
                peak = max(peak, rss_mb(pid))
                next_sample = now + 0.01
        hog.sock.settimeout(0.5)
        try:
            status = f"status {hog.reply().status}"
        except (TimeoutError, ConnectionError) as exc:
            status = "no reply" if isinstance(exc, TimeoutError) else "connection closed"
        latencies.sort()
        return VictimResult(latencies[-1] * 1e3, latencies[len(latencies) // 2] * 1e3,
                            rss_before, max(peak, rss_mb(pid)), status)
    finally:
        hog.close()
        victim_client.close()


# --- the run -----------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    unit: str
    run: Callable[[Server, float], tuple[int, int]]
    #: bytes per operation for MB/s; 0 for operations/s
    op_bytes: int = 0


WORKLOADS = [
    Workload("GET_DESCRIPTOR depth 1", "URB/s", lambda s, d: control(s, 1, d)),
    Workload("GET_DESCRIPTOR depth 32", "URB/s", lambda s, d: control(s, 32, d)),
    Workload("READ(10) 64 KiB depth 1", "MB/s", lambda s, d: bot(s, 1, False, d), BLOCK),
    Workload("READ(10) 64 KiB depth 4", "MB/s", lambda s, d: bot(s, 4, False, d), BLOCK),
    Workload("WRITE(10) 64 KiB depth 1", "MB/s", lambda s, d: bot(s, 1, True, d), BLOCK),
    Workload("WRITE(10) 64 KiB depth 4", "MB/s", lambda s, d: bot(s, 4, True, d), BLOCK),
    Workload("CDC-ACM echo 64 KiB", "MB/s", cdc_echo, BLOCK),
    Workload("16 clients GET_DESCRIPTOR", "URB/s", many_clients),
]


def measure(server: Server, work: Workload, duration: float) -> dict[str, float]:
    work.run(server, min(duration, 0.3))  # warm up
    cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
    ops, urbs = work.run(server, duration)
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(server.proc.pid) - cpu0
    rate = ops * work.op_bytes / elapsed / 1e6 if work.op_bytes else ops / elapsed
    return {"rate": rate, "cpu_us_per_urb": cpu / urbs * 1e6, "urbs": urbs,
            "server_cpu_s": cpu, "elapsed_s": elapsed}


def write_results(path: Path, duration: float, rounds: int,
                  results: list[dict[str, object]]) -> None:
    """The results as JSON, with the machine and the run's settings."""
    path.write_text(json.dumps({
        "time": time.time(), "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "duration_s": duration,
        "rounds": rounds, "results": results}, indent=2))


def median_sample(samples: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median of the rounds (the rate and the CPU time separately)."""
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def print_table(results: list[dict[str, object]], a: str, b: str) -> None:
    print(f"{'workload':<27} {'unit':>5} {a:>10} {b:>12} {'ratio':>7}   "
          f"{'CPU/URB ' + a:>15} {'CPU/URB ' + b:>20} {'ratio':>6}")
    for row in results:
        ra, rb = row[a], row[b]
        assert isinstance(ra, dict) and isinstance(rb, dict)
        if row["unit"] == "victim":
            for key, label in (("worst_ms", "victim worst ms"), ("median_ms", "victim median ms"),
                               ("rss_peak_mb", "server RSS peak MB")):
                print(f"{'1 GiB IN hog: ' + label:<33} {ra[key]:>10.2f} {rb[key]:>12.2f} "
                      f"{ra[key] / rb[key] if rb[key] else 0:>6.2f}x")
            print(f"{'1 GiB IN hog: reply to the hog':<33} {ra['hog_status']:>10} "
                  f"{rb['hog_status']:>12}")
            continue
        print(f"{row['workload']:<27} {row['unit']:>5} {ra['rate']:>10.1f} {rb['rate']:>12.1f} "
              f"{ra['rate'] / rb['rate']:>6.2f}x   {ra['cpu_us_per_urb']:>12.1f} us "
              f"{rb['cpu_us_per_urb']:>17.1f} us "
              f"{ra['cpu_us_per_urb'] / rb['cpu_us_per_urb']:>6.2f}")


def compare(earlier: Path, results: list[dict[str, object]], a: str, b: str) -> None:
    before = {r["workload"]: r for r in json.loads(earlier.read_text())["results"]}
    print(f"\nagainst {earlier} (ratios usbipy/peer: then -> now)")
    for row in results:
        old = before.get(row["workload"])
        if old is None or row["unit"] == "victim":
            continue
        then = old[a]["rate"] / old[b]["rate"]
        ra, rb = row[a], row[b]
        assert isinstance(ra, dict) and isinstance(rb, dict)
        print(f"{row['workload']:<27} {then:>6.2f}x -> {ra['rate'] / rb['rate']:>6.2f}x")


def baseline_server(rev: str) -> Server:
    """usbipy as of ``rev``, from a git worktree, serving bench/server_usbipy.py's devices."""
    tree = ROOT / f".baseline-{rev}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT.parent), "worktree", "add", "--detach",
                        str(tree), rev], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    # (that revision's own server script: this one may use what it does not have)
    return Server(f"usbipy@{rev[:7]}", [sys.executable, str(tree / "bench/server_usbipy.py")],
                  env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--compare", type=Path, help="an earlier --json file to compare with")
    parser.add_argument("--quick", action="store_true", help="0.5 s per measurement, not 2 s")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--only", metavar="TEXT",
                        help="run only the workloads whose name contains TEXT")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurements per server and workload, in alternating order; "
                             "the table shows the medians")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run usbipy as of git revision REV (a worktree in "
                             "bench/.baseline-REV), to show a change's cost in the same run")
    args = parser.parse_args()
    duration = 0.5 if args.quick else args.duration
    rounds = 1 if args.quick else max(1, args.rounds)
    os.sched_setaffinity(0, {CLIENT_CORE})
    servers = [
        Server("usbipy", [sys.executable, str(ROOT / "server_usbipy.py")]),
        Server("usbip-0.7.0", [peer_python(), str(ROOT / "peer_usbip070.py")]),
    ]
    if args.baseline:
        servers.append(baseline_server(args.baseline))
    results: list[dict[str, object]] = []
    try:
        for work in [w for w in WORKLOADS if not args.only or args.only in w.name]:
            row: dict[str, object] = {"workload": work.name, "unit": work.unit}
            samples: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
            for n in range(rounds):
                # alternate who goes first: a machine that drifts favours nobody
                for server in servers if n % 2 == 0 else servers[::-1]:
                    samples[server.name].append(measure(server, work, duration))
            for server in servers:
                row[server.name] = median_sample(samples[server.name])
            results.append(row)
        row = {"workload": "1 GiB IN request vs a victim", "unit": "victim"}
        for server in servers if not args.only or args.only in "1 GiB victim" else ():
            # the worst of the rounds: a worst case is what this one is about
            runs = [victim(server, duration) for _ in range(rounds)]
            worst = max(runs, key=lambda r: r.worst_ms)
            worst.rss_peak_mb = max(r.rss_peak_mb for r in runs)
            row[server.name] = worst.__dict__
        if len(row) > 2:
            results.append(row)
    finally:
        for server in servers:
            server.stop()
    a, b = servers[0].name, servers[1].name
    print_table(results, a, b)
    if args.baseline:
        print()
        print_table(results, a, servers[2].name)
    if args.json:
        write_results(args.json, duration, rounds, results)
    if args.compare:
        compare(args.compare, results, a, b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
