"""Passive mode: sample a live process's resolver state without ever stopping it.

No ptrace attach, no breakpoints, no signals: everything is read from ``/proc``
(``/proc/PID/mem``, ``task/TID/syscall``, ``task/TID/comm``, ``fd/``, ``net/udp*``), which
needs ptrace-*read* permission (root or the owner) but never makes the target a tracee:
its ``TracerPid`` stays 0 and it keeps running.

Per thread, one sample gives:

* its resolver state ``*__resp`` (the thread's ``_res``): ``options`` and ``_flags``, hence
  whether the sticky single-request bit is set, and in which field;
* whether it is blocked in a resolver wait: ``poll(pfd, 1, timeout > 0)`` (or ``ppoll``)
  on a UDP socket with ``events == POLLIN``;
* optionally, that this wait is send_dg's (a return address into ``send_dg`` on the
  stack above the saved stack pointer).

Where the state is, is :mod:`gdbdiag.passive.layout`'s business. A run
(:meth:`PassiveSampler.run`) turns each snapshot into core events (``sample`` per thread,
``sampled`` per snapshot) and feeds them to the core's detector
(:mod:`gdbdiag.core.sampling` decides what they mean), like every other probe source.
"""
from __future__ import annotations

import os
import re
import struct
import time
from dataclasses import asdict, dataclass
from typing import Callable

from elftools.common.exceptions import DWARFError, ELFError

from ..core import events as E
from ..core.detector import Detector
from ..core.events import Event
from ..core.flags import POLLIN, decode_flags, decode_options, sticky_bits
from ..procfs import ProcMem, file_maps, parse_syscall_line, read_text, s32
from .layout import _ROLE_RE, FileFacts, PassiveError, locate

SYS_POLL, SYS_PPOLL = 7, 271         # x86-64
STACK_SCAN = 1024                    # bytes above the saved sp searched for send_dg
MEMORY = "memory"
_read_text, _s32 = read_text, s32


@dataclass
class ThreadSample:
    t: float                        # time.time() of the read
    tid: int                        # host TID (the LWP gdb shows)
    ns_tid: int | None              # TID inside the target's PID namespace (struct pthread.tid)
    name: str | None                # /proc/PID/task/TID/comm
    pd: int | None = None           # struct pthread (= thread pointer)
    resp: int | None = None         # the thread's __resp (&its _res)
    options: int | None = None
    flags: int | None = None
    sticky: bool = False
    sticky_field: str | None = None  # "options" | "_flags" | "options+_flags"
    syscall: int | None = None      # nr, -1 (blocked, not in a syscall), None (running/unknown)
    in_resolver_poll: bool = False
    poll: dict | None = None        # {fd, events, timeout_ms, pfd, nfds, nr, udp_inode}
    frame_confirmed: bool | None = None   # None: no send_dg ranges (no debug file) or no poll
    source: str | None = None       # "thread-list" | "initial-_res" | None (not in any list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["options_decoded"] = decode_options(self.options) if self.options is not None else None
        d["flags_decoded"] = decode_flags(self.flags) if self.flags is not None else None
        return d

    def event(self) -> Event:
        """This sample as the core's ``sample`` observation."""
        data = {"thread_name": self.name, "resp": self.resp, "options": self.options,
                "flags": self.flags, "sticky": self.sticky, "sticky_field": self.sticky_field,
                "syscall": self.syscall, "in_resolver_poll": self.in_resolver_poll,
                "poll": self.poll, "frame_confirmed": self.frame_confirmed}
        prov = {k: MEMORY for k in ("thread_name", "resp", "options", "flags", "sticky",
                                     "sticky_field", "frame_confirmed")}
        prov.update(syscall="register", in_resolver_poll="register", poll="register")
        return Event(t=self.t, lwp=self.tid, kind=E.SAMPLE, data=data, prov=prov)


