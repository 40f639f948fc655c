"""usbipyd's heap while it serves (server/memory.py): replies freed together are
not handed back to the system only to be faulted in again for the next ones."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from usbipy.server import memory

#: Replies alive at once, then freed together (a resumable attachment's, until the
#: client's ACK), and how often.
CHURN = """
import os, resource, sys
from usbipy.server import memory
# glibc's defaults, as a process starts with them (its dynamic threshold moves them up
# once a large block was freed, which a process's history may or may not have done)
assert memory._MALLOPT(memory.M_MMAP_THRESHOLD, 128 << 10)
assert memory._MALLOPT(memory.M_TRIM_THRESHOLD, 128 << 10)
if sys.argv[1] == "kept":
    assert memory.keep_heap()
def replies():
    return [os.urandom(16) * 4096 for _ in range(8)]  # 8 x 64 KiB
for _ in range(20):
    replies()  # (the heap grows once)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    replies()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(how: str) -> int:
    # (glibc's defaults: no tunables from this environment)
    env = {k: v for k, v in os.environ.items()
           if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", CHURN, how], capture_output=True,
                          text=True, timeout=60, check=True, env=env)
    return int(done.stdout)


@pytest.mark.skipif(memory._MALLOPT is None or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt(3) only")
def test_replies_freed_together_are_not_faulted_in_again() -> None:
    # glibc's default thresholds hand the freed top back each time: a fault per page
    assert _faults("default") > 1000
    assert _faults("kept") < 50
