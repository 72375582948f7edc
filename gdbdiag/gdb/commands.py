"""`resolv …` commands (GEF-style registered classes, pwndbg-style argparse options,
preconditions as decorators: :mod:`.guards`), and the `set/show resolv …` settings.

An error of gdbdiag's own (:class:`~gdbdiag.errors.GdbdiagError`) in a command is a
one-line gdb error; `set resolv traceback on` prints its full traceback first.
Arguments that name a file (``--json FILE``, ``--record FILE`` …) complete as file names.
"""
import argparse
import json
import os
import time

import gdb

from ..core import render
from ..core import report as R
from ..core.detector import Detector
from ..core.events import Event
from ..core import events as E
from ..errors import EXIT_OK, GdbdiagError
from . import session as S
from .guards import attached_inferior, not_while_tracing, only_when_attached, setting, traceback_text

COMMANDS = []


def command(cls):
    COMMANDS.append(cls)
    return cls


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise gdb.GdbError("%s: %s" % (self.prog, message))

    def exit(self, status=0, message=None):
        if message:
            gdb.write(message)
        raise _Exit(message or "", status)


class _Exit(GdbdiagError):
    """argparse is done (``--help``): the command ends without running."""

    code = EXIT_OK


#: metavars of the options whose value is a file or directory (completed as file names)
PATH_METAVARS = ("FILE", "PATH", "DIR")


def path_completions(prefix):
    """The files and directories (with a trailing ``/``) whose path starts with ``prefix``."""
    head, tail = os.path.split(prefix)
    try:
        names = os.listdir(os.path.expanduser(head) or ".")
    except OSError:
        return []
    out = []
    for n in sorted(names):
        if n.startswith(tail) and (tail.startswith(".") or not n.startswith(".")):
            p = os.path.join(head, n)
            out.append(p + "/" if os.path.isdir(os.path.expanduser(p)) else p)
    return out


def show_traceback(exc):
    """With `set resolv traceback on`, write ``exc``'s full traceback."""
    tb = traceback_text(exc)
    if tb:
        gdb.write(tb)


