"""Where a live process keeps its resolver state, found without stopping it (reads only).

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

The per-process result is a :class:`Layout`; :class:`FileFacts` memoizes what is read
from ELF files, so processes mapping the same build share it (gdbdiag scan).
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import asdict, dataclass, field

from elftools.common.exceptions import DWARFError, ELFError
from elftools.elf.elffile import ELFFile

from ..glibc.elfscan import ElfImage, tpoff_relocs
from ..procfs import Mapping, ProcError, ProcMem, file_maps, mapped_file
from ..symbols.elfinfo import glibc_banner

ABI_RES = {"options": 8, "_flags": 504}          # struct __res_state, all builds checked
ABI_PTHREAD = {"list": 704, "tid": 720}         # struct pthread, all builds checked

_ROLE_RE = {
    "libc": re.compile(r"^libc(?:-\d[\d.]*)?\.so(?:\.6)?$"),
    "libresolv": re.compile(r"^libresolv(?:-\d[\d.]*)?\.so(?:\.2)?$"),
    "libpthread": re.compile(r"^libpthread(?:-\d[\d.]*)?\.so(?:\.0)?$"),
    "ld": re.compile(r"^ld-linux-x86-64\.so\.2$|^ld-\d[\d.]*\.so$"),
}


PassiveError = ProcError     # the target cannot be sampled (one-line reason in str())


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


def _open_obj(pid: int, role: str, maps: list[Mapping], files: FileFacts | None = None) -> _Obj | None:
    files = files if files is not None else FileFacts()
    first: dict[str, Mapping] = {}
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
        from ..symbols.cache import SymbolCache, default_cache_dir
        return SymbolCache(cache_dir or default_cache_dir()).lookup(build_id)
    except Exception:   # a damaged cache must not stop a passive read
        return None


class _Reader:
    """What :func:`locate` reads from the target's files (memoized in a :class:`FileFacts`)
    and from its memory."""

    def __init__(self, mem: ProcMem, files: FileFacts, cache_dir: str | None):
        self.mem, self.files, self.cache_dir = mem, files, cache_dir

    def from_elf(self, o: _Obj, what: tuple, fn):
        def compute():
            with open(o.host, "rb") as f:
                return fn(ELFFile(f))
        return self.files.get((o.build_id or o.host,) + what, compute)

    def syms(self, o: _Obj, names: list, sections: tuple) -> dict:
        return self.files.get((o.build_id or o.host, "syms", tuple(names), sections),
                              lambda: _symbols(o.host, names, sections))

    def desc(self, o: _Obj, sym: dict | None):
        """A libthread_db descriptor ``uint32[3] = {bits, count, offset}``."""
        if sym is None:
            return None
        b = self.mem.read(o.bias + sym["value"], 12)
        return None if b is None else struct.unpack("<III", b)

    def debug_file(self, o: _Obj) -> str | None:
        return self.files.get(("debug-file", o.build_id, self.cache_dir),
                              lambda: _debug_file_for(o.build_id, self.cache_dir, self.files))


LIBC_SYMS = ["_thread_db_rtld_global__dl_stack_used", "_thread_db_rtld_global__dl_stack_user",
             "_thread_db_pthread_list", "_thread_db_pthread_tid", "_res"]


def locate(pid: int, mem: ProcMem, cache_dir: str | None = None,
           glibc_version: str | None = None, files: FileFacts | None = None) -> Layout:
    """Find the thread lists, the ``__resp`` TLS offset, the ``__res_state`` offsets and
    send_dg's address ranges of process ``pid`` (reads only). ``files``: a
    :class:`FileFacts` memo shared across processes (none: every file is read anew)."""
    rd = _Reader(mem, files if files is not None else FileFacts(), cache_dir)
    lay = Layout(pid=pid, glibc_version=glibc_version)
    maps = file_maps(pid)
    objs = {r: _open_obj(pid, r, maps, rd.files) for r in _ROLE_RE}
    libc = objs["libc"]
    if libc is None:
        raise PassiveError(f"process {pid} has no libc.so.6 mapped (static, or not glibc)")
    for r, o in objs.items():
        if o is not None:
            lay.objects[r] = {"path": o.path, "bias": o.bias, "build_id": o.build_id}
    if lay.glibc_version is None:
        try:
            b = rd.files.get((libc.build_id or libc.host, "banner"), lambda: _banner(libc.host))
            lay.glibc_version = b[1] if b else None
        except OSError:
            pass
    ls = rd.syms(libc, LIBC_SYMS, (".dynsym",))
    if "_res" in ls:
        lay.main_res = libc.bias + ls["_res"]["value"]
    _find_tpoff(lay, rd, objs)
    if "_thread_db_rtld_global__dl_stack_used" in ls and objs["ld"] is not None:
        _lists_rtld(lay, rd, libc, objs["ld"], ls)
    elif objs["libpthread"] is not None:
        _lists_libpthread(lay, rd, objs["libpthread"])
    else:
        lay.notes.append("no thread list (single-threaded glibc < 2.34 process, or no ld.so "
                         "_rtld_global): only the initial thread's _res is read")
    from ..symbols.identify import version_tuple
    vt = version_tuple(lay.glibc_version)
    merged = vt >= (2, 34) if vt else "_thread_db_rtld_global__dl_stack_used" in ls
    holder = libc if merged else objs["libresolv"]     # the resolver moved into libc in 2.34
    if holder is None:
        lay.notes.append("libresolv.so.2 not loaded yet (glibc < 2.34 loads it at the first "
                         "lookup): send_dg frame check unavailable until then")
    else:
        _send_dg_facts(lay, rd, holder)
    return lay


def _find_tpoff(lay: Layout, rd: _Reader, objs: dict) -> None:
    """The ``__resp`` TLS offset: the value ld.so wrote into a TPOFF64 GOT slot."""
    libc = objs["libc"]
    slots = [(libc, off, how) for off, how in rd.from_elf(libc, ("tpoff",), lambda e: list(tpoff_relocs(e)))]
    if objs["libresolv"] is not None:
        try:
            slots += [(objs["libresolv"], off, how) for off, how in
                      rd.from_elf(objs["libresolv"], ("tpoff",), lambda e: list(tpoff_relocs(e)))]
        except (OSError, ELFError):
            pass
    for o, off, how in slots:
        v = rd.mem.i64(o.bias + off)
        if v is not None and v < 0 and -v < (1 << 24):
            lay.tpoff = v
            lay.tpoff_from = f"{os.path.basename(o.path)} GOT {off:#x} ({how})"
            return
    lay.notes.append("no R_X86_64_TPOFF64 slot for __resp found: only the initial "
                     "thread's _res can be read")


def _lists_rtld(lay: Layout, rd: _Reader, libc: _Obj, ld: _Obj, ls: dict) -> None:
    """glibc >= 2.34: the lists in ``_rtld_global``, offsets from libc's descriptors."""
    rs = rd.syms(ld, ["_rtld_global"], (".dynsym", ".symtab"))
    if "_rtld_global" not in rs:
        return
    rtld = ld.bias + rs["_rtld_global"]["value"]
    for nm in ("_dl_stack_used", "_dl_stack_user"):
        d = rd.desc(libc, ls.get(f"_thread_db_rtld_global_{nm}"))
        if d is not None:
            lay.lists.append((nm, rtld + d[2]))
    lay.lists_from = "ld.so _rtld_global + libc _thread_db_rtld_global_* (.dynsym)"
    for k, sym in (("list", "_thread_db_pthread_list"), ("tid", "_thread_db_pthread_tid")):
        d = rd.desc(libc, ls.get(sym))
        if d is not None:
            lay.pthread_off[k] = d[2]
            lay.pthread_off_from = "libc _thread_db_pthread_* (.dynsym)"


