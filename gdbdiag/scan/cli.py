"""``gdbdiag scan``: the command line."""
from __future__ import annotations

import signal
import sys

from ..errors import EXIT_OK, EXIT_USAGE, GdbdiagError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "scan", help="every glibc process of the node: sticky threads, resolver stalls, "
                     "affected builds (no ptrace)",
        description="Read every process of the node (or of --container / --pid) through "
                    "/proc only — /proc/PID/mem, maps, task/TID/syscall — and report each "
                    "glibc build (affected by bug 30081 or not, decided from send_dg's code), "
                    "each thread's sticky single-request bit and the threads blocked in "
                    "send_dg's poll now. Nothing is attached, stopped or signalled: every "
                    "target's TracerPid stays 0.",
        epilog="exit codes: 0 the scan ran (whatever it found), 2 bad arguments, 3 no such "
               "process or container, 4 tool failure. See docs/scan.md.")
    p.add_argument("--pid", type=int, nargs="+", metavar="PID", default=[],
                   help="scan these processes (as this PID namespace sees them)")
    p.add_argument("--container", nargs="+", metavar="ID", default=[],
                   help="scan the processes of these containers (runc/podman ID, unique ID "
                        "prefix, podman name, or an ID found in /proc/PID/cgroup)")
    p.add_argument("--runc-root", action="append", default=[], metavar="DIR",
                   help="another runc state root to look for containers in (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (--watch always prints JSON lines)")
    p.add_argument("--prom", metavar="FILE.prom",
                   help="also write Prometheus metrics here, atomically (node-exporter's "
                        "textfile collector); rewritten at every --watch pass")
    p.add_argument("--watch", type=float, metavar="SECONDS",
                   help="scan every SECONDS and print one JSON line per transition (thread "
                        "became sticky, stall began/ended, process appeared/exited)")
    p.add_argument("--passes", type=int, metavar="N", help="with --watch: stop after N passes")
    p.add_argument("--all-threads", action="store_true",
                   help="table: list every thread, not only sticky or waiting ones")
    p.add_argument("--bench", action="store_true",
                   help="print how long the pass took: cold and warm analysis cache, per process "
                        "and per build (scripts/bench-scan starts 300+ processes for it)")
    p.set_defaults(func=run)


def _check(args) -> None:
    if args.watch is not None and not args.watch > 0:
        raise GdbdiagError("--watch SECONDS must be positive", EXIT_USAGE)
    if args.passes is not None and (args.passes < 1 or args.watch is None):
        raise GdbdiagError("--passes N needs --watch and N >= 1", EXIT_USAGE)
    if args.bench and (args.watch is not None or args.json):
        raise GdbdiagError("--bench prints its own figures: not with --watch or --json", EXIT_USAGE)
    if args.prom:
        from .prom import check_path
        check_path(args.prom)


def run(args) -> int:
    _check(args)
    from .scanner import Scanner
    from .targets import Selection
    sel = Selection(pids=args.pid, containers=args.container, extra_roots=args.runc_root)
    if args.bench:
        from .bench import bench_selection
        print(bench_selection(sel))
        return EXIT_OK
    if args.watch is not None:
        return _watch(sel, args)
    with Scanner(sel) as sc:
        rep = sc.scan()
    if args.prom:
        from . import prom
        prom.write(args.prom, rep)
    from . import render
    print(render.to_json(rep) if args.json else render.text(rep, args.all_threads))
    return EXIT_OK


def _watch(sel, args) -> int:
    from .scanner import Scanner
    from .watch import run as watch_run
    stop = {"sig": None}

    def on_signal(signum, _frame):
        stop["sig"] = signum
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        with Scanner(sel, keep_samplers=True) as sc:
            watch_run(sc, args.watch, args.passes, args.prom, stop=lambda: stop["sig"] is not None)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    sys.stdout.flush()
    return EXIT_OK
