"""A passive run: /proc samples of every thread into the run's event stream (no ptrace,
no breakpoint, no symbols)."""
from __future__ import annotations

import time

from ..core import events as E
from ..errors import GdbdiagError
from ..sink import EventSink, build_report
from .common import say


def run_passive(pid: int, args, stop, deadline: float, sink: EventSink,
                escalate: bool) -> tuple[dict, int | None]:
    """Sample until the deadline, a signal, ``--until``, or (``escalate``) the first
    sticky thread; returns (the sampler's result, the LWP of a sticky thread or None)."""
    from ..passive import PassiveError, PassiveSampler
    from ..symbols.facts import glibc_facts
    affected = glibc_facts(pid).get("affected_30081")
    try:
        smp = PassiveSampler(pid, interval=0.05, affected=affected)
    except PassiveError as exc:
        raise GdbdiagError(f"passive: {exc}") from exc
    suspect = None

    def feed(ev):
        nonlocal suspect
        out = sink.feed(ev)
        if suspect is None:
            suspect = next((f.lwp for f in out if f.kind == E.STICKY_ENGAGED), None)
        return out

    def until():
        return bool(stop.why) or (escalate and suspect is not None) or sink.until_hit(args.until)

    with smp:
        # the build's facts come from the files at report time: none found in code here
        sink.start("passive", "passive", pid, {}, {"affected": affected,
                                                   "confirm_samples": smp.confirm_samples})
        if not args.quiet:
            say(f"gdbdiag: passive sampling of {pid} (no ptrace, no breakpoint); "
                f"bug 30081 in this build: {affected}")
        sink.release()
        res = smp.run(max(0.1, deadline - time.monotonic()), feed=feed, until=until)
    res["ended_by"] = stop.why or ("until" if sink.until_hit(args.until) else "duration")
    return res, suspect


def passive_report(sink: EventSink, pid: int, res: dict) -> dict:
    return build_report(sink, pid, {}, {
        "backend": "passive", "mode": "passive", "samples": res["samples"],
        "overhead": res["overhead"], "ended_by": res.get("ended_by", "duration")})
