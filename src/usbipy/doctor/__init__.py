"""`usbipy doctor`: the checks a person walks by hand when USB/IP does not work,
each with what to do when it fails."""

from .client import check_client
from .report import Check, Report, Status
from .server import check_server

__all__ = ["Check", "Report", "Status", "check_client", "check_server"]
