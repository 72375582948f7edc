"""Findings from sampled observations (passive mode), for the detector.

A passive source reads each thread's ``_res`` and its current syscall from /proc without
stopping it, every few tens of milliseconds, and writes one ``sample`` event per thread
and a ``sampled`` event per snapshot (the threads it saw). From those alone:

* ``sticky_engaged`` -- the single-request bit set in one sample, clear in the one before
  (or already set at the first sample);
* ``doomed_poll`` -- a sticky thread in a resolver wait (``poll``/``ppoll`` of one UDP
  socket for POLLIN with a timeout) on a build known to be affected by bug 30081;
  ``resolver_wait`` for any other resolver wait;
* ``stall`` -- the measured length of a doomed wait (>= 1 s), +- half a sampling gap at
  each end.

A wait counts once it has been seen in ``confirm_samples`` consecutive samples with the
same syscall arguments and the same voluntary context-switch count (an answered short
wait is never reported, and a new poll with identical arguments is told apart). Passive
sampling cannot see send_dg's locals, so "doomed" is an inference from the bit and the
build. Pure: no /proc reading here (``gdbdiag.passive`` does that).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import events as E
from .events import Event
from .flags import decode_flags, decode_options

STALL_MIN_MS = 1000.0
MEMORY, MEASURED = "memory", "measured"


@dataclass
class _PollTrack:
    key: tuple
    first_t: float
    prev_t: float | None            # the snapshot before first sight (the poll began after it)
    last_t: float
    seen: int
    info: dict
    frame_confirmed: bool | None
    sticky: bool
    reported: Event | None = None   # the doomed_poll / resolver_wait emitted for it


@dataclass
class _Sampled:
    sticky: bool | None = None      # None: not sampled yet
    poll: _PollTrack | None = None
    last_wait: tuple | None = None  # (end_t, ms, sticky_at_start) of the last resolver wait
    waits: int = 0
    gone: bool = False


def poll_key(data: dict):
    """One poll call: same syscall and arguments, and no voluntary context switch in
    between (a wakeup) -- a new poll with identical arguments differs in the latter."""
    p = data.get("poll")
    if not (data.get("in_resolver_poll") and p):
        return None
    return (p.get("nr"), tuple(p.get("args") or ()), p.get("nvcsw"), p.get("fd"), p.get("events"))


class SampleTracker:
    """Per-thread tracking of ``sample`` events; findings go back through the detector."""

    def __init__(self, det, affected: bool | None = None, confirm_samples: int = 2):
        self.det = det
        self.affected = affected
        self.confirm_samples = max(1, int(confirm_samples))
        self.state: dict[int, _Sampled] = {}
        self.prev_t: float | None = None        # the previous snapshot's time

    # -- events ---------------------------------------------------------------------------
    def sample(self, th, ev: Event) -> list[Event]:
        st = self.state.setdefault(th.lwp, _Sampled())
        st.gone = False
        key = poll_key(ev.data)
        out = []
        # a wait that just ended first (it may explain a 0 -> 1), then the bit, then a
        # wait that starts or goes on
        if st.poll is not None and key != st.poll.key:
            out += self._end_poll(th, st, ev.t)
        out += self._sticky(th, st, ev)
        out += self._poll(th, st, ev, key)
        return out

    def snapshot(self, ev: Event) -> list[Event]:
        """A snapshot is complete: threads not in it are gone (their wait ended)."""
        seen = set(ev.get("tids") or ())
        out = []
        for tid, st in self.state.items():
            if tid not in seen and not st.gone:
                st.gone = True
                if st.poll is not None:
                    out += self._end_poll(self.det.thread(tid), st, ev.t, "thread exit")
        self.prev_t = ev.t
        return out

    def extras(self, lwp: int) -> dict:
        """What a thread's summary adds in passive mode."""
        st = self.state.get(lwp)
        if st is None:
            return {}
        d = {"resolver_waits": st.waits, "gone": st.gone, "in_poll_ms": None}
        if st.poll is not None and st.poll.seen >= self.confirm_samples:
            d["in_poll_ms"] = round((st.poll.last_t - st.poll.first_t) * 1000.0, 1)
            d["in_poll_doomed"] = bool(st.poll.reported is not None
                                       and st.poll.reported.kind == E.DOOMED_POLL)
        return d

    # -- the single-request bit -------------------------------------------------------------
    def _sticky(self, th, st: _Sampled, ev: Event) -> list[Event]:
        d = ev.data
        th.options, th.flags = d.get("options"), d.get("flags")
        if d.get("resp") is None or d.get("options") is None:
            return []
        sticky = bool(d.get("sticky"))
        if st.sticky is None:
            st.sticky = sticky
            if not sticky:
                return []
            cause = ("already set" if self.prev_t is None
                     else "already set when the thread was first seen")
            return [self._engaged(th, ev, cause, "status")]
        if sticky and not st.sticky:
            st.sticky = True
            cause = "set between two samples (0 -> 1 observed)"
            lw = st.last_wait
            if lw is not None and not lw[2] and lw[1] >= STALL_MIN_MS and ev.t - lw[0] < 2.0:
                cause += f" right after a {lw[1] / 1000.0:.1f} s resolver wait timed out (a lost answer)"
            return [self._engaged(th, ev, cause, "transition")]
        if not sticky and st.sticky:
            # _flags builds clear the switch when resolv.conf is reloaded
            st.sticky = False
            th.sticky, th.sticky_field, th.cause = False, None, "cleared (resolv.conf reload?)"
        return []

    def _engaged(self, th, ev: Event, cause: str, how: str) -> Event:
        d = ev.data
        th.sticky, th.sticky_field, th.since, th.cause = True, d.get("sticky_field"), ev.t, cause
        th.since_how = f"passive:{how}"
        data = {"field": d.get("sticky_field"), "cause": cause, "how": f"passive:{how}",
                "options": d.get("options"), "flags": d.get("flags"),
                "options_decoded": decode_options(d.get("options")),
                "flags_decoded": decode_flags(d.get("flags")),
                "thread_name": d.get("thread_name"), "resp": d.get("resp"),
                "between": [self.prev_t, ev.t] if self.prev_t and how != "status" else None,
                "lost_qname": None, "lost_qtype": None, "qname": None, "qtype": None}
        prov = {k: E.INFERRED for k in data}
        prov.update({"field": MEMORY, "options": MEMORY, "flags": MEMORY, "resp": MEMORY,
                     "thread_name": MEMORY})
        return Event(t=ev.t, lwp=th.lwp, kind=E.STICKY_ENGAGED, data=data, prov=prov)

    # -- resolver waits ----------------------------------------------------------------------
    def _poll(self, th, st: _Sampled, ev: Event, key) -> list[Event]:
        if key is None:
            return []
        d, tr = ev.data, st.poll
        if tr is None:
            st.poll = tr = _PollTrack(key=key, first_t=ev.t, prev_t=self.prev_t, last_t=ev.t,
                                      seen=1, info=dict(d["poll"]),
                                      frame_confirmed=d.get("frame_confirmed"),
                                      sticky=bool(d.get("sticky")))
        else:
            tr.seen += 1
            tr.last_t = ev.t
            tr.sticky = tr.sticky or bool(d.get("sticky"))
            if tr.frame_confirmed is None:
                tr.frame_confirmed = d.get("frame_confirmed")
        if tr.reported is not None or tr.seen < self.confirm_samples:
            return []
        tr.reported = self._wait_found(th, st, tr, d)
        return [tr.reported]

    def _wait_found(self, th, st: _Sampled, tr: _PollTrack, d: dict) -> Event:
        sticky = bool(d.get("sticky"))
        p = tr.info
        data = {"predicted_ms": p.get("timeout_ms"), "fd": p.get("fd"), "events": p.get("events"),
                "timeout_ms": p.get("timeout_ms"), "pfd": p.get("pfd"),
                "udp_inode": p.get("udp_inode"), "frame_confirmed": tr.frame_confirmed,
                "sticky": sticky, "sticky_field": d.get("sticky_field"),
                "thread_name": d.get("thread_name"), "since": tr.first_t, "qname": None,
                "waiting_for": None, "error_rcode": None, "stack": [], "lookup": None}
        if sticky and self.affected is True:
            data["reason"] = ("single-request thread in a POLLIN resolver wait on an affected "
                              "build (passive: send_dg's state not visible; the wait can only "
                              "end by timeout if the first answer was an error)")
            kind = E.DOOMED_POLL
            th.doomed += 1
        else:
            data["reason"] = ("resolver wait (POLLIN on a UDP socket)"
                              + ("; sticky, build not known to stall" if sticky else ""))
            kind = E.RESOLVER_WAIT
            st.waits += 1
        prov = {k: E.INFERRED for k in data}
        prov.update({k: MEMORY for k in ("fd", "events", "pfd", "sticky", "sticky_field",
                                          "thread_name", "udp_inode")})
        prov.update({"predicted_ms": "register", "timeout_ms": "register"})
        return Event(t=tr.first_t, lwp=th.lwp, kind=kind, data=data, prov=prov)

    def _end_poll(self, th, st: _Sampled, t_seen_gone: float,
                  ended_by: str = "syscall changed") -> list[Event]:
        tr, st.poll = st.poll, None
        if tr is None:
            return []
        start = tr.first_t if tr.prev_t is None else (tr.prev_t + tr.first_t) / 2.0
        end = (tr.last_t + t_seen_gone) / 2.0
        ms = (end - start) * 1000.0
        st.last_wait = (end, ms, tr.sticky)
        if tr.reported is None or tr.reported.kind != E.DOOMED_POLL or ms < STALL_MIN_MS:
            return []
        pred = tr.info.get("timeout_ms")
        # +- half a sampling gap at each end; a wait already running at the first sample
        # has no known start: the measurement is then a lower bound
        err = (t_seen_gone - tr.last_t) / 2.0 + (0.0 if tr.prev_t is None else (tr.first_t - tr.prev_t) / 2.0)
        ev = Event(t=end, lwp=th.lwp, kind=E.STALL, data={
            "measured_ms": round(ms, 1), "predicted_ms": pred,
            "error_ms": round(err * 1000.0, 1), "lower_bound": tr.prev_t is None,
            "timed_out": bool(pred and ms >= 0.9 * pred), "ended_by": ended_by,
            "n": None, "qname": None, "lookup": None, "thread_name": th.name,
            "frame_confirmed": tr.frame_confirmed})
        ev.prov = {k: E.INFERRED for k in ev.data}
        ev.prov.update({"measured_ms": MEASURED, "predicted_ms": "register", "thread_name": MEMORY})
        th.stalls += 1
        th.last_stall_ms = ev.data["measured_ms"]
        self.det.stalls.append({"lwp": th.lwp, "thread": th.name, "qname": None, "lookup": None,
                                "predicted_ms": pred, "measured_ms": ev.data["measured_ms"],
                                "t": tr.reported.t})
        return [ev]
