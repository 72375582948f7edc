"""Passive mode: sample a live process's resolver state without ever stopping it.

No ptrace attach, no breakpoints, no signals: everything is read from ``/proc``
(``/proc/PID/mem``, ``task/TID/syscall``, ``task/TID/comm``, ``fd/``, ``net/udp*``), which
needs ptrace-*read* permission (root or the owner) but never makes the target a tracee:
its ``TracerPid`` stays 0 and it keeps running.

Per thread, one sample gives:

* its resolver state ``*__resp`` (the thread's ``_res``): ``options`` and ``_flags``, hence
  whether the sticky single-request bit is set, and in which field;
* whether it is blocked in a resolver wait: ``poll(pfd, 1, timeout > 0)`` (or ``ppoll``)
  on a UDP socket with ``events == POLLIN``;
* optionally, that this wait is send_dg's (a return address into ``send_dg`` on the
  stack above the saved stack pointer).

How the state is found, the way libthread_db does it (docs/send_dg-probes.md §8, method 3):

* the thread lists: glibc >= 2.34 ``_rtld_global`` (ld.so ``.dynsym``) plus the offsets in
  libc's ``_thread_db_rtld_global__dl_stack_used`` / ``__dl_stack_user`` descriptors;
  glibc < 2.34 libpthread's ``stack_used`` / ``__stack_user`` (LOCAL, ``.symtab``, which
  Debian keeps in libpthread);
* node -> ``struct pthread`` via ``_thread_db_pthread_list``, TID via
  ``_thread_db_pthread_tid`` (descriptors ``uint32[3] = {bits, count, offset}``);
* ``__resp`` = ``*(void **)(pd + tpoff)`` (x86-64: the thread pointer is the
  ``struct pthread``), tpoff being the value ld.so wrote into the GOT slot of an
  ``R_X86_64_TPOFF64`` relocation: libc's anonymous one whose addend is ``__resp``'s
  ``st_value`` (all versions), else libresolv's named one (2.31);
* ``options`` / ``_flags`` offsets from the DWARF of ``struct __res_state`` in the verified
  debug file of the object holding ``send_dg`` (symbol cache), else the ABI values 8 / 504.

Findings (``PassiveSampler.run``) use the core event model (``gdbdiag.core.events``):
``sticky_engaged``, ``doomed_poll`` (a sticky thread in a resolver wait on a build the
caller says is affected), ``stall`` (that wait's measured length, >= 1 s), plus
``resolver_wait`` (any other resolver wait that outlived one sampling interval).
Passive mode cannot see send_dg's locals, so "doomed" is an inference: see
``PassiveSampler`` for what it rests on.
"""
from __future__ import annotations

import os
import re
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from elftools.common.exceptions import DWARFError, ELFError
from elftools.elf.elffile import ELFFile

from .glibc.elfscan import ElfImage, tpoff_relocs
from .procfs import (Mapping, ProcError, ProcMem, file_maps, mapped_file, parse_syscall_line,
                     read_text, s32)

from .core import events as E
from .core.events import Event
from .core.flags import POLLIN, decode_flags, decode_options, sticky_bits
from .symbols.elfinfo import glibc_banner

__all__ = ["PassiveSampler", "ThreadSample", "Layout", "PassiveError", "ProcMem",
           "locate", "FileFacts", "RESOLVER_WAIT", "parse_syscall_line"]

RESOLVER_WAIT = "resolver_wait"      # a resolver poll that is not (known to be) doomed
MEMORY, INFERRED, MEASURED = "memory", E.INFERRED, "measured"

SYS_POLL, SYS_PPOLL = 7, 271         # x86-64
R_X86_64_TPOFF64 = 18
ABI_RES = {"options": 8, "_flags": 504}          # struct __res_state, all builds checked
ABI_PTHREAD = {"list": 704, "tid": 720}         # struct pthread, all builds checked
STALL_MIN_MS = 1000.0
STACK_SCAN = 1024                                # bytes above the saved sp searched for send_dg

_ROLE_RE = {
    "libc": re.compile(r"^libc(?:-\d[\d.]*)?\.so(?:\.6)?$"),
    "libresolv": re.compile(r"^libresolv(?:-\d[\d.]*)?\.so(?:\.2)?$"),
    "libpthread": re.compile(r"^libpthread(?:-\d[\d.]*)?\.so(?:\.0)?$"),
    "ld": re.compile(r"^ld-linux-x86-64\.so\.2$|^ld-\d[\d.]*\.so$"),
}


# The /proc readers live in gdbdiag.procfs (shared with gdbdiag.scan); re-exported here.
PassiveError = ProcError     # the target cannot be sampled (one-line reason in str())
_read_text, _s32, _Mapping, _maps = read_text, s32, Mapping, file_maps


# ---------------------------------------------------------------------------------------
# ELF / DWARF (pyelftools)
# ---------------------------------------------------------------------------------------
@dataclass
class _Obj:
    role: str
    path: str           # as the target sees it (maps)
    host: str           # where we read it (map_files link, else /proc/PID/root/...)
    start: int          # lowest mapping
    bias: int = 0
    build_id: str | None = None


def _load_facts(host: str) -> tuple[int | None, str | None]:
    """(p_vaddr - p_offset of the lowest PT_LOAD, build-id) of an ELF file."""
    img = ElfImage(host)
    lo = img.loads[0] if img.loads else None       # (p_vaddr, p_memsz, p_offset, ...), sorted
    return (None if lo is None else lo[0] - lo[2]), img.build_id()


