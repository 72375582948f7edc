"""How long has a thread been blocked? A lower bound from the scheduler, without ptrace.

``/proc/PID/task/TID/sched`` (CONFIG_SCHED_DEBUG, present on Debian's and most distro
kernels) has ``se.exec_start``: the CPU's scheduler clock (``rq_clock_task``) when the
task last stopped running — for a thread asleep in poll(), the moment it blocked. That
clock is per CPU (two CPUs' clocks differ by the IRQ and steal time each accounted, up
to seconds), so it is compared with the *same* CPU's clock now: this process pins itself
to that CPU for a moment (``sched_setaffinity``) and reads its own ``se.exec_start``,
which the scheduler has just set when it switched this process in there.

Why the result is a lower bound: the thread has not run since ``exec_start`` and is in
the wait now, so it entered the wait before then; the task clock excludes IRQ and steal
time, so it advances no faster than real time. Not available (None): no sched file, the
thread's CPU is outside this process's allowed CPUs (a cpuset), or the thread moved
while it was read.
"""
from __future__ import annotations

import os

from ..procfs import read_stat, sched_exec_start_ms

SELF_SCHED = "/proc/thread-self/sched"


class SchedClock:
    def __init__(self):
        self.available = sched_exec_start_ms(SELF_SCHED) is not None
        try:
            self.cpus = os.sched_getaffinity(0)
        except OSError:
            self.cpus = set()
        self.calls = 0

    def _now_on(self, cpu: int) -> float | None:
        """The scheduler clock of ``cpu`` now (ms), read from our own sched file while
        running there."""
        if cpu not in self.cpus:
            return None
        old = os.sched_getaffinity(0)
        try:
            os.sched_setaffinity(0, {cpu})
            return sched_exec_start_ms(SELF_SCHED)
        except OSError:
            return None
        finally:
            try:
                os.sched_setaffinity(0, old)
            except OSError:
                pass

    def blocked_ms(self, pid: int, tid: int) -> float | None:
        """Lower bound (ms) of how long thread ``tid`` of ``pid`` has been off CPU, or
        None when it cannot be told (see the module docstring)."""
        if not self.available:
            return None
        self.calls += 1
        before = read_stat(pid, tid)
        start = sched_exec_start_ms(f"/proc/{pid}/task/{tid}/sched")
        after = read_stat(pid, tid)
        if None in (before, after, start) or before["processor"] != after["processor"] \
                or after["state"] not in ("S", "D"):
            return None
        now = self._now_on(after["processor"])
        if now is None:
            return None
        return max(0.0, now - start)
