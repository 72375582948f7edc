"""What every kind of attach run shares: printing, the signals that end a run, and the
delivery of the report (text, timeline, JSON, exit code)."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from ..core import render
from ..errors import EXIT_FAIL_ON, EXIT_OK

ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def say(msg: str) -> None:
    try:
        print(msg, flush=True)
    except (OSError, ValueError):       # the terminal went away (SIGHUP): keep going
        pass


class Stop:
    """SIGINT/SIGTERM/SIGHUP end the run cleanly: ``why`` names the signal once one came.
    A context manager: the previous handlers are back on the way out."""

    def __init__(self):
        self.why: str | None = None
        self._old: dict = {}

    def __enter__(self) -> "Stop":
        self._old = {s: signal.signal(s, self._on_signal) for s in ENDING_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _on_signal(self, signum, frame) -> None:
        self.why = signal.Signals(signum).name


def deliver(pid: int, rep: dict, args, facts: dict) -> int:
    """Both namespaces' LWPs, the report and timeline printed and written; the exit code."""
    rep["target"]["nspid"] = facts["nspid"]
    rep["target"]["lwp_map"] = lwp_map(pid)
    for t in rep.get("threads", []):
        t["lwp_target"] = rep["target"]["lwp_map"].get(str(t["lwp"]))
    from ..timeline import terminal
    say(render.report_text(rep))
    run = rep.get("run") or {}
    if run.get("lost_records") or run.get("bad_records"):
        say(f"gdbdiag: {run.get('lost_records') or 0} probe record(s) lost (no room reserved in "
            f"the kernel ring), {run.get('bad_records') or 0} undecodable, of "
            f"{run.get('records')}: a finding may be missing")
    say(terminal(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1, default=str))
    if args.timeline:
        from ..timeline import write_html
        write_html(rep, args.timeline)
    code = rep["verdict"]["code"]
    if args.fail_on == "sticky" and code in ("STICKY_NO_STALL", "STICKY_STALLING"):
        return EXIT_FAIL_ON
    if args.fail_on == "stall" and code in ("STICKY_STALLING", "STALLING_NOT_STICKY"):
        return EXIT_FAIL_ON
    return EXIT_OK


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


def oom_score_adj(pid: int, value: int) -> None:
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as fh:
            fh.write(str(value))
    except OSError:               # not permitted (no CAP_SYS_RESOURCE): the default stays
        pass
