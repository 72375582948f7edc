"""A batch diagnosis on kernel probes: nothing in the target is ever stopped or patched
by gdbdiag, so no way the run ends can harm it.

    identify the target's glibc (its own root) -> analyze the code (no symbols needed)
    -> each thread's resolver state, read from /proc/PID/mem (already sticky?)
    -> the writer uprobes are attached (the kernel owns them; the rest once a thread is
       detailed) -> records -> the core's
       detector -> findings as they happen; at a doomed poll the blocked stack is
       unwound from /proc/PID/mem while the thread waits -> report.
"""
from __future__ import annotations

import time

from ..core import events as E
from ..sink import EventSink, build_report
from ..symbols.facts import resolv_conf_single_request
from . import plan as P
from .defer import Deferral
from .owner import Probes
from .records import Decoder, RecordError

# seconds between reads of the ring: a record that can matter wakes the run at once (the
# sticky-bit writer, a possibly doomed poll, a poll that timed out or stalled); the rest
# (healthy calls, deferred) waits for the next read
PUMP_WAIT = 0.25


class UprobeRun:
    def __init__(self, pid: int, mode: str = "armed", say=print, quiet: bool = False,
                 record: str | None = None, step_log: str | None = None,
                 symbols: str = "auto", offline: bool = False, source: bool = True,
                 sink: EventSink | None = None, empty_programs: bool = False):
        """``sink``: the run's event stream (a passive run's, when this one escalates it);
        by default a new one recording to ``record``. ``empty_programs``: the probes of
        ``mode`` with programs that do nothing and record nothing (the bench's
        ``uprobe-floor``: what the mechanism alone costs)."""
        self.pid, self.mode, self.say, self.quiet = pid, mode, say, quiet
        self.empty_programs = empty_programs
        self.own_sink = sink is None
        self.sink = sink or EventSink(record=record, say=say, quiet=quiet)
        self.sink.on_finding = self._on_finding
        self.det = self.sink.det
        self.step_log = open(step_log, "a") if step_log else None
        self.owner: Probes | None = None
        self.analysis: dict = {}
        self.records_seen = 0
        self.bad_records = 0
        self._names: dict[int, str | None] = {}
        self.stack_error: str | None = None
        self.lost = 0
        self.late_done = False
        self.symbols, self.offline, self.source = symbols, offline, source
        self.enrich = None
        self.symbols_line = ""
        self.defer: Deferral | None = None

    # -- set-up ------------------------------------------------------------------------------
    def arm(self) -> float:
        """Analyze, read each thread's state, attach the probes; returns seconds taken."""
        from ..symbols import identify
        t = time.monotonic()
        ident = identify.identify_process(self.pid)
        self.ident = ident
        self.analysis = P.analyze(self.pid, ident)
        plan = P.make_plan(self.pid, ident, self.analysis)
        from .enrich import Enrichment
        self.enrich = Enrichment(ident, self.symbols, self.offline, source=self.source)
        self.symbols_line = self.enrich.start()
        self.sink.start("uprobe", self.mode, self.pid, self.build_facts(), {
            "flag_probe": bool(plan.writers), "sticky_field": self.analysis.get("sticky_field"),
            "affected": self.analysis.get("affected_30081"),
            "resolv_conf_single_request": resolv_conf_single_request(self.pid)})
        # the writers first, then each thread's state: a thread that turns sticky in
        # between is seen by both, never by neither
        self.owner = Probes(plan, self.mode, self.empty_programs)
        if not self._status() or any(t.sticky for t in self.det.threads.values()):
            self._attach_late()
        self.decoder = Decoder(self.owner.record_kinds, plan.writers,
                               time.time() - time.monotonic(), self._name)
        self.sink.decode = self.decoder.decode          # the records kept for the report
        # a stream file or a step log needs every event as it comes; otherwise a
        # thread's healthy send_dg call is fed only if one of its records can matter
        if self.sink.record is None and self.step_log is None:
            self.defer = Deferral(self.owner.record_kinds, self._feed_record,
                                  self.decoder.thread_name)
        return time.monotonic() - t

    def build_facts(self) -> dict:
        """What the analyzer found in this build's code (the ``run`` record carries it)."""
        a = self.analysis
        return {"affected_30081": a.get("affected_30081"), "sticky_field": a.get("sticky_field"),
                "send_dg_object": a.get("send_dg_object"),
                "affected_how": (a.get(a.get("send_dg_object") or "", {}) or {}).get("fix_30081")}

    def _attach_late(self) -> None:
        """A thread is detailed: attach what armed mode keeps for that moment."""
        self.late_done = True
        try:
            self.owner.attach_late()
        except Exception as exc:                # the writers' findings stand
            self.say(f"gdbdiag: send_dg's step probes not attached ({exc})")

    def _name(self, tid: int) -> str | None:
        if tid not in self._names:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/comm") as fh:
                    self._names[tid] = fh.read().strip()
            except OSError:
                self._names[tid] = None
        return self._names[tid]

    def _status(self) -> bool:
        """Each thread's options/_flags now, without stopping it (its TLS found by walking
        glibc's thread list in /proc/PID/mem)."""
        from ..passive import PassiveError, PassiveSampler
        try:
            with PassiveSampler(self.pid) as smp:
                samples = smp.sample()
        except PassiveError as exc:
            self.say(f"gdbdiag: threads' resolver state not read ({exc}); every probe is "
                     "attached now, so sticky threads show up at their next lookup")
            return False
        for s in samples:
            if s.options is None:
                continue
            ev = E.Event(t=s.t, lwp=s.tid, kind=E.STATUS,
                         data={"thread_name": s.name, "options": s.options, "flags": s.flags},
                         prov={"options": "memory", "flags": "memory"})
            self._feed(ev)
        return True

    # -- the run -----------------------------------------------------------------------------
    def _feed(self, ev: E.Event, raw: bytes | None = None, kept: bool = False) -> list[E.Event]:
        out = self.sink.feed(ev, raw, kept)
        if not self.late_done and self.owner is not None and (
                ev.kind in (E.SEND_DG_ENTER, E.FLAG_WRITE) or
                any(f.kind == E.STICKY_ENGAGED for f in out)):
            self._attach_late()
        if self.step_log and ev.kind != E.STATUS:
            rows = self.det.dump(ev)
            self.step_log.write(f"== +{ev.t - self.sink.t0:.6f}s LWP {ev.lwp} {ev.kind}\n" + "".join(
                f"   {k:<24} {v}  [{how}]\n" for k, v, how in rows))
        return out

    def _on_finding(self, f: E.Event, ev: E.Event) -> None:
        if f.kind == E.DOOMED_POLL and ev.kind == E.POLL_ENTER:
            self._stack(ev, f)

    def _stack(self, poll: E.Event, finding: E.Event) -> None:
        """The application stack of a thread that waits in a doomed poll: its registers
        at the poll call (kernel probe), its stack memory now (it is blocked in poll)."""
        regs = poll.get("regs")
        if not regs:
            return
        try:
            from ..unwind import unwind
            frames = unwind(self.pid, regs, debug_dirs=self.enrich.debug_dirs if self.enrich else ())
        except Exception as exc:          # the diagnosis stands without a stack
            self.stack_error = f"{type(exc).__name__}: {exc}"
            return
        stack = [self._label(f) for f in frames]
        finding.data["stack"], finding.prov["stack"] = stack, "memory"
        th = self.det.thread(finding.lwp)
        th.stack = stack

    def _label(self, frame) -> str:
        """gdb-like frame label; send_dg (a static function, nameless without debug
        symbols) is named from the analyzer's bounds."""
        if frame.symbol:
            return frame.label()
        a = self.analysis
        obj = a.get(a.get("send_dg_object") or "") or {}
        sd = obj.get("send_dg") or {}
        ranges = [(sd.get("start"), sd.get("end"))] + [(c["start"], c["end"]) for c in sd.get("cold", [])]
        soname = "libc" if a.get("send_dg_object") == "libc" else "libresolv"
        if frame.module and frame.module.startswith(soname) and frame.module_offset is not None and \
                any(lo is not None and lo <= frame.module_offset < hi for lo, hi in ranges):
            return "send_dg"
        return frame.label()

    def pump(self, wait: float = 0.1) -> None:
        if wait:
            self.owner.wait(wait)
        recs = self.owner.records()
        self.records_seen += len(recs)
        # read after the ring: a record lost so far comes before these, or among them
        lost = self.owner.lost
        if lost > self.lost:
            if self.defer is not None:
                self.defer.flush_all()
            self._feed(E.Event(t=time.time(), lwp=self.pid, kind=E.RECORDS_LOST,
                               data={"lost": lost - self.lost, "lost_total": lost}))
            self.lost = lost
        if self.defer is not None:
            self.sink.keep(recs)
            add = self.defer.add
            for rec in recs:
                add(rec)
            return
        for rec in recs:
            self._feed_record(rec, kept=False)

    def _feed_record(self, rec: bytes, kept: bool = True) -> None:
        try:
            ev = self.decoder.decode(rec)
        except RecordError:
            self.bad_records += 1
            return
        if ev is not None:
            self._feed(ev, rec, kept)

    def loop(self, deadline: float, stop, until: str | None) -> str:
        """Run until the deadline, a signal (``stop.why``) or ``until``; returns why."""
        while True:
            if stop.why:
                return stop.why
            if time.monotonic() >= deadline:
                return "duration"
            self.pump(PUMP_WAIT)
            if not _alive(self.pid):
                return "target exited"
            if self.sink.until_hit(until):
                return "until"

    def close(self) -> None:
        if self.owner is not None:
            self.pump(0)
            if self.defer is not None:
                self.defer.flush_all()
            self.lost = self.owner.lost
            self.owner.close()
            self.owner = None
        if self.step_log:
            self.step_log.close()
        self.step_log = None
        if self.own_sink:
            self.sink.close()

    def release(self) -> None:
        self.sink.release()

    def armed_line(self, arm_s: float) -> str:
        a = self.analysis
        obj = a.get(a.get("send_dg_object") or "", {}) or {}
        fix = obj.get("fix_30081") or {}
        verdict = {True: "affected", False: "fixed", None: "unknown"}[a.get("affected_30081")]
        return (f"armed in {arm_s:.2f} s with kernel probes ({self.mode} mode, no debug symbols "
                f"needed); bug 30081 in this build: {verdict} ({fix.get('how', 'instruction flow')}"
                + (f": {fix['reason']}" if fix.get("reason") and verdict == "unknown" else "")
                + f"); sticky bit in {a.get('sticky_field') or '?'}")

    # -- the report ---------------------------------------------------------------------------
    def _sources(self) -> None:
        """glibc's source at the switch (the writer) and at the doomed poll, when the
        debug file (line table) and Debian's source of this build are at hand."""
        a, en = self.analysis, self.enrich
        obj = a.get(a.get("send_dg_object") or "") or {}
        if en is None or not obj.get("build_id"):
            return
        writer = next((w["addr"] for w in obj.get("sticky_writers", [])
                       if w.get("in_send_dg") and w["bit"] == "RES_SNGLKUP"), None)
        wait = next((c["call_addr"] for c in obj.get("calls", [])
                     if c["kind"] == "poll" and c.get("site") == "wait"), None)
        at = {E.STICKY_ENGAGED: writer, E.DOOMED_POLL: wait}
        cache: dict = {}
        for f in self.det.findings:
            addr = at.get(f.kind)
            if addr is None or (f.kind == E.STICKY_ENGAGED and f.get("how") != "flag_write"):
                continue
            if addr not in cache:
                try:
                    cache[addr] = en.source_at(obj["build_id"], addr)
                except Exception as exc:          # source lines are a nicety
                    en.notes.append(f"source lines: {exc}")
                    cache[addr] = None
            if cache[addr]:
                f.data["source"], f.prov["source"] = cache[addr], "dwarf"

    def report(self, ended_by: str, arm_s: float | None) -> dict:
        if self.enrich is not None:
            self.enrich.settle(2.0)
            self._sources()
        en = self.enrich
        symbols = {"source": [en.origin] if en and en.origin else ["none needed (disassembly)"],
                   "verified": bool(en and en.debug_files) or None,
                   "debug_files": dict(en.debug_files) if en else {},
                   "note": self.symbols_line, "errors": list(en.notes) if en else []}
        return build_report(self.sink, self.pid, symbols, {
            "backend": "uprobe", "mode": self.mode, "ended_by": ended_by,
            "attach_to_armed_s": round(arm_s, 3) if arm_s is not None else None,
            "records": self.records_seen, "bad_records": self.bad_records,
            "lost_records": self.lost, "stack_error": self.stack_error})


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
