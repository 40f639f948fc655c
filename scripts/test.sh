#!/bin/sh
# Set up, then run every check: ruff, mypy, and the whole pytest suite (unit,
# interop with Debian's usbip and tshark, and the real kernel under QEMU).
# Extra arguments go to pytest (e.g. -k codec, or tests/unit).
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check src tests bench
.venv/bin/mypy
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    # pytest exits 5 when a filter selects no test
    if [ "$#" -gt 0 ]; then
        echo "test: no test matched: $*"
        exit 0
    fi
    echo "test: the suite selected no test at all" >&2
    exit 1
fi
exit "$rc"
