"""`gdbdiag` — command-line entry point (host side). One module per sub-command."""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import EXIT_TOOL, GdbdiagError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="gdbdiag",
        description="Diagnose glibc's sticky single-request resolver stall (bug 30081) "
                    "live in running processes.")
    ap.add_argument("--version", action="version", version=f"gdbdiag {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from .lab import cli as lab_cli
    from .symbols import cli as symbols_cli
    from . import attach, bench, pod, replay
    attach.add_parser(sub)
    bench.add_parser(sub)
    pod.add_parser(sub)
    lab_cli.add_parser(sub)
    symbols_cli.add_parser(sub)
    replay.add_parser(sub)
    g = sub.add_parser("gdbinit", help="print the gdb line that loads the plugin",
                       description="Print `source FILE` for ~/.gdbinit or a gdb prompt; "
                                   "`gdb -x FILE` works too.")
    g.set_defaults(func=_gdbinit)
    return ap


def _gdbinit(args) -> int:
    from pathlib import Path
    print(f"source {Path(__file__).resolve().parent / 'gdb' / 'loader.py'}")
    return 0


def main(argv=None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if argv[:1] == ["pod"] and "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    args = ap.parse_args(argv)
    if rest:
        args.attach_args = rest
    try:
        return args.func(args)
    except GdbdiagError as e:
        print(f"gdbdiag: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("gdbdiag: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
