#!/bin/sh
# Set up a fresh Debian machine for usbipy: Debian packages (when root), then a
# virtual environment in .venv with usbipy installed in it.
#   scripts/setup.sh          what the demo needs
#   scripts/setup.sh --test   also what the tests need (QEMU, a kernel, usbip, tshark ...)
set -eu
cd "$(dirname "$0")/.."

packages="python3 python3-venv python3-pip"
if [ "${1:-}" = "--test" ]; then
    # the kernel tests boot this machine's Debian kernel under QEMU (its guest
    # records and plays with alsa-utils, captures video with v4l-utils); interop
    # tests use Debian's usbip and Wireshark's dissector
    packages="$packages qemu-system-x86 linux-image-amd64 busybox-static kmod cpio udev
        usbip usbutils libusb-1.0-0 e2fsprogs dosfstools tshark iproute2 procps socat
        nftables alsa-utils v4l-utils"
fi
missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing$missing"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
        echo "setup: missing Debian packages:$missing (run as root to install them)" >&2
    fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "${1:-}" = "--test" ]; then
    .venv/bin/python -m pip install -q -e '.[test]'
else
    # (with cryptography, for `usbipy cert`: the README's TLS set-up works from
    # here; with Pillow, for the demo webcam's MJPEG)
    .venv/bin/python -m pip install -q -e '.[tls,webcam]'
fi
