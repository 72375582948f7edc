"""The soak's figures of one interval: the runner's RSS and CPU, the workload's lookups
(its own log), the stream's lookups and size, and the records the probes could not write."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.events import LineTail as LogTail
from ..lab import container
from .config import STICKY

@dataclass
class Sample:
    minute: float
    rss_kb: int
    hwm_kb: int
    cpu_pct: float
    lookups: int
    lookups_per_s: float
    sticky_lookups: int
    errors: int
    recorded_lookups: int
    record_bytes: int
    lost_records: int | None = None     # records its probes could not reserve (so far)


def _status_kb(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM of ``pid``, in kB."""
    vals = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line.split(":")[0]] = int(line.split()[1])
    return vals["VmRSS"], vals["VmHWM"]


class RingLoss:
    """The runner's own count of records its probes could not write (no room reserved in
    its ring buffer; its report's ``lost_records``): its BPF array map of one 8-byte
    counter, found by that shape in /proc/RUNNER/fdinfo and opened read-only by id;
    ``read()`` is None when not found."""

    def __init__(self, pid: int):
        from ..uprobes import bpf
        self.bpf, self.fd = bpf, None
        for fd in sorted(os.listdir(f"/proc/{pid}/fdinfo"), key=int):
            try:
                info = dict(line.split(":", 1) for line in
                            Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines() if ":" in line)
            except OSError:
                continue
            shape = tuple(info.get(k, "").strip() for k in ("map_type", "key_size", "value_size",
                                                            "max_entries"))
            if shape == (str(bpf.MAP_ARRAY), "4", "8", "1"):
                # BPF_MAP_GET_FD_BY_ID (14), BPF_F_RDONLY
                self.fd = bpf._bpf(14, struct.pack("<III", int(info["map_id"]), 0, 1 << 3))
                break

    def read(self) -> int | None:
        if self.fd is None:
            return None
        v = self.bpf.map_lookup(self.fd, struct.pack("<I", 0), 8)
        return struct.unpack("<Q", v)[0] if v else 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _lookups(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# -- the figures of one interval ---------------------------------------------------------------
class Meter:
    """The runner's RSS and CPU, the workload's lookups (its own log) and the stream's
    lookups and size, interval by interval."""

    def __init__(self, runner: subprocess.Popen, lab: container.Lab, workdir: Path):
        from ..bench import _proc_cpu_s
        self.cpu_s = _proc_cpu_s
        self.pid, self.path = runner.pid, workdir / "stream.jsonl"
        self.workload = LogTail(Path(lab.out_dir) / "lookups.jsonl")
        self.workload.lines()                 # from the runner's start on
        self.stream = LogTail(self.path)
        self.t, self.cpu = time.monotonic(), 0.0    # the runner has just started
        self.sticky_tid: int | None = None
        self.sticky_times: list[float] = []   # the sticky thread's lookups (its own clock)
        self.gai: dict[int, list] = {}        # LWP -> [count, first t, last t] in the stream
        self.switch: dict | None = None       # the stream's sticky_engaged finding
        self.ring: RingLoss | None = None     # once the runner is armed

    def sample(self, minute: float) -> Sample:
        rss, hwm = _status_kb(self.pid)       # KeyError once it is a zombie
        t, cpu = time.monotonic(), self.cpu_s(self.pid)
        recs = _lookups(self.workload.lines())
        for r in recs:
            if r.get("name") == STICKY:
                self.sticky_tid = r.get("tid")
                self.sticky_times.append(r["t"])
        recorded = self.read_stream()
        pct = 100.0 * (cpu - self.cpu) / (t - self.t) if t > self.t else 0.0
        s = Sample(minute=round(minute, 2), rss_kb=rss, hwm_kb=hwm, cpu_pct=round(pct, 2),
                   lookups=len(recs), lookups_per_s=round(len(recs) / (t - self.t), 1),
                   sticky_lookups=sum(r.get("name") == STICKY for r in recs),
                   errors=sum(bool(r.get("error")) for r in recs), recorded_lookups=recorded,
                   record_bytes=self.record_bytes(),
                   lost_records=self.ring.read() if self.ring else None)
        self.t, self.cpu = t, cpu
        return s

    def finish(self) -> None:
        """The lines written after the last interval (the runner has exited)."""
        for r in _lookups(self.workload.lines()):
            if r.get("name") == STICKY:
                self.sticky_times.append(r["t"])
        self.read_stream()

    def read_stream(self) -> int:
        """getaddrinfo entries in the stream's new lines; notes the switch."""
        n = 0
        for line in self.stream.lines():
            if '"kind": "gai_enter"' in line:
                ev = json.loads(line)
                c = self.gai.setdefault(ev["lwp"], [0, ev["t"], ev["t"]])
                c[0], c[2] = c[0] + 1, ev["t"]
                n += 1
            elif '"kind": "sticky_engaged"' in line and self.switch is None:
                self.switch = json.loads(line)
        return n

    def record_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


HEADER = (f"   {'min':>6} {'RSS MB':>7} {'HWM MB':>7} {'CPU %':>6}   {'lookups':>7} {'/s':>5} "
          f"{'sticky':>6} {'errors':>6}   {'recorded':>8} {'stream MB':>9} {'lost':>5}")


def sample_line(s: Sample) -> str:
    return (f"   {s.minute:6.2f} {s.rss_kb / 1024:7.1f} {s.hwm_kb / 1024:7.1f} {s.cpu_pct:6.2f}   "
            f"{s.lookups:7d} {s.lookups_per_s:5.1f} {s.sticky_lookups:6d} {s.errors:6d}   "
            f"{s.recorded_lookups:8d} {s.record_bytes / 1e6:9.1f} "
            f"{'?' if s.lost_records is None else s.lost_records:>5}")
