"""How well the emulated headset and webcam stream, seen from a real Linux guest.

    python bench/bench_streaming.py [--seconds 60] [--frames 150] [--json FILE]

Boots the test kernel under QEMU (tests/kernel/vm.py; root, as the kernel tests),
runs ``usbipyd --audio --webcam`` on this host, and in the guest:

* records the microphone with arecord for --seconds (after 2 s of warm-up) and
  fits the bytes received against the guest's clock: the achieved sample rate
  and its drift from 48 kHz in ppm;
* captures --frames frames with v4l2-ctl at each format and size: the frame rate.

Each row also gives usbipyd's CPU time (every thread) per second of streaming.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from tests.kernel.guest import attach, wait_for, wait_output  # noqa: E402
from tests.kernel.vm import Vm  # noqa: E402

RATE = 48000
CARD = "hw:CARD=audio,DEV=0"

#: Reads arecord's raw stream in the guest and prints (seconds, bytes) as it goes.
RATE_PROBE = """
import sys, time
stream = sys.stdin.buffer
total, start = 0, time.monotonic()
while True:
    chunk = stream.read1(65536)
    if not chunk:
        break
    total += len(chunk)
    print(f"{time.monotonic() - start:.6f} {total}", flush=True)
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (proc(5))."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fit_rate(points: list[tuple[float, int]], skip: float) -> tuple[float, float]:
    """Least-squares bytes/second over the points after ``skip`` seconds, and the
    span of time they cover."""
    kept = [(t, n) for t, n in points if t >= skip]
    if len(kept) < 10:
        raise SystemExit(f"only {len(kept)} readings after {skip:g} s: too short a run")
    mean_t = sum(t for t, _ in kept) / len(kept)
    mean_n = sum(n for _, n in kept) / len(kept)
    slope = (sum((t - mean_t) * (n - mean_n) for t, n in kept)
             / sum((t - mean_t) ** 2 for t, _ in kept))
    return slope, kept[-1][0] - kept[0][0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="seconds of recording measured (default: 60)")
    parser.add_argument("--frames", type=int, default=150,
                        help="frames captured at each format (default: 150)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    with Vm() as vm:
        vm.check("modprobe -a vhci-hcd snd-usb-audio uvcvideo")
        (vm.io_dir / "rate.py").write_text(RATE_PROBE)
        server = subprocess.Popen(
            [sys.executable, "-m", "usbipy.cli.usbipyd", "--audio", "--webcam", "-t",
             str(vm.server_port), "--no-usbip-host", "--no-libusb"],
            stderr=subprocess.DEVNULL)
        try:
            wait_for(vm, "usbip list -r 10.0.2.100 2>/dev/null | grep -q ' 1-2:'")
            attach(vm, "1-1")
            wait_for(vm, "[ -e /proc/asound/audio ]")
            warmup = 2.0
            before, started = cpu_seconds(server.pid), time.monotonic()
            out = vm.check(
                f"arecord -q -D {CARD} -f S16_LE -r {RATE} -c 1 --period-time=10000 -t raw "
                f"-d {int(args.seconds + warmup + 1)} | {sys.executable} /run/vm/rate.py",
                timeout=args.seconds * 3 + 120)
            cpu = (cpu_seconds(server.pid) - before) / (time.monotonic() - started)
            points = [(float(t), int(n)) for t, n in
                      (line.split() for line in out.splitlines() if line.strip())]
            rate, span = fit_rate(points, warmup)
            rate /= 2  # mono S16_LE
            rows.append({"stream": "microphone 48 kHz mono", "seconds": round(span, 1),
                         "rate": round(rate, 2), "drift_ppm": round((rate / RATE - 1) * 1e6),
                         "server_cpu_per_s": round(cpu, 4)})
            print(f"microphone: {rate:.2f} Hz over {span:.1f} s of the guest's clock, "
                  f"drift {(rate / RATE - 1) * 1e6:+.0f} ppm; usbipyd {cpu * 100:.1f}% "
                  "of a core", flush=True)

            attach(vm, "1-2")
            node = wait_output(vm, "for d in /sys/class/video4linux/video*; do grep -q "
                                   "'usbipy webcam' $d/name && [ $(cat $d/index) = 0 ] && "
                                   "echo /dev/$(basename $d); done").split()[0]
            for fmt, width, height in (("YUYV", 160, 120), ("YUYV", 320, 240),
                                       ("YUYV", 640, 480), ("MJPG", 320, 240),
                                       ("MJPG", 640, 480)):
                before, started = cpu_seconds(server.pid), time.monotonic()
                out = vm.check(
                    f"s=$(date +%s.%N); v4l2-ctl -d {node} --set-fmt-video=width={width},"
                    f"height={height},pixelformat={fmt} --set-parm=30 --stream-mmap "
                    f"--stream-count={args.frames} --stream-to=/dev/null 2>&1; "
                    "e=$(date +%s.%N); echo \"$s $e\"", timeout=args.frames + 300)
                cpu = (cpu_seconds(server.pid) - before) / (time.monotonic() - started)
                start_s, end_s = (float(x) for x in out.split()[-2:])
                overall = args.frames / (end_s - start_s)
                # v4l2-ctl prints the rate of each second of streaming, from the
                # buffers' timestamps: the stream's own rate, setting up aside
                each = [float(m) for m in re.findall(r"([0-9.]+) fps", out)]
                fps = statistics.median(each) if each else overall
                rows.append({"stream": f"webcam {fmt} {width}x{height} at 30/s",
                             "frames": args.frames, "fps": round(fps, 2),
                             "fps_with_setup": round(overall, 2),
                             "server_cpu_per_s": round(cpu, 4)})
                print(f"webcam {fmt} {width}x{height}: {fps:.2f} frames/s ({overall:.2f} "
                      f"with setting up); usbipyd {cpu * 100:.1f}% of a core", flush=True)
        finally:
            server.terminate()
            server.wait(30)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
