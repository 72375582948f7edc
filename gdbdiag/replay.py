"""`gdbdiag replay` — the incident, reproduced on a lab container and explained.

Starts a lab (bullseye + redis as a replica of a dead peer, one AAAA answer lost by
default), probes GET latency, then prints the stalls next to the DNS-log lines that
explain them, and tears the lab down whatever happens.
"""
from __future__ import annotations

import json
import signal
import time

from tabulate import tabulate

from .errors import EXIT_OK
from .lab import container
from .lab.probe import summarize


def add_parser(sub) -> None:
    p = sub.add_parser("replay", help="reproduce the incident on a lab container and explain it",
                       description="Lab up (bullseye, redis replica of keydb-0.keydb, one AAAA "
                                   "answer lost), probe GET latency, print the stalls and the "
                                   "DNS log that explains them, tear down.")
    p.add_argument("--name", default="replay")
    p.add_argument("--release", choices=sorted(container.rootfs_mod.RELEASES), default="bullseye")
    p.add_argument("--fault", default=None,
                   help="a lab fault (default: none at start; one AAAA answer is dropped as soon "
                        "as gdbdiag is armed, so it sees the switch happen)")
    p.add_argument("--no-attach", action="store_true",
                   help="only reproduce: no gdbdiag attach (the fault defaults to drop-aaaa-once)")
    p.add_argument("--timeline", metavar="FILE", help="write the HTML timeline of the diagnosis")
    p.add_argument("--rcode", choices=container.RCODES, default="SERVFAIL")
    p.add_argument("--seconds", type=float, default=35.0, help="how long to probe (default 35)")
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p.add_argument("--json", metavar="FILE", help="write probe records, DNS log and stalls here")
    p.add_argument("--cache", metavar="DIR")
    p.set_defaults(func=run)


def find_stalls(probe: list[dict], slow_ms: float = 1000.0) -> list[dict]:
    return [r for r in probe if r.get("ms", 0) >= slow_ms]


def explain(stall: dict, dns: list[dict]) -> list[dict]:
    """DNS-log records that fall inside one stall's window."""
    t0, t1 = stall["t"], stall["t"] + stall["ms"] / 1000.0
    return [r for r in dns if t0 - 0.05 <= r["t"] <= t1 + 0.05]


def exchange_mode(dns: list[dict]) -> dict[int, str]:
    """For each AAAA query (by index in ``dns``): 'parallel' if it was on the wire before
    the A answer of the same lookup left the server (sendmmsg), 'serial' if after."""
    modes = {}
    last_a = {}
    for i, r in enumerate(dns):
        key = (r.get("client"), r.get("qname"))
        if r.get("qtype") == "A" and r.get("tx") is not None:
            last_a[key] = r
        elif r.get("qtype") == "AAAA" and key in last_a and r.get("rx") is not None:
            modes[i] = "serial" if r["rx"] > last_a[key]["tx"] else "parallel"
    return modes


def _fmt_dns(r: dict, t0: float, mode: str = "") -> str:
    return (f"  +{r['t'] - t0:7.3f}s  {r.get('qtype', '?'):5} {r.get('qname', '?'):44} "
            f"{r.get('rcode', '-'):9} {r.get('action', ''):8} {mode:8}"
            + (f" ({r['reason']})" if r.get("reason") else ""))


