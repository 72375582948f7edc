"""One scan pass over the selected processes, and the state kept between passes.

A :class:`Scanner` lives for one ``gdbdiag scan`` (one pass) or a whole ``--watch``
(many): its caches — builds by build-id and libc groups by (dev, inode), the
:class:`~gdbdiag.passive.FileFacts` memo of ELF facts, and (``keep_samplers``) one open
``/proc/PID/mem`` sampler per live process — make every pass after the first cheap.
"""
from __future__ import annotations

import os
import socket
import time
from collections import Counter

from ..passive import FileFacts, PassiveSampler
from . import SCHEMA
from .builds import BuildCache
from .classify import GlibcProc, Skip, classify
from .clock import SchedClock
from .targets import Selection
from .threads import open_sampler, read_process


class Scanner:
    def __init__(self, selection: Selection, analysis_cache: str | None = None,
                 keep_samplers: bool = False, before_read=None):
        self.selection = selection
        self.builds = BuildCache(analysis_cache)
        # no debug files: a node has none, and the analyzer gives send_dg's bounds
        self.files = FileFacts(debug_files=False)
        self.clock = SchedClock()
        self.keep = keep_samplers
        self.samplers: dict[tuple, PassiveSampler] = {}     # by GlibcProc.image
        self.before_read = before_read      # hook(GlibcProc) just before its memory is read
        self.passes = 0

    def close(self):
        for smp in self.samplers.values():
            smp.close()
        self.samplers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------------------------------
    def scan(self) -> dict:
        """One pass: the report (schema gdbdiag.scan/1) as a dict."""
        t0, now = time.perf_counter(), time.time()
        procs, skipped = [], []
        for pid, container in self.selection.select():
            c = classify(pid, container)
            (procs if isinstance(c, GlibcProc) else skipped).append(c)
        t1 = time.perf_counter()
        groups: dict[str, list[GlibcProc]] = {}
        for p in procs:
            groups.setdefault(p.libc_key, []).append(p)
        builds_before = {bid: (b.analysis_ms, b.identify_ms) for bid, b in self.builds.by_id.items()}
        build_of = {key: self.builds.for_group(members) for key, members in groups.items()}
        t2 = time.perf_counter()
        records, live = [], set()
        for p in procs:
            r = self._read(p, build_of.get(p.libc_key))
            if isinstance(r, Skip):
                skipped.append(r)
            else:
                records.append(r)
                live.add(p.image)
        for ident in [i for i in self.samplers if i not in live]:
            self.samplers.pop(ident).close()
        t3 = time.perf_counter()
        self.passes += 1
        timing = {"total_ms": (t3 - t0) * 1e3, "classify_ms": (t1 - t0) * 1e3,
                  "builds_ms": (t2 - t1) * 1e3, "read_ms": (t3 - t2) * 1e3,
                  "new_builds": sorted(set(self.builds.by_id) - set(builds_before)),
                  "file_facts": {"hits": self.files.hits, "misses": self.files.misses}}
        return self._report(now, records, skipped, build_of, timing)

    def _read(self, p: GlibcProc, build) -> dict | Skip:
        if self.before_read is not None:
            self.before_read(p)
        smp = self.samplers.get(p.image)
        try:
            if smp is None:
                smp = open_sampler(p, build, self.files)
                if isinstance(smp, Skip):
                    return smp
            r = read_process(p, smp, build, self.clock)
        except Exception as e:      # a racing exit can surface anywhere in the reads
            if smp is not None and not isinstance(smp, Skip):
                smp.close()
            self.samplers.pop(p.image, None)
            if not os.path.exists(f"/proc/{p.pid}"):
                return Skip(p.pid, "exited", "exited while being read", p.comm, p.container)
            return Skip(p.pid, "no_resolver_state", f"{type(e).__name__}: {e}", p.comm, p.container)
        if self.keep and not isinstance(r, Skip):
            self.samplers[p.image] = smp
        else:
            self.samplers.pop(p.image, None)
            smp.close()
        return r

    # -------------------------------------------------------------------------------------
    def _report(self, now, records, skipped, build_of, timing) -> dict:
        per_build = Counter(r["build_id"] for r in records)
        builds = []
        for b in {id(b): b for b in build_of.values() if b is not None}.values():
            d = b.to_dict()
            d["processes"] = per_build.get(b.build_id, 0)
            builds.append(d)
        builds.sort(key=lambda d: (-d["processes"], d["build_id"] or ""))
        threads = [t for r in records for t in r["threads"]]
        waits = [t["wait"] for t in threads if t["wait"] and t["wait"]["confirmed"]]
        n = len(records) + len(skipped)
        timing = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in timing.items()}
        timing["per_process_ms"] = round(timing["total_ms"] / n, 3) if n else None
        timing["per_scanned_process_ms"] = (round(timing["read_ms"] / len(records), 3)
                                            if records else None)
        return {
            "schema": SCHEMA, "time": now, "host": socket.gethostname(),
            "selection": self.selection.describe(), "pass": self.passes,
            "builds": builds,
            "processes": sorted(records, key=lambda r: r["pid"]),
            "skipped": {"counts": dict(sorted(Counter(s.reason for s in skipped).items())),
                        "processes": [s.to_dict() for s in sorted(skipped, key=lambda s: s.pid)]},
            "totals": {"processes_seen": n, "processes_scanned": len(records),
                       "processes_skipped": len(skipped), "threads": len(threads),
                       "sticky_threads": sum(1 for t in threads if t["sticky"]),
                       "sticky_processes": sum(1 for r in records if r["sticky_threads"]),
                       "resolver_waits": len(waits),
                       "stalls": sum(1 for w in waits if w["stall"]),
                       "doomed_waits": sum(1 for w in waits if w["doomed"]),
                       "builds": len(builds),
                       "affected_builds": sum(1 for b in builds if b["affected"] is True)},
            "timing": timing,
            "no_ptrace": "every value was read from /proc (files and /proc/PID/mem); no process "
                         "was attached, stopped or signalled",
        }
