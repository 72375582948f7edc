"""The trace session inside gdb: probes in, detector and output out.

Thin: the decisions are the pure core's (gdbdiag.core); this file only moves events from
probes to the detector and prints what it finds.
"""
import collections
import fnmatch
import json
import os
import time

import gdb

from ..core import events as E
from ..core import render
from ..core.detector import Detector
from ..core.events import Event
from ..core.flags import sticky_bits
from . import analysis as A
from . import probes as P
from . import target as T
from .guards import setting, traceback_text

STATE_FILE_ENV = "GDBDIAG_ARMED_FILE"   # where the batch runner's supervisor reads armed PCs
KEEP_OBSERVATIONS = 20000
SYMBOLS = {"source": None, "verified": None}   # set by `resolv symbols` or the batch runner


class TraceSession:
    current = None

    def __init__(self, step=False, thread=None, names=None, lean=False, record=None,
                 chain=True, verbose=None, echo=True, step_log=None, source=True, full=False):
        """``names``, ``verbose``: as given (``--names``, ``--verbose``), or None to follow
        `set resolv names` / `set resolv verbose` as they are when each probe fires."""
        self.step, self.thread, self.lean = step, thread, lean
        self._names, self._verbose = names, verbose
        # full: every probe from the start (--step, --full); otherwise only the watch set
        # until a thread is sticky (see probes.arm)
        self.full = bool(full or step or step_log) and not lean
        self.chain, self.echo = chain, echo
        self.t0 = time.time()
        self.observations = collections.deque(maxlen=KEEP_OBSERVATIONS)   # for the report
        self.probes = []
        self.analysis = None
        self.offsets = None
        self.dwarf = False          # gdb has DWARF for send_dg (enrichment only)
        self.build = {}
        self.detector = None
        self.errors = []
        self._saved = {}
        self._record = open(record, "w") if record else None
        self._step_log = open(step_log, "w") if step_log else None
        self._objfile_hook = None
        self.filtered = set()
        self.escalated = False
        self.want_source = source
        self.source_tree = None
        self.source_note = None
        self._escalate_pending = False
        self._gthread = None
        self._stop_hook = None
        if not self.full:
            self._stop_hook = self._on_stop
            gdb.events.stop.connect(self._stop_hook)

    # -- settings, read when used: `set resolv …` works during a trace -----------------
    @property
    def names(self):
        return self._names or setting("resolv names", "") or None

    @property
    def verbose(self):
        return bool(setting("resolv verbose", False)) if self._verbose is None else self._verbose

    @property
    def color(self):
        return bool(setting("resolv color", True))

    # -- set-up -----------------------------------------------------------------------
    def start(self):
        if not self.try_arm():
            self._objfile_hook = self._on_new_objfile
            gdb.events.new_objfile.connect(self._objfile_hook)
            self.say("send_dg is not loaded yet (glibc < 2.34 loads libresolv at the first "
                     "lookup): probes will be armed when it is")

    def _on_new_objfile(self, event):
        """A new object: arm once it is send_dg's (libresolv, seen in the process's maps;
        not by gdb's symbols). The objfile event of a library comes after gdb has read
        its separate debug file, so DWARF enrichment is there if gdb has it."""
        try:
            obj = event.new_objfile
            if obj.owner is not None or T.role_of(obj.filename) is None:
                return                      # a separate debug file, or not glibc's
            if self.try_arm():
                gdb.events.new_objfile.disconnect(self._objfile_hook)
                self._objfile_hook = None
        except Exception as exc:            # never let an event handler break gdb
            self.errors.append("arming on load: %s" % exc)
            self.say("gdbdiag: cannot arm on load of %s: %s" % (
                getattr(event.new_objfile, "filename", "?"), exc))

    def try_arm(self):
        """Analyze send_dg's object and arm; False while it is not mapped yet."""
        if self.probes:
            return True
        try:
            self.analysis = A.analyse()
        except A.NotLoaded:
            return False
        self.offsets = self.analysis["offsets"]
        self.dwarf = bool(self.analysis["dwarf"]["available"])
        self.build = build_facts(self.analysis)
        if self.want_source and self.dwarf:      # lines come from DWARF's line table
            self._load_source()
        self.detector = Detector(accepts_header_only=self.build["bug31890_fixed"],
                                 resolv_conf_single_request=resolv_conf_single_request(),
                                 flag_probe=True, sticky_field=self.build["sticky_field"])
        gthread = None
        if self.thread is not None:
            for th in gdb.selected_inferior().threads():
                if th.num == self.thread or th.ptid[1] == self.thread:
                    gthread = th.global_num
            if gthread is None:
                raise gdb.GdbError("no thread %s in this inferior" % self.thread)
        self._gthread = gthread
        self.probes = P.arm(self, self.analysis, self.offsets, thread=gthread,
                            chain=self.chain, lean=self.lean, part="all" if self.full else "watch")
        self.escalated = self.full
        self.write_armed_file()
        self._seed_thread_states()
        if not self.full and any(t.sticky for t in self.detector.threads.values()):
            self.escalate()
        self.say(self._armed_line())
        for c in A.disagreements(self.analysis):
            self.say("gdbdiag: analyzer and %s DISAGREE on %s: analyzer %s, gdb %s (probes use "
                     "the analyzer's)" % (c["source"], c["what"], c["analyzer"], c["gdb"]))
        return True

    def _seed_thread_states(self):
        """The stream's ``run`` record, then each thread's state now (threads already
        sticky before this trace)."""
        inf = gdb.selected_inferior()
        mode = "full" if self.full else ("lean" if self.lean else "armed")
        self._emit(Event(t=time.time(), lwp=inf.pid, kind=E.RUN,
                         data={"source": "gdb", "mode": mode, "pid": inf.pid,
                               "build": dict(self.build),
                               "detector": self.detector.settings()}))
        for row in thread_states(self.offsets):
            self._emit(Event(t=time.time(), lwp=row["lwp"], kind=E.STATUS,
                             data={"options": row["options"], "flags": row["flags"],
                                   "thread_name": row["name"]},
                             prov={"options": row["prov"], "flags": row["prov"]}))

    def _emit(self, ev):
        """One observation: recorded, fed to the detector; its findings recorded (with
        glibc's source line where DWARF maps the PC) and printed."""
        self.observations.append(ev)
        if self._record:
            self._record.write(E.to_line(ev))
            self._record.flush()
        found = self.detector.feed(ev)
        name = self.detector.thread(ev.lwp).name
        for f in found:
            if f.pc is not None and f.kind in (E.STICKY_ENGAGED, E.DOOMED_POLL):
                src = self.source_at(f.pc, color=False)
                if src:
                    f.data["source"] = src
            if self._record:
                self._record.write(E.to_line(f, finding=True))
                self._record.flush()
            self.say(render.finding_line(f, self.t0, name))
        return found

    def _armed_line(self):
        mode = "full" if self.full else ("lean" if self.lean else "armed")
        waiting = not (self.full or self.escalated)
        line = ("armed %d probes (%s mode%s) for send_dg in %s; bug 30081 in this build: %s "
                "(from the code); sticky bit in %s"
                % (len(self.probes), mode, ": watching the sticky-bit writes, send_dg's probes "
                   "follow sticky threads" if waiting else "", self.analysis.get("objfile"),
                   self.build["bug30081"], self.build["sticky_field"]))
        if self.dwarf:
            return line + "; probe points from send_dg's machine code, DWARF for enrichment"
        return line + ("; no debug symbols: probe points from send_dg's machine code%s" % (
            ", and send_dg's entry and its recvfrom call/return are watched on every lookup "
            "too (bookkeeping, so the lost query is named at the switch)" if waiting and
            not self.full else ""))

    def _load_source(self):
        """Debian's glibc source for this very build (cache first; fetched and verified
        like the symbols otherwise). Without it the dumps simply show no source."""
        try:
            from ..symbols import glibcsrc, identify
            ident = identify.identify_process(gdb.selected_inferior().pid)
            ver = ident.package_version
            if not ver:
                self.source_note = "no package version for this glibc: no source"
                return
            tree = glibcsrc.load_cached(ver)
            if tree is None:
                tree = glibcsrc.fetch_source(ver)
            self.source_tree = tree
        except Exception as exc:        # source is a nicety: never fail the trace for it
            self.source_note = "source: %s" % (getattr(exc, "reason", None) or exc)
            self.say(self.source_note)

    def source_at(self, pc, context=3, color=None):
        """(file, line, text) of the glibc source at pc, mapped through DWARF's line table."""
        sal = gdb.find_pc_line(pc)
        if sal is None or sal.symtab is None or not sal.line:
            return None
        fname = sal.symtab.filename
        text = None
        if self.source_tree is not None:
            from ..symbols.glibcsrc import highlight
            lines = self.source_tree.lines(fname, sal.line, context)
            if not lines:
                try:     # comp_dir + filename, e.g. /build/glibc-X/resolv/nss_dns/dns-host.c
                    lines = self.source_tree.lines(sal.symtab.fullname(), sal.line, context)
                except (gdb.error, RuntimeError):
                    lines = []
            if lines:
                text = highlight(lines, sal.line, self.color if color is None else color)
        return {"file": fname, "line": sal.line, "text": text}

    def escalate(self):
        """Lean mode: a thread is sticky, follow sticky threads' lookups from now on.
        Called while the target is stopped (breakpoints can be inserted)."""
        if self.escalated:
            return
        self.escalated = True
        self.probes += P.arm(self, self.analysis, self.offsets, thread=self._gthread,
                             chain=self.chain, lean=self.lean, part="sticky")
        self.write_armed_file()

    def _on_stop(self, event):
        if not self._escalate_pending:
            return
        self._escalate_pending = False
        try:
            self.escalate()
        finally:
            gdb.post_event(self._resume)

    def _resume(self):
        try:
            gdb.execute("continue &")
        except gdb.error as exc:
            self.errors.append("resume after arming: %s" % exc)

    def write_armed_file(self):
        path = os.environ.get(STATE_FILE_ENV)
        if not path:
            return
        inf = gdb.selected_inferior()
        data = {"pid": inf.pid, "pcs": sorted({p.pc for p in self.probes})}
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)

    def stop(self):
        if self._stop_hook is not None:
            gdb.events.stop.disconnect(self._stop_hook)
            self._stop_hook = None
        if self._objfile_hook is not None:
            gdb.events.new_objfile.disconnect(self._objfile_hook)
            self._objfile_hook = None
        n = 0
        for p in self.probes:
            if p.is_valid():
                p.delete()
                n += 1
        self.probes = []
        path = os.environ.get(STATE_FILE_ENV)
        if path:
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump({"pid": gdb.selected_inferior().pid, "pcs": []}, fh)
            os.replace(tmp, path)
        for fh in (self._record, self._step_log):
            if fh:
                fh.close()
        self._record = self._step_log = None
        return n

    # -- probes call these -----------------------------------------------------------
    def pc_name(self, pc):
        """'send_dg' for a PC in its ranges (the analyzer's), for stacks without symbols."""
        for lo, hi in (self.analysis or {}).get("ranges", ()):
            if lo <= pc < hi:
                return "send_dg"
        return None

    def saved(self, lwp):
        return self._saved.setdefault(lwp, {})

    def probe_error(self, probe, exc):
        msg = "%s at %#x: %s: %s" % (probe.label, probe.pc, type(exc).__name__, exc)
        if len(self.errors) < 50:
            self.errors.append(msg)
            self.say("probe error (target continues): " + msg)
            tb = traceback_text(exc)
            if tb:
                self.say(tb.rstrip("\n"))

    def observe(self, ev, probe):
        lwp = ev.lwp
        if ev.kind == E.GAI_ENTER:       # a new lookup: is its name wanted (the glob as set now)?
            names, name = self.names, ev.get("name") or ""
            if not names or fnmatch.fnmatch(name, names) or fnmatch.fnmatch(name + ".", names):
                self.filtered.discard(lwp)
            else:
                self.filtered.add(lwp)
        if lwp in self.filtered:
            return False
        self._emit(ev)
        name = self.detector.thread(lwp).name
        if ev.kind == E.FLAG_WRITE and not self.escalated:
            # lean: stop just long enough to arm the sticky-thread probes (see _on_stop)
            self._escalate_pending = True
            return True
        if self.step or self._step_log:
            text = "-- %s  (%s)\n%s" % (probe.label, render.who(lwp, name),
                                        render.dump_table(self.detector.dump(ev)))
            src = self.source_at(probe.pc, color=self.color and self.step)
            if src:
                text += "\n%s:%d\n%s" % (src["file"], src["line"], src["text"] or
                                          "(source not available%s)" % (
                                              ": " + self.source_note if self.source_note else ""))
            if self._step_log:
                self._step_log.write("%.6f %s\n\n" % (ev.t, text))
                self._step_log.flush()
            if self.step:
                self.say(text)
                return True
        if self.verbose:
            self.say("   %s %s %s" % (render.who(lwp, name), probe.label,
                                       {k: v for k, v in ev.data.items() if k not in ("stack",)}))
        return False

    def say(self, text):
        if self.echo:
            gdb.write(text + "\n")
            gdb.flush()