def run(args) -> int:
    attach = not args.no_attach
    fault = args.fault or ("none" if attach else "drop-aaaa-once")
    args.fault = fault
    spec = container.LabSpec(name=args.name, release=args.release, workload="redis",
                             fault=fault, rcode=args.rcode, cache=args.cache)
    # SIGTERM/SIGHUP take the same way out as Ctrl-C, so the lab is always removed.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: (_ for _ in ()).throw(KeyboardInterrupt()))
    lab = None
    if (container.STATE_ROOT / args.name).exists():
        # left by a replay that was killed before its teardown: the demo owns this name
        print(f"== removing a previous replay lab {args.name!r} left behind", flush=True)
        container.down(args.name, quiet=True)
    try:
        print(f"== lab: {args.release}, redis replica of keydb-0.keydb:6379 (a dead peer), "
              f"DNS answers {args.rcode} for the bare name, fault {args.fault}", flush=True)
        lab = container.up(spec, log=lambda m: print("   " + m, flush=True))
        print(f"   redis-server pid {lab.pid} (host), DNS log {lab.dns_log}", flush=True)
        runner = None
        if attach:
            runner = _start_attach(lab, args)
        print(f"== probing GET latency for {args.seconds:.0f} s (each '#' is a request "
              f"that took >= 1 s)", flush=True)
        t_start = time.time()

        def emit(rec):
            if rec["ms"] >= 1000:
                print(f"   +{rec['t'] - t_start:6.1f}s  GET took {rec['ms'] / 1000:6.2f} s  #",
                      flush=True)

        probe = lab.probe(args.seconds, 0.1, emit=emit)
        if runner is not None:
            _finish_attach(runner)
        dns = lab.dns_records()
        s = summarize(probe)
        stalls = find_stalls(probe)
        print(f"== {s['requests']} GETs: {len(stalls)} took >= 1 s (max {s['max_ms'] / 1000:.2f} s), "
              f"median {s['p50_ms']} ms", flush=True)
        if stalls:
            rows = []
            for st in stalls:
                window = explain(st, dns)
                servfail = [r for r in window if r.get("rcode") == args.rcode and
                            not r.get("qname", "").endswith("cluster.local.")]
                rows.append([f"+{st['t'] - t_start:.1f}s", f"{st['ms'] / 1000:.2f} s",
                             len(window), len(servfail),
                             ", ".join(f"{r['qtype']} {r['qname']}" for r in servfail[:2])])
            print(tabulate(rows, headers=["GET sent", "latency", "DNS queries in window",
                                          f"{args.rcode} answers", "error answers for"]))
        dropped = [r for r in dns if r.get("action") == "dropped"]
        if dropped:
            t0 = dropped[0]["t"]
            print("== DNS log around the lost answer (the first 24 lines from it; an AAAA is "
                  "'parallel' when it was sent with its A, 'serial' when sent after A's answer):")
            modes = exchange_mode(dns)
            for i, r in enumerate(dns):
                if r["t"] >= t0 - 0.01 and i < dns.index(dropped[0]) + 23:
                    print(_fmt_dns(r, t0, modes.get(i, "")))
            print(_story(args, dropped[0], dns, stalls))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"lab": lab.summary(), "probe": probe, "summary": s, "dns": dns},
                          fh, indent=1)
        return EXIT_OK
    finally:
        if "runner" in locals() and runner is not None and runner["p"].poll() is None:
            runner["p"].send_signal(signal.SIGINT)
            runner["p"].wait(60)
        if lab is not None and not args.keep:
            problems = container.down(lab.name, quiet=True)
            print(f"== lab {lab.name} removed" + (f" ({'; '.join(problems)})" if problems else ""))


def _start_attach(lab, args) -> dict:
    """`gdbdiag attach` on the lab's redis; the AAAA answer is dropped once it is armed."""
    import subprocess
    import sys
    import threading
    from pathlib import Path
    argv = [sys.executable, "-m", "gdbdiag.cli", "attach", str(lab.pid),
            "--duration", str(max(5.0, args.seconds - 2))]
    if args.timeline:
        argv += ["--timeline", args.timeline]
    if args.json:
        argv += ["--json", str(Path(args.json).with_suffix(".report.json"))]
    print(f"== gdbdiag attach {lab.pid}: symbols, probes; then one AAAA answer is lost", flush=True)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    armed = threading.Event()
    lines: list[str] = []

    def pump():
        for line in p.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if line.startswith("gdbdiag: armed"):
                armed.set()
            if line.startswith("[gdbdiag]") or line.startswith("gdbdiag:"):
                print("   " + line, flush=True)
        armed.set()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    armed.wait(120)
    if args.fault == "none" and p.poll() is None:
        lab.inject()
        print("   (lab: the DNS server will drop the next AAAA answer)", flush=True)
    return {"p": p, "lines": lines, "thread": t}


def _finish_attach(runner) -> None:
    runner["p"].wait(120)
    runner["thread"].join(10)
    text = runner["lines"]
    i = next((k for k, l in enumerate(text) if l.startswith("== target pid")), None)
    print("== gdbdiag's diagnosis")
    for line in text[i:] if i is not None else text[-20:]:
        print("   " + line)


def _story(args, drop: dict, dns: list[dict], stalls: list[dict]) -> str:
    bare = [r for r in dns if r.get("rcode") == args.rcode and r["t"] > drop["t"]
            and r.get("qtype") == "A"]
    gaps = [round(b["t"] - a["t"], 1) for a, b in zip(bare, bare[1:])
            if a.get("client") == b.get("client")]
    lines = [f"== what happened: the {drop['qtype']} answer for {drop['qname']} was lost;"
             " glibc's send_dg timed out waiting for it and switched this thread to",
             "   single-request mode for good (statp->options |= RES_SNGLKUP). From then on A and"
             " AAAA go out one after the other,"]
    if stalls:
        lines.append(f"   and each {args.rcode} to the A query is followed by a poll() for an "
                     "AAAA answer that was never asked for:")
        lines.append(f"   the A query for the bare name was re-sent {gaps[:4]} s after each "
                     f"{args.rcode} (the resolver timeout, per attempt), and redis's "
                     "replicationCron blocked every GET meanwhile.")
    else:
        lines.append("   but this glibc does not wait after an error answer: no stall (fixed build).")
    return "\n".join(lines)
