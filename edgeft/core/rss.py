"""Resident memory of this process: current, peak, and a resettable peak for measuring one stage.

`getrusage().ru_maxrss` is wrong for our subprocesses: on Linux, exec records the forked copy of the
parent's high-water mark, so a child reports at least its parent's peak. /proc/self/status VmHWM belongs
to the current address space only, and writing 5 to /proc/self/clear_refs resets it (Linux >= 4.0).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def current_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    return kb / 1024


def peak_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024
    return kb / 1024


def reset_peak() -> bool:
    """Start a new peak measurement from the current RSS; False where the OS cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
