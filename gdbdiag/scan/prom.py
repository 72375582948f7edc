"""The scan report in the Prometheus text format, for node-exporter's textfile
collector (``--collector.textfile.directory``): written with prometheus-client to a
temporary file beside the target and renamed over it (atomic: the collector never reads
half a file).

Series (labels in braces); thread-level series exist only for threads that are sticky
or in a resolver wait, so a healthy node exports a handful of series:

* ``gdbdiag_glibc_build_info{build_id,glibc_version,package,bug30081,decided_by,sticky_field,send_dg_object} 1``
* ``gdbdiag_glibc_build_affected{build_id}`` 1 affected by bug 30081, 0 fixed (absent: unknown)
* ``gdbdiag_glibc_build_processes{build_id}``
* ``gdbdiag_thread_sticky{pid,tid,process,thread,container,build_id,field} 1``
* ``gdbdiag_thread_resolver_wait_seconds{pid,tid,process,thread,container,build_id,doomed}``
  (how long the wait has lasted so far, a lower bound; 0 when unknown)
* ``gdbdiag_sticky_threads``, ``gdbdiag_sticky_processes``, ``gdbdiag_resolver_waits``,
  ``gdbdiag_doomed_waits``, ``gdbdiag_affected_builds``
* ``gdbdiag_scan_processes{result="scanned"|"skipped"}``,
  ``gdbdiag_scan_skipped_processes{reason}``, ``gdbdiag_scan_threads``,
  ``gdbdiag_scan_duration_seconds``, ``gdbdiag_scan_timestamp_seconds``
* with ``--watch``: ``gdbdiag_sticky_transitions_total``, ``gdbdiag_stalls_total``
  (stalls seen to end), ``gdbdiag_scan_passes_total``
"""
from __future__ import annotations

import os

from ..errors import EXIT_USAGE, GdbdiagError
from .classify import REASONS

P = "gdbdiag_"


def check_path(path: str) -> None:
    """Bad ``--prom`` paths are refused before anything runs."""
    d = os.path.dirname(os.path.abspath(path))
    if not path.endswith(".prom"):
        raise GdbdiagError(f"--prom {path}: the textfile collector reads only *.prom files", EXIT_USAGE)
    if not os.path.isdir(d):
        raise GdbdiagError(f"--prom {path}: no directory {d}", EXIT_USAGE)
    if not os.access(d, os.W_OK):
        raise GdbdiagError(f"--prom {path}: directory {d} is not writable", EXIT_USAGE)


def registry(rep: dict, counters: dict | None = None):
    from prometheus_client import CollectorRegistry, Gauge
    reg = CollectorRegistry()

    def g(name, doc, labels=()):
        return Gauge(P + name, doc, list(labels), registry=reg)

    info = g("glibc_build_info", "A glibc build seen on the node (value 1)",
             ("build_id", "glibc_version", "package", "bug30081", "decided_by", "sticky_field",
              "send_dg_object"))
    aff = g("glibc_build_affected", "1: this build stalls in sticky single-request mode "
            "(glibc bug 30081), 0: fixed; absent: unknown", ("build_id",))
    nproc = g("glibc_build_processes", "Processes scanned that map this build", ("build_id",))
    for b in rep["builds"]:
        bid = b["build_id"] or ""
        info.labels(bid, b["glibc_version"] or "", b["package"] or "", b["bug_30081"],
                    b["decided_by"] or "", b["sticky_field"] or "", b["send_dg_object"] or "").set(1)
        if b["affected"] is not None:
            aff.labels(bid).set(1 if b["affected"] else 0)
        nproc.labels(bid).set(b["processes"])
    _thread_series(g, rep)
    _totals(g, rep)
    if counters:
        from prometheus_client import Counter
        for name, (doc, value) in counters.items():
            c = Counter(P + name, doc, registry=reg)
            c.inc(value)
    return reg


def _thread_series(g, rep: dict) -> None:
    lab = ("pid", "tid", "process", "thread", "container", "build_id")
    sticky = g("thread_sticky", "A thread whose resolver state has the sticky "
               "single-request bit (value 1)", lab + ("field",))
    wait = g("thread_resolver_wait_seconds", "A thread blocked in send_dg's poll now: "
             "seconds so far (a lower bound; 0 when unknown)", lab + ("doomed",))
    for p in rep["processes"]:
        for t in p["threads"]:
            base = (str(p["pid"]), str(t["tid"]), p["comm"] or "", t["name"] or "",
                    p["container"] or "", p["build_id"] or "")
            if t["sticky"]:
                sticky.labels(*base, t["sticky_field"] or "").set(1)
            w = t["wait"]
            if w and w["confirmed"]:
                wait.labels(*base, "true" if w["doomed"] else "false").set((w["since_ms"] or 0) / 1000)


def _totals(g, rep: dict) -> None:
    t = rep["totals"]
    for name, key, doc in (("sticky_threads", "sticky_threads", "Threads in sticky single-request mode"),
                           ("sticky_processes", "sticky_processes", "Processes with a sticky thread"),
                           ("resolver_waits", "resolver_waits", "Threads in send_dg's poll now"),
                           ("doomed_waits", "doomed_waits", "Resolver waits that can only time out "
                            "(sticky thread, affected build, >= 1 s)"),
                           ("affected_builds", "affected_builds", "glibc builds with bug 30081 in use"),
                           ("scan_threads", "threads", "Threads read")):
        g(name, doc).set(t[key])
    procs = g("scan_processes", "Processes seen by the last pass", ("result",))
    procs.labels("scanned").set(t["processes_scanned"])
    procs.labels("skipped").set(t["processes_skipped"])
    sk = g("scan_skipped_processes", "Processes not read, by reason", ("reason",))
    counts = rep["skipped"]["counts"]
    for r in sorted(set(REASONS) | set(counts)):
        sk.labels(r).set(counts.get(r, 0))
    g("scan_duration_seconds", "Duration of the last pass").set(rep["timing"]["total_ms"] / 1000)
    g("scan_timestamp_seconds", "When the last pass started (Unix time)").set(rep["time"])


def write(path: str, rep: dict, counters: dict | None = None) -> None:
    """Write the report's metrics to ``path`` atomically (temporary file + rename)."""
    from prometheus_client import write_to_textfile
    try:
        write_to_textfile(path, registry(rep, counters))
    except OSError as e:
        raise GdbdiagError(f"cannot write {path}: {e.strerror or e}") from None
