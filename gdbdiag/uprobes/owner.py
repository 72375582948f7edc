"""The owner of the kernel probes: this process, through its file descriptors.

Safety by construction: each uprobe is created by perf_event_open(2) on the target's
file with a BPF program attached, each syscall tracepoint is a BPF link; every
descriptor belongs to the gdbdiag process. Whatever ends that process — a clean exit, Ctrl-C, SIGTERM, the OOM killer,
SIGKILL — the kernel closes its descriptors and removes every probe from the target's
text. A thread inside a probe hit is finished or restarted by the kernel itself: there
is nothing for anyone to restore, and no signal ever reaches the target.
"""
from __future__ import annotations

import errno
import os
import select
import struct
import time

from ..errors import EXIT_REFUSED, GdbdiagError
from . import bpf, program

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
RING_BYTES = 1 << 22
READY_SETTLE_NS = 1_000_000_000
_STAMP = struct.Struct("<Q")          # a record's CLOCK_MONOTONIC ns, at offset 8


class ProbeUnavailable(GdbdiagError):
    """Kernel probes cannot run here; the message is the one-line reason."""
    code = EXIT_REFUSED


def effective_caps(pid: str | int = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_available() -> None:
    """ProbeUnavailable with why not, when this process cannot own uprobes."""
    caps = effective_caps()
    has = lambda c: bool(caps >> c & 1)          # noqa: E731
    if not (has(CAP_SYS_ADMIN) or (has(CAP_PERFMON) and has(CAP_BPF))):
        raise ProbeUnavailable("kernel uprobes need CAP_SYS_ADMIN (or, before Linux 6.16, CAP_PERFMON and CAP_BPF); "
                               "this process has neither")
    if not os.path.exists("/sys/bus/event_source/devices/uprobe/type"):
        raise ProbeUnavailable("this kernel has no uprobe PMU (CONFIG_UPROBE_EVENTS)")


class Probes:
    """The probes of ``plan`` in ``mode``, attached; ``records()`` returns what they wrote."""

    def __init__(self, plan: program.Plan, mode: str = "armed", empty: bool = False):
        """``empty``: the same probes with programs that do nothing (the mechanism's
        own cost, for the bench)."""
        check_available()
        self.fds: list[int] = []
        self.maps: dict[str, int] = {}
        self.loaded: dict[int, int] = {}
        self.probes: list[program.Probe] = []
        self.ring = None
        try:
            self._attach(plan, mode, empty)
        except BaseException:
            self.close()
            raise

    def _attach(self, plan, mode, empty):
        try:
            self.maps["state"] = bpf.map_create(bpf.MAP_LRU_HASH, 8, program.STATE_SIZE, 16384)
            self.maps["ring"] = bpf.map_create(bpf.MAP_RINGBUF, 0, 0, RING_BYTES)
            self.maps["lost"] = bpf.map_create(bpf.MAP_ARRAY, 4, 8, 1)
            self.probes, self.record_kinds = program.build(plan, self.maps, mode, empty)
            self.pmu, self.pid = bpf.uprobe_pmu_type(), plan.pid
            # every program is loaded (verified) now; the late ones wait unattached, so
            # attaching them later is a few system calls, not a verifier run
            self.loaded = {}
            for p in self.probes:
                self.loaded[p.id] = bpf.prog_load(p.code, f"gdbdiag_{p.id}",
                                                  bpf.PROG_RAW_TRACEPOINT if p.kind != "uprobe"
                                                  else bpf.PROG_KPROBE)
            for p in self.probes:
                if not p.late:
                    self._attach_one(p)
        except bpf.BpfError as exc:
            why = exc.strerror or str(exc)
            if exc.errno in (errno.EPERM, errno.EACCES) and not effective_caps() >> CAP_SYS_ADMIN & 1:
                why += " (this kernel wants CAP_SYS_ADMIN for uprobes)"
            raise ProbeUnavailable(why) from None
        self.ring = bpf.RingReader(self.maps["ring"], RING_BYTES)
        self.poller = select.poll()
        self.poller.register(self.maps["ring"], select.POLLIN)
        # records from before the last probe was attached may come from a partial set
        self.ready_ns = time.monotonic_ns()

    def _attach_one(self, p: program.Probe) -> None:
        prog = self.loaded.pop(p.id)
        try:
            self.fds.append(bpf.uprobe_open(p.file, p.offset, self.pid, prog, self.pmu)
                            if p.kind == "uprobe" else bpf.raw_tracepoint_open(p.kind, prog))
        finally:
            os.close(prog)           # the attachment holds the program
        p.late = False

    def attach_late(self) -> int:
        """Attach the probes kept for later (lean/armed mode, once a thread is detailed)."""
        late = [p for p in self.probes if p.late] if self.maps else []
        for p in late:
            self._attach_one(p)
        return len(late)

    def wait(self, timeout: float) -> None:
        """Sleep until a record that asks for it (the switch) or ``timeout`` seconds."""
        if self.ring is not None:
            self.poller.poll(int(timeout * 1000))

    def records(self) -> list[bytes]:
        if self.ring is None:
            return []
        recs = self.ring.read()
        if self.ready_ns is None:
            return recs
        ready, stamp = self.ready_ns, _STAMP.unpack_from
        if time.monotonic_ns() - ready > READY_SETTLE_NS:
            self.ready_ns = None        # a record reserved before then is long submitted
        return [rec for rec in recs if len(rec) >= 16 and stamp(rec, 8)[0] >= ready]

    @property
    def lost(self) -> int:
        if "lost" not in self.maps:
            return 0
        v = bpf.map_lookup(self.maps["lost"], struct.pack("<I", 0), 8)
        return struct.unpack("<Q", v)[0] if v else 0

    def close(self) -> None:
        for fd in self.fds:            # first the probes: the target is untouched from here
            os.close(fd)
        self.fds = []
        for fd in self.loaded.values():
            os.close(fd)
        self.loaded = {}
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        for fd in self.maps.values():
            os.close(fd)
        self.maps = {}
