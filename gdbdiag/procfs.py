"""Reading a live process through ``/proc`` only: no ptrace attach, no signal, no stop.

Shared by passive sampling (:mod:`gdbdiag.passive`) and the node scan
(:mod:`gdbdiag.scan`). Everything here is a read: ``/proc/PID/mem`` (pread, which needs
ptrace-*read* permission — root, the owner, or CAP_SYS_PTRACE — but never makes the target
a tracee), ``maps``, ``stat``, ``status``, ``task/TID/{syscall,comm,sched}``.

A process may exit between any two reads: readers return None (or raise
:class:`ProcError` with a one-line reason where the caller must stop), never crash.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

from .errors import EXIT_REFUSED, GdbdiagError

__all__ = ["ProcError", "ProcMem", "Mapping", "read_text", "parse_syscall_line", "s32",
           "read_maps", "file_maps", "parse_stat", "read_stat", "parse_status", "task_ids",
           "sched_exec_start_ms", "exe_name", "PF_KTHREAD"]

PF_KTHREAD = 0x00200000          # task flags (stat field 9): a kernel thread


class ProcError(GdbdiagError):
    """The target cannot be read (one-line reason in str()). ``gdbdiag.passive``
    exports it as ``PassiveError``."""

    code = EXIT_REFUSED


class ProcMem:
    """Reads through /proc/PID/mem (pread). A read that fails or comes back short
    returns None: a thread may exit, a list may change, the process may go away."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            raise ProcError(f"no such process: {pid}") from None
        except PermissionError as e:
            raise ProcError(f"cannot read /proc/{pid}/mem ({e.strerror}): run as root "
                            "or as the process owner (ptrace read access)") from None
        except OSError as e:
            raise ProcError(f"cannot open /proc/{pid}/mem ({e.strerror})") from None
        self.reads = 0
        self.failed = 0

    def read(self, addr: int, n: int) -> bytes | None:
        if addr <= 0 or addr + n > (1 << 64):
            return None
        self.reads += 1
        try:
            b = os.pread(self.fd, n, addr)
        except (OSError, OverflowError, ValueError, TypeError):
            self.failed += 1
            return None
        if len(b) != n:
            self.failed += 1
            return None
        return b

    def u64(self, addr):
        b = self.read(addr, 8)
        return None if b is None else struct.unpack("<Q", b)[0]

    def i64(self, addr):
        b = self.read(addr, 8)
        return None if b is None else struct.unpack("<q", b)[0]

    def u32(self, addr):
        b = self.read(addr, 4)
        return None if b is None else struct.unpack("<I", b)[0]

    def i32(self, addr):
        b = self.read(addr, 4)
        return None if b is None else struct.unpack("<i", b)[0]

    def close(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def parse_syscall_line(text: str | None) -> dict | None:
    """``/proc/PID/task/TID/syscall``: ``{"nr", "args" (6), "sp", "pc"}``; ``{"nr": None,
    "running": True}`` when the thread is on a CPU; ``{"nr": -1, sp, pc}`` when blocked
    outside a system call; None when unreadable."""
    if text is None:
        return None
    parts = text.split()
    if not parts:
        return None
    if parts[0] == "running":
        return {"nr": None, "running": True}
    try:
        nums = [int(p, 0) for p in parts]
    except ValueError:
        return None
    if nums[0] == -1 and len(nums) >= 3:
        return {"nr": -1, "args": [], "sp": nums[1], "pc": nums[2]}
    if len(nums) < 9:
        return None
    return {"nr": nums[0], "args": nums[1:7], "sp": nums[7], "pc": nums[8]}


def s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


@dataclass
class Mapping:
    start: int
    end: int
    offset: int
    path: str                 # "" for anonymous mappings, "[heap]", "/usr/lib/… (deleted)"
    perms: str = ""
    dev: str = ""             # "major:minor" (hex) as in maps
    inode: int = 0


def mapped_file(pid: int, start: int, end: int, path: str, inode: int | None = None) -> str | None:
    """Where this host reads the file mapped at [start, end) of ``pid``: the very file
    through /proc/PID/map_files (needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE), else
    ``path`` inside the process's root (CAP_SYS_PTRACE is enough) — when ``inode`` is
    given, only if that is still the mapped inode. None when neither can be used."""
    mf = f"/proc/{pid}/map_files/{start:x}-{end:x}"
    try:
        os.stat(mf)
        return mf
    except OSError:
        pass
    inner = f"/proc/{pid}/root{path}"
    if inode is None:
        return inner
    try:
        return inner if os.stat(inner).st_ino == inode else None
    except OSError:
        return None


def read_maps(pid: int) -> list[Mapping]:
    """Every mapping of ``pid``. Raises ProcError when the process is gone or the file
    cannot be read (no permission); an empty list is a process without memory (a kernel
    thread, or one that is exiting)."""
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) < 5:
                    continue
                a, _, b = parts[0].partition("-")
                out.append(Mapping(int(a, 16), int(b, 16), int(parts[2], 16),
                                   parts[5] if len(parts) > 5 else "", parts[1], parts[3],
                                   int(parts[4])))
    except (FileNotFoundError, ProcessLookupError):
        raise ProcError(f"process {pid} went away") from None
    except PermissionError as e:
        raise ProcError(f"cannot read /proc/{pid}/maps ({e.strerror})") from None
    except OSError as e:       # ESRCH mid-read: the process exited while we read
        raise ProcError(f"process {pid} went away ({e.strerror})") from None
    return out


