"""The scan report as text tables (tabulate when importable) and as JSON."""
from __future__ import annotations

import json

try:
    from tabulate import tabulate as _tabulate
except ImportError:          # pragma: no cover - tabulate is a dependency, but optional here
    _tabulate = None


def table(rows: list[list], headers: list[str]) -> str:
    if _tabulate is not None:
        return _tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip()   # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * x for x in w)] + [line(r) for r in cells[1:]])


def _short(bid: str | None) -> str:
    return (bid or "?")[:12]


def _verdict(b: dict) -> str:
    v = {"affected": "AFFECTED", "fixed": "fixed"}.get(b["bug_30081"], "unknown")
    return v + (f" ({b['how']})" if b.get("how") else "")


def builds_table(rep: dict) -> str:
    rows = [[_short(b["build_id"]), b["glibc_version"] or "?", b["package"] or "?",
             _verdict(b), b["decided_by"] or "-", b["sticky_field"] or "?",
             b["send_dg_object"] or "-", b["processes"]] for b in rep["builds"]]
    return table(rows, ["build-id", "glibc", "package", "bug 30081", "decided by",
                        "sticky field", "send_dg in", "processes"])


def _wait_text(w: dict | None) -> str:
    if not w or not w["confirmed"]:
        return ""
    age = (f"{w['since_ms'] / 1000:.1f} s+" if w["since_ms"] is not None else "age ?")
    kind = "DOOMED poll" if w["doomed"] else ("stall" if w["stall"] else "resolver wait")
    return f"{kind} {age} (fd {w['fd']}, timeout {w['timeout_ms']} ms)"


def threads_table(rep: dict, every: bool = False) -> tuple[str, int]:
    rows = []
    for p in rep["processes"]:
        for t in p["threads"]:
            w = t["wait"] if t["wait"] and t["wait"]["confirmed"] else None
            if not (every or t["sticky"] or w):
                continue
            sticky = {True: "STICKY", False: "no", None: "?"}[t["sticky"]]
            rows.append([p["pid"], t["tid"], p["comm"], t["name"], p["container"] or "-",
                         _short(p["build_id"]), sticky, t["sticky_field"] or "", _wait_text(w)])
    return table(rows, ["pid", "tid", "process", "thread", "container", "build",
                        "sticky", "field", "resolver wait now"]), len(rows)


def skipped_line(rep: dict) -> str:
    c = rep["skipped"]["counts"]
    if not c:
        return "skipped: none"
    return (f"skipped {sum(c.values())} processes: "
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])))


def text(rep: dict, every_thread: bool = False) -> str:
    t = rep["totals"]
    out = [f"== glibc builds ({t['builds']}, {t['affected_builds']} affected by bug 30081)",
           builds_table(rep), ""]
    tt, n = threads_table(rep, every_thread)
    what = "every thread" if every_thread else "threads that are sticky or in a resolver wait"
    out += [f"== {what}: {n}", tt if n else "(none)", ""]
    out.append(f"scanned {t['processes_scanned']} processes ({t['threads']} threads) of "
               f"{t['processes_seen']} in {rep['timing']['total_ms'] / 1000:.2f} s; "
               f"{t['sticky_threads']} sticky thread(s) in {t['sticky_processes']} process(es), "
               f"{t['resolver_waits']} resolver wait(s) now ({t['doomed_waits']} doomed); "
               "no process was stopped (no ptrace)")
    out.append(skipped_line(rep))
    return "\n".join(out)


def to_json(rep: dict, indent: int | None = 1) -> str:
    return json.dumps(rep, indent=indent, default=str)
