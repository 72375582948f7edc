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
    from .scan import cli as scan_cli
    scan_cli.add_parser(sub)
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
    """Run one sub-command.  The one place where an error becomes an exit status and one
    line on stderr: a :class:`GdbdiagError` with its own code, anything else as an
    internal error (EXIT_TOOL).  ``--traceback`` (before the sub-command) or
    ``GDBDIAG_TRACEBACK=1`` shows the full traceback instead."""
    import traceback

    from .errors import one_line, want_traceback

    ap = build_parser()
    ap.add_argument("--traceback", action="store_true",
                    help="on an error, print the full traceback instead of one line "
                         "(also GDBDIAG_TRACEBACK=1)")
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if [a for a in argv if a != "--traceback"][:1] == ["pod"] and "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    args = ap.parse_args(argv)
    if rest:
        args.attach_args = rest
    who = f"gdbdiag {args.command}" if getattr(args, "command", None) else "gdbdiag"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{who}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.traceback or want_traceback():
            traceback.print_exc()
        elif isinstance(e, GdbdiagError):
            print(f"{who}: {e.line}", file=sys.stderr)
        else:
            print(f"{who}: internal error: {type(e).__name__}: {one_line(e)} "
                  f"(GDBDIAG_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return e.code if isinstance(e, GdbdiagError) else EXIT_TOOL


if __name__ == "__main__":
    sys.exit(main())
