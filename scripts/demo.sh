#!/bin/sh
# Set up, then run the demo server: an emulated keyboard, disk, serial port,
# headset and webcam on 127.0.0.1:3240, its status page on http://127.0.0.1:3241/.
# Extra arguments go to usbipyd
# (e.g. --tcp-port 13240).
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/usbipyd --demo --audio --webcam --http 3241 "$@"
