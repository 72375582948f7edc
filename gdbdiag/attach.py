"""`gdbdiag attach PID` — a batch diagnosis that never harms the target.

Order of operations, each step undone on every way out:
  preflight (refuse with a one-line cause, touching nothing)
  -> symbols (fetch/verify/cache) -> gdb attaches (pexpect)
  -> supervisor starts (own session; waits on gdb's pidfd)
  -> `resolv trace` (the plugin writes the armed PCs for the supervisor first)
  -> target runs; detections printed as they happen
  -> on duration / --until / SIGINT / SIGTERM / SIGHUP: interrupt, report, untrace,
     detach, quit -> supervisor sees a clean exit and has nothing to do.
If gdb dies instead, the supervisor puts the original bytes back and the runner rebuilds
the report from the event stream gdb was recording.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pexpect

from .core import render
from .core import report as R
from .core.detector import Detector
from .core.events import load_stream, OBSERVATIONS
from .errors import EXIT_FAIL_ON, EXIT_OK, EXIT_TOOL, GdbdiagError
from . import preflight

ARMED_DIR = Path(os.environ.get("GDBDIAG_RUN_DIR", "/run/gdbdiag")) / "armed"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "attach", help="attach to a process, trace its resolver, report, detach",
        description="Attach gdb with the gdbdiag plugin to PID, load its glibc's debug "
                    "symbols, arm the trace, print each detection as it happens, then the "
                    "report and the verdict, and detach. The target keeps running throughout "
                    "and is left with its code bytes as on disk, however the run ends.",
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
                   help="append every observation and finding as JSON lines (the event stream)")
    p.add_argument("--fail-on", choices=("sticky", "stall"),
                   help="exit 1 if a thread is sticky / a stall was seen")
    p.add_argument("--backend", choices=("uprobe", "gdb"), default="uprobe",
                   help="uprobe (default): kernel-owned probes run by bpftrace; nothing in the "
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


class _Stop(GdbdiagError):
    """A signal ended the run (control flow inside run(); never reaches the CLI)."""


class _Passive(GdbdiagError):
    def __init__(self, res):
        super().__init__("passive run over")
        self.res = res


def _row(ev) -> dict:
    d = dict(ev.data)
    return {"t": ev.t, "lwp": ev.lwp, "thread": d.get("thread_name"), "kind": ev.kind,
            "qname": d.get("qname"), "qtype": None, "rcode": None,
            **{k: v for k, v in d.items() if k in ("predicted_ms", "measured_ms", "cause", "field",
                                                    "timeout_ms", "frame_confirmed")},
            "provenance": dict(ev.prov), "source_mode": "passive"}


def _run_passive(pid, args, stop, deadline):
    """Sample without stopping the target; returns (result, LWP of a sticky thread)."""
    from .passive import PassiveError, PassiveSampler
    from .symbols.facts import glibc_facts
    affected = glibc_facts(pid).get("affected_30081")
    try:
        smp = PassiveSampler(pid, interval=0.05, affected=affected)
    except PassiveError as exc:
        raise GdbdiagError(f"passive: {exc}") from exc
    events, suspect = [], None
    t0 = time.time()
    with smp:
        if not args.quiet:
            _say(f"gdbdiag: passive sampling of {pid} (no ptrace, no breakpoint); "
                 f"bug 30081 in this build: {affected}")
        kinds = set()

        def on_event(ev):
            nonlocal suspect
            events.append(ev)
            kinds.add(ev.kind)
            if not args.quiet:
                _say(render.finding_line(ev, t0, ev.get("thread_name")))
            if ev.kind == "sticky_engaged" and suspect is None:
                suspect = ev.lwp

        def until():
            return bool(stop["why"]) or (args.escalate and suspect is not None) or \
                (args.until == "sticky" and "sticky_engaged" in kinds) or \
                (args.until == "stall" and "stall" in kinds)

        res = smp.run(max(0.1, deadline - time.monotonic()), on_event=on_event, until=until)
    return res, suspect


def _passive_report(pid, res, facts) -> dict:
    from .symbols.facts import glibc_facts
    det = Detector()
    for t in res.get("threads", []):
        th = det.thread(t.get("tid") or t.get("lwp"))
        th.name = t.get("name")
        th.options, th.flags = t.get("options"), t.get("flags")
    for ev in res["events"]:
        th = det.thread(ev.lwp)
        if ev.kind == "sticky_engaged" and not th.sticky:
            th.sticky, th.since = True, ev.t
            th.cause = ev.get("cause")
            th.sticky_field = ev.get("field") or ev.get("sticky_field")
        elif ev.kind == "doomed_poll":
            th.doomed += 1
        elif ev.kind == "stall":
            th.stalls += 1
            th.last_stall_ms = ev.get("measured_ms")
            det.stalls.append({"lwp": ev.lwp, "thread": th.name, "qname": None, "lookup": None,
                               "predicted_ms": ev.get("predicted_ms"),
                               "measured_ms": ev.get("measured_ms"), "t": ev.t})
        det.findings.append(ev)
    glibc = glibc_facts(pid)
    rep = R.build(det, {"pid": pid, "exe": _readlink(f"/proc/{pid}/exe"),
                        "threads": facts["threads"]}, glibc, {}, [])
    rep["run"] = {"mode": "passive", "samples": res["samples"], "overhead": res["overhead"],
                  "ended_by": "duration"}
    return rep


def _say(msg: str) -> None:
    try:
        print(msg, flush=True)
    except (OSError, ValueError):       # the terminal went away (SIGHUP): keep going
        pass


def symbol_setup(pid: int, mode: str, offline: bool) -> tuple[list[str], dict]:
    from .gdbdrive import setup_commands
    from .symbols import gdbload, identify
    if mode == "auto":
        cmds, info = setup_commands(pid, offline=offline)
        f = info["fetch"]
        return cmds, {"source": sorted({o.get("origin") for o in f.get("objects", []) if o.get("origin")}),
                      "verified": bool(info["ok"]),
                      "objects": [{k: o.get(k) for k in ("name", "build_id", "debug_file", "origin", "error")}
                                  for o in f.get("objects", [])]}
    ident = identify.identify_process(pid)
    if mode == "off":
        cmds = [c for c in gdbload.gdb_setup_commands(ident, ["/usr/lib/debug"])
                if not c.startswith("set debug-file-directory")]
        return cmds, {"source": ["gdb default"], "verified": False}
    if not os.path.isdir(mode):
        raise GdbdiagError(f"--symbols {mode}: not auto, off or a directory", 2)
    return gdbload.gdb_setup_commands(ident, mode), {"source": [mode], "verified": None}


def resolve_pid(args) -> int:
    from . import pod
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
    if args.backend == "uprobe" and not (args.passive and not args.escalate):
        from .uprobes.owner import ProbeUnavailable, check_available
        try:
            check_available()
        except ProbeUnavailable as exc:
            _say(f"gdbdiag: kernel probes unavailable: {exc}; sampling passively instead "
                 "(no ptrace, no breakpoint; --backend gdb inserts breakpoints, if you accept "
                 "their hazard)")
            args.passive, args.escalate = True, False
    if args.backend == "uprobe" or (args.passive and not args.escalate):
        # passive sampling alone needs no debugger and no symbols: never the gdb path
        return _run_uprobe(pid, args, facts)

    stop = {"why": None}

    def on_signal(signum, frame):
        stop["why"] = signal.Signals(signum).name
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    from .gdbdrive import Gdb, GdbError
    workdir = Path(tempfile.mkdtemp(prefix="gdbdiag-attach-"))
    ARMED_DIR.mkdir(parents=True, exist_ok=True)
    armed = ARMED_DIR / f"{pid}-{os.getpid()}.json"
    stream = workdir / "events.jsonl"
    rep_path = workdir / "report.json"
    g = sup = None
    t_attach = time.monotonic()
    armed_line = ""
    try:
        try:
            cmds, sym = symbol_setup(pid, args.symbols, args.offline)
        except GdbdiagError:
            raise
        except Exception as exc:
            raise GdbdiagError(f"symbols: {exc}") from exc
        if args.symbols == "auto" and not sym["verified"]:
            bad = [o for o in sym.get("objects", []) if o.get("error")]
            raise GdbdiagError("symbols: no verified debug file for "
                               + ", ".join(f"{o['name']} ({o['error']})" for o in bad))
        if not args.no_source:
            _prefetch_source(pid, args.quiet)
        passive_events, suspect = [], None
        if args.passive:
            res, suspect = _run_passive(pid, args, stop, deadline=time.monotonic() + args.duration)
            passive_events = res["events"]
            if not (args.escalate and suspect is not None and not stop["why"]):
                raise _Passive(res)
            left = args.duration - (time.monotonic() - t_attach)
            if left <= 1:
                raise _Passive(res)
            args.duration = left
            if not args.quiet:
                _say(f"gdbdiag: escalating: arming the trace on LWP {suspect} for {left:.0f} s")
        if not args.quiet:
            _say(f"gdbdiag: attaching to {pid} ({facts['name']}, {facts['threads']} threads); "
                 f"symbols from {', '.join(s for s in sym['source'] if s)}")
        try:
            g = Gdb(pid, cmds, env={"GDBDIAG_ARMED_FILE": str(armed)})
        except (GdbError, pexpect.ExceptionPexpect) as exc:
            raise GdbdiagError(f"gdb could not attach: {exc}") from exc
        sup = subprocess.Popen([sys.executable, "-m", "gdbdiag.supervisor", "--target", str(pid),
                                "--gdb", str(g.child.pid), "--armed", str(armed),
                                "--log", str(workdir / "supervisor.log")],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True,
                               env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
        # gdb dying with breakpoints inserted is this backend's hazard: the OOM killer
        # (gdb reading debug info is the largest process of a debug container) should
        # take the runner first (gdb then detaches on SIGHUP), never gdb or its safety net
        for p in (g.child.pid, sup.pid):
            _oom_score_adj(p, -999)
        opts = " --lean" if args.lean else ""
        if args.full:
            opts += " --full"
        if suspect is not None:
            opts += f" --thread {suspect}"
        if args.no_source:
            opts += " --no-source"
        if args.step_log:
            opts += f" --step-log {args.step_log}"
        out = g.cmd(f"resolv trace --record {stream}{opts}")
        armed_line = next((l for l in out.splitlines() if l.startswith("armed ")), "")
        if not armed_line and "not loaded yet" not in out:
            raise GdbdiagError("resolv trace failed: " + (out.strip().splitlines() or ["?"])[-1])
        attach_to_armed = time.monotonic() - t_attach
        if not args.quiet:
            for line in out.splitlines():
                if line.strip() and not line.startswith("resolv trace"):
                    _say(line)
            _say(f"gdbdiag: armed in {attach_to_armed:.2f} s; tracing for up to "
                 f"{args.duration:.0f} s (Ctrl-C ends the run cleanly)")
        g.cont()
        deadline = time.monotonic() + args.duration
        seen = set()
        printed = len([l for l in g.output.splitlines() if l.startswith("[gdbdiag]")])
        while True:
            if stop["why"]:
                if not args.quiet:
                    _say(f"gdbdiag: {stop['why']}: ending the run (untrace, detach)")
                break
            if time.monotonic() >= deadline:
                break
            try:
                g.drain(0.3)
            except OSError:
                break
            if not g.child.isalive():
                raise _Stop("gdb exited unexpectedly")
            lines = [l for l in g.output.splitlines() if l.startswith("[gdbdiag]")]
            for line in lines[printed:]:
                if not args.quiet:
                    _say(line)
                kind = line.split(": ", 1)[0].rsplit(" ", 1)[-1]
                seen.add(kind)
            printed = len(lines)
            if args.until == "sticky" and "sticky_engaged" in seen:
                break
            if args.until == "stall" and "stall" in seen:
                break
        g.interrupt()
        g.cmd(f"resolv report --json {rep_path}")
        g.cmd("resolv untrace")
        g.cmd("detach")
        g.close()
        rep = json.loads(rep_path.read_text())
        rep.setdefault("run", {})
        until_hit = (args.until == "sticky" and "sticky_engaged" in seen) or \
            (args.until == "stall" and "stall" in seen)
        rep["run"].update(attach_to_armed_s=round(attach_to_armed, 3),
                          ended_by=stop["why"] or ("until" if until_hit else "duration"))
    except _Passive as p:
        rep = _passive_report(pid, p.res, facts)
    except _Stop as exc:
        rep = _rebuild(stream, pid, armed_line, str(exc), workdir)
    except (pexpect.EOF, pexpect.TIMEOUT) as exc:
        rep = _rebuild(stream, pid, armed_line, f"gdb stopped answering ({type(exc).__name__})", workdir)
    finally:
        if g is not None:
            g.close()
        if sup is not None:
            try:
                sup.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        for s, h in old.items():
            signal.signal(s, h)
    if args.passive and passive_events and rep.get("run", {}).get("mode") != "passive":
        _merge_passive(rep, passive_events)
    rep["symbols"] = sym
    sup_log = workdir / "supervisor.log"
    if sup_log.exists():
        rep["run"]["supervisor"] = sup_log.read_text().strip().splitlines()[-1:]
    code = _deliver(pid, rep, args, facts)
    if rep["run"].get("error"):
        _say(f"gdbdiag: the run's files (event stream, supervisor log) are kept in {workdir}")
        return EXIT_TOOL
    shutil.rmtree(workdir, ignore_errors=True)
    return code


def _oom_score_adj(pid: int, value: int) -> None:
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as fh:
            fh.write(str(value))
    except OSError:               # not permitted (no CAP_SYS_RESOURCE): the default stays
        pass


def _merge_passive(rep: dict, passive_events: list) -> None:
    rep["events"] = sorted(rep["events"] + [_row(e) for e in passive_events], key=lambda e: e["t"])
    rep["run"]["passive_first"] = True
    # the switch was seen by the sampler, before the probes: its time and cause win
    for ev in passive_events:
        if ev.kind == "sticky_engaged":
            for t in rep["threads"]:
                if t["lwp"] == ev.lwp:
                    t["since"], t["cause"] = ev.t, f"{ev.get('cause')} (passive sampling)"


def _deliver(pid: int, rep: dict, args, facts: dict) -> int:
    """Both namespaces' LWPs, the report and timeline printed and written; the exit code."""
    rep["target"]["nspid"] = facts["nspid"]
    rep["target"]["lwp_map"] = lwp_map(pid)
    for t in rep.get("threads", []):
        t["lwp_target"] = rep["target"]["lwp_map"].get(str(t["lwp"]))
    from .timeline import terminal
    _say(render.report_text(rep))
    _say(terminal(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1, default=str))
    if args.timeline:
        from .timeline import write_html
        write_html(rep, args.timeline)
    code = rep["verdict"]["code"]
    if args.fail_on == "sticky" and code in ("STICKY_NO_STALL", "STICKY_STALLING"):
        return EXIT_FAIL_ON
    if args.fail_on == "stall" and code in ("STICKY_STALLING", "STALLING_NOT_STICKY"):
        return EXIT_FAIL_ON
    return EXIT_OK


