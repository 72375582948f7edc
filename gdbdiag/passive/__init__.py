"""Passive mode: a live process's resolver state read from /proc, never stopping it.

- :mod:`.layout` -- where the state is (thread lists, ``__resp``'s TLS slot,
  ``struct __res_state`` offsets, send_dg's ranges), from the target's ELF files and DWARF;
- :mod:`.sampler` -- one snapshot of every thread, and timed runs that feed the core's
  detector (the findings are :mod:`gdbdiag.core.sampling`'s);
- :mod:`.cli` -- ``python -m gdbdiag.passive``.
"""
from ..core.events import RESOLVER_WAIT
from ..core.sampling import STALL_MIN_MS
from ..procfs import ProcMem, parse_syscall_line
from .layout import FileFacts, Layout, PassiveError, locate
from .sampler import PassiveSampler, ThreadSample

__all__ = ["PassiveSampler", "ThreadSample", "Layout", "PassiveError", "ProcMem",
           "locate", "FileFacts", "RESOLVER_WAIT", "STALL_MIN_MS", "parse_syscall_line"]
