"""What a resumable attachment costs: disk reads through the relay against direct ones,
in one run.

    python bench/bench_resume.py [--rounds N] [--duration S] [--json results.json]
    python bench/bench_resume.py --link 1gbit [--rounds N] [--duration S] [--json results.json]
    python bench/bench_resume.py --vhci [--rounds N] [--size-mib M] [--json results.json]

Two usbipy servers (bench/server_usbipy.py, the same code) export the demo
disk. The lean client (bench/fastclient.py) reads 64 KiB blocks from one
directly over TCP, as vhci-hcd does with --no-resume, and from the other
through a resumable attachment: a relay process (bench/relay_peer.py, the
relay `usbipy attach --persistent` runs) holds one end of a socketpair and
the TCP connection, and the client the other end, as vhci-hcd does. The relay
runs on the client's core, as the keeper runs on the client's host.

The table gives each path's throughput and their ratio (the goal: at least
0.8), the server's CPU time per MB (unchanged: framing and acknowledgements are
all it adds) and the relay's. The two alternate within each round, and the
ratios are the median of the rounds' ratios: both saw the same moment of a
noisy machine.

On loopback the CPU is the limit, and the relay (another process on the
client's core) costs what it costs in CPU: the worst case. With --link RATE
(root), the same runs in a network namespace of its own whose loopback is
shaped to RATE by a token bucket (tc tbf): a LAN, where the link is the limit,
as it is for a device used across one.

With --vhci, the client is the kernel's: a guest of this machine's kernel
under QEMU (the kernel tests' harness) runs usbipyd with a disk image and
`usbipy attach --persistent` to it, with and without --no-resume, and reads
the disk with dd (O_DIRECT, 1 MiB); usbipyd's CPU time comes from the guest's
/proc. Figures are for a TCG guest: compare the ratios, not the MB/s.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from bench.bench import (  # noqa: E402
    BLOCK,
    CLIENT_CORE,
    ROOT,
    Server,
    cpu_seconds,
    median_sample,
    pipelined,
    read10,
    write_results,
)
from bench.fastclient import FastClient  # noqa: E402

#: Where the relay runs (BENCH_RELAY_CORES, comma-separated; default: the client's core).
RELAY_CORES = {int(c) for c in os.environ.get("BENCH_RELAY_CORES", str(CLIENT_CORE)).split(",")}


class RelayedClient(FastClient):
    """The lean client over a socketpair whose other end a relay process holds."""

    def __init__(self, server: Server, busid: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.relay = subprocess.Popen(
            [sys.executable, str(ROOT / "relay_peer.py"), str(server.port), busid,
             str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, RELAY_CORES))
        theirs.close()
        assert self.relay.stdout is not None
        said = self.relay.stdout.readline().strip()
        if said != "resumable":
            raise RuntimeError(f"the relay says {said!r}, not resumable")
        self.sock = ours
        self._imported(next(d for d in server.devices if d.busid == busid))
        self.sock.settimeout(60)

    def close(self) -> None:
        super().close()
        self.relay.wait(timeout=30)


def _direct(server: Server) -> FastClient:
    return server.client(0x08)


def _relayed(server: Server) -> FastClient:
    return RelayedClient(server, server.busid(0x08))


def reads(server: Server, connect: Callable[[Server], FastClient], depth: int,
          duration: float) -> dict[str, float]:
    """READ(10) of 64 KiB at ``depth`` for ``duration``: MB/s and CPU per MB."""
    client = connect(server)
    try:
        op = read10(client)
        pipelined(client, op, depth, 0.3)  # warm up
        relay = client.relay.pid if isinstance(client, RelayedClient) else None
        server0 = cpu_seconds(server.proc.pid)
        relay0 = cpu_seconds(relay) if relay is not None else 0.0
        t0 = time.perf_counter()
        ops, _urbs = pipelined(client, op, depth, duration)
        elapsed = time.perf_counter() - t0
        mb = ops * BLOCK / 1e6
        return {"mb_s": mb / elapsed,
                "server_cpu_ms_per_mb": (cpu_seconds(server.proc.pid) - server0) / mb * 1e3,
                "relay_cpu_ms_per_mb": ((cpu_seconds(relay) - relay0) / mb * 1e3
                                        if relay is not None else 0.0)}
    finally:
        client.close()


def vhci_reads(rounds: int, size_mib: int) -> list[dict[str, object]]:
    """The disk read through vhci-hcd in a guest, resumable and direct, alternating."""
    sys.path.insert(0, str(ROOT.parent))
    from tests.kernel.guest import KEEPERS, STOP_KEEPERS, vhci_nodes, wait_for
    from tests.kernel.vm import Vm

    usbipy = f"{sys.executable} -m usbipy.cli.usbipy"
    usbipyd = f"{sys.executable} -m usbipy.cli.usbipyd"
    samples: dict[str, list[dict[str, float]]] = {"direct": [], "resumable": []}
    with Vm(memory_mb=1536) as vm:
        vm.check("modprobe -a vhci-hcd usb-storage sd_mod")
        vm.check(f"truncate -s {size_mib + 16}M /run/disk.img")
        vm.check(f"setsid {usbipyd} -c /dev/null --no-usbip-host --no-libusb --disk "
                 "/run/disk.img -P /run/usbipyd.pid </dev/null >/run/usbipyd.log 2>&1 &")
        wait_for(vm, "grep -q 'listening on' /run/usbipyd.log")
        pid = vm.check("cat /run/usbipyd.pid").strip()
        clk = int(vm.check("getconf CLK_TCK"))

        def cpu() -> float:
            fields = vm.check(f"cat /proc/{pid}/stat").rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / clk

        for n in range(max(1, rounds)):
            for name in (("direct", "resumable") if n % 2 == 0 else ("resumable", "direct")):
                option = "--no-resume" if name == "direct" else ""
                vm.check(f"{usbipy} attach -r 127.0.0.1 -b 1-1 --persistent --background "
                         f"{option}")
                wait_for(vm, f"grep -qs '\"state\": \"attached\"' {KEEPERS}")
                wait_for(vm, f"[ -n \"$({vhci_nodes('block')})\" ]")
                disk = vm.check(vhci_nodes("block")).split()[0]
                wait_for(vm, f"[ \"$(cat /sys/block/{disk}/size)\" != 0 ]")
                resumable = '"resumable": true' in vm.check(f"cat {KEEPERS}")
                assert resumable == (name == "resumable"), name
                before = cpu()
                out = vm.check(f"dd if=/dev/{disk} of=/dev/null bs=1M count={size_mib} "
                               "iflag=direct 2>&1", timeout=600)
                used = cpu() - before
                match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
                if match is None:
                    raise RuntimeError(f"unexpected dd output: {out}")
                mb = int(match.group(1)) / 1e6
                samples[name].append({"mb_s": mb / float(match.group(2)),
                                      "server_cpu_ms_per_mb": used / mb * 1e3})
                vm.check(f"{usbipy} detach -b 1-1")
                vm.check(STOP_KEEPERS)
                wait_for(vm, f"[ -z \"$({vhci_nodes('block')})\" ]")
                wait_for(vm, f"{usbipy} list -r 127.0.0.1 2>/dev/null | grep -q ' 1-1: '")
    return [_row(f"vhci dd {size_mib} MiB, 1 MiB O_DIRECT", samples)]


def _row(workload: str, samples: dict[str, list[dict[str, float]]]) -> dict[str, object]:
    """Each path's medians, and the ratios of each round's pair, their median."""
    pairs = list(zip(samples["resumable"], samples["direct"], strict=True))
    return {
        "workload": workload,
        "direct": median_sample(samples["direct"]),
        "resumable": median_sample(samples["resumable"]),
        "throughput_ratio": statistics.median(r["mb_s"] / d["mb_s"] for r, d in pairs),
        "server_cpu_ratio": statistics.median(
            r["server_cpu_ms_per_mb"] / d["server_cpu_ms_per_mb"] for r, d in pairs),
    }


#: The demo disk's size (bench/server_usbipy.py): read whole before the measurements.
DISK = 64 << 20


def pipelined_count(client: FastClient, op: Callable[[], list[bytes]], depth: int,
                    count: int) -> None:
    """``count`` operations, ``depth`` in flight."""
    per_op = len(op())
    client._directions.clear()  # that operation was only counted, never sent
    sent = min(depth, count)
    for _ in range(sent):
        client.send(*op())
    replies = 0
    while replies < count * per_op:
        if client.reply().status != 0:
            raise RuntimeError("a warm-up read failed")
        replies += 1
        if replies % per_op == 0 and sent < count:
            client.send(*op())
            sent += 1

#: The network namespace --link makes (and removes), and its token bucket's depth.
LINK_NAMESPACE = f"usbipy-bench-{os.getpid()}"
LINK_BURST = "128kb"


def on_a_link(rate: str, argv: list[str]) -> int:
    """Runs this benchmark again in a namespace of its own whose loopback is shaped
    to ``rate``; its exit status."""
    if os.geteuid() != 0:
        print("bench_resume.py: --link needs root (a network namespace and tc)",
              file=sys.stderr)
        return 1
    ns = LINK_NAMESPACE
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "tbf", "rate",
                        rate, "burst", LINK_BURST, "latency", "10ms"], check=True)
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__,
                               "--shaped", rate, *argv]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=5,
                        help="measurements per path and depth, alternating order")
    parser.add_argument("--vhci", action="store_true",
                        help="the kernel's vhci-hcd as the client, in a guest under QEMU")
    parser.add_argument("--size-mib", type=int, default=64, help="with --vhci: MiB read")
    parser.add_argument("--link", metavar="RATE",
                        help="over a link of RATE (tc's units: 1gbit, 100mbit), not loopback")
    parser.add_argument("--shaped", metavar="RATE", help=argparse.SUPPRESS)  # (inside it)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    if args.link:
        return on_a_link(args.link, ["--rounds", str(args.rounds), "--duration",
                                     str(args.duration),
                                     *(["--json", str(args.json.resolve())] if args.json else [])])
    if args.vhci:
        measured = vhci_reads(args.rounds, args.size_mib)
        _print(measured)
        if args.json:
            write_results(args.json, 0.0, args.rounds, measured)
        return 0
    os.sched_setaffinity(0, {CLIENT_CORE})
    script = [sys.executable, str(ROOT / "server_usbipy.py")]
    direct, resumable = Server("direct", script), Server("resumable", script)
    paths = [(direct, _direct), (resumable, _relayed)]
    results: list[dict[str, object]] = []
    try:
        for server in (direct, resumable):
            # The disk's first pass fills the page cache (ext4 zeroes a sparse image's
            # pages on that read): paid before any measurement, not by the first one.
            client = _direct(server)
            try:
                pipelined_count(client, read10(client), 4, DISK // BLOCK)
            finally:
                client.close()
        for depth in (1, 4):
            samples: dict[str, list[dict[str, float]]] = {"direct": [], "resumable": []}
            for n in range(max(1, args.rounds)):
                for server, connect in paths if n % 2 == 0 else paths[::-1]:
                    samples[server.name].append(reads(server, connect, depth, args.duration))
            where = f", {args.shaped} link" if args.shaped else ", loopback"
            results.append(_row(f"READ(10) 64 KiB depth {depth}{where}", samples))
    finally:
        direct.stop()
        resumable.stop()
    _print(results)
    if args.json:
        write_results(args.json, args.duration, args.rounds, results)
    return 0


def _print(results: list[dict[str, object]]) -> None:
    print(f"{'workload':<44} {'direct MB/s':>11} {'resumable':>10} {'ratio':>6}   "
          f"{'server ms/MB':>12} {'resumable':>10} {'ratio':>6}   {'relay ms/MB':>11}")
    for row in results:
        d, r = row["direct"], row["resumable"]
        assert isinstance(d, dict) and isinstance(r, dict)
        print(f"{row['workload']:<44} {d['mb_s']:>11.1f} {r['mb_s']:>10.1f} "
              f"{row['throughput_ratio']:>5.2f}x   {d['server_cpu_ms_per_mb']:>12.2f} "
              f"{r['server_cpu_ms_per_mb']:>10.2f} {row['server_cpu_ratio']:>6.2f}   "
              f"{r.get('relay_cpu_ms_per_mb', float('nan')):>11.2f}")


if __name__ == "__main__":
    sys.exit(main())