def _signals(stop: dict) -> dict:
    def on_signal(signum, frame):
        stop["why"] = signal.Signals(signum).name
    return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def _run_uprobe(pid: int, args, facts: dict) -> int:
    """Kernel probes (the default): nothing gdbdiag does can stop or patch the target."""
    from .uprobes.owner import ProbeUnavailable
    from .uprobes.plan import NoPlan
    from .uprobes.run import UprobeRun
    stop = {"why": None}
    old = _signals(stop)
    t_start = time.monotonic()
    deadline = t_start + args.duration
    passive_events = []
    mode = "full" if args.full else "lean" if args.lean else "armed"
    run_ = UprobeRun(pid, mode, say=_say, quiet=args.quiet, record=args.record,
                     step_log=args.step_log, symbols=args.symbols, offline=args.offline,
                     source=not args.no_source)
    try:
        if args.passive:
            res, suspect = _run_passive(pid, args, stop, deadline)
            passive_events = res["events"]
            if not args.escalate or suspect is None or stop["why"] or \
                    deadline - time.monotonic() <= 1:
                rep = _passive_report(pid, res, facts)
                return _deliver(pid, rep, args, facts)
            if not args.quiet:
                _say(f"gdbdiag: escalating: kernel probes on {pid} for the remaining "
                     f"{deadline - time.monotonic():.0f} s")
        try:
            arm_s = run_.arm()
        except ProbeUnavailable as exc:
            if passive_events:              # escalation refused: the samples stand
                raise GdbdiagError(f"kernel probes: {exc}") from exc
            # the capabilities looked right, the kernel said no (e.g. uprobes need
            # CAP_SYS_ADMIN on recent kernels): say so, and sample instead
            run_.close()
            _say(f"gdbdiag: kernel probes refused: {exc}; sampling passively instead (no "
                 "ptrace, no breakpoint)")
            args.escalate = False
            res, _ = _run_passive(pid, args, stop, deadline)
            return _deliver(pid, _passive_report(pid, res, facts), args, facts)
        except NoPlan as exc:
            raise GdbdiagError(f"kernel probes: {exc}") from exc
        if not args.quiet:
            _say(f"gdbdiag: {run_.armed_line(arm_s)}; {pid} ({facts['name']}, {facts['threads']} "
                 f"threads); tracing for up to {deadline - time.monotonic():.0f} s (Ctrl-C ends "
                 "the run cleanly)")
            _say(f"gdbdiag: {run_.symbols_line}")
        run_.release()
        ended = run_.loop(deadline, stop, args.until)
        if stop["why"] and not args.quiet:
            _say(f"gdbdiag: {stop['why']}: ending the run (the kernel removes the probes)")
    finally:
        run_.close()
        for s, h in old.items():
            signal.signal(s, h)
    rep = run_.report(ended, arm_s)
    if passive_events:
        _merge_passive(rep, passive_events)
    return _deliver(pid, rep, args, facts)


