"""Preconditions of the `resolv …` commands as decorators (pwndbg's ``OnlyWhenRunning``
style), and the live value of a `set resolv …` setting.

    @only_when_attached
    @not_while_tracing("tracing: `resolv untrace` before reloading symbols")
    def run(self, args): ...

A failed precondition is a one-line gdb error, raised before the command does anything.
"""
import functools
import traceback

import gdb


def attached_inferior():
    """The selected inferior if it is a live process, else None."""
    inf = gdb.selected_inferior()
    return inf if inf is not None and inf.pid != 0 else None


def only_when_attached(run):
    """Refuse the command unless gdb is attached to (or running) a process."""
    @functools.wraps(run)
    def guarded(*args, **kw):
        if attached_inferior() is None:
            raise gdb.GdbError("no process: attach to one first (attach PID)")
        return run(*args, **kw)
    return guarded


def not_while_tracing(message):
    """Refuse the command while a trace has probes in the target (``message``: the error)."""
    def decorate(run):
        @functools.wraps(run)
        def guarded(*args, **kw):
            from .session import TraceSession
            cur = TraceSession.current
            if cur is not None and cur.probes:
                raise gdb.GdbError(message)
            return run(*args, **kw)
        return guarded
    return decorate


def setting(name, default=None):
    """The current value of gdb parameter ``name`` (e.g. "resolv verbose"), read when
    called, so a `set` takes effect at once (also while a trace runs); ``default`` when
    the parameter is not registered."""
    try:
        return gdb.parameter(name)
    except RuntimeError:          # gdb.error (a RuntimeError): no such parameter
        return default


def traceback_text(exc):
    """``exc``'s full traceback when `set resolv traceback on`, else None."""
    if not setting("resolv traceback", False):
        return None
    return "".join(traceback.format_exception(exc))
