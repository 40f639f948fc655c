#!/bin/sh
# The compatibility matrix: every gadget through every USB/IP path, measured in the
# kernel tests' guest (root; scripts/setup.sh --test installs what it needs), written
# to docs/compatibility.md.
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m tests.kernel.compat --out docs/compatibility.md "$@"