class FileFacts:
    """Memo of what :func:`locate` reads from ELF files -- load segments, build-id, glibc
    banner, symbols, TPOFF64 relocations, debug-file lookups and their DWARF: functions of
    the file alone, so every process mapping the same build shares them (gdbdiag scan
    keeps one for a whole node). Keys: the build-id, or the file's identity (st_dev,
    st_ino, size, mtime) for its load facts. Without one, :func:`locate` reads every file
    anew (a fresh memo per call). ``debug_files=False``: no debug file is looked up
    (ABI offsets; send_dg's ranges then come from the caller, e.g. the analyzer)."""

    def __init__(self, debug_files: bool = True):
        self.memo: dict = {}
        self.hits = self.misses = 0
        self.debug_files = debug_files

    def get(self, key, compute):
        if key in self.memo:
            self.hits += 1
            return self.memo[key]
        self.misses += 1
        v = self.memo[key] = compute()     # an exception is not memoized
        return v


def _open_obj(pid: int, role: str, maps: list[_Mapping], files: FileFacts | None = None) -> _Obj | None:
    files = files if files is not None else FileFacts()
    first: dict[str, _Mapping] = {}
    for m in maps:
        p = m.path[:-len(" (deleted)")] if m.path.endswith(" (deleted)") else m.path
        if _ROLE_RE[role].match(os.path.basename(p)):
            if p not in first or m.start < first[p].start:
                first[p] = m
    if not first:
        return None
    path, m = min(first.items(), key=lambda kv: kv[1].start)
    host = mapped_file(pid, m.start, m.end, path)
    o = _Obj(role=role, path=path, host=host, start=m.start)
    try:
        st = os.stat(host)
        base, o.build_id = files.get(("load", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns),
                                     lambda: _load_facts(host))
        # the lowest mapping maps file offset m.offset; in that segment it is at
        # p_vaddr + (m.offset - p_offset)
        o.bias = m.start if base is None else m.start - ((base + m.offset) & ~0xFFF)
    except Exception:   # the target's files are foreign input: any parse failure = not usable
        return None
    return o


_BIND = {0: "STB_LOCAL", 1: "STB_GLOBAL", 2: "STB_WEAK"}


def _symbols(path: str, names, sections=(".dynsym", ".symtab")) -> dict[str, dict]:
    """{name: {value, size, type, bind, section}} for the wanted names, the first
    defined occurrence over ``sections`` in order (ELF file ``path``)."""
    img = ElfImage(path)
    want = set(names)
    out: dict[str, dict] = {}
    for sn in sections:
        table = img.dynsym() if sn == ".dynsym" else img.symtab() if sn == ".symtab" else []
        for s in table:
            if s.name in want and s.name not in out and s.shndx != 0:
                out[s.name] = {"value": s.value, "size": s.size, "type": "STT_" + s.type,
                               "bind": _BIND.get(s.bind, s.bind), "section": sn}
    return out


def _member_offset(die) -> int | None:
    a = die.attributes.get("DW_AT_data_member_location")
    if a is None:
        return None
    v = a.value
    if isinstance(v, int):
        return v
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == 0x23:   # DW_OP_plus_uconst
        return v[1]
    return None


def _type_size(die, depth=0) -> int | None:
    while die is not None and depth < 10:
        a = die.attributes.get("DW_AT_byte_size")
        if a is not None:
            return a.value
        if "DW_AT_type" not in die.attributes:
            return None
        die = die.get_DIE_from_attribute("DW_AT_type")
        depth += 1
    return None


def _res_state_from_dwarf(elf: ELFFile, near_addr: int | None) -> dict | None:
    """{options: off, _flags: off, size, options_size, _flags_size} of a complete
    ``struct __res_state`` in the CU holding ``near_addr`` (send_dg), else None."""
    if not elf.has_dwarf_info():
        return None
    dw = elf.get_dwarf_info()
    cus = []
    if near_addr is not None:
        try:
            ar = dw.get_aranges()
            off = ar.cu_offset_at_addr(near_addr) if ar is not None else None
            if off is not None:
                cus.append(dw.get_CU_at(off))
        except (DWARFError, ELFError, KeyError, ValueError, AttributeError):
            pass
    if not cus:
        return None   # no whole-file DWARF scan: too slow for libc; ABI fallback instead
    for cu in cus:
        for die in cu.iter_DIEs():
            if die.tag != "DW_TAG_structure_type" or "DW_AT_declaration" in die.attributes:
                continue
            n = die.attributes.get("DW_AT_name")
            if n is None or n.value != b"__res_state":
                continue
            out = {"size": _type_size(die)}
            for ch in die.iter_children():
                nm = ch.attributes.get("DW_AT_name")
                if ch.tag == "DW_TAG_member" and nm is not None and nm.value in (b"options", b"_flags"):
                    k = nm.value.decode()
                    out[k] = _member_offset(ch)
                    try:
                        out[k + "_size"] = _type_size(ch.get_DIE_from_attribute("DW_AT_type"))
                    except (KeyError, DWARFError):
                        out[k + "_size"] = None
            if out.get("options") is not None and out.get("_flags") is not None:
                return out
    return None