class ResolvCommand(gdb.Command):
    """Base: parse argv with argparse; errors are one-line gdb errors."""
    name = ""
    summary = ""
    examples = ""

    def __init__(self):
        self.parser = _Parser(prog=self.name, add_help=True,
                              epilog=("examples:\n" + self.examples) if self.examples else None,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        self.options(self.parser)
        self.path_options = {o for a in self.parser._actions if a.option_strings and a.nargs != 0
                             and a.metavar in PATH_METAVARS for o in a.option_strings}
        self.option_names = sorted(o for a in self.parser._actions for o in a.option_strings
                                   if o.startswith("--"))
        # gdb reads the class docstring when the command is created: `help resolv trace`
        type(self).__doc__ = self.summary + "\n\n" + self.parser.format_help()
        super().__init__(self.name, gdb.COMMAND_USER)

    def options(self, p):
        pass

    def invoke(self, arg, from_tty):
        try:
            args = self.parser.parse_args(gdb.string_to_argv(arg))
        except _Exit:
            return
        try:
            self.run(args)
        except gdb.GdbError:
            raise
        except GdbdiagError as exc:
            show_traceback(exc)
            raise gdb.GdbError(exc.line) from None
        except Exception as exc:
            show_traceback(exc)
            raise

    def complete(self, text, word):
        """File names after an option that takes a file (``--json FILE``); option names
        for a word that starts with ``-``.

        gdb calls this twice: first with ``word`` None, to learn how to break words (a
        COMPLETE_ constant: file-name rules keep a path one word), then with its last
        word.  gdb's own file-name completer reads the whole argument text (so it cannot
        complete a path that follows an option): the names are listed here instead."""
        parts = text.split()
        current = "" if not text or text[-1].isspace() else parts[-1]
        done = parts[:-1] if current else parts
        after_path_option = bool(done) and done[-1] in self.path_options
        if word is None:
            return gdb.COMPLETE_FILENAME if after_path_option else []
        cut = len(current) - len(word)        # gdb's word may be the token's tail
        if after_path_option:
            return [p[cut:] for p in path_completions(current)]
        if current.startswith("-"):
            return [o[cut:] for o in self.option_names if o.startswith(current)]
        return []

    def run(self, args):
        raise gdb.GdbError("not a command")


@command
class Resolv(gdb.Command):
    """Diagnose glibc's sticky single-request resolver stall (bug 30081) in this process.

resolv status    each thread's resolver state (sticky single-request mode?)
resolv trace     arm the getaddrinfo -> send_dg chain and send_dg's probes
resolv untrace   remove every probe (the target's code bytes are restored)
resolv report    findings, stalls, blocked stacks, verdict (--json FILE)
resolv probes    probe points found in send_dg, and the bug-30081 verdict from its code
resolv symbols   load matching debug symbols for this process's glibc"""

    def __init__(self):
        super().__init__("resolv", gdb.COMMAND_USER, prefix=True)

    def invoke(self, arg, from_tty):
        gdb.execute("help resolv", from_tty)


@command
class ResolvStatus(ResolvCommand):
    name = "resolv status"
    summary = "A table per thread: options/_flags decoded, sticky or not, nameservers, " \
              "timeout/attempts/ndots, last query and stall (works before any trace)."
    examples = "  resolv status\n  resolv status --json"

    def options(self, p):
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    @only_when_attached
    def run(self, args):
        sess = S.TraceSession.current
        offsets = sess.offsets if sess and sess.offsets else None
        rows = S.thread_states(offsets)
        det = sess.detector if sess and sess.detector else None
        out = []
        for r in rows:
            sticky = S.sticky_of(r)
            th = det.threads.get(r["lwp"]) if det else None
            since = None
            if th is not None and th.sticky and th.since and th.cause and "attach" not in th.cause:
                since = time.strftime("%H:%M:%S", time.localtime(th.since))
            out.append({"lwp": r["lwp"], "name": r["name"], "options": r["options"],
                        "flags": r["flags"], "sticky": sticky["single_request"],
                        "sticky_field": sticky["field"], "since_text": since or (
                            "before attach" if sticky["single_request"] else ""),
                        "cause": th.cause if th is not None and th.sticky else (
                            "unknown (before attach)" if sticky["single_request"] else ""),
                        "nameservers": r["nameservers"], "resolver": r["resolver"],
                        "last_query": th.last_query if th else None,
                        "last_stall_ms": th.last_stall_ms if th else None,
                        "provenance": r.get("prov"), "error": r.get("error")})
        if args.json:
            gdb.write(json.dumps(out, indent=1) + "\n")
            return
        gdb.write(render.status_table(out) + "\n")
        mem = [o for o in out if o["provenance"] == "memory" and o["options"] is not None]
        if mem:
            gdb.write("(options/_flags of %d thread(s) read from /proc/%d/mem without debug "
                      "symbols: provenance memory)\n" % (len(mem), attached_inferior().pid))
        bad = [o for o in out if o.get("error")]
        if bad:
            gdb.write("(%d thread(s) unreadable: %s — is the target's libthread_db loaded? "
                      "try `resolv symbols`)\n" % (len(bad), bad[0]["error"]))


@command
class ResolvTrace(ResolvCommand):
    name = "resolv trace"
    summary = ("Arm getaddrinfo -> _nss_dns_gethostbyname4_r -> __res_context_search -> "
               "__res_context_querydomain -> __res_context_query -> __res_context_send -> "
               "send_dg, and probes at send_dg's calls to poll/send/sendmmsg/recvfrom, after "
               "them, and where the single-request flags are set. send_dg's probe points are "
               "read from the machine code of the process's own libc/libresolv (no debug "
               "symbols needed); DWARF, when loaded, adds locals and is cross-checked. Without "
               "--step probes record and continue; with --step gdb stops at every step and "
               "prints the dump.\n\n"
               "SAFETY: this gdb session inserts breakpoints (int3) into the target. If gdb is "
               "killed while they are inserted (SIGKILL, a crash, a dropped terminal), a thread "
               "that reaches one dies of SIGTRAP, and with it the process. `resolv untrace` "
               "and `detach` remove them. For a run that cannot harm the target however it "
               "ends, use `gdbdiag attach PID` instead (kernel probes, the default batch "
               "backend: no breakpoint in the target's code).")
    examples = ("  resolv trace\n  resolv trace --step\n  resolv trace --thread 2 "
                "--names 'keydb-*'\n  continue")

    def options(self, p):
        p.add_argument("--step", action="store_true", default=None,
                       help="stop at every step and print its dump (default: set resolv step)")
        p.add_argument("--thread", type=int, help="only this thread (gdb number or LWP)")
        p.add_argument("--names", metavar="GLOB", help="only lookups whose name matches GLOB")
        p.add_argument("--lean", action="store_true",
                       help="fewest stops: no chain, no check polls (see README)")
        p.add_argument("--full", action="store_true",
                       help="every probe for every lookup from the start (costly; --step implies it)")
        p.add_argument("--record", metavar="FILE", help="write every event as JSON lines")
        p.add_argument("--verbose", action="store_true", help="print every observation")
        p.add_argument("--no-source", action="store_true",
                       help="do not fetch/show glibc's source at each step")
        p.add_argument("--step-log", metavar="FILE",
                       help="write every step's dump to FILE without stopping (batch runs)")

    @only_when_attached
    @not_while_tracing("already tracing: `resolv untrace` first")
    def run(self, args):
        # step decides which probes are armed: read once, here; verbose, names and
        # color are read by the session whenever a probe fires (`set` works at once)
        step = args.step if args.step is not None else bool(setting("resolv step", False))
        sess = S.TraceSession(step=step, thread=args.thread, names=args.names, lean=args.lean,
                              record=args.record, step_log=args.step_log,
                              source=not args.no_source, full=args.full,
                              verbose=True if args.verbose else None)
        S.TraceSession.current = sess
        sess.start()


@command
class ResolvUntrace(ResolvCommand):
    name = "resolv untrace"
    summary = "Delete every gdbdiag probe; the target's code bytes are restored at once."

    def run(self, args):
        sess = S.TraceSession.current
        n = sess.stop() if sess else 0
        gdb.write("removed %d probes\n" % n)


@command
class ResolvReport(ResolvCommand):
    name = "resolv report"
    summary = "The findings so far: sticky threads, stalls, blocked stacks, the verdict."
    examples = "  resolv report\n  resolv report --json /tmp/report.json"

    def options(self, p):
        p.add_argument("--json", metavar="FILE", help="write the JSON report (schema %s)" % R.SCHEMA)
        p.add_argument("--timeline", metavar="FILE", help="write an HTML timeline")

    @only_when_attached
    def run(self, args):
        from ..timeline import terminal
        rep = current_report()
        gdb.write(render.report_text(rep) + "\n")
        gdb.write(terminal(rep) + "\n")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rep, fh, indent=1, default=str)
            gdb.write("report written to %s\n" % args.json)
        if args.timeline:
            from ..timeline import write_html
            write_html(rep, args.timeline)
            gdb.write("timeline written to %s\n" % args.timeline)


