"""How fast a scan is: ``gdbdiag scan --bench`` (the processes there are) and
``scripts/bench-scan`` (``python -m gdbdiag.scan.bench``: starts lab containers of the
three Debian releases, each running the resolver workload plus many small glibc
processes, scans the whole node, prints the figures, removes the labs).

Three runs over the same processes:

* **cold** — a new scanner and an empty analyzer cache (a fresh temporary directory):
  every build is analyzed from its code, every ELF fact read;
* **disk-warm** — a new scanner, the analyzer's disk cache filled by the cold run: what
  a restarted DaemonSet pod pays;
* **watch** — a ``--watch`` scanner's third pass (builds, groups and ELF facts in memory,
  one open ``/proc/PID/mem`` sampler per process kept): what every pass after the first
  costs.

The OS page cache is warm in all three (the files were just read). Figures are printed,
never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from .render import table


RUNS = ("cold", "disk-warm", "watch")


def _run(sel, cache_dir: str, passes: int = 1, keep: bool = False) -> list[dict]:
    from .scanner import Scanner
    out = []
    with Scanner(sel, analysis_cache=cache_dir, keep_samplers=keep) as sc:
        for _ in range(passes):
            out.append(sc.scan())
    return out


def measure(sel) -> dict:
    with tempfile.TemporaryDirectory(prefix="gdbdiag-bench-") as d:
        cold = _run(sel, d)[0]
        disk = _run(sel, d)[0]
        watch = _run(sel, d, passes=3, keep=True)[-1]
    return {"cold": cold, "disk-warm": disk, "watch": watch}


def figures(runs: dict) -> dict:
    out = {}
    for name, rep in runs.items():
        t, tm = rep["totals"], rep["timing"]
        out[name] = {"total_s": round(tm["total_ms"] / 1000, 3),
                     "processes_seen": t["processes_seen"], "scanned": t["processes_scanned"],
                     "skipped": t["processes_skipped"], "threads": t["threads"],
                     "per_process_ms": tm["per_process_ms"],
                     "per_scanned_process_read_ms": tm["per_scanned_process_ms"],
                     "classify_ms": tm["classify_ms"], "builds_ms": tm["builds_ms"],
                     "read_ms": tm["read_ms"], "builds": t["builds"]}
    out["builds"] = [{"build_id": b["build_id"], "glibc": b["glibc_version"], "package": b["package"],
                      "bug_30081": b["bug_30081"], "processes": b["processes"],
                      "cold_analysis_ms": b["analysis_ms"], "cold_identify_ms": b["identify_ms"],
                      "disk_warm_analysis_ms": next((x["analysis_ms"] for x in runs["disk-warm"]["builds"]
                                                     if x["build_id"] == b["build_id"]), None)}
                     for b in runs["cold"]["builds"]]
    out["skipped"] = runs["cold"]["skipped"]["counts"]
    return out


def format_figures(f: dict) -> str:
    rows = [[n, f[n]["total_s"], f[n]["processes_seen"], f[n]["scanned"], f[n]["threads"],
             f[n]["per_process_ms"], f[n]["per_scanned_process_read_ms"],
             round(f[n]["classify_ms"]), round(f[n]["builds_ms"]), round(f[n]["read_ms"])]
            for n in RUNS]
    out = [table(rows, ["run", "total s", "processes", "glibc", "threads", "ms/process",
                        "read ms/glibc process", "classify ms", "builds ms", "read ms"]), ""]
    rows = [[(b["build_id"] or "?")[:12], b["glibc"], b["package"], b["bug_30081"], b["processes"],
             b["cold_analysis_ms"], b["disk_warm_analysis_ms"], b["cold_identify_ms"]]
            for b in f["builds"]]
    out += [table(rows, ["build-id", "glibc", "package", "bug 30081", "processes",
                         "analysis ms (cold)", "analysis ms (disk cache)", "identify ms"]), ""]
    out.append("skipped (cold run): " + (", ".join(f"{k} {v}" for k, v in f["skipped"].items()) or "none"))
    return "\n".join(out)


def bench_selection(sel) -> str:
    return format_figures(figures(measure(sel)))


# ---------------------------------------------------------------------------------------
# scripts/bench-scan: lab containers full of small glibc processes
# ---------------------------------------------------------------------------------------
_PY_THREADS = ("import threading,time\n"
               "[threading.Thread(target=time.sleep,args=(86400,),daemon=True).start() for _ in range(3)]\n"
               "time.sleep(86400)")


def lab_cmd(sleepers: int, pythons: int, interval: float = 1.0) -> str:
    """A container command: ``sleepers`` sleep(1) processes, ``pythons`` Python processes
    with 4 threads each, then (as the container's main process) the resolver workload."""
    return (f"i=0; while [ $i -lt {sleepers} ]; do sleep 86400 & i=$((i+1)); done; "
            f"j=0; while [ $j -lt {pythons} ]; do python3 -c '{_PY_THREADS}' & j=$((j+1)); done; "
            f"exec python3 -u /opt/gdbdiag/resolver.py --interval {interval} "
            "--out /gdbdiag-out/lookups.jsonl keydb-0.keydb keydb-2.keydb")


def start_labs(per_release: int, procs: int, prefix: str, log=print) -> list:
    from ..lab import container
    labs = []
    pythons = max(1, procs // 10)
    sleepers = max(0, procs - pythons - 1)
    for i in range(per_release):
        for rel in ("bullseye", "bookworm", "trixie"):
            name = f"{prefix}-{rel[:2]}{i}"
            spec = container.LabSpec(name=name, release=rel, cmd=lab_cmd(sleepers, pythons))
            labs.append(name)
            container.up(spec)
            log(f"lab {name} ({rel}) up")
    return labs


def wait_for(labs: list, procs: int, timeout: float = 60.0) -> None:
    """Until every lab's container has its ``procs`` processes."""
    from ..lab import container
    from .targets import Selection
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sel = Selection(containers=[container.Lab.load(n).runc_id for n in labs])
        if len(sel.select()) >= len(labs) * procs:
            return
        time.sleep(0.5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench-scan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--labs-per-release", type=int, default=2)
    ap.add_argument("--procs-per-lab", type=int, default=50)
    ap.add_argument("--json", metavar="FILE", help="also write the figures here")
    a = ap.parse_args(argv)
    from ..lab import container
    from .targets import Selection
    prefix = f"bscan{os.getpid() % 10000}"
    labs = []
    try:
        t0 = time.monotonic()
        labs = start_labs(a.labs_per_release, a.procs_per_lab, prefix,
                          log=lambda m: print(m, file=sys.stderr))
        wait_for(labs, a.procs_per_lab)
        print(f"{len(labs)} labs up in {time.monotonic() - t0:.1f} s; scanning the node "
              f"({os.cpu_count()} CPUs)", file=sys.stderr)
        f = figures(measure(Selection()))
        f["setup"] = {"labs": labs, "procs_per_lab": a.procs_per_lab, "cpus": os.cpu_count()}
        print(format_figures(f))
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(f, fh, indent=1)
    finally:
        for n in labs:
            container.down(n, quiet=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