class PassiveSampler:
    """Sample process ``pid`` every ``interval`` seconds without stopping it.

    ``affected`` is whether this glibc build stalls in sticky mode (bug 30081), decided
    elsewhere (code check): True turns a sticky thread's resolver wait into a
    ``doomed_poll``; False/None keeps it a ``resolver_wait``.

    A wait counts once it has been seen in ``confirm_samples`` consecutive samples with the
    same syscall arguments and the same voluntary context-switch count (so an answered
    short wait is never reported, and a new poll with identical arguments is told apart).
    Passive mode cannot see send_dg's locals: on an affected build it also reports the
    first (answered) POLLIN wait of a sticky lookup if that wait outlives one interval;
    the stall event then carries its measured length, and only waits of >= 1 s are stalls.
    """

    def __init__(self, pid: int, interval: float = 0.05, affected: bool | None = None,
                 cache_dir: str | None = None, confirm_samples: int = 2,
                 glibc_version: str | None = None, files: FileFacts | None = None):
        self.pid = int(pid)
        self.interval = float(interval)
        self.affected = affected
        self.confirm_samples = max(1, int(confirm_samples))
        self.cache_dir = cache_dir
        self.files = files           # a FileFacts memo shared with other samplers (gdbdiag scan)
        if not os.path.isdir(f"/proc/{self.pid}"):
            raise PassiveError(f"no such process: {self.pid}")
        self.mem = ProcMem(self.pid)
        try:
            self.layout = locate(self.pid, self.mem, cache_dir, glibc_version, self.files)
        except (OSError, ELFError, DWARFError, ValueError, KeyError, IndexError, struct.error) as e:
            self.mem.close()
            raise PassiveError(f"cannot locate the resolver state of {self.pid}: "
                               f"{type(e).__name__}: {e}") from None
        except BaseException:
            self.mem.close()
            raise
        self._nsmap: dict[int, int] = {}        # ns tid -> host tid
        self._host_ns: dict[int, int] = {}      # host tid -> ns tid
        self._frame_cache: dict[tuple, bool | None] = {}
        self._udp: set[int] | None = None
        self._relocated_at = time.monotonic()
        self.samples = 0
        self.sampling_seconds = 0.0

    # -- plumbing ---------------------------------------------------------------------------
    def close(self):
        self.mem.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def alive(self) -> bool:
        st = _read_text(f"/proc/{self.pid}/stat")
        if st is None:
            return False
        state = st.rsplit(")", 1)[-1].split()
        return bool(state) and state[0] not in ("Z", "X")

    def _tasks(self) -> list[int]:
        try:
            return sorted(int(n) for n in os.listdir(f"/proc/{self.pid}/task") if n.isdigit())
        except FileNotFoundError:
            return []

    def _refresh_nsmap(self, tids):
        for tid in tids:
            if tid in self._host_ns:
                continue
            txt = _read_text(f"/proc/{self.pid}/task/{tid}/status")
            if txt is None:
                continue
            m = re.search(r"^NSpid:\s+(.*)$", txt, re.M)
            ns = int(m.group(1).split()[-1]) if m else tid
            self._host_ns[tid] = ns
            self._nsmap[ns] = tid
        live = set(tids)
        for tid in [t for t in self._host_ns if t not in live]:
            self._nsmap.pop(self._host_ns.pop(tid), None)

    def _nvcsw(self, tid) -> int | None:
        txt = _read_text(f"/proc/{self.pid}/task/{tid}/status")
        if txt is None:
            return None
        m = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", txt, re.M)
        return int(m.group(1)) if m else None

    def _udp_inodes(self) -> set[int]:
        if self._udp is None:
            s = set()
            for n in ("udp", "udp6"):
                txt = _read_text(f"/proc/{self.pid}/net/{n}")
                for line in (txt or "").splitlines()[1:]:
                    parts = line.split()
                    if len(parts) > 9 and parts[9].isdigit():
                        s.add(int(parts[9]))
            self._udp = s
        return self._udp

    def _socket_inode(self, fd: int) -> int | None:
        try:
            link = os.readlink(f"/proc/{self.pid}/fd/{fd}")
        except OSError:
            return None
        m = re.fullmatch(r"socket:\[(\d+)\]", link)
        return int(m.group(1)) if m else None

    def _walk(self) -> list[tuple[int, int | None]]:
        """[(pd, ns_tid)] over glibc's thread lists; partial on a concurrent change."""
        lay, mem = self.layout, self.mem
        loff, toff = lay.pthread_off["list"], lay.pthread_off["tid"]
        out, seen = [], set()
        for _name, head in lay.lists:
            node = mem.u64(head)
            n = 0
            while node and node != head and node not in seen and n < 65536:
                seen.add(node)
                pd = node - loff
                out.append((pd, mem.i32(pd + toff)))
                node = mem.u64(node)
                n += 1
        return out

    def _frame(self, tid, sc) -> bool | None:
        rng = self.layout.send_dg
        if not rng:
            return None
        key = (tid, sc["sp"], tuple(sc["args"]))
        if key in self._frame_cache:
            return self._frame_cache[key]
        sp = sc["sp"]
        ok = False
        b = self.mem.read(sp, STACK_SCAN)
        if b is None:   # near the top of the stack mapping: read less
            for n in (512, 256, 128):
                b = self.mem.read(sp, n)
                if b is not None:
                    break
        if b is None:
            return None
        for (w,) in struct.iter_unpack("<Q", b[: len(b) // 8 * 8]):
            if any(lo <= w < hi for lo, hi in rng):
                ok = True
                break
        if len(self._frame_cache) > 4096:
            self._frame_cache.clear()
        self._frame_cache[key] = ok
        return ok

    def _poll_of(self, tid, sc) -> dict | None:
        """The pollfd of a poll/ppoll with nfds == 1, or None."""
        nr = sc.get("nr")
        if nr not in (SYS_POLL, SYS_PPOLL):
            return None
        pfd, nfds = sc["args"][0], sc["args"][1]
        if nfds != 1:
            return None
        if nr == SYS_POLL:
            timeout_ms = _s32(sc["args"][2])
        else:
            tsp = sc["args"][2]
            if tsp == 0:
                timeout_ms = -1
            else:
                b = self.mem.read(tsp, 16)
                if b is None:
                    return None
                sec, nsec = struct.unpack("<qq", b)
                timeout_ms = sec * 1000 + nsec // 1_000_000
        b = self.mem.read(pfd, 8)
        if b is None:
            return None
        fd, events, revents = struct.unpack("<ihh", b)
        return {"fd": fd, "events": events & 0xFFFF, "timeout_ms": timeout_ms, "pfd": pfd,
                "nfds": nfds, "nr": nr, "revents": revents & 0xFFFF, "udp_inode": None}

    # -- one snapshot ------------------------------------------------------------------------
    def sample(self) -> list[ThreadSample]:
        t0 = time.monotonic()
        try:
            return self._sample()
        finally:
            self.samples += 1
            self.sampling_seconds += time.monotonic() - t0

    def _sample(self) -> list[ThreadSample]:
        lay = self.layout
        now = time.time()
        self._udp = None
        tids = self._tasks()
        if not tids:
            return []
        self._refresh_nsmap(tids)
        # glibc < 2.34 maps libresolv (send_dg) at the first lookup: look again then
        if (lay.send_dg_object is None and "libresolv" not in lay.objects
                and time.monotonic() - self._relocated_at > 1.0):
            self._relocated_at = time.monotonic()
            try:
                if any(_ROLE_RE["libresolv"].match(os.path.basename(m.path)) for m in file_maps(self.pid)):
                    self.layout = lay = locate(self.pid, self.mem, self.cache_dir, lay.glibc_version, self.files)
            except (PassiveError, OSError, ELFError, DWARFError):
                pass
        by_tid: dict[int, dict] = {}
        for pd, ns in self._walk():
            host = self._nsmap.get(ns) if ns is not None else None
            if host is None and ns is not None and ns > 0:
                self._refresh_nsmap(self._tasks())
                host = self._nsmap.get(ns)
            if host is None:
                continue   # exited (or not started yet): its struct pthread is being reused
            resp = self.mem.u64(pd + lay.tpoff) if lay.tpoff is not None else None
            by_tid[host] = {"pd": pd, "ns": ns, "resp": resp, "source": "thread-list"}
        if self.pid in tids and self.pid not in by_tid and lay.main_res:
            by_tid[self.pid] = {"pd": None, "ns": self._host_ns.get(self.pid), "resp": lay.main_res,
                                "source": "initial-_res"}
        out = []
        for tid in tids:
            info = by_tid.get(tid, {})
            name = _read_text(f"/proc/{self.pid}/task/{tid}/comm")
            if name is None:
                continue   # gone between listdir and now
            s = ThreadSample(t=now, tid=tid, ns_tid=info.get("ns", self._host_ns.get(tid)),
                             name=name.strip(), pd=info.get("pd"), resp=info.get("resp"),
                             source=info.get("source"))
            if s.resp:
                s.options = self.mem.u64(s.resp + lay.res_off["options"])
                s.flags = self.mem.u32(s.resp + lay.res_off["_flags"])
                bits = sticky_bits(s.options, s.flags)
                s.sticky, s.sticky_field = bits["single_request"], bits["field"]
            sc = parse_syscall_line(_read_text(f"/proc/{self.pid}/task/{tid}/syscall"))
            if sc is not None:
                s.syscall = sc.get("nr")
                p = self._poll_of(tid, sc) if sc.get("nr") is not None and sc["nr"] >= 0 else None
                if p is not None and p["events"] == POLLIN and p["timeout_ms"] > 0:
                    ino = self._socket_inode(p["fd"])
                    if ino is not None and ino in self._udp_inodes():
                        p["udp_inode"] = ino
                        s.in_resolver_poll = True
                        s.frame_confirmed = self._frame(tid, sc)
                        p["nvcsw"] = self._nvcsw(tid)
                        p["args"] = list(sc["args"])
                        p["sp"] = sc["sp"]
                if p is not None:
                    s.poll = p
            if not s.in_resolver_poll:
                s.frame_confirmed = False if lay.send_dg else None
            out.append(s)
        return out


    # -- a timed run -------------------------------------------------------------------------
    def detector(self) -> Detector:
        """A core detector set for this build (``affected``) and this sampler."""
        return Detector(affected=self.affected, confirm_samples=self.confirm_samples)

    def snapshot_events(self, snap: list[ThreadSample]) -> list[Event]:
        """One snapshot as core events: a ``sample`` per thread, then ``sampled``."""
        t = snap[0].t if snap else time.time()
        return [s.event() for s in snap] + [
            Event(t=t, lwp=self.pid, kind=E.SAMPLED, data={"tids": [s.tid for s in snap]})]

    def run(self, duration: float, on_event: Callable[[Event], None] | None = None,
            on_sample: Callable[[list[ThreadSample]], None] | None = None,
            until: Callable[[], bool] | None = None, feed=None) -> dict:
        """Sample for ``duration`` seconds, or until the process ends, or until ``until()``
        is true (checked after each sample). Each snapshot goes to ``on_sample`` and, as
        core events, to ``feed`` (default: a detector of its own, :meth:`detector`), whose
        findings go to ``on_event`` as they happen. Returns {threads (summaries), events
        (the findings), samples, overhead, layout, mode, affected}."""
        det = None
        if feed is None:
            det = self.detector()
            feed = det.feed
        events: list[Event] = []
        start_samples, start_secs = self.samples, self.sampling_seconds
        reads0, failed0 = self.mem.reads, self.mem.failed
        t_end = time.monotonic() + duration
        while self.alive():
            tick = time.monotonic()
            snap = self.sample()
            for ev in self.snapshot_events(snap):
                for f in feed(ev) or ():
                    events.append(f)
                    if on_event is not None:
                        on_event(f)
            if on_sample is not None:
                on_sample(snap)
            if time.monotonic() >= t_end or (until is not None and until()):
                break
            time.sleep(max(0.0, self.interval - (time.monotonic() - tick)))
        n = self.samples - start_samples
        secs = self.sampling_seconds - start_secs
        return {"threads": det.thread_summaries() if det is not None else [],
                "events": events, "samples": n,
                "overhead": {"seconds_in_sampling": round(secs, 4),
                             "per_sample_ms": round(secs / n * 1000.0, 3) if n else None,
                             "memory_reads": self.mem.reads - reads0,
                             "failed_reads": self.mem.failed - failed0,
                             "interval": self.interval},
                "layout": self.layout.to_dict(), "mode": "passive",
                "affected": self.affected}
