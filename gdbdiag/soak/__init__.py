"""`gdbdiag bench --soak MINUTES` — a long `gdbdiag attach` on a busy lab resolver.

A bullseye lab container runs the resolver workload: five threads, each resolving its
own name every 0.1 s (~50 lookups/s, every lookup the incident's 8 queries), all names
answered. Once `gdbdiag attach PID --duration MINUTES*60 --json REPORT --record STREAM
--quiet` (the runner, a subprocess) has its kernel probes attached, the DNS server loses
one AAAA answer for one name only: that one thread goes sticky while the runner watches,
and from then on every send_dg step and getaddrinfo of it is recorded — the heaviest
stream armed mode produces without stalls. Every interval one line: the runner's RSS
and high-water mark (/proc/PID/status), its CPU in the interval as % of one core
(utime+stime of /proc/PID/stat), the workload's acknowledged lookups in that interval
(from its own log), the lookups the runner recorded, the stream file's size, and the
records its probes could not write so far (no room reserved in its ring buffer). At
the end: RSS first/last/max, drift from a linear fit after interval 1, CPU mean/max,
whether they are flat (by the criterion printed) and whether the report is complete.
The lab is always torn down, also on Ctrl-C, SIGTERM or SIGHUP.
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
from dataclasses import asdict
from pathlib import Path

from ..core.events import LineTail as LogTail
from ..errors import EXIT_OK, EXIT_TOOL, EXIT_USAGE, GdbdiagError
from ..lab import container
from .config import LOOKUP_INTERVAL, NAMES, RECORDS, STICKY
from .meter import HEADER, Meter, RingLoss, Sample, sample_line, _lookups
from .verdict import check_report, render, summarize

__all__ = ["add_arguments", "run", "Soak", "Sample", "LogTail", "Meter", "RingLoss",
           "summarize", "check_report", "render"]


def add_arguments(p) -> None:
    p.add_argument("--soak", type=float, metavar="MINUTES",
                   help="run only the soak: `gdbdiag attach` for MINUTES on a lab resolver "
                        "(~50 lookups/s, one sticky thread), the runner's RSS and CPU printed "
                        "every --soak-interval, the final report checked for completeness")
    p.add_argument("--soak-interval", type=float, default=60.0, metavar="SECONDS",
                   help="the soak's sampling period (default 60)")


# -- the lab and the runner ----------------------------------------------------------------
def lab_up(release: str, log) -> container.Lab:
    name = f"soak-{os.getpid() % 100000}"
    lab = container.up(container.LabSpec(name=name, release=release, workload="resolver",
                                         names=NAMES, interval=LOOKUP_INTERVAL, fault="none",
                                         fault_match=f"{STICKY}*", records=RECORDS))
    log(f"   lab {name}: resolver pid {lab.pid} on {release}: {len(NAMES)} threads, each "
        f"resolving its name every {LOOKUP_INTERVAL} s; the lost AAAA will be for {STICKY} only")
    return lab


def measured_rate(tail: LogTail, seconds: float) -> float:
    """Lookups per second the workload itself logged over ``seconds``."""
    tail.lines()
    t0 = time.monotonic()
    time.sleep(seconds)
    n = len(_lookups(tail.lines()))
    return n / (time.monotonic() - t0)


def start_runner(pid: int, seconds: float, workdir: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "gdbdiag.cli", "attach", str(pid), "--duration", str(seconds),
            "--json", str(workdir / "report.json"), "--record", str(workdir / "stream.jsonl"),
            "--quiet"]
    with open(workdir / "runner.out", "w") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)


def exited(runner: subprocess.Popen) -> bool:
    """Has the runner exited? (Not reaped: its rusage is read by stop_runner.)"""
    if runner.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, runner.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def wait_armed(runner: subprocess.Popen, workdir: Path, timeout: float = 120.0) -> float:
    """Seconds until the runner holds a perf_event descriptor (a uprobe: the writers are
    attached before anything else); raises if it exits or takes longer than ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if exited(runner):
            raise GdbdiagError("the runner exited before arming: "
                               + (workdir / "runner.out").read_text()[-2000:])
        try:
            fds = os.listdir(f"/proc/{runner.pid}/fd")
        except OSError:
            fds = []
        for fd in fds:
            try:
                if os.readlink(f"/proc/{runner.pid}/fd/{fd}") == "anon_inode:[perf_event]":
                    return time.monotonic() - t0
            except OSError:
                continue
        time.sleep(0.05)
    raise GdbdiagError(f"the runner did not attach its probes within {timeout:.0f} s")