def file_maps(pid: int) -> list[Mapping]:
    """The file-backed mappings of ``pid`` (path starting with '/')."""
    return [m for m in read_maps(pid) if m.path.startswith("/")]


def parse_stat(text: str | None) -> dict | None:
    """``/proc/PID/stat`` (or ``task/TID/stat``): comm, state, ppid, flags, utime, stime
    (clock ticks), starttime (ticks since boot), processor (last CPU)."""
    if not text:
        return None
    lp, rp = text.find("("), text.rfind(")")
    if lp < 0 or rp < lp:
        return None
    f = text[rp + 2:].split()
    if len(f) < 37:
        return None
    try:
        return {"comm": text[lp + 1:rp], "state": f[0], "ppid": int(f[1]), "flags": int(f[6]),
                "utime": int(f[11]), "stime": int(f[12]), "num_threads": int(f[17]),
                "starttime": int(f[19]), "processor": int(f[36])}
    except (ValueError, IndexError):
        return None


def read_stat(pid: int, tid: int | None = None) -> dict | None:
    p = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    return parse_stat(read_text(p))


def parse_status(text: str | None) -> dict:
    out = {}
    for line in (text or "").splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k] = v.strip()
    return out


def task_ids(pid: int) -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir(f"/proc/{pid}/task") if n.isdigit())
    except OSError:
        return []


_EXEC_START = re.compile(r"^se\.exec_start\s*:\s*([\d.]+)", re.M)


def sched_exec_start_ms(path: str) -> float | None:
    """``se.exec_start`` of a ``/proc/…/sched`` file (CONFIG_SCHED_DEBUG): the scheduler
    clock (ms, per CPU) when the task last stopped running — for a sleeping task, the
    moment it blocked. None when the file is absent or unreadable."""
    m = _EXEC_START.search(read_text(path) or "")
    return float(m.group(1)) if m else None


def exe_name(pid: int) -> str | None:
    """The program as it was started (argv[0]): ``/usr/bin/redis-server``, not the
    symlink's target (``/usr/bin/redis-check-rdb``); a title the program set itself
    (``redis-server *:6379``) gives its first word, placed in the executable's directory
    when that name exists there in the process's root."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv0 = fh.read().split(b"\0", 1)[0].decode(errors="replace")
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    first = argv0.split(" ", 1)[0]
    if not first:
        return exe
    if not first.startswith("/"):
        cand = os.path.join(os.path.dirname(exe), os.path.basename(first))
        if os.path.lexists(f"/proc/{pid}/root{cand}"):
            return cand
    return first
