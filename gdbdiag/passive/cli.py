"""``python -m gdbdiag.passive PID [--duration S] [--interval S] [--affected yes|no]``:
the passive sampler on its own (findings and per-thread summaries, or one snapshot)."""
from __future__ import annotations

import argparse
import json
import sys

from ..core.events import Event
from .sampler import PassiveError, PassiveSampler


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gdbdiag passive",
                                 description="sample a process's resolver state without stopping it")
    ap.add_argument("pid", type=int)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--affected", choices=("yes", "no", "unknown"), default="unknown")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--once", action="store_true", help="one snapshot, printed as JSON")
    a = ap.parse_args(argv)
    aff = {"yes": True, "no": False, "unknown": None}[a.affected]
    try:
        smp = PassiveSampler(a.pid, interval=a.interval, affected=aff)
    except PassiveError as e:
        print(f"gdbdiag passive: {e}", file=sys.stderr)
        return 4
    with smp:
        if a.once:
            print(json.dumps([s.to_dict() for s in smp.sample()], indent=1))
            return 0

        def show(ev: Event):
            print(f"[gdbdiag] LWP {ev.lwp} ({ev.get('thread_name') or '?'}) {ev.kind}: "
                  + ", ".join(f"{k}={v}" for k, v in ev.data.items()
                              if v not in (None, [], "") and k not in ("thread_name",)), flush=True)
        res = smp.run(a.duration, on_event=show)
    res["events"] = [e.to_json() for e in res["events"]]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(json.dumps({"samples": res["samples"], "overhead": res["overhead"],
                      "threads": res["threads"]}, indent=1, default=str))
    return 0

