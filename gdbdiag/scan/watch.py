"""``--watch SECONDS``: a pass every SECONDS, one JSON line per transition.

Events (``"event"`` key; every line also has ``time``, and ``pid``/``tid`` where they
apply):

* ``watch_started`` — the first pass's totals and builds;
* ``build_seen`` — a glibc build seen for the first time (after the first pass);
* ``process_appeared`` / ``process_exited`` — glibc processes coming and going (a
  process is its (PID, start time): a recycled PID is a new process);
* ``thread_sticky`` — a thread's sticky single-request bit is set (``"already": true``
  when it was set the first time the thread was seen), ``thread_unsticky`` — cleared
  (``_flags`` builds clear it when resolv.conf is reloaded);
* ``stall_began`` — a thread has been in send_dg's poll for >= 1 s (``since_ms``, a lower
  bound; ``doomed`` on an affected build when the thread is sticky);
* ``stall_ended`` — that wait is over: ``duration_ms`` (lower bound) and
  ``duration_max_ms`` (upper bound, from the pass before and the poll's own timeout),
  ``duration_estimate_ms`` their middle; ``duration_kind`` is ``measured`` when the two
  agree within 10 % (or 250 ms), else ``lower_bound``; ``timed_out`` when the lower
  bound is >= 90 % of the poll's timeout; ``ended_by`` says how it was seen to end.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from ..passive import STALL_MIN_MS


@dataclass
class _Wait:
    key: tuple
    pid: int
    tid: int
    name: str | None
    first_t: float             # pass time when first seen
    start_max: float           # it began no later than this (read time - since)
    start_min: float | None    # and after this (the start of the last pass that saw the thread not in it)
    last_t: float              # last read in the wait
    timeout_ms: int
    doomed: bool
    sticky: bool
    reported: bool = False


class Watcher:
    """Turns consecutive reports into transition events (pure: no /proc access)."""

    def __init__(self, emit=None):
        self.emit = emit or (lambda ev: print(json.dumps(ev, default=str), flush=True))
        self.procs: dict[tuple, dict] = {}          # (pid, starttime) -> last record
        self.sticky: dict[tuple, str | None] = {}   # (pid, tid) -> field
        self.waits: dict[tuple, _Wait] = {}         # (pid, tid) -> open wait
        self.builds: set = set()
        self.last_t: float | None = None
        self.t_end: float = 0.0
        self.counters = {"sticky_transitions": 0, "stalls": 0, "passes": 0}

    def feed(self, rep: dict) -> list[dict]:
        t = rep["time"]
        # every thread of this pass was read between t and t_end
        self.t_end = t + (rep.get("timing") or {}).get("total_ms", 0.0) / 1000.0
        out: list[dict] = []
        first = self.last_t is None
        cur = {(p["pid"], p["starttime"]): p for p in rep["processes"]}
        if first:
            out.append({"event": "watch_started", "totals": rep["totals"],
                        "skipped": rep["skipped"]["counts"], "selection": rep["selection"],
                        "builds": [_build_brief(b) for b in rep["builds"]]})
        for b in rep["builds"]:
            if b["build_id"] not in self.builds and not first:
                out.append(dict(_build_brief(b), event="build_seen"))
            self.builds.add(b["build_id"])
        for ident, p in self.procs.items():        # exits first: a PID may be reused
            if ident not in cur:
                self._close_waits(p["pid"], None, self.t_end, "process exited", out)
                out.append({"event": "process_exited", "pid": p["pid"], "comm": p["comm"],
                            "container": p["container"]})
                for k in [k for k in self.sticky if k[0] == p["pid"]]:
                    del self.sticky[k]
        for ident, p in cur.items():
            if ident not in self.procs and not first:
                out.append({"event": "process_appeared", "pid": p["pid"], "comm": p["comm"],
                            "container": p["container"], "build_id": p["build_id"],
                            "threads": len(p["threads"])})
            self._threads(p, t, first, ident in self.procs, out)
        self.procs, self.last_t = cur, t
        self.counters["passes"] += 1
        for ev in out:
            ev.setdefault("time", t)
            self.emit(ev)
        return out

    def _threads(self, p: dict, t: float, first: bool, known: bool, out: list) -> None:
        pid = p["pid"]
        tids = {th["tid"] for th in p["threads"]}
        for th in p["threads"]:
            k = (pid, th["tid"])
            if th["sticky"] and k not in self.sticky:
                already = first or not known
                out.append({"event": "thread_sticky", "pid": pid, "tid": th["tid"],
                            "thread": th["name"], "comm": p["comm"], "container": p["container"],
                            "field": th["sticky_field"], "options": th["options"],
                            "flags": th["flags"], "build_id": p["build_id"], "already": already})
                self.sticky[k] = th["sticky_field"]
                if not already:
                    self.counters["sticky_transitions"] += 1
            elif th["sticky"] is False and k in self.sticky:
                out.append({"event": "thread_unsticky", "pid": pid, "tid": th["tid"],
                            "thread": th["name"], "field": self.sticky.pop(k)})
            self._wait(p, th, t, known, out)
        for k in [k for k in self.waits if k[0] == pid and k[1] not in tids]:
            self._end(self.waits.pop(k), self.t_end, "thread exited", out)
        for k in [k for k in self.sticky if k[0] == pid and k[1] not in tids]:
            del self.sticky[k]

    def _wait(self, p: dict, th: dict, t: float, known: bool, out: list) -> None:
        k = (p["pid"], th["tid"])
        w = th["wait"] if th["wait"] and th["wait"]["confirmed"] else None
        key = None if w is None else (tuple(w["args"] or ()), w["nvcsw"], w["fd"])
        open_ = self.waits.get(k)
        if open_ is not None and open_.key != key:
            self._end(self.waits.pop(k), self.t_end, "returned (the thread left this poll)", out)
            open_ = None
        if w is None:
            return
        since = w["since_ms"]
        seen = w.get("seen_at") or t           # when this thread was read in the wait
        if open_ is None:
            start_max = seen - (since or 0.0) / 1000.0
            start_min = self.last_t if (known and self.last_t is not None) else None
            open_ = self.waits[k] = _Wait(key, p["pid"], th["tid"], th["name"], t, start_max,
                                          start_min, seen, w["timeout_ms"], False,
                                          bool(th["sticky"]))
        else:
            open_.last_t = seen
            if since is not None:
                open_.start_max = min(open_.start_max, seen - since / 1000.0)
        age_ms = (seen - open_.start_max) * 1000.0
        if age_ms >= STALL_MIN_MS:    # a sticky thread's wait on an affected build, >= 1 s old
            open_.doomed = open_.doomed or bool(w.get("sticky_on_affected_build", w["doomed"]))
        if not open_.reported and age_ms >= STALL_MIN_MS:
            open_.reported = True
            out.append({"event": "stall_began", "pid": p["pid"], "tid": th["tid"],
                        "thread": th["name"], "comm": p["comm"], "container": p["container"],
                        "since_ms": round(age_ms, 1), "since_kind": "lower_bound",
                        "began_at": round(open_.start_max, 3), "fd": w["fd"],
                        "timeout_ms": w["timeout_ms"], "sticky": bool(th["sticky"]),
                        "doomed": open_.doomed, "evidence": w["evidence"]})

    def _close_waits(self, pid: int, tid, t: float, why: str, out: list) -> None:
        for k in [k for k in self.waits if k[0] == pid and (tid is None or k[1] == tid)]:
            self._end(self.waits.pop(k), t, why, out)

    def _end(self, w: _Wait, t: float, why: str, out: list) -> None:
        if not w.reported:
            return
        lo = (w.last_t - w.start_max) * 1000.0
        hi = None if w.start_min is None else (t - w.start_min) * 1000.0
        if w.timeout_ms and w.timeout_ms > 0:
            hi = w.timeout_ms if hi is None else min(hi, float(w.timeout_ms))
        hi = None if hi is None else max(hi, lo)
        measured = hi is not None and hi - lo <= max(0.1 * lo, 250.0)
        self.counters["stalls"] += 1
        out.append({"event": "stall_ended", "pid": w.pid, "tid": w.tid, "thread": w.name,
                    "duration_ms": round(lo, 1),
                    "duration_max_ms": None if hi is None else round(hi, 1),
                    "duration_estimate_ms": None if hi is None else round((lo + hi) / 2, 1),
                    "duration_kind": "measured" if measured else "lower_bound",
                    "timed_out": bool(w.timeout_ms and lo >= 0.9 * w.timeout_ms),
                    "timeout_ms": w.timeout_ms, "doomed": w.doomed, "sticky": w.sticky,
                    "ended_by": why})

    def prom_counters(self) -> dict:
        c = self.counters
        return {"sticky_transitions": ("Threads seen to become sticky while watching",
                                       c["sticky_transitions"]),
                "stalls": ("Resolver stalls (>= 1 s in send_dg's poll) seen to end", c["stalls"]),
                "scan_passes": ("Passes made", c["passes"])}


def _build_brief(b: dict) -> dict:
    return {"build_id": b["build_id"], "glibc_version": b["glibc_version"], "package": b["package"],
            "bug_30081": b["bug_30081"], "how": b["how"], "decided_by": b["decided_by"],
            "sticky_field": b["sticky_field"], "processes": b["processes"]}


def run(scanner, interval: float, passes: int | None = None, prom_path: str | None = None,
        stop=None, emit=None) -> Watcher:
    """Scan every ``interval`` seconds until ``passes`` are done or ``stop()`` is true."""
    from . import prom
    w = Watcher(emit)
    n = 0
    while True:
        tick = time.monotonic()
        rep = scanner.scan()
        w.feed(rep)
        if prom_path:
            prom.write(prom_path, rep, w.prom_counters())
        n += 1
        if (passes is not None and n >= passes) or (stop is not None and stop()):
            break
        deadline = tick + interval
        while time.monotonic() < deadline:
            if stop is not None and stop():
                return w
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        sys.stdout.flush()
    return w
