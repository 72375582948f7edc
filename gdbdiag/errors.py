"""Exit codes, and the one base of every gdbdiag exception.

Standard library only: the gdb side (gdbdiag/gdb/, run by gdb's embedded Python)
imports it too.  ``gdbdiag.cli.main`` is the one place that turns an error into an exit
status and one line on stderr (``GDBDIAG_TRACEBACK=1`` or ``--traceback``: the full
traceback instead)."""

EXIT_OK = 0          # the run completed (whatever the verdict, unless --fail-on applies)
EXIT_FAIL_ON = 1     # --fail-on matched the verdict
EXIT_USAGE = 2       # bad command line (argparse uses 2 as well); symbols/check: target not identified
EXIT_REFUSED = 3     # the target was refused (missing, zombie, traced, no permission, no glibc resolver)
EXIT_TOOL = 4        # gdbdiag itself failed (lab, symbols, gdb)

TRACEBACK_ENV = "GDBDIAG_TRACEBACK"


class GdbdiagError(Exception):
    """A failure reported as one line; ``code`` is the exit status.

    Subclasses set ``code`` as a class attribute (the default for that kind of error);
    ``GdbdiagError(message, code)`` overrides it for one error."""

    code = EXIT_TOOL

    def __init__(self, message: str = "", code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def line(self) -> str:
        """The message on one line (newlines and runs of blanks folded)."""
        return one_line(str(self)) or type(self).__name__


def one_line(text, limit: int = 300) -> str:
    """``text`` on one line of at most ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def want_traceback(environ=None) -> bool:
    """Does the environment ask for full tracebacks (``GDBDIAG_TRACEBACK=1``)?"""
    import os
    v = (environ if environ is not None else os.environ).get(TRACEBACK_ENV, "")
    return v.strip().lower() not in ("", "0", "no", "off", "false")