def build_facts(analysis) -> dict:
    fields = analysis.get("flag_field") or []
    locals31890 = analysis.get("bug31890_locals")       # None: no DWARF, cannot tell
    return {"bug30081": analysis.get("bug30081"),
            "affected_30081": {"affected": True, "fixed": False}.get(analysis.get("bug30081")),
            "bug31890_fixed": bool(locals31890) if locals31890 is not None else None,
            "sticky_field": fields[0] if len(fields) == 1 else ("/".join(fields) or None),
            "send_dg_object": analysis.get("objfile")}


def resolv_conf_single_request():
    """Does the target's own /etc/resolv.conf say single-request? (read in its root)."""
    from ..symbols.facts import resolv_conf_single_request as read
    return read(gdb.selected_inferior().pid)


def thread_states(offsets=None) -> list:
    """Each thread's _res: options, _flags, nameservers, timeout/attempts/ndots.

    Through ``__resp`` (the thread's resolver state; needs DWARF and the target's
    libthread_db for TLS): provenance ``dwarf``. Threads gdb cannot read so are read
    from /proc/PID/mem without symbols (gdbdiag.passive: glibc's thread list, the
    ``__resp`` TLS slot, ABI offsets): options/_flags only, provenance ``memory``.
    Threads neither can read are listed with ``options`` None and an ``error``."""
    rows = _states_by_dwarf()
    if any(r["options"] is None for r in rows):
        _states_from_memory(rows)
    return rows