# ---------------------------------------------------------------------------------------
# where things are, per process
# ---------------------------------------------------------------------------------------
@dataclass
class Layout:
    pid: int
    glibc_version: str | None = None
    res_off: dict = field(default_factory=lambda: dict(ABI_RES))
    res_off_from: str = "abi"                 # "dwarf:<debug file>" | "abi"
    tpoff: int | None = None
    tpoff_from: str | None = None             # "libc.so.6 GOT 0x… (anonymous TPOFF64 …)"
    lists: list = field(default_factory=list)  # [(name, head address)]
    lists_from: str | None = None
    pthread_off: dict = field(default_factory=lambda: dict(ABI_PTHREAD))
    pthread_off_from: str = "abi"
    main_res: int | None = None               # &_res (the initial thread's state)
    send_dg: list = field(default_factory=list)    # run-time [(lo, hi)]
    send_dg_from: str | None = None
    send_dg_object: str | None = None         # libresolv.so.2 / libc.so.6
    debug_file: str | None = None
    objects: dict = field(default_factory=dict)    # role -> {path, bias, build_id}
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lists"] = [{"name": n, "head": h} for n, h in self.lists]
        d["send_dg"] = [[lo, hi] for lo, hi in self.send_dg]
        return d


def _banner(host: str):
    with open(host, "rb") as f:
        return glibc_banner(f)


def _debug_facts(dbg: str) -> tuple[list, dict | None]:
    """send_dg's (and send_dg.cold's) link-time ranges from a debug file's .symtab, in
    order, and ``struct __res_state`` from the DWARF of send_dg's CU."""
    syms = ElfImage(dbg).symtab()
    ranges = []
    for nm in ("send_dg", "send_dg.cold"):
        ranges += [(s.value, s.value + s.size) for s in syms if s.name == nm and s.type == "FUNC" and s.size]
    with open(dbg, "rb") as f:
        return ranges, _res_state_from_dwarf(ELFFile(f), ranges[0][0] if ranges else None)


def _debug_file_for(build_id: str | None, cache_dir: str | None, files: FileFacts | None = None) -> str | None:
    if not build_id or (files is not None and not files.debug_files):
        return None
    try:
        from .symbols.cache import SymbolCache, default_cache_dir
        return SymbolCache(cache_dir or default_cache_dir()).lookup(build_id)
    except Exception:   # a damaged cache must not stop a passive read
        return None


