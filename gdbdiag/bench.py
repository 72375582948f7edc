"""`gdbdiag bench` — the cost to the target and the time to a diagnosis, measured.

Everything is a ratio against the unarmed target in the same run, with the modes
interleaved round by round so machine drift cancels. Lab containers only; nothing here
asserts a timing: the figures are printed and written as JSON.
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tabulate import tabulate

from .errors import EXIT_OK
from .lab import container

# uprobe-*: the kernel-probe backend (the default of attach); gdb-*: --backend gdb
# uprobe-floor: --full's probes with programs that do nothing (the traps and the syscall
# tracing slow path alone), measured only when named
# unarmed-again: a second phase with no tool at all, measured like a mode: its ratio to
# unarmed is this machine's noise floor in the same run (an A/A control)
MODES = ("unarmed", "unarmed-again", "uprobe-armed", "uprobe-lean", "uprobe-full", "uprobe-floor",
         "passive", "gdb-armed", "gdb-lean", "strace", "ebpf")
DETECT_MODES = ("uprobe-armed", "uprobe-lean", "passive")
RECORDS = ("keydb-0.keydb=A:10.244.1.9", "keydb-0.keydb=AAAA:fd00::9")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure overhead and time to diagnosis on lab containers",
                       description=__doc__)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--phase-seconds", type=float, default=4.0)
    p.add_argument("--release", default="bullseye")
    p.add_argument("--modes", default=",".join(m for m in MODES[1:] if not m.startswith("gdb-")
                                               and m != "uprobe-floor"),
                   help="comma-separated modes of the latency part (unarmed is always measured); "
                        "gdb-armed,gdb-lean insert breakpoints into the bench's own lab target "
                        "and are measured only when named here, as is uprobe-floor (--full's "
                        "probes with programs that do nothing: the mechanism's own cost)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: "
                   "latency,throughput,attach,detect")
    from . import soak
    soak.add_arguments(p)
    p.set_defaults(func=run)


# -- tools in each mode -------------------------------------------------------------
class Tool:
    """One mode's instrument around a target PID: start(), ready, stop()."""

    def __init__(self, mode: str, pid: int, on_line=None):
        self.mode, self.pid, self.on_line = mode, pid, on_line or (lambda line, t: None)
        self.proc = None
        self.gdb = None
        self.passive = None
        self.uprobe = None
        self._thread = None
        self._stop = threading.Event()
        self.events = []

    def start(self) -> None:
        m = self.mode
        if m.startswith("uprobe-"):
            from .uprobes.run import UprobeRun
            floor = m == "uprobe-floor"
            self.uprobe = UprobeRun(self.pid, "full" if floor else m.split("-", 1)[1],
                                    say=lambda line: self.on_line(line, time.time()),
                                    empty_programs=floor)
            self.uprobe.arm()
            self.uprobe.release()
            self._thread = threading.Thread(target=self._pump_uprobe, daemon=True)
            self._thread.start()
        elif m.startswith("gdb-"):
            from .gdbdrive import Gdb, setup_commands
            cmds, _ = setup_commands(self.pid, offline=True)
            self.gdb = Gdb(self.pid, cmds)
            self.gdb.cmd("resolv trace" + (" --lean" if m == "gdb-lean" else ""))
            self.gdb.cont()
            self._thread = threading.Thread(target=self._pump_gdb, daemon=True)
            self._thread.start()
        elif m == "passive":
            from .passive import PassiveSampler
            self.passive = PassiveSampler(self.pid, interval=0.05, affected=True)
            self._thread = threading.Thread(target=self._run_passive, daemon=True)
            self._thread.start()
        elif m == "strace":
            self.proc = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=%network,poll",
                                          "-o", "/dev/null", "-p", str(self.pid)],
                                         stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
            time.sleep(1.0)
        elif m == "ebpf":
            libc = _libc_path(self.pid)
            prog = (f'uprobe:{libc}:getaddrinfo /pid == {self.pid}/ {{ @s[tid] = nsecs; }} '
                    f'uretprobe:{libc}:getaddrinfo /@s[tid]/ {{ @us = hist((nsecs - @s[tid]) / 1000); '
                    f'delete(@s[tid]); }}')
            self.proc = subprocess.Popen(["bpftrace", "-e", prog], stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                line = self.proc.stdout.readline()
                if "Attaching" in line or not line:
                    break
            time.sleep(0.5)

    def _pump_uprobe(self):
        from .uprobes.run import PUMP_WAIT
        while not self._stop.is_set():
            self.uprobe.pump(PUMP_WAIT)

    def _pump_gdb(self):
        rest = ""
        while not self._stop.is_set():
            try:
                text = rest + self.gdb.drain(0.2)
            except OSError:
                return
            *lines, rest = text.split("\n")      # what gdb printed since, whole lines
            for line in lines:
                if line.startswith("[gdbdiag]"):
                    self.on_line(line.rstrip("\r"), time.time())

    def _run_passive(self):
        def on_event(ev):
            self.events.append(ev)
            self.on_line(f"[gdbdiag] passive {ev.kind}: {ev.get('measured_ms') or ''}", time.time())
        self.passive.run(3600, on_event=on_event, until=self._stop.is_set)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.gdb is not None:
            self.gdb.close()
        if self.uprobe is not None:
            self.uprobe.close()
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _libc_path(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            parts = line.split(None, 5)
            if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith("libc"):
                return f"/proc/{pid}/root{parts[5].strip()}"
    raise RuntimeError("libc not mapped")


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_times() -> tuple[float, float]:
    """(busy, stolen) seconds of the whole machine so far (/proc/stat's first line): busy
    is not idle, not waiting for I/O and not stolen by the hypervisor (a VM's steal is
    other guests' work)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]] + [0] * 8
    idle, steal = f[3] + f[4], f[7]
    return (sum(f[:8]) - idle - steal) / os.sysconf("SC_CLK_TCK"), steal / os.sysconf("SC_CLK_TCK")


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0, "median_ms": None, "mean_ms": None, "p99_ms": None}
    q = statistics.quantiles(xs, n=100) if len(xs) >= 2 else [xs[0]] * 99
    return {"n": len(xs), "median_ms": round(statistics.median(xs), 3),
            "mean_ms": round(statistics.fmean(xs), 4), "p99_ms": round(q[98], 3)}


# -- the parts ---------------------------------------------------------------------------
def bench_latency(release, rounds, secs, log, modes=MODES) -> dict:
    """The loop workload: one thread calling getaddrinfo back to back (healthy DNS); its
    latency per mode from the workload's own lookup log, and lookups per second."""
    name = f"bench-lat-{os.getpid() % 10000}"
    lab = container.up(container.LabSpec(name=name, release=release, workload="resolver",
                                         names=("keydb-0.keydb",), interval=0.0, fault="none",
                                         records=RECORDS))
    try:
        if any(m.startswith("gdb-") for m in modes):
            _warm_symbols(lab.pid)
        windows = {m: [] for m in modes}
        busy = {m: [] for m in modes}
        target = {m: [] for m in modes}
        stolen = {m: 0.0 for m in modes}
        for r in range(rounds):
            for m in _order(modes, r):
                tool = Tool(m, lab.pid)
                if not m.startswith("unarmed"):
                    tool.start()
                t0, (c0, s0), p0 = time.time(), _cpu_times(), _proc_cpu_s(lab.pid)
                time.sleep(secs)
                t1, (c1, s1), p1 = time.time(), _cpu_times(), _proc_cpu_s(lab.pid)
                tool.stop()
                windows[m].append((t0, t1))
                busy[m].append(c1 - c0)
                target[m].append(p1 - p0)
                stolen[m] += s1 - s0
                log(f"   round {r + 1} {m:8} {secs:.0f} s")
        out = _latency_figures(lab.workload_records(), windows, busy, modes)
        tgt = _latency_figures(lab.workload_records(), windows, target, modes)
        cpus = os.cpu_count() or 1
        for m in modes:         # the target's own CPU (probe traps are charged to it)
            out[m]["target_cpu_ms_per_lookup"] = tgt[m]["cpu_ms_per_lookup"]
            out[m]["target_cpu_ratio"] = tgt[m]["cpu_ratio"]
            # the share of the machine's CPU time the hypervisor gave other guests: this
            # VM's noise, per mode (a mode whose phases were robbed more looks slower)
            wall = sum(b - a for a, b in windows[m]) * cpus
            out[m]["steal_pct"] = round(100 * stolen[m] / wall, 1) if wall else None
        return out
    finally:
        container.down(name)


def _order(modes: tuple, r: int) -> list:
    """Round ``r``'s order of the modes: shuffled (seeded, so a run can be repeated), so
    that no mode always follows another or always runs first in a round."""
    out = list(modes)
    random.Random(r).shuffle(out)
    return out


def _latency_figures(recs: list[dict], windows: dict, busy: dict, modes) -> dict:
    """Per mode: latency stats, lookups/s, the machine's CPU per lookup (target, DNS
    server, the tool, the kernel probes' share of every syscall: less noisy than wall
    time); ratios are each round's to the same round's unarmed phase, median over rounds,
    so slow drift of the machine cancels."""
    out, per_round = {}, {}
    for m, ws in windows.items():
        per = [[r["seconds"] * 1000 for r in recs if a <= r["t"] and r["t"] + r["seconds"] <= b]
               for a, b in ws]
        xs = [x for p in per for x in p]
        out[m] = _stats(xs)
        out[m]["lookups_per_s"] = round(len(xs) / sum(b - a for a, b in ws), 1)
        out[m]["cpu_ms_per_lookup"] = round(sum(busy[m]) * 1000 / len(xs), 4) if xs else None
        per_round[m] = [(statistics.fmean(p), busy[m][i] * 1000 / len(p)) if p else None
                        for i, p in enumerate(per)]
    for m in modes:
        rs = [(a[0] / b[0], a[1] / b[1]) for a, b in zip(per_round[m], per_round["unarmed"])
              if a and b and b[0] and b[1]]
        out[m]["ratio"] = round(statistics.median(r[0] for r in rs), 3) if rs else None
        # the spread of the per-round ratios: where this run's noise puts the median
        out[m]["ratio_iqr"] = [round(q, 3) for q in statistics.quantiles(
            [r[0] for r in rs], n=4)[::2]] if len(rs) >= 4 else None
        out[m]["cpu_ratio"] = round(statistics.median(r[1] for r in rs), 3) if rs else None
        out[m]["rate_ratio"] = round(out["unarmed"]["lookups_per_s"] / out[m]["lookups_per_s"], 3) \
            if out[m]["lookups_per_s"] else None
    return out


def bench_throughput(release, rounds, secs, log) -> dict:
    name = f"bench-thr-{os.getpid() % 10000}"
    lab = container.up(container.LabSpec(name=name, release=release, workload="redis",
                                         fault="none", records=RECORDS))
    try:
        counts = {m: [] for m in ("unarmed", "unarmed-again", "uprobe-armed", "uprobe-lean",
                                  "uprobe-full", "passive")}
        for r in range(rounds):
            for m in _order(tuple(counts), r):
                tool = Tool(m, lab.pid)
                if not m.startswith("unarmed"):
                    tool.start()
                recs = lab.probe(seconds=secs, interval=0.0)
                tool.stop()
                ok = [x for x in recs if "error" not in x]
                counts[m].append(len(ok) / secs)
                log(f"   round {r + 1} {m:8} {len(ok) / secs:8.0f} GET/s")
        # each round's rate over the same round's unarmed one, median over rounds
        return {m: {"gets_per_s": round(statistics.median(v), 1),
                    "ratio": round(statistics.median(a / b for a, b in zip(v, counts["unarmed"]) if b), 3)}
                for m, v in counts.items()}
    finally:
        container.down(name)


def bench_attach(release, log) -> dict:
    """attach -> armed with kernel probes: warm cache, and cold (empty cache, no network:
    `unshare -n`, so nothing can be fetched)."""
    name = f"bench-att-{os.getpid() % 10000}"
    lab = container.up(container.LabSpec(name=name, release=release, workload="redis", fault="none"))
    try:
        cold_dir = tempfile.mkdtemp(prefix="gdbdiag-cold-")
        out = {}
        for label, env, pre in (("cold", {"GDBDIAG_CACHE": cold_dir}, ["unshare", "-n"]),
                                ("warm", {}, [])):
            rep = Path(cold_dir) / f"{label}.json"
            t0 = time.monotonic()
            subprocess.run(pre + [sys.executable, "-m", "gdbdiag.cli", "attach", str(lab.pid),
                                  "--duration", "1", "--quiet", "--json", str(rep)],
                           capture_output=True, text=True, timeout=600, env=dict(os.environ, **env))
            armed = json.loads(rep.read_text())["run"].get("attach_to_armed_s") if rep.exists() else None
            out[f"attach_to_armed_{label}_s"] = armed
            out[f"attach_total_{label}_s"] = round(time.monotonic() - t0, 2)
            log(f"   attach -> armed, {label}: {armed} s")
        shutil.rmtree(cold_dir, ignore_errors=True)
        return out
    finally:
        container.down(name)


def bench_detect(release, log) -> dict:
    """Lost AAAA -> sticky_engaged report; doomed poll report -> its timeout, per mode."""
    out = {}
    for m in DETECT_MODES:
        name = f"bd-{m.split('-')[-1]}-{os.getpid() % 10000}"
        lab = container.up(container.LabSpec(name=name, release=release, workload="redis", fault="none"))
        lines = []
        try:
            tool = Tool(m, lab.pid, on_line=lambda line, t: lines.append((t, line)))
            tool.start()
            time.sleep(1.0)
            lab.inject()
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                if any("stall" in l.split(": ", 1)[0] for _, l in lines):
                    break
                time.sleep(0.2)
            tool.stop()
            drop = [r for r in lab.dns_records() if r["action"] == "dropped"]
            sticky = [t for t, l in lines if "sticky_engaged" in l]
            doomed = [t for t, l in lines if "doomed_poll" in l]
            stalls = [t for t, l in lines if "stall" in l.split(": ", 1)[0]]
            d = {}
            if drop and sticky:
                d["sticky_report_delay_ms"] = round((sticky[0] - drop[0]["t"]) * 1000, 1)
                # the loss itself takes one resolver timeout (5 s) to be noticed by glibc
                d["sticky_report_after_switch_ms"] = round(d["sticky_report_delay_ms"] - 5000, 1)
            if doomed and stalls:
                d["doomed_poll_report_lead_ms"] = round((stalls[0] - doomed[0]) * 1000, 1)
            out[m] = d
            log(f"   {m:8} {d}")
        finally:
            container.down(name)
    return out


def _warm_symbols(pid):
    from .gdbdrive import setup_commands
    setup_commands(pid)


def machine() -> dict:
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024 // 1024
    except OSError:
        pass
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "mem_gib": mem, "cpu": cpu, "kernel": platform.release(),
            "gdb": subprocess.run(["gdb", "--version"], capture_output=True, text=True).stdout.splitlines()[0]}


def run(args) -> int:
    if args.soak is not None:
        from . import soak
        return soak.run(args)
    log = lambda m: print(m, flush=True)
    skip = set(filter(None, args.skip.split(",")))
    res = {"machine": machine(), "release": args.release, "rounds": args.rounds,
           "phase_seconds": args.phase_seconds}
    if "latency" not in skip:
        log("== getaddrinfo latency (loop workload: one thread, back to back, healthy DNS, "
            "8 queries per lookup)")
        modes = tuple(m for m in MODES if m == "unarmed" or m in args.modes.split(","))
        res["latency"] = bench_latency(args.release, args.rounds, args.phase_seconds, log, modes)
    if "throughput" not in skip:
        log("== Redis GET throughput")
        res["throughput"] = bench_throughput(args.release, args.rounds, args.phase_seconds, log)
    if "attach" not in skip:
        log("== attach -> armed")
        res.update(bench_attach(args.release, log))
    if "detect" not in skip:
        log("== time to diagnosis")
        res["detect"] = bench_detect(args.release, log)
    lat = res.get("latency", {})
    for m in MODES[1:]:
        if m in lat:
            res[f"overhead_ratio_{m}"] = lat[m].get("ratio")
    det = res.get("detect", {})
    for k in ("sticky_report_delay_ms", "doomed_poll_report_lead_ms"):
        res[k] = {m: det[m].get(k) for m in det}
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return EXIT_OK


def render(res: dict) -> str:
    out = []
    lat = res.get("latency")
    if lat:
        rows = [[m, lat[m]["n"], lat[m].get("lookups_per_s"), lat[m]["median_ms"],
                 lat[m].get("mean_ms"), lat[m]["p99_ms"], lat[m]["ratio"],
                 "–".join(map(str, lat[m]["ratio_iqr"])) if lat[m].get("ratio_iqr") else "",
                 lat[m].get("rate_ratio"),
                 lat[m].get("cpu_ms_per_lookup"), lat[m].get("cpu_ratio"),
                 lat[m].get("target_cpu_ms_per_lookup"), lat[m].get("target_cpu_ratio"),
                 lat[m].get("steal_pct")]
                for m in MODES if m in lat]
        out.append(tabulate(rows, headers=["getaddrinfo loop", "lookups", "lookups/s", "median ms",
                                           "mean ms", "p99 ms", "mean ratio",
                                           "per-round IQR", "1/rate ratio",
                                           "machine CPU ms/lookup", "ratio", "target CPU ms/lookup",
                                           "ratio", "steal %"]))
    thr = res.get("throughput")
    if thr:
        rows = [[m, v["gets_per_s"], v["ratio"]] for m, v in thr.items()]
        out.append(tabulate(rows, headers=["redis GET", "GET/s", "ratio to unarmed"]))
    if "attach_to_armed_warm_s" in res:
        out.append(f"attach -> armed (kernel probes): warm cache {res['attach_to_armed_warm_s']} s, "
                   f"empty cache and no network {res['attach_to_armed_cold_s']} s")
    det = res.get("detect")
    if det:
        rows = [[m, d.get("sticky_report_delay_ms"), d.get("sticky_report_after_switch_ms"),
                 d.get("doomed_poll_report_lead_ms")] for m, d in det.items()]
        out.append(tabulate(rows, headers=["mode", "lost AAAA -> sticky report ms",
                                           "(minus the 5 s timeout)", "doomed poll reported ms before it ends"]))
    m = res["machine"]
    out.append(f"machine: {m['cpus']} cores, {m['mem_gib']} GiB, {m['cpu']}, kernel {m['kernel']}, {m['gdb']}")
    return "\n\n".join(out)
