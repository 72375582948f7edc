"""`gdbdiag attach PID` — a batch diagnosis that never harms the target.

    preflight (refuse with a one-line cause, touching nothing)
    -> [passive sampling (--passive): until the end, or the first sticky thread (--escalate)]
    -> kernel probes (uprobe_run, the default) or gdb breakpoints (gdb_run, --backend gdb)
    -> every observation into one event sink (gdbdiag.sink: record, one detector, findings
       printed as they happen) -> the report from the sink, however the run ended
    -> common.deliver: text, timeline, JSON, exit code.
"""
from __future__ import annotations

import time

from .. import preflight
from ..errors import EXIT_TOOL, GdbdiagError
from ..sink import EventSink
from .common import Stop, deliver, lwp_map, say


def add_parser(sub) -> None:
    p = sub.add_parser(
        "attach", help="attach to a process, trace its resolver, report, detach",
        description="Trace PID's resolver -- with kernel probes (the default: no debug "
                    "symbols needed, nothing in the target stopped or patched), passive /proc "
                    "sampling (--passive), or gdb breakpoints (--backend gdb) -- print each "
                    "detection as it happens, then the report and the verdict. The target "
                    "keeps running throughout and is left with its code bytes as on disk, "
                    "however the run ends.",
        epilog="exit codes: 0 completed (any verdict), 1 --fail-on matched, 2 usage error, "
               "3 target refused (missing, zombie, traced, no permission, no glibc resolver), "
               "4 tool failure")
    p.add_argument("pid", type=int, nargs="?", help="the target's PID (as this namespace sees it)")
    p.add_argument("--container-id", metavar="ID",
                   help="instead of PID: the main process of this container (from /proc/*/cgroup; "
                        "a node debug pod)")
    p.add_argument("--process", metavar="auto|NAME",
                   help="instead of PID: the main process (or the one named NAME) of the other "
                        "container sharing this PID namespace (kubectl debug --target)")
    p.add_argument("--duration", type=float, default=60.0, metavar="S",
                   help="trace for S seconds (default 60)")
    p.add_argument("--until", choices=("sticky", "stall"),
                   help="stop as soon as a thread goes sticky / a stall is measured")
    p.add_argument("--json", metavar="FILE", help="write the JSON report (schema gdbdiag.report/1)")
    p.add_argument("--timeline", metavar="FILE", help="write an HTML timeline")
    p.add_argument("--symbols", default="auto", metavar="auto|off|DIR",
                   help="auto: fetch and verify (default); off: use what gdb finds; DIR: a "
                        "debug-file-directory you provide")
    p.add_argument("--offline", action="store_true", help="symbols from the cache only")
    p.add_argument("--step-log", metavar="FILE", help="write every step's dump here")
    p.add_argument("--record", metavar="FILE",
                   help="append the run's event stream as JSON lines: a run record (source, build "
                        "facts, detector settings), every observation, every finding "
                        "(docs/ARCHITECTURE.md, One event stream)")
    p.add_argument("--fail-on", choices=("sticky", "stall"),
                   help="exit 1 if a thread is sticky / a stall was seen")
    p.add_argument("--backend", choices=("uprobe", "gdb"), default="uprobe",
                   help="uprobe (default): kernel uprobes owned by this process (perf_event_open "
                        "and gdbdiag's own BPF programs); nothing in the "
                        "target is stopped or patched by gdbdiag, so no way the run ends (even "
                        "SIGKILL of any gdbdiag process) can harm it. gdb: software breakpoints "
                        "(int3) inserted by gdb, for hosts where uprobes are not permitted; "
                        "REMAINING HAZARD: if gdb dies while a breakpoint is inserted, a thread "
                        "that reaches it before the supervisor seizes the target is killed by "
                        "SIGTRAP")
    p.add_argument("--lean", action="store_true", help="fewest probes (see README)")
    p.add_argument("--full", action="store_true",
                   help="every probe for every lookup from the start (costly)")
    p.add_argument("--passive", action="store_true",
                   help="never stop the target: sample each thread's _res and its syscall "
                        "from /proc (no ptrace attach, no breakpoint)")
    p.add_argument("--escalate", action="store_true",
                   help="with --passive: once a thread is found sticky, arm the trace on that "
                        "thread for the rest of the run")
    p.add_argument("--no-source", action="store_true",
                   help="do not fetch or show glibc's source (Debian's source package)")
    p.add_argument("--quiet", action="store_true", help="only the report")
    p.set_defaults(func=run)


def resolve_pid(args) -> int:
    from .. import pod
    given = [x for x in (args.pid is not None, bool(args.container_id), bool(args.process)) if x]
    if len(given) != 1:
        raise GdbdiagError("give exactly one of PID, --container-id or --process", 2)
    if args.pid is not None:
        return args.pid
    if args.container_id:
        return pod.pid_for_container_id(args.container_id, args.process or "auto")
    return pod.pid_in_own_namespace(args.process)


def run(args) -> int:
    pid = resolve_pid(args)
    facts = preflight.check_target(pid)
    preflight.check_resolver(pid)
    if args.duration <= 0:
        raise GdbdiagError("--duration must be positive", 2)
    passive, escalate = args.passive, args.escalate
    if args.backend == "uprobe" and not (passive and not escalate):
        from ..uprobes.owner import ProbeUnavailable, check_available
        try:
            check_available()
        except ProbeUnavailable as exc:
            say(f"gdbdiag: kernel probes unavailable: {exc}; sampling passively instead "
                "(no ptrace, no breakpoint; --backend gdb inserts breakpoints, if you accept "
                "their hazard)")
            passive, escalate = True, False
    with Stop() as stop:
        sink = EventSink(record=args.record, say=say, quiet=args.quiet)
        try:
            rep = _run(pid, args, facts, sink, stop, passive, escalate)
        finally:
            sink.close()
    code = deliver(pid, rep, args, facts)
    return EXIT_TOOL if rep["run"].get("error") else code


def _run(pid: int, args, facts: dict, sink: EventSink, stop: Stop, passive: bool,
         escalate: bool) -> dict:
    """Passive first when asked; then kernel probes or gdb (the rest of the run)."""
    from .passive_run import passive_report, run_passive
    deadline = time.monotonic() + args.duration
    suspect = None
    if passive:
        res, suspect = run_passive(pid, args, stop, deadline, sink, escalate)
        if not escalate or suspect is None or stop.why or deadline - time.monotonic() <= 1:
            return passive_report(sink, pid, res)
        if not args.quiet:
            what = (f"kernel probes on {pid}" if args.backend == "uprobe"
                    else f"arming the trace on LWP {suspect}")
            say(f"gdbdiag: escalating: {what} for the remaining "
                f"{deadline - time.monotonic():.0f} s")
    if args.backend == "uprobe":
        from .uprobe_run import run_uprobe
        return run_uprobe(pid, args, facts, sink, stop, deadline, after_passive=passive)
    from .gdb_run import GdbRun
    rep = GdbRun(pid, args, facts, sink, stop, deadline, thread=suspect).run()
    rep["run"]["passive_first"] = passive
    return rep


__all__ = ["add_parser", "run", "resolve_pid", "lwp_map"]