def locate(pid: int, mem: ProcMem, cache_dir: str | None = None,
           glibc_version: str | None = None, files: FileFacts | None = None) -> Layout:
    """Find the thread lists, the ``__resp`` TLS offset, the ``__res_state`` offsets and
    send_dg's address ranges of process ``pid`` (reads only). ``files``: a
    :class:`FileFacts` memo shared across processes (none: every file is read anew)."""
    files = files if files is not None else FileFacts()
    lay = Layout(pid=pid, glibc_version=glibc_version)
    maps = _maps(pid)
    objs = {r: _open_obj(pid, r, maps, files) for r in _ROLE_RE}
    libc = objs["libc"]
    if libc is None:
        raise PassiveError(f"process {pid} has no libc.so.6 mapped (static, or not glibc)")
    for r, o in objs.items():
        if o is not None:
            lay.objects[r] = {"path": o.path, "bias": o.bias, "build_id": o.build_id}

    def from_elf(o: _Obj, what: tuple, fn):
        def compute():
            with open(o.host, "rb") as f:
                return fn(ELFFile(f))
        return files.get((o.build_id or o.host,) + what, compute)

    def syms(o: _Obj, names: list, sections: tuple) -> dict:
        return files.get((o.build_id or o.host, "syms", tuple(names), sections),
                         lambda: _symbols(o.host, names, sections))

    if lay.glibc_version is None:
        try:
            b = files.get((libc.build_id or libc.host, "banner"), lambda: _banner(libc.host))
            lay.glibc_version = b[1] if b else None
        except OSError:
            pass

    # -- libc: descriptors (2.34+), __resp TLS slot, _res -------------------------------------
    want = ["_thread_db_rtld_global__dl_stack_used", "_thread_db_rtld_global__dl_stack_user",
            "_thread_db_pthread_list", "_thread_db_pthread_tid", "_res"]
    ls = syms(libc, want, (".dynsym",))
    if "_res" in ls:
        lay.main_res = libc.bias + ls["_res"]["value"]
    slots = [(libc, off, how) for off, how in from_elf(libc, ("tpoff",), lambda e: list(tpoff_relocs(e)))]
    if objs["libresolv"] is not None:
        try:
            slots += [(objs["libresolv"], off, how) for off, how in
                      from_elf(objs["libresolv"], ("tpoff",), lambda e: list(tpoff_relocs(e)))]
        except (OSError, ELFError):
            pass
    for o, off, how in slots:
        v = mem.i64(o.bias + off)
        if v is not None and v < 0 and -v < (1 << 24):
            lay.tpoff = v
            lay.tpoff_from = f"{os.path.basename(o.path)} GOT {off:#x} ({how})"
            break
    if lay.tpoff is None:
        lay.notes.append("no R_X86_64_TPOFF64 slot for __resp found: only the initial "
                         "thread's _res can be read")

    def desc(o: _Obj, sym: dict | None):
        if sym is None:
            return None
        b = mem.read(o.bias + sym["value"], 12)
        return None if b is None else struct.unpack("<III", b)

    # -- thread lists ----------------------------------------------------------------------
    if "_thread_db_rtld_global__dl_stack_used" in ls and objs["ld"] is not None:
        rs = syms(objs["ld"], ["_rtld_global"], (".dynsym", ".symtab"))
        if "_rtld_global" in rs:
            rtld = objs["ld"].bias + rs["_rtld_global"]["value"]
            for nm in ("_dl_stack_used", "_dl_stack_user"):
                d = desc(libc, ls.get(f"_thread_db_rtld_global_{nm}"))
                if d is not None:
                    lay.lists.append((nm, rtld + d[2]))
            lay.lists_from = "ld.so _rtld_global + libc _thread_db_rtld_global_* (.dynsym)"
            for k, sym in (("list", "_thread_db_pthread_list"), ("tid", "_thread_db_pthread_tid")):
                d = desc(libc, ls.get(sym))
                if d is not None:
                    lay.pthread_off[k] = d[2]
                    lay.pthread_off_from = "libc _thread_db_pthread_* (.dynsym)"
    elif objs["libpthread"] is not None:
        lp = objs["libpthread"]
        pnames = ["stack_used", "__stack_user", "_thread_db_pthread_list", "_thread_db_pthread_tid"]
        ps = syms(lp, pnames, (".symtab", ".dynsym"))
        src = "libpthread .symtab"
        if "stack_used" not in ps:
            dbg = files.get(("debug-file", lp.build_id, cache_dir),
                            lambda: _debug_file_for(lp.build_id, cache_dir, files))
            if dbg:
                ps = files.get(("debug-syms", dbg), lambda: _symbols(dbg, pnames, (".symtab",)))
                src = f"libpthread debug file {dbg}"
        for nm in ("stack_used", "__stack_user"):
            if nm in ps:
                lay.lists.append((nm, lp.bias + ps[nm]["value"]))
        if lay.lists:
            lay.lists_from = src
        for k, sym in (("list", "_thread_db_pthread_list"), ("tid", "_thread_db_pthread_tid")):
            d = desc(lp, ps.get(sym))
            if d is not None:
                lay.pthread_off[k] = d[2]
                lay.pthread_off_from = f"{src} _thread_db_pthread_*"
        if not lay.lists:
            lay.notes.append("libpthread has no stack_used/__stack_user symbols (stripped .symtab "
                             "and no debug file): only the initial thread's _res can be read")
    else:
        lay.notes.append("no thread list (single-threaded glibc < 2.34 process, or no ld.so "
                         "_rtld_global): only the initial thread's _res is read")

    # -- send_dg and struct __res_state from the verified debug file ---------------------------
    from .symbols.identify import version_tuple
    vt = version_tuple(lay.glibc_version)
    merged = vt >= (2, 34) if vt else "_thread_db_rtld_global__dl_stack_used" in ls
    holder = libc if merged else objs["libresolv"]     # the resolver moved into libc in 2.34
    if holder is None:
        lay.notes.append("libresolv.so.2 not loaded yet (glibc < 2.34 loads it at the first "
                         "lookup): send_dg frame check unavailable until then")
    if holder is not None:
        lay.send_dg_object = os.path.basename(holder.path)
        dbg = files.get(("debug-file", holder.build_id, cache_dir),
                        lambda: _debug_file_for(holder.build_id, cache_dir, files))
        if dbg is None and not files.debug_files:
            lay.notes.append("debug files not used: ABI offsets of struct __res_state")
        elif dbg is None:
            lay.notes.append(f"no verified debug file for {lay.send_dg_object} "
                             f"({holder.build_id}) in the symbol cache: ABI offsets, no send_dg "
                             "frame check (run `gdbdiag symbols PID`)")
        else:
            lay.debug_file = dbg
            try:
                ranges, rs = files.get(("debug-facts", dbg), lambda: _debug_facts(dbg))
                ranges = [(holder.bias + lo, holder.bias + hi) for lo, hi in ranges]
                if ranges:
                    lay.send_dg = sorted(set(ranges))
                    lay.send_dg_from = f"{dbg} .symtab (send_dg, send_dg.cold)"
                if rs is not None:
                    lay.res_off = {"options": rs["options"], "_flags": rs["_flags"]}
                    lay.res_off_from = f"dwarf:{dbg}"
                    if rs.get("options_size") not in (None, 8) or rs.get("_flags_size") not in (None, 4):
                        lay.notes.append(f"unexpected __res_state member sizes {rs}")
                else:
                    lay.notes.append("struct __res_state not found in the debug file's DWARF: ABI offsets")
            except (OSError, ELFError, DWARFError) as e:
                lay.notes.append(f"cannot read debug file {dbg}: {e}")
    return lay


# ---------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------
@dataclass
class ThreadSample:
    t: float                        # time.time() of the read
    tid: int                        # host TID (the LWP gdb shows)
    ns_tid: int | None              # TID inside the target's PID namespace (struct pthread.tid)
    name: str | None                # /proc/PID/task/TID/comm
    pd: int | None = None           # struct pthread (= thread pointer)
    resp: int | None = None         # the thread's __resp (&its _res)
    options: int | None = None
    flags: int | None = None
    sticky: bool = False
    sticky_field: str | None = None  # "options" | "_flags" | "options+_flags"
    syscall: int | None = None      # nr, -1 (blocked, not in a syscall), None (running/unknown)
    in_resolver_poll: bool = False
    poll: dict | None = None        # {fd, events, timeout_ms, pfd, nfds, nr, udp_inode}
    frame_confirmed: bool | None = None   # None: no send_dg ranges (no debug file) or no poll
    source: str | None = None       # "thread-list" | "initial-_res" | None (not in any list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["options_decoded"] = decode_options(self.options) if self.options is not None else None
        d["flags_decoded"] = decode_flags(self.flags) if self.flags is not None else None
        return d


@dataclass
class _PollTrack:
    key: tuple
    first_t: float
    prev_t: float | None            # the sample before first sight (poll began after it)
    last_t: float
    seen: int
    info: dict
    frame_confirmed: bool | None
    sticky: bool
    reported: Event | None = None   # the doomed_poll / resolver_wait event emitted for it


