"""A run on kernel probes (the default backend): nothing gdbdiag does can stop or patch
the target; the kernel removes the probes however the run ends."""
from __future__ import annotations

import time

from ..errors import GdbdiagError
from ..sink import EventSink
from .common import say
from .passive_run import passive_report, run_passive


def run_uprobe(pid: int, args, facts: dict, sink: EventSink, stop, deadline: float,
               after_passive: bool = False) -> dict:
    """Arm, trace until the deadline / a signal / ``--until``, and return the report. A
    kernel that refuses the probes (e.g. uprobes need CAP_SYS_ADMIN on recent kernels)
    gets one line and a passive run instead -- unless this run escalates a passive one."""
    from ..uprobes.owner import ProbeUnavailable
    from ..uprobes.plan import NoPlan
    from ..uprobes.run import UprobeRun
    mode = "full" if args.full else "lean" if args.lean else "armed"
    run_ = UprobeRun(pid, mode, say=say, quiet=args.quiet, step_log=args.step_log,
                     symbols=args.symbols, offline=args.offline, source=not args.no_source,
                     sink=sink)
    arm_s = None
    try:
        try:
            arm_s = run_.arm()
        except ProbeUnavailable as exc:
            if after_passive:               # escalation refused: the samples stand
                raise GdbdiagError(f"kernel probes: {exc}") from exc
            run_.close()
            say(f"gdbdiag: kernel probes refused: {exc}; sampling passively instead (no "
                "ptrace, no breakpoint)")
            res, _ = run_passive(pid, args, stop, deadline, sink, escalate=False)
            return passive_report(sink, pid, res)
        except NoPlan as exc:
            raise GdbdiagError(f"kernel probes: {exc}") from exc
        if not args.quiet:
            say(f"gdbdiag: {run_.armed_line(arm_s)}; {pid} ({facts['name']}, {facts['threads']} "
                f"threads); tracing for up to {deadline - time.monotonic():.0f} s (Ctrl-C ends "
                "the run cleanly)")
            say(f"gdbdiag: {run_.symbols_line}")
        run_.release()
        ended = run_.loop(deadline, stop, args.until)
        if stop.why and not args.quiet:
            say(f"gdbdiag: {stop.why}: ending the run (the kernel removes the probes)")
    finally:
        run_.close()
    rep = run_.report(ended, arm_s)
    rep["run"]["passive_first"] = after_passive
    return rep