def stop_runner(runner: subprocess.Popen, grace: float = 120.0) -> dict:
    """Reap the runner — SIGINT first if it is still tracing (as Ctrl-C would: it ends the
    run cleanly and writes its report), SIGKILL after ``grace`` seconds — with its exit
    code, total CPU and peak RSS from the kernel's accounting of the reaped child."""
    if runner.returncode is not None:
        return {"code": runner.returncode}
    if not exited(runner):
        os.kill(runner.pid, signal.SIGINT)     # unreaped: the PID is still this child's
    deadline = time.monotonic() + grace
    while True:
        pid, status, ru = os.wait4(runner.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            os.kill(runner.pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.1)
    runner.returncode = os.waitstatus_to_exitcode(status)
    return {"code": runner.returncode, "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "maxrss_kb": ru.ru_maxrss}


# -- the run ---------------------------------------------------------------------------------------
class Soak:
    """One soak: the lab, the runner, the intervals; ``close`` always tears down."""

    def __init__(self, release: str, minutes: float, interval: float, log):
        self.release, self.minutes, self.interval, self.log = release, minutes, interval, log
        self.workdir = Path(tempfile.mkdtemp(prefix="gdbdiag-soak-"))
        self.lab: container.Lab | None = None
        self.runner: subprocess.Popen | None = None
        self.meter: Meter | None = None
        self.samples: list[Sample] = []
        self.res: dict = {"minutes": minutes, "interval_s": interval, "names": list(NAMES),
                          "sticky_name": STICKY, "lookup_interval_s": LOOKUP_INTERVAL,
                          "workdir": str(self.workdir)}

    def start(self) -> None:
        self.lab = lab_up(self.release, self.log)
        self.res["lab"] = self.lab.name
        rate = measured_rate(LogTail(Path(self.lab.out_dir) / "lookups.jsonl"), 3.0)
        self.res["baseline_lookups_per_s"] = round(rate, 1)
        self.log(f"   resolver: {rate:.1f} lookups/s measured from its own log over 3 s "
                 f"(aim: {len(NAMES) / LOOKUP_INTERVAL:.0f})")
        self.runner = start_runner(self.lab.pid, self.minutes * 60, self.workdir)
        self.meter = Meter(self.runner, self.lab, self.workdir)
        self.log(f"   runner: gdbdiag attach {self.lab.pid} --duration {self.minutes * 60:g} "
                 f"--json {self.workdir}/report.json --record {self.workdir}/stream.jsonl "
                 f"--quiet (pid {self.runner.pid})")
        armed = wait_armed(self.runner, self.workdir)
        time.sleep(1.0)                  # the writers are attached; let the arming finish
        try:
            self.meter.ring = RingLoss(self.runner.pid)
        except OSError as exc:           # the column shows '?'
            self.log(f"   (the runner's count of lost records is not readable: {exc})")
        self.injected_at = time.time()
        self.lab.inject()
        self.res["armed_after_s"] = round(armed, 2)
        self.log(f"   runner armed (its first uprobe) {armed:.2f} s after its start; the DNS "
                 f"server now drops the next AAAA answer for {STICKY}")

    def loop(self) -> None:
        self.log(HEADER)
        t0, k = self.meter.t, 0
        while True:
            k += 1
            due = t0 + k * self.interval
            while time.monotonic() < due and not exited(self.runner):
                time.sleep(min(0.5, max(0.0, due - time.monotonic())))
            if exited(self.runner):
                return
            try:
                s = self.meter.sample(k * self.interval / 60)
            except (OSError, KeyError):   # it exited (a zombie has no VmRSS) meanwhile
                return
            self.samples.append(s)
            self.log(sample_line(s))
            sw = self.meter.switch
            if sw and "switch_after_injection_s" not in self.res:
                self.res["switch_after_injection_s"] = round(sw["t"] - self.injected_at, 2)
                self.log(f"   (the stream has the switch: LWP {sw['lwp']} sticky_engaged "
                         f"{sw['t'] - self.injected_at:.1f} s after the injection)")

    def finish(self) -> None:
        """The runner's end, its report checked, the figures summarized."""
        self.res["runner"] = stop_runner(self.runner)
        self.meter.finish()
        if self.meter.ring:
            self.res["lost_records_at_exit"] = self.meter.ring.read()
        self.res["record_bytes"] = self.meter.record_bytes()
        self.res["samples"] = [asdict(s) for s in self.samples]
        self.res["summary"] = summarize(self.samples)
        report = self.workdir / "report.json"
        self.res["report"] = str(report)
        rep = json.loads(report.read_text()) if report.exists() else {}
        self.res["checks"] = check_report(rep, self.meter, self.injected_at)
        self.res["report_complete"] = all(c["ok"] for c in self.res["checks"])
        self.res["runner_output"] = (self.workdir / "runner.out").read_text()

    def close(self) -> None:
        """Stop the runner if it still runs, tear the lab down; say what is left."""
        if self.runner is not None and self.runner.returncode is None:
            self.res.setdefault("runner", stop_runner(self.runner))
        keep = not self.res.get("report_complete")
        if self.lab is not None:
            if keep:                     # the evidence of an incomplete report, for a look
                for src in (Path(self.lab.out_dir or "") / "lookups.jsonl", Path(self.lab.dns_log or "")):
                    if src.is_file():
                        shutil.copy(src, self.workdir / src.name)
            problems = container.down(self.lab.name, quiet=True) + container.leftovers(self.lab.name)
            self.res["lab_torn_down"] = not problems
            self.log(f"   lab {self.lab.name} torn down" if not problems else
                     f"   lab {self.lab.name}: left behind: {'; '.join(problems)}")
        if self.meter is not None and self.meter.ring is not None:
            self.meter.ring.close()
        stream = self.workdir / "stream.jsonl"
        if keep:
            self.log(f"   kept in {self.workdir}: the stream, the report, the workload's and the "
                     "DNS server's logs")
        elif stream.exists():
            stream.unlink()              # its size is a figure; the report stays


def run(args) -> int:
    """`gdbdiag bench --soak MINUTES`: the soak only."""
    from ..bench import machine
    if args.soak <= 0 or args.soak_interval <= 0:
        raise GdbdiagError("--soak and --soak-interval must be > 0", EXIT_USAGE)
    log = lambda m: print(m, flush=True)  # noqa: E731
    log(f"== soak: gdbdiag attach for {args.soak:g} min on a {args.release} lab resolver "
        f"({len(NAMES)} threads, each resolving every {LOOKUP_INTERVAL} s), one thread made "
        f"sticky; one line every {args.soak_interval:g} s")
    soak = Soak(args.release, args.soak, args.soak_interval, log)
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.default_int_handler) for s in sigs}  # as Ctrl-C
    try:
        soak.start()
        soak.loop()
        soak.finish()
    finally:
        for s in sigs:                   # the teardown is not interrupted
            signal.signal(s, signal.SIG_IGN)
        try:
            soak.close()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    log(render(soak.res))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "release": args.release,
                                               "soak": soak.res}, indent=1))
    return EXIT_OK if soak.res["report_complete"] and soak.res.get("lab_torn_down") else EXIT_TOOL