def current_report(include_observations=True):
    inf = attached_inferior()
    sess = S.TraceSession.current
    det = sess.detector if sess and sess.detector else Detector()
    if not (sess and sess.detector):
        for r in S.thread_states(None):
            det.feed(Event(t=time.time(), lwp=r["lwp"], kind=E.STATUS,
                           data={"options": r["options"], "flags": r["flags"],
                                 "thread_name": r["name"]},
                           prov={"options": r["prov"], "flags": r["prov"]}))
    build = sess.build if sess else {}
    glibc = glibc_facts(inf.pid, build)
    target = {"pid": inf.pid, "exe": _exe(inf.pid),
              "threads": len(inf.threads())}
    return R.build(det, target, glibc, symbols_facts(),
                   sess.observations if sess and include_observations else [],
                   started=sess.t0 if sess else None)


def _exe(pid):
    from ..procfs import exe_name
    return exe_name(pid)


def glibc_facts(pid, build):
    from ..symbols.facts import glibc_facts as facts
    return facts(pid, build)


def symbols_facts():
    return getattr(S, "SYMBOLS", {"source": None, "verified": None})


@command
class ResolvProbes(ResolvCommand):
    name = "resolv probes"
    summary = ("Where the probes go in send_dg (call sites, flag writes, returns), found in the "
               "machine code of the process's own glibc (no debug symbols needed); the "
               "bug-30081 verdict from that code; with DWARF also which locals it can read "
               "there (--detail) and a cross-check of every probe point.")

    def options(self, p):
        p.add_argument("--json", action="store_true")
        p.add_argument("--detail", action="store_true", help="per-probe availability of every local")

    @only_when_attached
    def run(self, args):
        from . import analysis as A
        r = A.analyse(detail=args.detail)
        if args.json:
            gdb.write(json.dumps(r, indent=1, default=str) + "\n")
        else:
            A.report(r)


