"""A run on gdb breakpoints (``--backend gdb``, for hosts without uprobes).

    symbols (fetch/verify/cache) -> gdb attaches (pexpect) -> the supervisor starts (own
    session; waits on gdb's pidfd) -> `resolv trace --record STREAM` (the plugin writes the
    armed PCs for the supervisor first) -> the target runs; the runner tails STREAM into
    the run's event sink (one detector; findings printed as they happen) -> on duration /
    --until / a signal: interrupt, untrace, detach, quit.

If gdb dies instead, the supervisor puts the original bytes back; the report is the
sink's, as in a clean run: the stream's ``run`` record carries the build's facts.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pexpect

from ..core import events as E
from ..errors import GdbdiagError
from ..sink import EventSink, build_report
from .common import oom_score_adj, say

ARMED_DIR = Path(os.environ.get("GDBDIAG_RUN_DIR", "/run/gdbdiag")) / "armed"
EXTRAS = ("source", "stack")      # what the plugin adds to a finding that the runner cannot


class GdbGone(GdbdiagError):
    """gdb died or stopped answering mid-run (the report is rebuilt from the stream)."""


class GdbRun:
    def __init__(self, pid: int, args, facts: dict, sink: EventSink, stop, deadline: float,
                 thread: int | None = None):
        self.pid, self.args, self.facts, self.sink = pid, args, facts, sink
        self.stop, self.deadline, self.thread = stop, deadline, thread
        self.workdir = Path(tempfile.mkdtemp(prefix="gdbdiag-attach-"))
        ARMED_DIR.mkdir(parents=True, exist_ok=True)
        self.armed = ARMED_DIR / f"{pid}-{os.getpid()}.json"
        self.stream = self.workdir / "events.jsonl"
        self.tail = E.StreamTail(self.stream)
        self.g = self.sup = None
        self.sym: dict = {}
        self.arm_s: float | None = None

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        from ..gdbdrive import GdbError
        t0 = time.monotonic()
        try:
            self.sym = self._symbols()
            if not self.args.no_source:
                _prefetch_source(self.pid, self.args.quiet)
            self._start_gdb()
            self._arm()
            self.arm_s = time.monotonic() - t0
            if not self.args.quiet:
                say(f"gdbdiag: armed in {self.arm_s:.2f} s; tracing for up to "
                    f"{self.deadline - time.monotonic():.0f} s (Ctrl-C ends the run cleanly)")
            self.sink.release()
            self.g.cont()
            ended = self._loop()
            self._finish()
            run = {"ended_by": ended}
        except GdbGone as exc:
            run = {"error": str(exc)}
        except (pexpect.EOF, pexpect.TIMEOUT, GdbError) as exc:
            run = {"error": f"gdb stopped answering ({type(exc).__name__})"}
        finally:
            self._close()
        self._drain()                    # the records gdb wrote last
        if run.get("error"):
            say(f"gdbdiag: {run['error']}; the supervisor restores the target's code; "
                "report rebuilt from the recorded events")
        run.update(backend="gdb", mode=self._mode(),
                   attach_to_armed_s=round(self.arm_s, 3) if self.arm_s is not None else None)
        rep = build_report(self.sink, self.pid, self.sym, run)
        sup_log = self.workdir / "supervisor.log"
        if sup_log.exists():
            rep["run"]["supervisor"] = sup_log.read_text().strip().splitlines()[-1:]
        if run.get("error"):
            say(f"gdbdiag: the run's files (event stream, supervisor log) are kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return rep

    def _mode(self) -> str:
        return "full" if self.args.full else "lean" if self.args.lean else "armed"

    def _symbols(self) -> dict:
        try:
            self.cmds, sym = symbol_setup(self.pid, self.args.symbols, self.args.offline)
        except GdbdiagError:
            raise
        except Exception as exc:
            raise GdbdiagError(f"symbols: {exc}") from exc
        if self.args.symbols == "auto" and not sym["verified"]:
            bad = [o for o in sym.get("objects", []) if o.get("error")]
            raise GdbdiagError("symbols: no verified debug file for "
                               + ", ".join(f"{o['name']} ({o['error']})" for o in bad))
        return sym

    def _start_gdb(self) -> None:
        from ..gdbdrive import Gdb, GdbError
        if not self.args.quiet:
            say(f"gdbdiag: attaching to {self.pid} ({self.facts['name']}, {self.facts['threads']} "
                f"threads); symbols from {', '.join(s for s in self.sym['source'] if s)}")
        try:
            self.g = Gdb(self.pid, self.cmds, env={"GDBDIAG_ARMED_FILE": str(self.armed)})
        except (GdbError, pexpect.ExceptionPexpect) as exc:
            raise GdbdiagError(f"gdb could not attach: {exc}") from exc
        self.sup = subprocess.Popen(
            [sys.executable, "-m", "gdbdiag.supervisor", "--target", str(self.pid),
             "--gdb", str(self.g.child.pid), "--armed", str(self.armed),
             "--log", str(self.workdir / "supervisor.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
        # gdb dying with breakpoints inserted is this backend's hazard: the OOM killer
        # (gdb reading debug info is the largest process of a debug container) should
        # take the runner first (gdb then detaches on SIGHUP), never gdb or its safety net
        for p in (self.g.child.pid, self.sup.pid):
            oom_score_adj(p, -999)

    def _arm(self) -> None:
        a = self.args
        opts = " --lean" if a.lean else ""
        opts += " --full" if a.full else ""
        opts += f" --thread {self.thread}" if self.thread is not None else ""
        opts += " --no-source" if a.no_source else ""
        opts += f" --step-log {a.step_log}" if a.step_log else ""
        out = self.g.cmd(f"resolv trace --record {self.stream}{opts}")
        armed = any(line.startswith("armed ") for line in out.splitlines())
        if not armed and "not loaded yet" not in out:
            raise GdbdiagError("resolv trace failed: " + (out.strip().splitlines() or ["?"])[-1])
        if not a.quiet:
            for line in out.splitlines():
                if line.strip() and not line.startswith(("resolv trace", "[gdbdiag]")):
                    say(line)
        self._drain()

    def _loop(self) -> str:
        while True:
            if self.stop.why:
                if not self.args.quiet:
                    say(f"gdbdiag: {self.stop.why}: ending the run (untrace, detach)")
                return self.stop.why
            if time.monotonic() >= self.deadline:
                return "duration"
            try:
                self.g.drain(0.3)        # gdb's terminal must not fill up
            except OSError as exc:
                raise GdbGone(f"gdb's terminal closed ({exc})") from exc
            if not self.g.child.isalive():
                raise GdbGone("gdb exited unexpectedly")
            self._drain()
            if self.sink.until_hit(self.args.until):
                return "until"

    def _drain(self) -> None:
        """The plugin's new records into the sink: observations to the run's detector
        (the same findings follow); what only gdb could add to a finding is copied."""
        for ev, is_finding in self.tail.read():
            if not is_finding:
                self.sink.feed(ev)
                continue
            mine = next((f for f in reversed(self.sink.det.findings)
                         if f.kind == ev.kind and f.lwp == ev.lwp and f.t == ev.t), None)
            for k in EXTRAS:
                if mine is not None and ev.data.get(k) and not mine.data.get(k):
                    mine.data[k] = ev.data[k]
                    if k in ev.prov:
                        mine.prov[k] = ev.prov[k]

    def _finish(self) -> None:
        g = self.g
        g.interrupt()
        g.cmd("resolv untrace")
        g.cmd("detach")
        g.close()

    def _close(self) -> None:
        if self.g is not None:
            self.g.close()
        if self.sup is not None:
            try:
                self.sup.wait(timeout=20)
            except subprocess.TimeoutExpired:   # it runs on in its own session until the
                pass                            # target's code is restored: never killed


def symbol_setup(pid: int, mode: str, offline: bool) -> tuple[list[str], dict]:
    from ..gdbdrive import setup_commands
    from ..symbols import gdbload, identify
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


def _prefetch_source(pid: int, quiet: bool) -> None:
    """Fetch and verify glibc's Debian source for this build on the host side, so the
    plugin finds it in the cache. A failure only means no source lines in the output."""
    try:
        from ..symbols import glibcsrc, identify
        ident = identify.identify_process(pid)
        if ident.package_version and glibcsrc.load_cached(ident.package_version) is None:
            glibcsrc.fetch_source(ident.package_version)
    except Exception as exc:
        if not quiet:
            say(f"gdbdiag: source: {getattr(exc, 'reason', None) or exc} (continuing without)")
