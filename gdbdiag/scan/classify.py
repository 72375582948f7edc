"""One process, cheaply: is it a glibc process worth reading, and which libc does it map?

Reads ``/proc/PID/stat`` and ``/proc/PID/maps`` (and, for a process without glibc, the
first bytes of ``/proc/PID/exe``). Every outcome other than a glibc process is a
:class:`Skip` with a reason code — never an exception — because processes exit, are
unreadable, or are not glibc programs all the time on a node.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field

from ..procfs import PF_KTHREAD, ProcError, read_maps, read_stat

# reason codes (counted in the report; the detail says more)
EXITED, KERNEL_THREAD, ZOMBIE, UNREADABLE, STATIC, MUSL, GO, NOT_GLIBC, SELF, NO_STATE = (
    "exited", "kernel_thread", "zombie", "unreadable", "static", "musl", "go", "not_glibc",
    "self", "no_resolver_state")
REASONS = (EXITED, KERNEL_THREAD, ZOMBIE, UNREADABLE, STATIC, MUSL, GO, NOT_GLIBC, SELF, NO_STATE)

_LIBC = re.compile(r"^(?:libc\.so\.6|libc-2\.\d+\.so)$")       # glibc's sonames/file names
# musl: Alpine's /lib/ld-musl-x86_64.so.1, Debian's /usr/lib/x86_64-linux-musl/libc.so
_MUSL = re.compile(r"/ld-musl-[\w-]+\.so\.1$|/libc\.musl-[\w-]+\.so\.1$|-linux-musl/|/musl/")
_EXE_PEEK = 1 << 20


@dataclass
class Skip:
    pid: int
    reason: str
    detail: str
    comm: str | None = None
    container: str | None = None

    def to_dict(self) -> dict:
        return {"pid": self.pid, "comm": self.comm, "reason": self.reason, "detail": self.detail,
                "container": self.container}


@dataclass
class GlibcProc:
    pid: int
    comm: str
    starttime: int                # ticks since boot: (pid, starttime) names one process
    libc_path: str                # as the process sees it (maps), " (deleted)" removed
    libc_key: str                 # "dev:inode" of the libc mapping (the grouping key)
    libc_map: tuple               # (start, end) of its lowest mapping
    deleted: bool = False
    container: str | None = None
    threads: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def ident(self) -> tuple[int, int]:
        return (self.pid, self.starttime)

    @property
    def image(self) -> tuple[int, int, int]:
        """(pid, start time, where libc is mapped): changes when the process execs."""
        return (self.pid, self.starttime, self.libc_map[0])


def _exe_kind(pid: int) -> tuple[str, str]:
    """(reason, detail) for a process that maps no glibc: static, Go or another libc."""
    try:
        with open(f"/proc/{pid}/exe", "rb") as f:
            head = f.read(_EXE_PEEK)
    except FileNotFoundError:
        return EXITED, "exited while being read"
    except OSError as e:
        return UNREADABLE, f"cannot read /proc/{pid}/exe ({e.strerror})"
    if head[:4] != b"\x7fELF" or len(head) < 64 or head[4] != 2:
        return NOT_GLIBC, "executable is not a 64-bit ELF file"
    if b"Go build ID" in head or b"\xff Go buildinf" in head or b"runtime.goexit" in head:
        return GO, "a Go program: its resolver is Go's own (or cgo through a libc it does not map)"
    interp = _interp(head)
    if interp is None:
        return STATIC, "statically linked: no glibc libc.so.6 mapped, no glibc resolver to read"
    if "musl" in interp:
        return MUSL, f"musl libc (interpreter {interp}): no send_dg, no sticky single-request mode"
    return NOT_GLIBC, f"dynamically linked (interpreter {interp}), but maps no glibc libc.so.6"


def _interp(head: bytes) -> str | None:
    """The PT_INTERP path of an ELF64 header block, or None (static)."""
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + 56 > len(head):
            break
        p_type, _fl, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", head, at)
        if p_type == 3:                                    # PT_INTERP
            return head[p_offset:p_offset + p_filesz].split(b"\0")[0].decode("ascii", "replace")
    return None


def classify(pid: int, container: str | None = None) -> GlibcProc | Skip:
    if pid == os.getpid():
        return Skip(pid, SELF, "gdbdiag itself", "gdbdiag", container)
    st = read_stat(pid)
    if st is None:
        return Skip(pid, EXITED, "no /proc entry any more", None, container)
    comm = st["comm"]
    if st["flags"] & PF_KTHREAD:
        return Skip(pid, KERNEL_THREAD, "kernel thread: no user memory", comm, container)
    if st["state"] in ("Z", "X"):
        return Skip(pid, ZOMBIE, "exited, not yet reaped by its parent", comm, container)
    try:
        maps = read_maps(pid)
    except ProcError as e:
        gone = not os.path.exists(f"/proc/{pid}")
        return Skip(pid, EXITED if gone else UNREADABLE, str(e), comm, container)
    if not maps:
        gone = read_stat(pid) is None
        return Skip(pid, EXITED if gone else ZOMBIE, "no memory mappings (exiting)", comm, container)
    libc = None
    for m in maps:
        if not m.path.startswith("/"):
            continue
        p = m.path[:-len(" (deleted)")] if m.path.endswith(" (deleted)") else m.path
        base = os.path.basename(p)
        if _MUSL.search(p):
            return Skip(pid, MUSL, f"musl libc ({p}): no send_dg, no sticky single-request mode",
                        comm, container)
        if _LIBC.match(base) and (libc is None or m.start < libc[0].start):
            libc = (m, p)
    if libc is None:
        reason, detail = _exe_kind(pid)
        return Skip(pid, reason, detail, comm, container)
    m, path = libc
    return GlibcProc(pid=pid, comm=comm, starttime=st["starttime"], libc_path=path,
                     libc_key=f"{m.dev}:{m.inode}", libc_map=(m.start, m.end),
                     deleted=m.path.endswith(" (deleted)"), container=container,
                     threads=st["num_threads"])
