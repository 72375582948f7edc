"""Live detection, per thread: sticky serial mode engaged, doomed polls, measured stalls.

Feed observations (``Detector.feed``) in the order the probes saw them; it returns the
findings each one produced, keeps a state per thread and the step dump of the last step.
Pure Python: the same code runs inside gdb and on recorded streams in unit tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import events as E
from .events import Event
from .flags import decode_flags, decode_options, decode_poll, sticky_bits
from .sampling import SampleTracker
from .shadow import Query, SendDgShadow


@dataclass
class ThreadState:
    lwp: int
    name: str | None = None
    sticky: bool = False
    sticky_field: str | None = None
    since: float | None = None
    since_how: str | None = None         # how the switch was seen (a read of a set bit: "before")
    cause: str | None = None
    options: int | None = None
    flags: int | None = None
    lookup: str | None = None            # getaddrinfo's name in progress
    stack: list[str] = field(default_factory=list)
    last_query: str | None = None
    last_stall_ms: float | None = None
    shadow: SendDgShadow | None = None
    poll_t: float | None = None
    poll_doomed: Event | None = None
    poll_timeout_ms: int | None = None
    mismatches: list[str] = field(default_factory=list)
    stalls: int = 0
    doomed: int = 0

    def summary(self) -> dict:
        return {"lwp": self.lwp, "name": self.name, "sticky": self.sticky,
                "sticky_field": self.sticky_field, "since": self.since,
                "since_how": self.since_how, "cause": self.cause,
                "options": self.options, "flags": self.flags, "last_query": self.last_query,
                "last_stall_ms": self.last_stall_ms, "doomed_polls": self.doomed,
                "stalls": self.stalls, "stack": self.stack}


def _q(d: dict | None) -> Query | None:
    if not d:
        return None
    return Query(id=d.get("id"), qname=d.get("qname"), qtype=d.get("qtype"))


STREAM_KINDS = (E.RUN, E.SAMPLED, E.RECORDS_LOST)


def _no_finding(th, ev) -> list:
    return []


def _qlabel(q: Query | None) -> str:
    return f"{q.qtype} {q.qname}" if q else "?"


class Detector:
    SETTINGS = ("accepts_header_only", "resolv_conf_single_request", "flag_probe",
                "sticky_field", "affected", "confirm_samples")

    def __init__(self, accepts_header_only: bool = False, resolv_conf_single_request=None,
                 flag_probe: bool = True, sticky_field: str | None = None,
                 affected: bool | None = None, confirm_samples: int = 2):
        self.threads: dict[int, ThreadState] = {}
        self.run: dict = {}                  # the stream's ``run`` record (source, build facts)
        self.records_lost = 0                # probe records the kernel could not write
        self.refuted: list[Event] = []       # doomed polls that got an answer after all
        # passive samples (``sample``/``sampled``): affected = bug 30081 in this build
        self.sampling = SampleTracker(self, affected, confirm_samples)
        # With a probe on the instruction that sets the sticky bit, engagement is read
        # there; without one (lean mode), it is inferred from the timeout that causes it.
        self.flag_probe = flag_probe
        self.sticky_field = sticky_field     # "options" or "_flags", from the build
        self._pending_lost: tuple[int, Query] | None = None
        self.findings: list[Event] = []
        self.stalls: list[dict] = []
        self.accepts_header_only = accepts_header_only
        # True/False when the target's resolv.conf was read: tells a thread that is serial
        # from its first lookup ("options single-request") from one switched by a loss.
        self.resolv_conf_single_request = resolv_conf_single_request
        self._handlers: dict = {}

    def settings(self) -> dict:
        """What a ``run`` record carries so that a replay decides the same way."""
        return {"accepts_header_only": self.accepts_header_only,
                "resolv_conf_single_request": self.resolv_conf_single_request,
                "flag_probe": self.flag_probe, "sticky_field": self.sticky_field,
                "affected": self.sampling.affected,
                "confirm_samples": self.sampling.confirm_samples}

    def configure(self, settings: dict) -> None:
        for k, v in (settings or {}).items():
            if k == "affected":
                self.sampling.affected = v
            elif k == "confirm_samples":
                self.sampling.confirm_samples = max(1, int(v))
            elif k in self.SETTINGS:
                setattr(self, k, v)

    def thread(self, lwp: int) -> ThreadState:
        if lwp not in self.threads:
            self.threads[lwp] = ThreadState(lwp=lwp)
        return self.threads[lwp]

    # ---------------------------------------------------------------------------------
    def feed(self, ev: Event) -> list[Event]:
        if ev.kind in STREAM_KINDS:          # about the stream, not one thread
            th = None
        else:
            th = self.threads.get(ev.lwp) or self.thread(ev.lwp)
            name = ev.data.get("thread_name")
            if name:
                th.name = name
        handler = self._handlers.get(ev.kind)
        if handler is None:              # each kind's handler looked up once
            handler = self._handlers[ev.kind] = getattr(self, "_on_" + ev.kind, _no_finding)
        out = handler(th, ev)
        if out:
            self.findings.extend(out)
        return out

    def _finding(self, kind, th: ThreadState, ev: Event, data: dict, prov=None) -> Event:
        d = dict(data)
        d.setdefault("qname", th.last_query.split(" ", 1)[1] if th.last_query else None)
        return Event(t=ev.t, lwp=th.lwp, kind=kind, data=d,
                     prov=prov or {k: E.INFERRED for k in d}, pc=ev.pc)

    def _engage(self, th: ThreadState, ev: Event, field_: str, cause: str,
                lost: Query | None, how: str) -> list[Event]:
        if th.sticky:
            return []
        th.sticky, th.sticky_field, th.since, th.cause = True, field_, ev.t, cause
        th.since_how = how
        data = {"field": field_, "cause": cause, "how": how,
                "lost_qname": lost.qname if lost else None,
                "lost_qtype": lost.qtype if lost else None,
                "qname": lost.qname if lost else None, "qtype": lost.qtype if lost else None}
        # the field written is known from the writer instruction (disassembly) at a flag
        # write, or read (memory) in a status/entry read of options/_flags
        prov = {"field": ev.prov.get("field", ev.prov.get("options", E.INFERRED))
                if how != "timeout" else E.INFERRED}
        prov.update({k: E.INFERRED for k in data if k != "field"})
        return [self._finding(E.STICKY_ENGAGED, th, ev, data, prov)]

    # -- observations ---------------------------------------------------------------------
    def _already_sticky(self, th: ThreadState, ev: Event, how: str, otherwise: str) -> list[Event]:
        """The bit is set in what was just read, and no switch was seen: say why."""
        th.options, th.flags = ev.get("options"), ev.get("flags")
        bits = sticky_bits(th.options, th.flags)
        if bits["single_request"] and not th.sticky:
            cause = ("resolv.conf options single-request" if self.resolv_conf_single_request
                     else otherwise)
            return self._engage(th, ev, bits["field"], cause, None, how)
        return []

    def _on_status(self, th: ThreadState, ev: Event) -> list[Event]:
        return self._already_sticky(th, ev, "status",
                                    "already set when gdbdiag attached (an earlier lost answer)")

    def _on_run(self, th: ThreadState, ev: Event) -> list[Event]:
        self.run = dict(ev.data)
        self.configure(ev.get("detector"))
        return []

    def _on_records_lost(self, th: ThreadState, ev: Event) -> list[Event]:
        """Some probe records never came (of which thread, unknown): no send_dg in
        progress can be followed any more -- a missing send or answer would make a poll
        look doomed. Each thread's shadow starts again at its next send_dg entry."""
        self.records_lost += ev.get("lost") or 0
        for t in self.threads.values():
            t.shadow, t.poll_doomed = None, None
        self._pending_lost = None
        return []

    def _on_sample(self, th: ThreadState, ev: Event) -> list[Event]:
        return self.sampling.sample(th, ev)

    def _on_sampled(self, th: ThreadState, ev: Event) -> list[Event]:
        return self.sampling.snapshot(ev)

    def _on_gai_enter(self, th, ev):
        d = ev.data
        th.lookup = d.get("name")
        if d.get("stack"):
            th.stack = list(d["stack"])
        return []

    def _on_gai_return(self, th, ev):
        th.lookup = None
        return []

    def _on_chain(self, th, ev):
        return []

    def _on_send_dg_enter(self, th, ev):
        d = ev.data
        q1, q2 = _q(d.get("q1")), _q(d.get("q2"))
        th.shadow = SendDgShadow.enter(d.get("options"), d.get("flags"), q1, q2,
                                       self.accepts_header_only)
        th.last_query = _qlabel(q1) if q1 else th.last_query
        return self._already_sticky(th, ev, "send_dg_enter",
                                    "set before this trace (an earlier lost answer, or resolv.conf)")

    def _on_sendmmsg_return(self, th, ev):
        n = ev.data.get("n")
        if th.shadow and (n or 0) > 0:
            th.shadow.sent_mmsg(n)
        return []

    def _on_send_return(self, th, ev):
        if th.shadow and (ev.get("n") or -1) > 0:
            q = th.shadow.sent_one(ev.get("id"))
            if q:
                th.last_query = _qlabel(q)
        return []

    def _on_poll_enter(self, th, ev):
        d = ev.data
        if d.get("stack") and (not th.stack or d.get("site") == "wait"):
            th.stack = list(d["stack"])
        sh = th.shadow
        th.poll_t, th.poll_doomed = ev.t, None
        th.poll_timeout_ms = timeout = d.get("timeout_ms")
        if sh is None or not sh.poll_is_doomed(d.get("events"), timeout):
            return []
        never = sh.never_sent()
        err = sh.error_answer
        if not (sh.single_request and err is not None and never):
            # a POLLIN wait with nothing in flight for another reason (e.g. an ignored
            # header-only answer): still can only time out
            ign = [q for q in sh.outstanding() if q.ignored]
            reason = (f"header-only {ign[0].rcode} answer to {ign[0].qtype} ignored by glibc "
                      "(bug 31890): its query will not be answered again" if ign
                      else "no query in flight")
            err = err or (ign[0] if ign else None)
        else:
            reason = f"{err.rcode} to {err.qtype} in single-request mode; {never[0].qtype} never sent"
        th.doomed += 1
        d = self._finding(E.DOOMED_POLL, th, ev, {
            "predicted_ms": ev.get("timeout_ms"), "reason": reason,
            "qname": (err or sh.queries[0]).qname,
            "waiting_for": never[0].qtype if never else None,
            "error_rcode": err.rcode if err else None,
            "stack": th.stack, "lookup": th.lookup})
        d.prov["predicted_ms"] = ev.prov.get("timeout_ms", E.INFERRED)
        th.poll_doomed = d
        return [d]

    def _on_poll_return(self, th, ev):
        out = []
        sh = th.shadow
        n = ev.get("n")
        dur = None if th.poll_t is None else (ev.t - th.poll_t) * 1000.0
        if th.poll_doomed is not None and n is not None and n > 0:
            # an answer came: the prediction was wrong (the shadow missed something). The
            # finding is withdrawn from the verdict, marked, and no stall is claimed
            d, th.poll_doomed = th.poll_doomed, None
            d.data["refuted"] = f"poll returned {n} after {dur or 0:.1f} ms"
            if d in self.findings:
                self.findings.remove(d)
            th.doomed -= 1
            self.refuted.append(d)
        elif th.poll_doomed is not None:
            d = th.poll_doomed
            st = self._finding(E.STALL, th, ev, {
                "measured_ms": round(dur, 1) if dur is not None else None,
                "predicted_ms": d.get("predicted_ms"), "n": n, "qname": d.get("qname"),
                "timed_out": n == 0, "lookup": th.lookup})
            st.prov["measured_ms"] = "measured"
            out.append(st)
            th.stalls += 1
            th.last_stall_ms = st.get("measured_ms")
            self.stalls.append({"lwp": th.lwp, "thread": th.name, "qname": d.get("qname"),
                                "lookup": th.lookup, "predicted_ms": d.get("predicted_ms"),
                                "measured_ms": st.get("measured_ms"), "t": d.t})
            th.poll_doomed = None
        elif n == 0 and sh is not None and (th.poll_timeout_ms or 0) > 0:
            lost = sh.lost()
            if lost is not None:
                out.append(self._finding(E.LOST_ANSWER, th, ev, {
                    "qname": lost.qname, "qtype": lost.qtype,
                    "waited_ms": round(dur, 1) if dur is not None else None,
                    "single_request": sh.single_request}))
                if not sh.single_request:
                    # send_dg: statp->options |= RES_SNGLKUP; single_request = true; goto retry
                    self._pending_lost = (th.lwp, lost)
                    if not self.flag_probe:
                        cause = (f"{lost.qtype} answer for {lost.qname} lost (poll timed out "
                                 "after the other answer came)")
                        out += self._engage(th, ev, self.sticky_field or "options", cause, lost,
                                            "timeout")
                        sh.single_request = True
                        sh.retry()
        th.poll_t = None
        return out

    def _on_recvfrom_return(self, th, ev):
        d = ev.data
        if th.shadow is None or (d.get("n") or -1) < 12:
            return []
        th.shadow.received(d.get("id"), d.get("rcode"), d.get("qdcount"))
        return []

    def _on_flag_write(self, th, ev):
        sh = th.shadow
        if sh is None and ev.get("q1"):
            # not traced since send_dg's entry (lean mode): the queries were read here,
            # the answers from recvresp1/2's home slots
            sh = th.shadow = SendDgShadow.enter(ev.get("before") if ev.get("field") == "options" else th.options,
                                                ev.get("before") if ev.get("field") == "_flags" else th.flags,
                                                _q(ev.get("q1")), _q(ev.get("q2")),
                                                self.accepts_header_only)
            for q in sh.queries:
                q.sent = True
            if ev.get("recvresp1"):
                sh.queries[0].answered = True
            if ev.get("recvresp2") and len(sh.queries) > 1:
                sh.queries[1].answered = True
        lost = None
        pend = self._pending_lost
        if pend and pend[0] == th.lwp:
            lost = pend[1]
            self._pending_lost = None
        elif sh is not None:
            lost = sh.lost()
        bit = ev.get("bit", "RES_SNGLKUP")
        out = []
        if not th.sticky:
            cause = (f"{lost.qtype} answer for {lost.qname} lost (poll timed out after the "
                     f"other answer came)" if lost else "poll timeout with one answer missing")
            out = self._engage(th, ev, ev.get("field", "options"), cause, lost, "flag_write")
        if ev.get("value") is not None:
            if ev.get("field") == "_flags":
                th.flags = ev.get("value")
            else:
                th.options = ev.get("value")
        if sh is not None:
            if "REOP" in bit:
                sh.single_request_reopen = True
            sh.single_request = True
            sh.retry()           # goto retry / retry_reopen
        return out

    def _on_send_dg_return(self, th, ev):
        th.shadow = None
        return []

    # -- the dump at a step ------------------------------------------------------------------
    def dump(self, ev: Event) -> list[tuple[str, object, str]]:
        """(field, value, provenance) rows for the step just fed: read values as read,
        the rest from the shadow, marked inferred; read-vs-inferred mismatches recorded."""
        th = self.thread(ev.lwp)
        rows: list[tuple[str, object, str]] = [("function", ev.get("function", ev.kind), "probe"),
                                               ("thread", f"{th.lwp} {th.name or ''}".strip(), "register")]
        if th.last_query:
            rows.append(("query", th.last_query, E.INFERRED))
        for key in ("name", "domain", "type", "fd", "len", "events", "revents", "timeout_ms", "n", "id",
                    "rcode", "qdcount"):
            if key in ev.data:
                val = ev.data[key]
                if key in ("events", "revents") and isinstance(val, int):
                    val = f"{decode_poll(val)} ({val:#x})"
                rows.append((key, val, ev.prov.get(key, "register")))
        sh = th.shadow
        inferred = sh.locals() if sh else {}
        for key in ("recvresp1", "recvresp2", "nwritten", "single_request", "single_request_reopen"):
            if ev.read(key):
                rows.append((key, ev.data[key], ev.prov[key]))
                if key in inferred and int(inferred[key]) != int(ev.data[key]):
                    th.mismatches.append(f"{key}: read {ev.data[key]} at {ev.kind}, "
                                         f"inferred {inferred[key]}")
            elif key in inferred:
                rows.append((key, inferred[key], E.INFERRED))
        if th.options is not None:
            rows.append(("statp->options", f"{th.options:#x} {decode_options(th.options)}",
                         ev.prov.get("options", "memory")))
        if th.flags is not None:
            rows.append(("statp->_flags", f"{th.flags:#x} {decode_flags(th.flags)}",
                         ev.prov.get("flags", "memory")))
        return rows

    def thread_summaries(self) -> list[dict]:
        return [dict(t.summary(), **self.sampling.extras(t.lwp))
                for t in sorted(self.threads.values(), key=lambda t: t.lwp)]