def _lists_libpthread(lay: Layout, rd: _Reader, lp: _Obj) -> None:
    """glibc < 2.34: libpthread's ``stack_used`` / ``__stack_user`` (.symtab, or the
    verified debug file's)."""
    pnames = ["stack_used", "__stack_user", "_thread_db_pthread_list", "_thread_db_pthread_tid"]
    ps = rd.syms(lp, pnames, (".symtab", ".dynsym"))
    src = "libpthread .symtab"
    if "stack_used" not in ps:
        dbg = rd.debug_file(lp)
        if dbg:
            ps = rd.files.get(("debug-syms", dbg), lambda: _symbols(dbg, pnames, (".symtab",)))
            src = f"libpthread debug file {dbg}"
    for nm in ("stack_used", "__stack_user"):
        if nm in ps:
            lay.lists.append((nm, lp.bias + ps[nm]["value"]))
    if lay.lists:
        lay.lists_from = src
    for k, sym in (("list", "_thread_db_pthread_list"), ("tid", "_thread_db_pthread_tid")):
        d = rd.desc(lp, ps.get(sym))
        if d is not None:
            lay.pthread_off[k] = d[2]
            lay.pthread_off_from = f"{src} _thread_db_pthread_*"
    if not lay.lists:
        lay.notes.append("libpthread has no stack_used/__stack_user symbols (stripped .symtab "
                         "and no debug file): only the initial thread's _res can be read")


def _send_dg_facts(lay: Layout, rd: _Reader, holder: _Obj) -> None:
    """send_dg's ranges and ``struct __res_state`` from the verified debug file."""
    lay.send_dg_object = os.path.basename(holder.path)
    dbg = rd.debug_file(holder)
    if dbg is None and not rd.files.debug_files:
        lay.notes.append("debug files not used: ABI offsets of struct __res_state")
        return
    if dbg is None:
        lay.notes.append(f"no verified debug file for {lay.send_dg_object} "
                         f"({holder.build_id}) in the symbol cache: ABI offsets, no send_dg "
                         "frame check (run `gdbdiag symbols PID`)")
        return
    lay.debug_file = dbg
    try:
        ranges, rs = rd.files.get(("debug-facts", dbg), lambda: _debug_facts(dbg))
    except (OSError, ELFError, DWARFError) as e:
        lay.notes.append(f"cannot read debug file {dbg}: {e}")
        return
    ranges = [(holder.bias + lo, holder.bias + hi) for lo, hi in ranges]
    if ranges:
        lay.send_dg = sorted(set(ranges))
        lay.send_dg_from = f"{dbg} .symtab (send_dg, send_dg.cold)"
    if rs is None:
        lay.notes.append("struct __res_state not found in the debug file's DWARF: ABI offsets")
        return
    lay.res_off = {"options": rs["options"], "_flags": rs["_flags"]}
    lay.res_off_from = f"dwarf:{dbg}"
    if rs.get("options_size") not in (None, 8) or rs.get("_flags_size") not in (None, 4):
        lay.notes.append(f"unexpected __res_state member sizes {rs}")
