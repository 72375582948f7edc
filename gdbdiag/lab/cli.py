"""`gdbdiag lab up|probe|down|list|inject` — the replay lab from the command line."""
from __future__ import annotations

import json
import sys
import time

from ..errors import EXIT_OK, EXIT_TOOL
from . import container
from .errors import LabError
from .probe import summarize


def add_parser(sub) -> None:
    lab = sub.add_parser("lab", help="test containers that reproduce the incident",
                         description="Start, probe and remove lab containers.")
    ls = lab.add_subparsers(dest="lab_cmd", metavar="{up,probe,down,list,inject,prepare}")
    ls.required = True
    lab.set_defaults(func=run)

    up = ls.add_parser("up", help="start a lab container")
    up.add_argument("--name", default="lab")
    src = up.add_mutually_exclusive_group()
    src.add_argument("--release", choices=sorted(container.rootfs_mod.RELEASES), default=None,
                     help="Debian release of the rootfs (default bullseye)")
    src.add_argument("--rootfs", metavar="DIR|TARBALL",
                     help="your own root filesystem (directory, or a docker/podman export tarball)")
    up.add_argument("--workload", choices=container.WORKLOADS, default="redis")
    up.add_argument("--cmd", help="run this command (sh -c) as the container's process")
    up.add_argument("--names", nargs="+", metavar="NAME", default=list(container.DEFAULT_NAMES),
                    help="resolver workload: one thread per name")
    up.add_argument("--interval", type=float, default=1.0, help="resolver workload: seconds between lookups")
    up.add_argument("--fault", default="drop-aaaa-once",
                    help="drop-aaaa-once | drop-aaaa-nth:N | drop-aaaa-after:SECONDS | delay:MS | drop-all | none")
    up.add_argument("--fault-match", metavar="GLOB", help="apply the fault only to names matching GLOB")
    up.add_argument("--rcode", choices=container.RCODES, default="SERVFAIL",
                    help="the DNS server's answer for names it cannot resolve")
    up.add_argument("--error-style", choices=("echo", "header-only"), default="echo",
                    help="error answers with the question echoed, or a bare 12-byte header")
    up.add_argument("--resolv-options", default="", metavar="OPTS",
                    help="extra resolv.conf options, e.g. single-request")
    up.add_argument("--record", action="append", default=[], metavar="NAME=TYPE:ADDR",
                    help="a record the DNS server answers (repeatable)")
    up.add_argument("--cache", metavar="DIR", help="root filesystem cache (default /var/cache/gdbdiag)")
    up.add_argument("--json", metavar="FILE", help="also write the lab description here")

    pr = ls.add_parser("probe", help="GET latency probe against the lab's redis")
    pr.add_argument("--name", default="lab")
    pr.add_argument("--seconds", type=float, default=30.0)
    pr.add_argument("--interval", type=float, default=0.1)
    pr.add_argument("--json", metavar="FILE", help="write every request and the summary here")

    dn = ls.add_parser("down", help="remove a lab and everything it created")
    dn.add_argument("--name", default="lab")
    dn.add_argument("--all", action="store_true", help="remove every lab")

    ls.add_parser("list", help="list running labs")

    inj = ls.add_parser("inject", help="make the DNS server drop the next AAAA answer now")
    inj.add_argument("--name", default="lab")

    pre = ls.add_parser("prepare", help="build (or check) the cached root filesystems, in parallel")
    pre.add_argument("--release", action="append", choices=sorted(container.rootfs_mod.RELEASES),
                     help="repeatable; default all")
    pre.add_argument("--cache", metavar="DIR")


def run(args) -> int:
    """Run ``gdbdiag lab …``; a LabError goes up to gdbdiag.cli.main (one line, exit 4)."""
    if args.lab_cmd == "up":
        if args.rootfs and not args.cmd:
            raise LabError("--rootfs needs --cmd (the command your image runs)")
        spec = container.LabSpec(
            name=args.name, release=None if args.rootfs else (args.release or "bullseye"),
            rootfs=args.rootfs, workload=args.workload, cmd=args.cmd, fault=args.fault,
            fault_match=args.fault_match, rcode=args.rcode, error_style=args.error_style,
            names=tuple(args.names), interval=args.interval, resolv_options=args.resolv_options,
            records=tuple(args.record), cache=args.cache)
        lab = container.up(spec, log=lambda m: print(m, file=sys.stderr))
        desc = lab.summary()
        print(json.dumps(desc, indent=1))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(desc, fh, indent=1)
        return EXIT_OK
    if args.lab_cmd == "probe":
        lab = container.Lab.load(args.name)
        if lab.workload != "redis":
            raise LabError(f"lab {lab.name} runs {lab.workload}, not redis: nothing to probe")

        def emit(rec):
            flag = "  SLOW" if rec["ms"] >= 1000 else ""
            err = f"  error: {rec['error']}" if "error" in rec else ""
            print(f"{rec['t']:.3f}  GET {rec['ms']:9.2f} ms{flag}{err}", flush=True)

        recs = lab.probe(args.seconds, args.interval, emit=emit)
        s = summarize(recs)
        print(f"summary: {s['requests']} requests, {s['slow']} slow (>= 1 s), "
              f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, max {s['max_ms']} ms, "
              f"{s['errors']} errors")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"requests": recs, "summary": s}, fh, indent=1)
        return EXIT_OK
    if args.lab_cmd == "down":
        names = [lab.name for lab in container.list_labs()] if args.all else [args.name]
        rc = EXIT_OK
        for name in names:
            problems = container.down(name)
            left = container.leftovers(name)
            if problems or left:
                print(f"gdbdiag lab: {name}: " + "; ".join(problems + left), file=sys.stderr)
                rc = EXIT_TOOL
            else:
                print(f"lab {name} removed")
        return rc
    if args.lab_cmd == "list":
        for lab in container.list_labs():
            state = "up" if lab.alive() else "dead"
            print(f"{lab.name:16} {state:5} pid {lab.pid}  {lab.workload:9} "
                  f"{container.release_label(lab)}  fault {lab.fault}")
        return EXIT_OK
    if args.lab_cmd == "prepare":
        from concurrent.futures import ThreadPoolExecutor
        rels = args.release or sorted(container.rootfs_mod.RELEASES)
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(rels)) as ex:
            futs = {r: ex.submit(container.rootfs_mod.ensure_release, r, args.cache,
                                 log=lambda m: print(m, file=sys.stderr)) for r in rels}
            for r, f in futs.items():
                info = container.rootfs_mod.rootfs_info(f.result())
                print(f"{r}: {f.result()} (glibc {info.get('glibc')}, redis {info.get('redis')})")
        print(f"ready in {time.monotonic() - t0:.1f} s")
        return EXIT_OK
    if args.lab_cmd == "inject":
        container.Lab.load(args.name).inject()
        print(f"lab {args.name}: the next AAAA answer will be dropped")
        return EXIT_OK
    raise AssertionError(args.lab_cmd)