def _states_from_memory(rows):
    from ..passive import PassiveSampler
    try:
        with PassiveSampler(gdb.selected_inferior().pid) as sampler:
            got = {s.tid: s for s in sampler.sample()}
    except Exception as exc:          # status must still list the threads
        for r in rows:
            if r["options"] is None:
                r["error"] = "%s; from memory: %s" % (r.get("error") or "no DWARF", exc)
        return
    for r in rows:
        s = got.get(r["lwp"])
        if r["options"] is not None or s is None or s.options is None:
            continue
        r.update(options=s.options, flags=s.flags, resp=s.resp, prov="memory")
        r["dwarf_error"] = r.pop("error", None)


def _states_by_dwarf() -> list:
    rows = []
    inf = gdb.selected_inferior()
    orig = gdb.selected_thread()
    try:
        for th in sorted(inf.threads(), key=lambda t: t.num):
            th.switch()
            row = {"num": th.num, "lwp": th.ptid[1], "name": th.name or "", "options": None,
                   "flags": None, "prov": "dwarf", "nameservers": "", "resolver": ""}
            try:
                resp = gdb.parse_and_eval("__resp")
                st = resp.dereference()
                row["options"] = int(st["options"])
                try:
                    row["flags"] = int(st["_flags"])
                except gdb.error:
                    row["flags"] = None
                n = int(st["nscount"])
                ns = []
                for i in range(min(n, 3)):
                    a = st["nsaddr_list"][i]
                    ip = int(a["sin_addr"]["s_addr"])
                    ns.append("%d.%d.%d.%d" % (ip & 255, ip >> 8 & 255, ip >> 16 & 255, ip >> 24))
                row["nameservers"] = " ".join(ns)
                row["resolver"] = "%ss/%s/%s" % (int(st["retrans"]), int(st["retry"]), int(st["ndots"]))
                row["resp"] = int(resp)
            except gdb.error as exc:
                row["error"] = str(exc)
            rows.append(row)
    finally:
        if orig is not None and orig.is_valid():
            orig.switch()
    return rows


def sticky_of(row) -> dict:
    return sticky_bits(row.get("options"), row.get("flags"))
