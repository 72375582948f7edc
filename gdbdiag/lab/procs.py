"""Host processes for the lab: commands that must succeed, PIDs that must still be the
very process started (not a recycled PID), waiting on a condition, the end of a log."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from .errors import LabError


def run(argv, check=True, **kw):
    """Run a command (output captured); with ``check`` a failure is a one-line LabError."""
    r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)
    if check and r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise LabError(f"{' '.join(argv[:4])}… failed: {msg[-1] if msg else 'exit %d' % r.returncode}")
    return r


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_matches(pid: int | None, start: int | None) -> bool:
    """True if ``pid`` is still the very process we started (not a recycled PID)."""
    return bool(pid) and pid_alive(pid) and start_time(pid) == start


def tail(path: Path, n: int = 300) -> str:
    """The last ``n`` characters of a log, on one line."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n:].strip().replace("\n", " | ")


def wait_until(ok, timeout, failed, msg):
    """Poll ``ok()`` until true; LabError(msg) as soon as ``failed()`` or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        if failed():
            raise LabError(msg)
        time.sleep(0.05)
    raise LabError(msg + " (timed out)")
