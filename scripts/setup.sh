#!/bin/sh
# Set up a fresh Debian machine for usbipy: Debian packages (when root), then a
# virtual environment in .venv with usbipy installed in it.
#   scripts/setup.sh          what the demo needs
#   scripts/setup.sh --test   also what the tests need (QEMU, a kernel, usbip, tshark ...)
set -eu
cd "$(dirname "$0")/.."

packages="python3 python3-venv python3-pip man-db"
if [ "${1:-}" = "--test" ]; then
    # the kernel tests boot this machine's Debian kernel under QEMU (its guest
    # records and plays with alsa-utils, captures video with v4l-utils); interop
    # tests use Debian's usbip and Wireshark's dissector
    packages="$packages qemu-system-x86 linux-image-amd64 busybox-static kmod cpio udev
        usbip usbutils libusb-1.0-0 e2fsprogs dosfstools tshark iproute2 procps socat
        nftables alsa-utils v4l-utils chromium chromium-driver avahi-daemon avahi-utils
        dbus-daemon"
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
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "" 2>/dev/null; then
    "$python" -m venv --clear .venv  # (a new one: whatever the old stamp said is gone)
fi
# What is installed is stamped: a second run with the same pyproject.toml installs
# nothing (the package is installed editable: a change to the code needs no step).
# (with cryptography, for `usbipy cert`: the README's TLS set-up works from here;
# with Pillow, for the demo webcam's MJPEG; the test extra holds them all)
if [ "${1:-}" = "--test" ]; then extras=test; else extras=tls,webcam,man,fleet,metrics; fi
stamp=.venv/.usbipy-installed
sum=$(cksum < pyproject.toml)
installed=$(cat "$stamp" 2>/dev/null || true)
if [ "$installed" != "$extras $sum" ] && [ "$installed" != "test $sum" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".[$extras]"
    echo "$extras $sum" > "$stamp"
fi
# usbipy(8) and usbipyd(8), from the same parsers as --help: made again when the
# command-line code changed
if [ "$(id -u)" = 0 ]; then page=/usr/local/share/man/man8/usbipyd.8; else
    page=.venv/share/man/man8/usbipyd.8; fi
if [ ! -f "$page" ] || [ -n "$(find src/usbipy/cli pyproject.toml -newer "$page" | head -n 1)" ]
then
    scripts/manpages.sh
fi