class ResolvParam(gdb.Parameter):
    def __init__(self, name, kind, doc, default):
        self.set_doc = doc
        self.show_doc = doc
        self.__doc__ = doc
        super().__init__(name, gdb.COMMAND_DATA, kind)
        self.value = default

    def get_set_string(self):
        return ""

    def get_show_string(self, svalue):
        return "%s is %s" % (self.name, svalue)


class ResolvPrefix(gdb.Command):
    """gdbdiag settings."""

    def __init__(self, verb):
        super().__init__("%s resolv" % verb, gdb.COMMAND_DATA, prefix=True)


def register_parameters():
    params = []
    for verb in ("set", "show"):
        params.append(ResolvPrefix(verb))
    for name, kind, doc, default in (
            ("resolv step", gdb.PARAM_BOOLEAN, "Stop at every traced step and print its dump "
             "(decides which probes are armed: takes effect at the next `resolv trace`).", False),
            ("resolv verbose", gdb.PARAM_BOOLEAN, "Print every observation while tracing "
             "(at once, also during a trace).", False),
            ("resolv names", gdb.PARAM_STRING, "Trace only lookups matching this glob, unless "
             "`resolv trace --names` gave one (from the next lookup on, also during a trace).", ""),
            ("resolv color", gdb.PARAM_BOOLEAN, "Colour the output (pygments).", True),
            ("resolv traceback", gdb.PARAM_BOOLEAN, "Print the full Python traceback of a probe "
             "error or a command's error, not only its one line (at once).", False)):
        p = ResolvParam(name, kind, doc, default)
        p.name = name
        params.append(p)
    return params


@command
class ResolvSymbols(ResolvCommand):
    name = "resolv symbols"
    summary = ("Identify this process's glibc inside its own root, fetch and verify the "
               "matching debug files (cache, Debian archive, Ubuntu, debuginfod, local), make "
               "gdb load exactly those, and check by build-id what gdb loaded.")
    examples = "  resolv symbols\n  resolv symbols --offline\n  resolv symbols --local /tmp/libc6-dbg.deb"

    def options(self, p):
        p.add_argument("--offline", action="store_true", help="use the cache only")
        p.add_argument("--local", action="append", default=[], metavar="PATH",
                       help="a .deb/.ddeb, directory or debug file to try too")
        p.add_argument("--cache", metavar="DIR")
        p.add_argument("--check", action="store_true",
                       help="only check what gdb loaded; fetch and change nothing")

    @only_when_attached
    @not_while_tracing("tracing: `resolv untrace` before reloading symbols")
    def run(self, args):
        from ..symbols import gdbload, identify
        from ..symbols.cache import SymbolCache, default_cache_dir
        from ..symbols.sources import Settings, fetch_symbols
        inf = attached_inferior()
        ident = identify.identify_process(inf.pid)
        cache = SymbolCache(args.cache or default_cache_dir())
        if not args.check:
            res = fetch_symbols(ident, Settings(offline=args.offline, local=args.local,
                                                progress=False), cache)
            for o in res.to_dict().get("objects", []):
                gdb.write("  %-16s %s  %s\n" % (o.get("name"), (o.get("build_id") or "?")[:12],
                                                 o.get("origin") or o.get("error") or ""))
            S.SYMBOLS = {"source": sorted({o.get("origin") for o in res.to_dict().get("objects", [])
                                           if o.get("origin")}),
                         "verified": res.ok, "cache": cache.debug_dir}
            # thread_db: gdb's TLS support for __resp in this process's own libthread_db
            for c in gdbload.gdb_setup_commands(ident, cache.debug_dir, attached=True):
                gdb.execute(c, to_string=True)
        problems = gdbload.check_loaded(ident, gdbload.collect_objfiles(gdb), cache.debug_dir)
        if problems:
            for p in problems:
                gdb.write("  problem: %s\n" % p)
            raise gdb.GdbError("gdb has not loaded the target's own glibc debug files (see above)")
        gdb.write("symbols verified: %s %s (%s); gdb loaded the target's own objects and debug "
                  "files (build-ids match)\n" % (ident.glibc_version, ident.package_version or "",
                                                 ident.mode))
