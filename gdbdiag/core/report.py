"""The JSON report (schema ``gdbdiag.report/1``), built from the detector's state.

Documented in docs/report-schema.md. Pure: the plugin and the batch runner both use it.
"""
from __future__ import annotations

import time

from . import events as E
from .verdict import decide

SCHEMA = "gdbdiag.report/1"


def _event_row(ev: E.Event, names: dict) -> dict:
    d = ev.data
    row = {"t": ev.t, "lwp": ev.lwp, "thread": names.get(ev.lwp), "kind": ev.kind,
           "qname": d.get("qname"), "qtype": d.get("qtype"), "rcode": d.get("rcode")}
    if "q1" in d and d.get("q1"):
        row["qname"], row["qtype"] = d["q1"].get("qname"), d["q1"].get("qtype")
        row["queries"] = [q for q in (d.get("q1"), d.get("q2")) if q]
    if ev.kind in (E.POLL_ENTER, E.POLL_RETURN, E.DOOMED_POLL):
        row["poll"] = {k: d.get(k) for k in ("fd", "events", "revents", "timeout_ms", "n")}
        if ev.kind == E.DOOMED_POLL:
            row["poll"]["timeout_ms"] = d.get("predicted_ms")
    for k in ("recvresp1", "recvresp2", "nwritten", "single_request", "single_request_reopen",
              "predicted_ms", "measured_ms", "cause", "reason", "field", "lost_qname",
              "lost_qtype", "waiting_for", "error_rcode", "n", "id", "options", "flags",
              "function", "name", "domain", "stack", "waited_ms", "how", "lookup", "source"):
        if k in d and d[k] is not None:
            row[k] = d[k]
    row["provenance"] = dict(ev.prov)
    if ev.pc is not None:
        row["pc"] = ev.pc
    return row


def build(detector, target: dict, glibc: dict, symbols: dict, observations: list,
          include_observations: bool = True, started: float | None = None) -> dict:
    threads = detector.thread_summaries()
    names = {t["lwp"]: t.get("name") for t in threads}
    verdict = decide(threads, detector.findings, glibc)
    rows = []
    evs = (list(observations) if include_observations else []) + list(detector.findings)
    evs.sort(key=lambda e: e.t)
    for ev in evs:
        rows.append(_event_row(ev, names))
    return {
        "schema": SCHEMA,
        "generated": time.time(),
        "started": started,
        "target": target,
        "glibc": glibc,
        "symbols": symbols,
        "events": rows,
        "threads": [{"lwp": t["lwp"], "lwp_target": target.get("lwp_map", {}).get(str(t["lwp"])),
                     "name": t.get("name"), "sticky": t["sticky"], "since": t.get("since"),
                     "since_how": t.get("since_how"),
                     "cause": t.get("cause"), "sticky_field": t.get("sticky_field"),
                     "options": t.get("options"), "flags": t.get("flags"),
                     "last_query": t.get("last_query"), "stalls": t.get("stalls"),
                     "doomed_polls": t.get("doomed_polls"), "stack": t.get("stack"),
                     "resolver_seen": t.get("options") is not None}
                    for t in threads],
        "stalls": [{"lwp": s["lwp"], "thread": s.get("thread"), "qname": s.get("qname"),
                    "lookup": s.get("lookup"), "predicted_ms": s.get("predicted_ms"),
                    "measured_ms": s.get("measured_ms"), "t": s.get("t")}
                   for s in detector.stalls],
        "verdict": verdict,
        # doomed-poll predictions withdrawn because the poll was answered after all, and
        # probe records the kernel could not write (the stream then had gaps)
        "refuted": [{"t": f.t, "lwp": f.lwp, "why": f.get("refuted")}
                    for f in getattr(detector, "refuted", [])],
        "records_lost": getattr(detector, "records_lost", 0),
    }