def _prefetch_source(pid: int, quiet: bool) -> None:
    """Fetch and verify glibc's Debian source for this build on the host side, so the
    plugin finds it in the cache. A failure only means no source lines in the output."""
    try:
        from .symbols import glibcsrc, identify
        ident = identify.identify_process(pid)
        if ident.package_version and glibcsrc.load_cached(ident.package_version) is None:
            glibcsrc.fetch_source(ident.package_version)
    except Exception as exc:
        if not quiet:
            _say(f"gdbdiag: source: {getattr(exc, 'reason', None) or exc} (continuing without)")


def _rebuild(stream: Path, pid: int, armed_line: str, why: str, workdir: Path) -> dict:
    """gdb is gone: the report from the events it had recorded (pure core)."""
    _say(f"gdbdiag: {why}; the supervisor restores the target's code; report rebuilt from "
         "the recorded events")
    det = Detector()
    obs = []
    if stream.exists():
        with open(stream) as fh:
            for ev in load_stream(fh):
                if ev.kind in OBSERVATIONS:
                    obs.append(ev)
                    det.feed(ev)
    affected = None
    if "bug 30081 in this build: affected" in armed_line:
        affected = True
    elif "bug 30081 in this build: fixed" in armed_line:
        affected = False
    from .symbols.facts import glibc_facts
    glibc = glibc_facts(pid, {"affected_30081": affected})
    rep = R.build(det, {"pid": pid, "exe": _readlink(f"/proc/{pid}/exe")}, glibc, {}, obs)
    rep["run"] = {"error": why}
    return rep


def _readlink(p):
    try:
        return os.readlink(p)
    except OSError:
        return None


def lwp_map(pid: int) -> dict:
    """Host LWP -> LWP as the target's own PID namespace sees it (NSpid's last field)."""
    out = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as fh:
                for line in fh:
                    if line.startswith("NSpid:"):
                        out[tid] = int(line.split()[-1])
    except OSError:
        pass
    return out
