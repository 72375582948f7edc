"""The owner of the kernel probes: a bpftrace process, and the records it prints.

Safety by construction: the probes are kernel uprobes attached through perf file
descriptors that bpftrace holds. Whatever ends bpftrace — our SIGTERM, the OOM killer,
a SIGKILL, our own death (PR_SET_PDEATHSIG) — the kernel closes the descriptors and
removes every probe from the target's text; a thread that was executing one is
single-stepped or restarted by the kernel itself. There is nothing to restore.
"""
from __future__ import annotations

import ctypes
import heapq
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time

PR_SET_PDEATHSIG = 1
REORDER_S = 0.05          # records arrive per CPU; hold them this long to order by time
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


class ProbeUnavailable(Exception):
    """Kernel probes cannot run here; the message is the one-line reason."""


def effective_caps(pid: str | int = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_available() -> str:
    """The bpftrace binary, or ProbeUnavailable with why not."""
    exe = shutil.which("bpftrace")
    if exe is None:
        raise ProbeUnavailable("bpftrace is not installed (Debian package bpftrace)")
    caps = effective_caps()
    has = lambda c: bool(caps >> c & 1)          # noqa: E731
    if not (has(CAP_SYS_ADMIN) or (has(CAP_PERFMON) and has(CAP_BPF))):
        raise ProbeUnavailable("kernel uprobes need CAP_SYS_ADMIN, or CAP_PERFMON and CAP_BPF "
                               "(this process has neither)")
    if not os.path.exists("/sys/bus/event_source/devices/uprobe"):
        raise ProbeUnavailable("this kernel has no uprobe PMU (CONFIG_UPROBE_EVENTS)")
    return exe


def _child_setup():
    # die with the runner: the kernel then removes the probes with bpftrace's descriptors
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("500")           # if memory runs out, the probe owner goes first
    except OSError:
        pass


class Owner:
    """bpftrace running ``program``; ``records()`` yields its lines in time order."""

    def __init__(self, program: str, workdir: str | None = None, ready_timeout: float = 20.0):
        exe = check_available()
        self._dir = workdir or tempfile.mkdtemp(prefix="gdbdiag-bpf-")
        self.path = os.path.join(self._dir, "probes.bt")
        with open(self.path, "w") as fh:
            fh.write(program)
        env = dict(os.environ, BPFTRACE_STRLEN="200", BPFTRACE_MAP_KEYS_MAX="65536",
                   BPFTRACE_PERF_RB_PAGES="256")
        self.errlog = open(os.path.join(self._dir, "bpftrace.err"), "w+")
        self.proc = subprocess.Popen([exe, "--unsafe", "-B", "line", self.path],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.errlog, env=env, preexec_fn=_child_setup,
                                     start_new_session=True, text=True, bufsize=1)
        self.lost = 0
        self.ready_ns = None
        self.stop_ns = None
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._heap: list = []
        self._seq = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait_ready(ready_timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self):
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def _wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.05)
            except queue.Empty:
                continue
            if line.startswith("READY "):
                self.ready_ns = int(line.split()[1])
                return
            if line is None:
                break
        self.stop()
        raise ProbeUnavailable("bpftrace could not attach the probes: " + self.stderr_tail())

    def stderr_tail(self, n: int = 3) -> str:
        try:
            self.errlog.seek(0)
            lines = [l.strip() for l in self.errlog.read().splitlines()
                     if l.strip() and "RLIMIT_MEMLOCK" not in l and "WARNING" not in l]
        except (OSError, ValueError):
            return "?"
        return " | ".join(lines[-n:]) or f"exit status {self.proc.poll()}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def records(self, wait: float = 0.05, flush: bool = False) -> list[str]:
        """Lines that are older than the reorder window (all of them if ``flush``),
        in kernel time order."""
        try:
            line = self._q.get(timeout=wait)
            while True:
                self._push(line)
                line = self._q.get_nowait()
        except queue.Empty:
            pass
        horizon = None if flush else int((time.monotonic() - REORDER_S) * 1e9)
        out = []
        while self._heap and (horizon is None or self._heap[0][0] <= horizon):
            out.append(heapq.heappop(self._heap)[2])
        return out

    def _push(self, line):
        if line is None:
            return
        if line.startswith("Lost "):
            try:
                self.lost += int(line.split()[1])
            except (IndexError, ValueError):
                pass
            return
        f = line.split(" ", 3)
        try:
            ns = int(f[2])
        except (IndexError, ValueError):
            return
        if (self.ready_ns is not None and ns < self.ready_ns) or \
                (self.stop_ns is not None and ns >= self.stop_ns):
            return              # the probe set was incomplete (attaching / detaching)
        self._seq += 1
        heapq.heappush(self._heap, (ns, self._seq, line))

    def stop(self, timeout: float = 3.0) -> None:
        if self.stop_ns is None:
            self.stop_ns = time.monotonic_ns()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=1)
        self.errlog.close()