@dataclass
class _TState:
    tid: int
    name: str | None = None
    sticky: bool | None = None      # None: not sampled yet
    sticky_field: str | None = None
    since: float | None = None
    cause: str | None = None
    options: int | None = None
    flags: int | None = None
    poll: _PollTrack | None = None
    last_wait: tuple | None = None  # (end_t, ms, sticky_at_start) of the last resolver wait
    doomed: int = 0
    stalls: int = 0
    waits: int = 0
    last_stall_ms: float | None = None
    gone: bool = False

    def summary(self) -> dict:
        return {"lwp": self.tid, "name": self.name, "sticky": bool(self.sticky),
                "sticky_field": self.sticky_field, "since": self.since, "cause": self.cause,
                "options": self.options, "flags": self.flags, "doomed_polls": self.doomed,
                "stalls": self.stalls, "resolver_waits": self.waits,
                "last_stall_ms": self.last_stall_ms, "gone": self.gone,
                "in_poll_ms": None}


class PassiveSampler:
    """Sample process ``pid`` every ``interval`` seconds without stopping it.

    ``affected`` is whether this glibc build stalls in sticky mode (bug 30081), decided
    elsewhere (code check): True turns a sticky thread's resolver wait into a
    ``doomed_poll``; False/None keeps it a ``resolver_wait``.

    A wait counts once it has been seen in ``confirm_samples`` consecutive samples with the
    same syscall arguments and the same voluntary context-switch count (so an answered
    short wait is never reported, and a new poll with identical arguments is told apart).
    Passive mode cannot see send_dg's locals: on an affected build it also reports the
    first (answered) POLLIN wait of a sticky lookup if that wait outlives one interval;
    the stall event then carries its measured length, and only waits of >= 1 s are stalls.
    """

    def __init__(self, pid: int, interval: float = 0.05, affected: bool | None = None,
                 cache_dir: str | None = None, confirm_samples: int = 2,
                 glibc_version: str | None = None, files: FileFacts | None = None):
        self.pid = int(pid)
        self.interval = float(interval)
        self.affected = affected
        self.confirm_samples = max(1, int(confirm_samples))
        self.cache_dir = cache_dir
        self.files = files           # a FileFacts memo shared with other samplers (gdbdiag scan)
        if not os.path.isdir(f"/proc/{self.pid}"):
            raise PassiveError(f"no such process: {self.pid}")
        self.mem = ProcMem(self.pid)
        try:
            self.layout = locate(self.pid, self.mem, cache_dir, glibc_version, self.files)
        except (OSError, ELFError, DWARFError, ValueError, KeyError, IndexError, struct.error) as e:
            self.mem.close()
            raise PassiveError(f"cannot locate the resolver state of {self.pid}: "
                               f"{type(e).__name__}: {e}") from None
        except BaseException:
            self.mem.close()
            raise
        self._nsmap: dict[int, int] = {}        # ns tid -> host tid
        self._host_ns: dict[int, int] = {}      # host tid -> ns tid
        self._frame_cache: dict[tuple, bool | None] = {}
        self._udp: set[int] | None = None
        self._relocated_at = time.monotonic()
        self.samples = 0
        self.sampling_seconds = 0.0

    # -- plumbing ---------------------------------------------------------------------------
    def close(self):
        self.mem.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def alive(self) -> bool:
        st = _read_text(f"/proc/{self.pid}/stat")
        if st is None:
            return False
        state = st.rsplit(")", 1)[-1].split()
        return bool(state) and state[0] not in ("Z", "X")

    def _tasks(self) -> list[int]:
        try:
            return sorted(int(n) for n in os.listdir(f"/proc/{self.pid}/task") if n.isdigit())
        except FileNotFoundError:
            return []

    def _refresh_nsmap(self, tids):
        for tid in tids:
            if tid in self._host_ns:
                continue
            txt = _read_text(f"/proc/{self.pid}/task/{tid}/status")
            if txt is None:
                continue
            m = re.search(r"^NSpid:\s+(.*)$", txt, re.M)
            ns = int(m.group(1).split()[-1]) if m else tid
            self._host_ns[tid] = ns
            self._nsmap[ns] = tid
        live = set(tids)
        for tid in [t for t in self._host_ns if t not in live]:
            self._nsmap.pop(self._host_ns.pop(tid), None)

    def _nvcsw(self, tid) -> int | None:
        txt = _read_text(f"/proc/{self.pid}/task/{tid}/status")
        if txt is None:
            return None
        m = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", txt, re.M)
        return int(m.group(1)) if m else None

    def _udp_inodes(self) -> set[int]:
        if self._udp is None:
            s = set()
            for n in ("udp", "udp6"):
                txt = _read_text(f"/proc/{self.pid}/net/{n}")
                for line in (txt or "").splitlines()[1:]:
                    parts = line.split()
                    if len(parts) > 9 and parts[9].isdigit():
                        s.add(int(parts[9]))
            self._udp = s
        return self._udp

    def _socket_inode(self, fd: int) -> int | None:
        try:
            link = os.readlink(f"/proc/{self.pid}/fd/{fd}")
        except OSError:
            return None
        m = re.fullmatch(r"socket:\[(\d+)\]", link)
        return int(m.group(1)) if m else None

    def _walk(self) -> list[tuple[int, int | None]]:
        """[(pd, ns_tid)] over glibc's thread lists; partial on a concurrent change."""
        lay, mem = self.layout, self.mem
        loff, toff = lay.pthread_off["list"], lay.pthread_off["tid"]
        out, seen = [], set()
        for _name, head in lay.lists:
            node = mem.u64(head)
            n = 0
            while node and node != head and node not in seen and n < 65536:
                seen.add(node)
                pd = node - loff
                out.append((pd, mem.i32(pd + toff)))
                node = mem.u64(node)
                n += 1
        return out

    def _frame(self, tid, sc) -> bool | None:
        rng = self.layout.send_dg
        if not rng:
            return None
        key = (tid, sc["sp"], tuple(sc["args"]))
        if key in self._frame_cache:
            return self._frame_cache[key]
        sp = sc["sp"]
        ok = False
        b = self.mem.read(sp, STACK_SCAN)
        if b is None:   # near the top of the stack mapping: read less
            for n in (512, 256, 128):
                b = self.mem.read(sp, n)
                if b is not None:
                    break
        if b is None:
            return None
        for (w,) in struct.iter_unpack("<Q", b[: len(b) // 8 * 8]):
            if any(lo <= w < hi for lo, hi in rng):
                ok = True
                break
        if len(self._frame_cache) > 4096:
            self._frame_cache.clear()
        self._frame_cache[key] = ok
        return ok

    def _poll_of(self, tid, sc) -> dict | None:
        """The pollfd of a poll/ppoll with nfds == 1, or None."""
        nr = sc.get("nr")
        if nr not in (SYS_POLL, SYS_PPOLL):
            return None
        pfd, nfds = sc["args"][0], sc["args"][1]
        if nfds != 1:
            return None
        if nr == SYS_POLL:
            timeout_ms = _s32(sc["args"][2])
        else:
            tsp = sc["args"][2]
            if tsp == 0:
                timeout_ms = -1
            else:
                b = self.mem.read(tsp, 16)
                if b is None:
                    return None
                sec, nsec = struct.unpack("<qq", b)
                timeout_ms = sec * 1000 + nsec // 1_000_000
        b = self.mem.read(pfd, 8)
        if b is None:
            return None
        fd, events, revents = struct.unpack("<ihh", b)
        return {"fd": fd, "events": events & 0xFFFF, "timeout_ms": timeout_ms, "pfd": pfd,
                "nfds": nfds, "nr": nr, "revents": revents & 0xFFFF, "udp_inode": None}

    # -- one snapshot ------------------------------------------------------------------------
    def sample(self) -> list[ThreadSample]:
        t0 = time.monotonic()
        try:
            return self._sample()
        finally:
            self.samples += 1
            self.sampling_seconds += time.monotonic() - t0

    def _sample(self) -> list[ThreadSample]:
        lay = self.layout
        now = time.time()
        self._udp = None
        tids = self._tasks()
        if not tids:
            return []
        self._refresh_nsmap(tids)
        # glibc < 2.34 maps libresolv (send_dg) at the first lookup: look again then
        if (lay.send_dg_object is None and "libresolv" not in lay.objects
                and time.monotonic() - self._relocated_at > 1.0):
            self._relocated_at = time.monotonic()
            try:
                if any(_ROLE_RE["libresolv"].match(os.path.basename(m.path)) for m in _maps(self.pid)):
                    self.layout = lay = locate(self.pid, self.mem, self.cache_dir, lay.glibc_version, self.files)
            except (PassiveError, OSError, ELFError, DWARFError):
                pass
        by_tid: dict[int, dict] = {}
        for pd, ns in self._walk():
            host = self._nsmap.get(ns) if ns is not None else None
            if host is None and ns is not None and ns > 0:
                self._refresh_nsmap(self._tasks())
                host = self._nsmap.get(ns)
            if host is None:
                continue   # exited (or not started yet): its struct pthread is being reused
            resp = self.mem.u64(pd + lay.tpoff) if lay.tpoff is not None else None
            by_tid[host] = {"pd": pd, "ns": ns, "resp": resp, "source": "thread-list"}
        if self.pid in tids and self.pid not in by_tid and lay.main_res:
            by_tid[self.pid] = {"pd": None, "ns": self._host_ns.get(self.pid), "resp": lay.main_res,
                                "source": "initial-_res"}
        out = []
        for tid in tids:
            info = by_tid.get(tid, {})
            name = _read_text(f"/proc/{self.pid}/task/{tid}/comm")
            if name is None:
                continue   # gone between listdir and now
            s = ThreadSample(t=now, tid=tid, ns_tid=info.get("ns", self._host_ns.get(tid)),
                             name=name.strip(), pd=info.get("pd"), resp=info.get("resp"),
                             source=info.get("source"))
            if s.resp:
                s.options = self.mem.u64(s.resp + lay.res_off["options"])
                s.flags = self.mem.u32(s.resp + lay.res_off["_flags"])
                bits = sticky_bits(s.options, s.flags)
                s.sticky, s.sticky_field = bits["single_request"], bits["field"]
            sc = parse_syscall_line(_read_text(f"/proc/{self.pid}/task/{tid}/syscall"))
            if sc is not None:
                s.syscall = sc.get("nr")
                p = self._poll_of(tid, sc) if sc.get("nr") is not None and sc["nr"] >= 0 else None
                if p is not None and p["events"] == POLLIN and p["timeout_ms"] > 0:
                    ino = self._socket_inode(p["fd"])
                    if ino is not None and ino in self._udp_inodes():
                        p["udp_inode"] = ino
                        s.in_resolver_poll = True
                        s.frame_confirmed = self._frame(tid, sc)
                        p["nvcsw"] = self._nvcsw(tid)
                        p["args"] = list(sc["args"])
                        p["sp"] = sc["sp"]
                if p is not None:
                    s.poll = p
            if not s.in_resolver_poll:
                s.frame_confirmed = False if lay.send_dg else None
            out.append(s)
        return out

    # -- a timed run -------------------------------------------------------------------------
    def run(self, duration: float, on_event: Callable[[Event], None] | None = None,
            on_sample: Callable[[list[ThreadSample]], None] | None = None,
            until: Callable[[], bool] | None = None) -> dict:
        """Sample for ``duration`` seconds, or until the process ends, or until ``until()``
        is true (checked after each sample).  Findings go to ``on_event`` as they happen,
        each snapshot to ``on_sample``.  Returns {threads (summaries), events (core
        :class:`Event` objects), samples, overhead, layout, mode, affected}."""
        states: dict[int, _TState] = {}
        events: list[Event] = []
        start_samples, start_secs = self.samples, self.sampling_seconds
        t_end = time.monotonic() + duration
        prev_t: float | None = None
        reads0, failed0 = self.mem.reads, self.mem.failed

        def emit(ev: Event):
            events.append(ev)
            if on_event is not None:
                on_event(ev)

        while True:
            tick = time.monotonic()
            if not self.alive():
                break
            snap = self.sample()
            t = snap[0].t if snap else time.time()
            seen = set()
            for s in snap:
                seen.add(s.tid)
                st = states.setdefault(s.tid, _TState(tid=s.tid))
                st.name, st.gone = s.name, False
                # a wait that just ended first (it may explain a 0 -> 1), then the bit,
                # then a wait that starts or goes on
                if st.poll is not None and self._poll_key(s) != st.poll.key:
                    self._end_poll(st, s.t, emit)
                self._track_sticky(st, s, prev_t, emit)
                self._track_poll(st, s, prev_t, emit)
            for tid, st in states.items():
                if tid not in seen and not st.gone:
                    st.gone = True
                    if st.poll is not None:
                        self._end_poll(st, t, emit, ended_by="thread exit")
            if on_sample is not None:
                on_sample(snap)
            prev_t = t
            if time.monotonic() >= t_end or (until is not None and until()):
                break
            time.sleep(max(0.0, self.interval - (time.monotonic() - tick)))
        threads = []
        for st in states.values():
            d = st.summary()
            if st.poll is not None and st.poll.seen >= self.confirm_samples:
                d["in_poll_ms"] = round((st.poll.last_t - st.poll.first_t) * 1000.0, 1)
                d["in_poll_doomed"] = bool(st.poll.reported is not None
                                           and st.poll.reported.kind == E.DOOMED_POLL)
            threads.append(d)
        n = self.samples - start_samples
        secs = self.sampling_seconds - start_secs
        return {"threads": threads, "events": events, "samples": n,
                "overhead": {"seconds_in_sampling": round(secs, 4),
                             "per_sample_ms": round(secs / n * 1000.0, 3) if n else None,
                             "memory_reads": self.mem.reads - reads0,
                             "failed_reads": self.mem.failed - failed0,
                             "interval": self.interval},
                "layout": self.layout.to_dict(), "mode": "passive",
                "affected": self.affected}

    # -- per-thread logic (pure given samples) -----------------------------------------------
    def _track_sticky(self, st: _TState, s: ThreadSample, prev_t, emit):
        st.options, st.flags = s.options, s.flags
        if s.resp is None or s.options is None:
            return
        if st.sticky is None:
            st.sticky = s.sticky
            if s.sticky:
                st.sticky_field, st.since = s.sticky_field, s.t
                st.cause = "already set" if prev_t is None else "already set when the thread was first seen"
                emit(self._engaged(st, s, st.cause, "status"))
            return
        if s.sticky and not st.sticky:
            st.sticky, st.sticky_field, st.since = True, s.sticky_field, s.t
            cause = "set between two samples (0 -> 1 observed)"
            lw = st.last_wait
            if lw is not None and not lw[2] and lw[1] >= STALL_MIN_MS and s.t - lw[0] < 2.0:
                cause += f" right after a {lw[1] / 1000.0:.1f} s resolver wait timed out (a lost answer)"
            st.cause = cause
            emit(self._engaged(st, s, cause, "transition", prev_t))
        elif not s.sticky and st.sticky:
            # _flags builds clear the switch when resolv.conf is reloaded
            st.sticky, st.sticky_field, st.cause = False, None, "cleared (resolv.conf reload?)"

    def _engaged(self, st, s: ThreadSample, cause, how, prev_t=None) -> Event:
        data = {"field": s.sticky_field, "cause": cause, "how": f"passive:{how}",
                "options": s.options, "flags": s.flags,
                "options_decoded": decode_options(s.options), "flags_decoded": decode_flags(s.flags),
                "thread_name": s.name, "resp": s.resp, "between": [prev_t, s.t] if prev_t else None,
                "lost_qname": None, "lost_qtype": None, "qname": None, "qtype": None}
        prov = {k: INFERRED for k in data}
        prov.update({"field": MEMORY, "options": MEMORY, "flags": MEMORY, "resp": MEMORY,
                     "thread_name": MEMORY})
        return Event(t=s.t, lwp=s.tid, kind=E.STICKY_ENGAGED, data=data, prov=prov)

    @staticmethod
    def _poll_key(s: ThreadSample):
        """One poll call: same syscall and arguments, and no voluntary context switch in
        between (a wakeup) -- a new poll with identical arguments differs in the latter."""
        if not (s.in_resolver_poll and s.poll is not None):
            return None
        p = s.poll
        return (p["nr"], tuple(p.get("args") or ()), p.get("nvcsw"), p["fd"], p["events"])

    def _track_poll(self, st: _TState, s: ThreadSample, prev_t, emit):
        key = self._poll_key(s)
        tr = st.poll
        if tr is not None and key != tr.key:
            self._end_poll(st, s.t, emit)
            tr = None
        if key is None:
            return
        if tr is None:
            st.poll = tr = _PollTrack(key=key, first_t=s.t, prev_t=prev_t, last_t=s.t, seen=1,
                                      info=dict(s.poll), frame_confirmed=s.frame_confirmed,
                                      sticky=bool(s.sticky))
        else:
            tr.seen += 1
            tr.last_t = s.t
            tr.sticky = tr.sticky or bool(s.sticky)
            if tr.frame_confirmed is None:
                tr.frame_confirmed = s.frame_confirmed
        if tr.reported is None and tr.seen >= self.confirm_samples:
            doomed = bool(s.sticky) and self.affected is True
            p = tr.info
            data = {"predicted_ms": p["timeout_ms"], "fd": p["fd"], "events": p["events"],
                    "timeout_ms": p["timeout_ms"], "pfd": p["pfd"], "udp_inode": p["udp_inode"],
                    "frame_confirmed": tr.frame_confirmed, "sticky": bool(s.sticky),
                    "sticky_field": s.sticky_field, "thread_name": s.name,
                    "since": tr.first_t, "qname": None, "waiting_for": None, "error_rcode": None,
                    "stack": [], "lookup": None}
            if doomed:
                data["reason"] = ("single-request thread in a POLLIN resolver wait on an affected "
                                  "build (passive: send_dg's state not visible; the wait can only "
                                  "end by timeout if the first answer was an error)")
                kind = E.DOOMED_POLL
                st.doomed += 1
            else:
                data["reason"] = ("resolver wait (POLLIN on a UDP socket)"
                                  + ("; sticky, build not known to stall" if s.sticky else ""))
                kind = RESOLVER_WAIT
                st.waits += 1
            prov = {k: INFERRED for k in data}
            prov.update({k: MEMORY for k in ("fd", "events", "pfd", "sticky", "sticky_field",
                                              "thread_name")})
            prov.update({"predicted_ms": "register", "timeout_ms": "register", "udp_inode": MEMORY})
            tr.reported = Event(t=tr.first_t, lwp=s.tid, kind=kind, data=data, prov=prov)
            emit(tr.reported)

    def _end_poll(self, st: _TState, t_seen_gone: float, emit, ended_by="syscall changed"):
        tr = st.poll
        st.poll = None
        if tr is None:
            return
        start = tr.first_t if tr.prev_t is None else (tr.prev_t + tr.first_t) / 2.0
        end = (tr.last_t + t_seen_gone) / 2.0
        ms = (end - start) * 1000.0
        st.last_wait = (end, ms, tr.sticky)
        if tr.reported is None or tr.reported.kind != E.DOOMED_POLL:
            return
        if ms < STALL_MIN_MS:
            return
        pred = tr.info.get("timeout_ms")
        # +- half a sampling gap at each end; a wait already running at the first sample
        # has no known start: the measurement is then a lower bound
        err = (t_seen_gone - tr.last_t) / 2.0 + (0.0 if tr.prev_t is None else (tr.first_t - tr.prev_t) / 2.0)
        ev = Event(t=end, lwp=st.tid, kind=E.STALL, data={
            "measured_ms": round(ms, 1), "predicted_ms": pred,
            "error_ms": round(err * 1000.0, 1), "lower_bound": tr.prev_t is None,
            "timed_out": bool(pred and ms >= 0.9 * pred), "ended_by": ended_by,
            "n": None, "qname": None, "lookup": None, "thread_name": st.name,
            "frame_confirmed": tr.frame_confirmed})
        ev.prov = {k: INFERRED for k in ev.data}
        ev.prov.update({"measured_ms": MEASURED, "predicted_ms": "register", "thread_name": MEMORY})
        st.stalls += 1
        st.last_stall_ms = ev.data["measured_ms"]
        emit(ev)


# ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """``python -m gdbdiag.passive PID [--duration S] [--interval S] [--affected yes|no]``"""
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="gdbdiag passive",
                                 description="sample a process's resolver state without stopping it")
    ap.add_argument("pid", type=int)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--affected", choices=("yes", "no", "unknown"), default="unknown")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--once", action="store_true", help="one snapshot, printed as JSON")
    a = ap.parse_args(argv)
    aff = {"yes": True, "no": False, "unknown": None}[a.affected]
    try:
        smp = PassiveSampler(a.pid, interval=a.interval, affected=aff)
    except PassiveError as e:
        print(f"gdbdiag passive: {e}", file=sys.stderr)
        return 4
    with smp:
        if a.once:
            print(json.dumps([s.to_dict() for s in smp.sample()], indent=1))
            return 0

        def show(ev: Event):
            print(f"[gdbdiag] LWP {ev.lwp} ({ev.get('thread_name') or '?'}) {ev.kind}: "
                  + ", ".join(f"{k}={v}" for k, v in ev.data.items()
                              if v not in (None, [], "") and k not in ("thread_name",)), flush=True)
        res = smp.run(a.duration, on_event=show)
    res["events"] = [e.to_json() for e in res["events"]]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(json.dumps({"samples": res["samples"], "overhead": res["overhead"],
                      "threads": res["threads"]}, indent=1, default=str))
    return 0


if __name__ == "__main__":   # pragma: no cover
    raise SystemExit(main())
