"""``gdbdiag symbols`` and ``gdbdiag check``: :func:`add_parser` adds them to
gdbdiag/cli.py's parser, :func:`run` runs them.  Errors (an unidentifiable target, a
bad ``--sources``, unreadable ``--data``) are raised as :class:`~gdbdiag.errors.GdbdiagError`
and reported as one line by ``gdbdiag.cli.main``.

    gdbdiag symbols PID | --file PATH [--root DIR] | --root DIR
            [--sources debian,ubuntu,debuginfod,local] [--local PATH]... [--cache DIR]
            [--offline] [--timeout S] [--debian-mirror URL] [--debian-security-mirror URL]
            [--ubuntu-mirror URL] [--ubuntu-ddebs URL] [--launchpad-url URL]
            [--debuginfod-url URL]... [--keyring FILE]... [--json FILE]
            [--progress/--no-progress] [--no-dpkg-deb] [--identify-only] [--gdb-commands]
    gdbdiag check PID | --file PATH [--root DIR] | --root DIR [--data FILE] [--json FILE]

Exit status — symbols: 0 every object has a verified debug file, 1 some have not,
2 the target cannot be identified.  check: 0 not affected, 1 affected, 3 unknown,
2 the target cannot be identified or the data file is unreadable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from tabulate import tabulate

from ..errors import EXIT_USAGE, GdbdiagError
from . import debdata, gdbload
from .cache import SymbolCache, atomic_write_bytes, default_cache_dir
from .identify import IdentifyError, identify_file, identify_process, identify_root
from .sources import SOURCES, Settings, fetch_symbols

__all__ = ["add_parser", "run", "identify_from_args"]


def _target_args(p: argparse.ArgumentParser):
    p.add_argument("pid", nargs="?", type=int, help="process to inspect")
    p.add_argument("--file", metavar="PATH", help="identify one ELF object instead of a process")
    p.add_argument("--root", metavar="DIR", help="rootfs directory: --file is inside it; alone: its glibc")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON ('-' = stdout)")


def add_parser(subparsers) -> None:
    """Add the ``symbols`` and ``check`` sub-commands to an argparse sub-parsers object."""
    s = subparsers.add_parser("symbols", help="identify the target's glibc and fetch/verify/cache its debug files",
                              description="Identify the glibc objects the resolver uses, fetch their debug "
                                          "files, verify them by build-id and cache them.")
    _target_args(s)
    s.add_argument("--sources", default=os.environ.get("GDBDIAG_SOURCES", "debian,ubuntu,debuginfod,local"),
                   help="comma-separated order (default: %(default)s)")
    s.add_argument("--local", metavar="PATH", action="append", default=[],
                   help="a .deb/.ddeb, a directory or a debug file (repeatable)")
    s.add_argument("--cache", metavar="DIR", default=None, help=f"cache dir (default {default_cache_dir()})")
    s.add_argument("--offline", action="store_true", help="use the cache only")
    s.add_argument("--timeout", type=float, default=float(os.environ.get("GDBDIAG_TIMEOUT", "30")),
                   help="seconds per network operation (default: %(default)s)")
    s.add_argument("--debian-mirror", metavar="URL", help="default $GDBDIAG_DEBIAN_MIRROR or deb.debian.org/debian")
    s.add_argument("--debian-security-mirror", metavar="URL", help="default $GDBDIAG_DEBIAN_SECURITY_MIRROR")
    s.add_argument("--debian-suites", metavar="LIST", help="comma-separated suites to search, in order")
    s.add_argument("--ubuntu-mirror", metavar="URL", help="Ubuntu archive base ($GDBDIAG_UBUNTU_MIRROR)")
    s.add_argument("--ubuntu-ddebs", metavar="URL", help="Ubuntu ddebs base ($GDBDIAG_UBUNTU_DDEBS)")
    s.add_argument("--launchpad-url", metavar="URL", help="Launchpad base ($GDBDIAG_LAUNCHPAD_URL)")
    s.add_argument("--debuginfod-url", metavar="URL", action="append", default=None,
                   help="debuginfod server (repeatable; default $DEBUGINFOD_URLS)")
    s.add_argument("--keyring", metavar="FILE", action="append", default=None,
                   help="OpenPGP keyring for InRelease (repeatable; default the Debian archive keyrings)")
    s.add_argument("--progress", dest="progress", action="store_true", default=None, help="force the progress bar")
    s.add_argument("--no-progress", dest="progress", action="store_false")
    s.add_argument("--no-dpkg-deb", action="store_true", help="extract packages in pure Python")
    s.add_argument("--identify-only", action="store_true", help="identify, fetch nothing")
    s.add_argument("--gdb-commands", action="store_true", help="print the gdb setup commands for this target")
    s.set_defaults(_symbols_cmd="symbols", func=run)

    c = subparsers.add_parser("check", help="is the target's glibc build affected by bug 30081?",
                              description="Report from debian-symbols data whether the target's glibc build "
                                          "stalls in sticky single-request mode (glibc bug 30081).")
    _target_args(c)
    c.add_argument("--data", metavar="FILE", default=None, help=f"default {debdata.default_data_path()}")
    c.set_defaults(_symbols_cmd="check", func=run)


def identify_from_args(args):
    if args.file:
        return identify_file(args.file, root=args.root)
    if args.pid is not None:
        return identify_process(args.pid)
    if args.root:
        return identify_root(args.root)
    raise IdentifyError("give a PID, --file PATH or --root DIR")


def _settings(args) -> Settings:
    s = Settings()
    s.sources = [x.strip() for x in args.sources.split(",") if x.strip()]
    bad = [x for x in s.sources if x not in SOURCES]
    if bad:
        raise IdentifyError(f"unknown source(s) {', '.join(bad)} (known: {', '.join(SOURCES)})")
    s.timeout, s.offline, s.progress = args.timeout, args.offline, args.progress
    s.local = list(args.local)
    for a, attr in (("debian_mirror", "debian_mirror"), ("debian_security_mirror", "debian_security_mirror"),
                    ("ubuntu_mirror", "ubuntu_mirror"), ("ubuntu_ddebs", "ubuntu_ddebs"),
                    ("launchpad_url", "launchpad_url")):
        v = getattr(args, a)
        if v:
            setattr(s, attr, v)
    if args.debian_suites:
        s.debian_suites = [x.strip() for x in args.debian_suites.split(",") if x.strip()]
    if args.debuginfod_url is not None:
        s.debuginfod_urls = args.debuginfod_url
    if args.keyring:
        s.keyrings = args.keyring
    if args.no_dpkg_deb:
        s.use_dpkg = False
    return s


def _write_json(dest: str, obj):
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    if dest == "-":
        sys.stdout.write(text)
    else:
        atomic_write_bytes(os.path.abspath(dest), text.encode())


def _short(b):
    return (b[:12] + "…") if b else "-"


def run_symbols(args) -> int:
    settings = _settings(args)
    ident = identify_from_args(args)
    for w in ident.warnings:
        print(f"warning: {w}", file=sys.stderr)
    cache = SymbolCache(args.cache)
    d = ident.distro
    print(f"target: {('pid ' + str(ident.pid)) if ident.pid else ident.objects[0].host_path} "
          f"({ident.mode}{', root ' + (ident.root_dir or ident.root) if ident.root not in ('/', None) else ''})  "
          f"distro: {d.get('pretty_name') or d.get('id') or '?'}  "
          f"glibc {ident.glibc_version or '?'}  {ident.package or 'libc6'} {ident.package_version or '?'}"
          f"{' (from ' + ident.package_version_from + ')' if ident.package_version_from else ''}")
    if args.identify_only:
        rows = [[o.name, o.path, o.status, o.build_id, o.package_version] for o in ident.objects]
        print(tabulate(rows, headers=["object", "path (in target)", "status", "build-id", "version"]))
        if args.json:
            _write_json(args.json, {"schema": "gdbdiag.symbols/1", "target": ident.to_dict()})
        return 0
    res = fetch_symbols(ident, settings, cache)
    rows = []
    for o in res.objects:
        rows.append([o.name, o.status, _short(o.build_id), o.package_version or "-",
                     o.origin if o.debug_file else f"MISSING: {o.error}"])
    print(tabulate(rows, headers=["object", "status", "build-id", "version", "symbols from"]))
    for a in res.attempts:
        if not a.ok and not a.reason.startswith("skipped"):
            print(f"  {a.source}: {a.reason}", file=sys.stderr)
    print(f"debug-file-directory: {res.debug_dir}")
    if args.gdb_commands and ident.pid:
        for c in gdbload.gdb_setup_commands(ident, res.debug_dir):
            print(c)
    if args.json:
        _write_json(args.json, res.to_dict())
    return 0 if res.ok else 1


def run_check(args) -> int:
    ident = identify_from_args(args)
    try:
        data = debdata.load_data(args.data)
    except ValueError as e:
        raise GdbdiagError(f"--data: {e}", EXIT_USAGE) from None
    v = debdata.check_target(ident, data)
    aff = {True: "AFFECTED: stalls in sticky single-request mode on error answers (bug 30081)",
           False: "not affected: has the bug 30081 fix", None: "unknown"}[v["affected"]]
    rows = [["target", f"pid {ident.pid}" if ident.pid else (ident.objects[0].host_path if ident.objects else "?")],
            ["glibc", f"{ident.glibc_version} ({ident.package or 'libc6'} {ident.package_version or '?'})"],
            ["matched by", v["matched_by"] or "nothing (version table)"],
            ["send_dg in", v.get("send_dg_object") or "?"],
            ["sticky flag in", f"_res.{v['sticky_field']}" if v.get("sticky_field") else "?"],
            ["bug 30081", aff],
            ["decided by", v.get("fixed_by") or "?"],
            ["evidence", v.get("evidence") or "-"]]
    if v.get("note"):
        rows.append(["note", v["note"]])
    print(tabulate(rows, tablefmt="plain"))
    if args.json:
        _write_json(args.json, v)
    return {True: 1, False: 0, None: 3}[v["affected"]]


def run(args) -> int:
    cmd = getattr(args, "_symbols_cmd", None)
    if cmd == "symbols":
        return run_symbols(args)
    if cmd == "check":
        return run_check(args)
    raise SystemExit(f"gdbdiag.symbols.cli.run: not a symbols/check namespace: {args!r}")

