"""Distinct glibc builds on a node: what each is, and whether it has bug 30081.

Processes are grouped by the (dev, inode) of their libc mapping. Per group, one read
of the file's build-id; per build-id, one analysis of its libc and libresolv
(:func:`gdbdiag.glibc.analyzer.analyze_target` — send_dg's bounds, its poll call
sites, and the bug-30081 verdict from its code, cached on disk by build-id) and one
identification of its package (:func:`gdbdiag.symbols.facts.glibc_facts`, which also
cross-checks the verdict with ``debian-symbols/``). Three hundred processes that share
three builds cost three analyses.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from ..procfs import file_maps, mapped_file
from .classify import GlibcProc

_LIBRESOLV = re.compile(r"^libresolv(?:-2\.\d+)?\.so(?:\.2)?$")


@dataclass
class Build:
    build_id: str | None
    keys: set = field(default_factory=set)        # "dev:inode" of the libc files seen
    glibc_version: str | None = None
    package: str | None = None                     # "libc6 2.31-13+deb11u11"
    distro: str | None = None
    affected: bool | None = None                   # bug 30081: this build stalls in sticky mode
    how: str | None = None                         # the analyzer's method ("instruction flow")
    reason: str | None = None                      # the analyzer's reason, in one sentence
    decided_by: str | None = None                  # "code", "code, agrees with debian-symbols", …
    send_dg_object: str | None = None              # "libc" | "libresolv"
    sticky_field: str | None = None                # "options" | "_flags"
    send_dg: dict | None = None                    # {role, build_id, ranges, poll_wait, poll_check}
    analysis_ms: float = 0.0
    identify_ms: float = 0.0
    analysis_cached: bool | None = None            # the analyzer's disk cache answered
    errors: list = field(default_factory=list)
    libc_path: str | None = None
    example_pid: int | None = None

    @property
    def verdict(self) -> str:
        return {True: "affected", False: "fixed"}.get(self.affected, "unknown")

    def to_dict(self) -> dict:
        return {"build_id": self.build_id, "libc_files": sorted(self.keys),
                "libc_path": self.libc_path, "glibc_version": self.glibc_version,
                "package": self.package, "distro": self.distro,
                "bug_30081": self.verdict, "affected": self.affected, "how": self.how,
                "reason": self.reason, "decided_by": self.decided_by,
                "send_dg_object": self.send_dg_object, "sticky_field": self.sticky_field,
                "send_dg": self.send_dg, "analysis_ms": round(self.analysis_ms, 1),
                "identify_ms": round(self.identify_ms, 1),
                "analysis_cached": self.analysis_cached, "errors": self.errors,
                "example_pid": self.example_pid}


def _libc_host_path(p: GlibcProc) -> str | None:
    """The very file mapped, else the path inside the process's root if it is still
    the mapped inode."""
    try:
        inode = int(p.libc_key.rsplit(":", 1)[1])
    except ValueError:
        return None
    return mapped_file(p.pid, p.libc_map[0], p.libc_map[1], p.libc_path, inode)


def _mapped_libresolv(pid: int) -> str | None:
    for m in file_maps(pid):
        p = m.path[:-len(" (deleted)")] if m.path.endswith(" (deleted)") else m.path
        if _LIBRESOLV.match(os.path.basename(p)):
            return p
    return None


def _send_dg_facts(analysis: dict) -> dict | None:
    role = analysis.get("send_dg_object")
    obj = analysis.get(role) if role else None
    if not obj or not obj.get("send_dg"):
        return None
    sd = obj["send_dg"]
    polls = [c for c in obj.get("calls") or [] if c.get("kind") == "poll"]
    return {"role": role, "build_id": obj.get("build_id"),
            "ranges": [[sd["start"], sd["end"]]] + [[c["start"], c["end"]] for c in sd.get("cold") or []],
            "poll_wait": [c["ret_addr"] for c in polls if c.get("site") == "wait"],
            "poll_check": [c["ret_addr"] for c in polls if c.get("site") == "check"]}


class BuildCache:
    """Builds by build-id and libc groups by (dev, inode), for the life of a scanner (a
    whole ``--watch``). ``cache_dir``: the analyzer's disk cache (default: its own)."""

    def __init__(self, cache_dir: str | None = None):
        self.cache_dir = cache_dir
        self.by_id: dict[str, Build] = {}
        self.by_key: dict[str, str] = {}

    def for_group(self, members: list[GlibcProc]) -> Build | None:
        """The build of a libc group, trying its processes in turn (one may exit while
        it is read). None when none of them could be read."""
        key = members[0].libc_key
        if key in self.by_key:
            return self.by_id[self.by_key[key]]
        for p in members:
            b = self._first_sight(p)
            if b is not None:
                b.keys.add(key)
                self.by_key[key] = b.build_id
                return b
        return None

    def _first_sight(self, p: GlibcProc) -> Build | None:
        from ..symbols.elfinfo import read_build_id
        host = _libc_host_path(p)
        if host is None:
            return None
        try:
            bid = read_build_id(host)
        except OSError:
            return None
        bid = bid or f"no-build-id:{p.libc_key}"
        if bid in self.by_id:
            return self.by_id[bid]
        b = self._describe(p, bid)
        if b is not None:
            self.by_id[bid] = b
        return b

    def _describe(self, p: GlibcProc, bid: str) -> Build | None:
        from ..glibc.analyzer import analyze_target
        from ..symbols import identify
        from ..symbols.facts import glibc_facts
        b = Build(build_id=bid, libc_path=p.libc_path, example_pid=p.pid)
        root = f"/proc/{p.pid}/root"
        t0 = time.perf_counter()
        analysis = None
        try:
            res = _mapped_libresolv(p.pid)
            if res is None:         # glibc < 2.34 maps it at the first lookup: find it in the root
                obj = identify.identify_process(p.pid).object("libresolv.so.2")
                res = obj.path if obj is not None else None
            t1 = time.perf_counter()
            b.identify_ms = (t1 - t0) * 1e3
            analysis = analyze_target(root, root + p.libc_path, root + res if res else None,
                                      cache_dir=self.cache_dir)
            b.analysis_ms = (time.perf_counter() - t1) * 1e3
        except Exception as e:      # foreign files: anything may fail; a gone process: retry another
            if not os.path.exists(f"/proc/{p.pid}"):
                return None
            b.errors.append(f"not analyzed: {type(e).__name__}: {e}")
        if analysis is not None:
            role = analysis.get("send_dg_object")
            fix = (analysis.get(role) or {}).get("fix_30081") or {}
            b.how = fix.get("how") or "instruction flow"
            b.reason = fix.get("reason") or analysis.get("unknown_reason")
            b.send_dg_object, b.sticky_field = role, analysis.get("sticky_field")
            b.send_dg = _send_dg_facts(analysis)
            b.analysis_cached = all(analysis[r].get("cached") for r in ("libc", "libresolv") if analysis.get(r))
            b.errors += analysis.get("notes") or []
            b.errors += [w for r in ("libc", "libresolv") if analysis.get(r)
                         for w in analysis[r].get("warnings") or [] if "not cached" in w]
        t2 = time.perf_counter()
        facts = glibc_facts(p.pid, analysis)
        if facts.get("identify_error") and not os.path.exists(f"/proc/{p.pid}"):
            return None                 # it exited meanwhile: the group's next process will do
        b.identify_ms += (time.perf_counter() - t2) * 1e3
        b.glibc_version, b.package, b.distro = facts.get("version"), facts.get("distro_package"), facts.get("distro")
        b.affected, b.decided_by = facts.get("affected_30081"), facts.get("affected_source")
        b.sticky_field = b.sticky_field or facts.get("sticky_field")
        if analysis is None and b.affected is not None:
            b.how = "debian-symbols table (the code was not analyzed)"
        if facts.get("identify_error"):
            b.errors.append("package not identified: " + facts["identify_error"])
        return b
