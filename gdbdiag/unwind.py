"""Host-side stack unwinding of a live thread from captured registers: no ptrace stop.

A kernel-uprobe capture gives a thread's ``rip rsp rbp rbx r12-r15`` at a probe (e.g. the
call to ``__poll`` in send_dg); while the thread then sits blocked in the syscall its stack
cannot change, so :func:`unwind` reads it through ``/proc/PID/mem`` and walks it with the
``.eh_frame`` CFI of each object (Debian builds have no frame pointers).  Objects are opened
as the *target* sees them (``/proc/PID/map_files/<start>-<end>``, else
``/proc/PID/root/<path>``: a container's own files, never the host's).  CFI is decoded by
pyelftools; the FDE of a PC comes from ``.eh_frame_hdr``'s sorted table (one FDE parsed per
lookup), else from all FDEs sorted once, else from ``.debug_frame``.  DWARF-expression CFAs
and register rules (PLT stubs, signal trampolines, realigned stacks) are evaluated here; a
PC without CFI gets one frame-pointer step when ``rbp`` looks sane.  Symbols come from the
object's ``.symtab``/``.dynsym`` and the ``.symtab`` of its debug file (by build-id, in
``debug_dirs``: static functions like ``send_dg`` are named only there); a PC outside every
sized symbol stays unnamed, as in gdb.  Per-object data is cached by build-id (LRU).
"""
from __future__ import annotations

import io
import operator
import os
import struct
import threading
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass

from elftools.common.exceptions import DWARFError, ELFError
from elftools.dwarf.callframe import FDE, CallFrameInfo
from elftools.dwarf.structs import DWARFStructs
from elftools.elf.elffile import ELFFile

from .errors import GdbdiagError
from .glibc.elfscan import leb128
from .passive import PassiveError, ProcMem
from .procfs import mapped_file
from .symbols.elfinfo import read_build_id

__all__ = ["Frame", "UnwindError", "unwind", "REGS", "clear_cache"]

M64 = (1 << 64) - 1
RA = 16                                  # DWARF x86-64 return-address column
RSP, RBP = 7, 6
REGS = {"rax": 0, "rdx": 1, "rcx": 2, "rbx": 3, "rsi": 4, "rdi": 5, "rbp": 6, "rsp": 7,
        **{f"r{i}": i for i in range(8, 16)}, "rip": RA}
CALLEE_SAVED = (3, 6, 12, 13, 14, 15)
CACHE_SIZE = 48
FP_MAX_FRAME = 1 << 20                   # rbp must lie within 1 MiB above rsp for an fp step
OUTERMOST = "outermost"


class UnwindError(GdbdiagError):
    """The process cannot be unwound at all (gone, no permission): one-line reason."""


@dataclass
class Frame:
    pc: int
    module: str | None            # basename of the object as the target sees it
    module_offset: int | None     # pc - load bias (the object's own virtual address)
    symbol: str | None
    symbol_offset: int | None
    how: str                      # "first" (the registers), "cfi", "fp" (frame pointer)
    provenance: str = "memory"
    sp: int | None = None         # rsp in this frame, when known
    stop_reason: str | None = None  # set on the last frame when the unwind stopped early

    def label(self) -> str:
        """What gdb's ``bt`` shows as the function: the symbol, else the address."""
        return self.symbol if self.symbol else f"0x{self.pc:016x}"

    def __str__(self) -> str:
        where = f"{self.symbol}+{self.symbol_offset:#x}" if self.symbol else "??"
        mod = f" ({self.module}+{self.module_offset:#x})" if self.module else ""
        return f"0x{self.pc:016x} {where}{mod} [{self.how}]"


# --- /proc/PID/maps ---
@dataclass
class _Map:
    start: int
    end: int
    perms: str
    offset: int
    path: str                     # "" for anonymous; " (deleted)" stripped

    @property
    def name(self) -> str | None:
        return os.path.basename(self.path) if self.path.startswith("/") else (self.path or None)


def _read_maps(pid: int) -> list[_Map]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UnwindError(f"no such process: {pid}") from None
    except PermissionError as e:
        raise UnwindError(f"cannot read /proc/{pid}/maps ({e.strerror})") from None
    out = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        a, b = parts[0].split("-")
        path = parts[5] if len(parts) > 5 else ""
        if path.endswith(" (deleted)"):
            path = path[:-len(" (deleted)")]
        out.append(_Map(int(a, 16), int(b, 16), parts[1], int(parts[2], 16), path))
    return out


def _find_map(maps: list[_Map], starts: list[int], pc: int) -> _Map | None:
    i = bisect_right(starts, pc) - 1
    return maps[i] if i >= 0 and pc < maps[i].end else None


# --- per-object data: PT_LOADs, CFI, symbols (cached by build-id) ---
class _Cfi:
    """FDE lookup by (object) virtual address."""

    def __init__(self, elf: ELFFile):
        structs = DWARFStructs(little_endian=True, dwarf_format=32, address_size=8)
        self.eh = self.hdr = self.dbg = None
        self.locs: list[int] = []
        self.fdes: list = []           # FDE objects (full parse) or eh_frame offsets (hdr)
        self.dbg_locs = self.dbg_fdes = None
        sec = elf.get_section_by_name(".eh_frame")
        if sec is not None and sec["sh_type"] != "SHT_NOBITS" and sec["sh_size"]:
            self.eh_addr = sec["sh_addr"]
            self.eh = CallFrameInfo(io.BytesIO(sec.data()), sec["sh_size"], sec["sh_addr"],
                                    structs, for_eh_frame=True)
            hdr = elf.get_section_by_name(".eh_frame_hdr")
            try:
                if hdr is None or not hasattr(self.eh, "_parse_entry_at"):
                    raise ValueError("no usable .eh_frame_hdr")
                self._read_hdr(hdr.data(), hdr["sh_addr"])
            except (ValueError, struct.error):
                self.locs, self.fdes = _sorted_fdes(self.eh)
        sec = elf.get_section_by_name(".debug_frame")
        if sec is not None and sec["sh_type"] != "SHT_NOBITS" and sec["sh_size"]:
            self.dbg = CallFrameInfo(io.BytesIO(sec.data()), sec["sh_size"], sec["sh_addr"], structs)

    def _read_hdr(self, data: bytes, addr: int):
        # version 1; eh_frame_ptr pcrel|sdata4, fde_count udata4, table datarel|sdata4 (what
        # GNU ld and lld write); anything else: sort all FDEs instead
        if data[:4] != b"\x01\x1b\x03\x3b":
            raise ValueError("unsupported .eh_frame_hdr")
        count = struct.unpack_from("<I", data, 8)[0]
        raw = struct.unpack_from(f"<{2 * count}i", data, 12)
        self.locs = [(addr + v) & M64 for v in raw[0::2]]
        self.fdes = [(addr + v - self.eh_addr) & M64 for v in raw[1::2]]
        self.hdr = True

    def find(self, v: int):
        """The FDE covering virtual address ``v``, or None."""
        if self.eh is not None:
            i = bisect_right(self.locs, v) - 1
            if i >= 0:
                fde = self.eh._parse_entry_at(self.fdes[i]) if self.hdr else self.fdes[i]
                if isinstance(fde, FDE) and _covers(fde, v):
                    return fde
        if self.dbg is not None:
            if self.dbg_locs is None:
                self.dbg_locs, self.dbg_fdes = _sorted_fdes(self.dbg)
            i = bisect_right(self.dbg_locs, v) - 1
            if i >= 0 and _covers(self.dbg_fdes[i], v):
                return self.dbg_fdes[i]
        return None


def _sorted_fdes(cfi: CallFrameInfo) -> tuple[list[int], list]:
    fdes = sorted((e for e in cfi.get_entries() if isinstance(e, FDE)), key=lambda e: e["initial_location"])
    return [e["initial_location"] for e in fdes], fdes


def _covers(fde, v: int) -> bool:
    return fde["initial_location"] <= v < fde["initial_location"] + fde["address_range"]


_BIND_PRIO = {1: 3, 2: 2, 0: 1}           # GLOBAL > WEAK > LOCAL among aliases


class _Syms:
    """Function symbols sorted by address; lookup respects st_size like gdb's msymbols."""

    def __init__(self, elf: ELFFile, sections=("SHT_SYMTAB", "SHT_DYNSYM")):
        execs = {i for i, s in enumerate(elf.iter_sections()) if s["sh_flags"] & 0x4}
        seen = set()
        for sec in elf.iter_sections():
            if sec["sh_type"] not in sections or sec["sh_entsize"] != 24:
                continue
            strtab = elf.get_section(sec["sh_link"]).data()
            for noff, info, _o, shndx, value, size in struct.iter_unpack("<IBBHQQ", sec.data()):
                typ = info & 0xF
                if not value or shndx == 0 or shndx >= 0xFF00:
                    continue
                if typ not in (2, 10) and not (typ == 0 and shndx in execs):
                    continue
                name = strtab[noff:strtab.find(b"\0", noff)].decode("utf-8", "replace")
                if name and not name.startswith("$"):
                    prio = _BIND_PRIO.get(info >> 4, 0) + (typ != 0) * 4 + ("@" not in name) * 8
                    seen.add((value, prio, size, name))
        ents = sorted(seen)
        self.starts = [e[0] for e in ents]
        self.ents = ents

    def lookup(self, v: int) -> tuple[str, int] | None:
        i = bisect_right(self.starts, v) - 1
        if i < 0:
            return None
        nearest = self.starts[i]
        for j in range(i, max(i - 64, -1), -1):
            start, _p, size, name = self.ents[j]
            if v < start + size or (size == 0 and start == nearest):
                return name, v - start
        return None


class _Obj:
    """What one ELF object contributes to unwinding; cached by build-id."""

    def __init__(self, elf: ELFFile, build_id: str | None):
        self.build_id = build_id
        self.loads = [(s["p_offset"], s["p_filesz"], s["p_vaddr"], s["p_memsz"])
                      for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        self.cfi = _Cfi(elf)
        self.syms = _Syms(elf)           # .symtab and .dynsym (a superset of either)
        self.debug: dict[str, _Syms | None] = {}
        self.lock = threading.Lock()

    def vaddr(self, m: _Map, pc: int) -> int | None:
        """The object's virtual address of ``pc`` (mapped by ``m``): through the PT_LOAD
        whose file range holds pc's file offset (else the one whose pages do)."""
        off = pc - m.start + m.offset
        for exact in (True, False):
            for p_off, filesz, p_vaddr, memsz in self.loads:
                lo, hi = (p_off, p_off + filesz) if exact else (p_off & ~0xFFF, p_off + max(filesz, memsz))
                if lo <= off < hi:
                    return off - p_off + p_vaddr
        return None

    def debug_syms(self, debug_dirs) -> list[_Syms]:
        out = []
        if not self.build_id or len(self.build_id) < 3:
            return out
        for d in debug_dirs:
            p = os.path.join(d, ".build-id", self.build_id[:2], self.build_id[2:] + ".debug")
            if p not in self.debug:
                self.debug[p] = _load_debug_syms(p, self.build_id)
            if self.debug[p] is not None:
                out.append(self.debug[p])
        return out

    def symbolize(self, v: int, debug_dirs) -> tuple[str, int] | None:
        for s in self.debug_syms(debug_dirs) + [self.syms]:
            hit = s.lookup(v)
            if hit:
                return hit
        return None


def _load_debug_syms(path: str, build_id: str) -> _Syms | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            if read_build_id(f) != build_id:
                return None
            f.seek(0)
            return _Syms(ELFFile(f), ("SHT_SYMTAB",))
    except (OSError, ELFError, ValueError, struct.error):
        return None


_cache: OrderedDict[str, _Obj] = OrderedDict()
_ident: dict[tuple, str] = {}             # (st_dev, st_ino, st_size, st_mtime_ns) -> cache key
_lock = threading.Lock()


def clear_cache():
    with _lock:
        _cache.clear()
        _ident.clear()


def _cached(key: str, build) -> _Obj:
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    obj = build()
    with _lock:
        _cache[key] = obj
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return obj


def _open_obj(pid: int, m: _Map, mem) -> _Obj | None:
    """The cached object data of mapping ``m`` (its file as the target sees it)."""
    if m.path == "[vdso]":
        data = mem.read(m.start, m.end - m.start)
        if data is None:
            return None
        elf = ELFFile(io.BytesIO(data))
        bid = read_build_id(io.BytesIO(data))
        return _cached(f"vdso:{bid or hash(data)}", lambda: _Obj(elf, bid))
    if not m.path.startswith("/"):
        return None
    with open(mapped_file(pid, m.start, m.end, m.path), "rb") as f:
        st = os.fstat(f.fileno())
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with _lock:
            key = _ident.get(ident)
        if key is None:
            bid = read_build_id(f)
            key = f"bid:{bid}" if bid else f"file:{ident}"
            with _lock:
                if len(_ident) > 4096:
                    _ident.clear()
                _ident[ident] = key
        bid = key[4:] if key.startswith("bid:") else None
        f.seek(0)
        return _cached(key, lambda: _Obj(ELFFile(f), bid))


# --- DWARF expressions (CFA / register rules) ---
def _s64(v: int) -> int:
    v &= M64
    return v - (1 << 64) if v >> 63 else v


_CONSTS = {0x08: "<B", 0x09: "<b", 0x0A: "<H", 0x0B: "<h", 0x0C: "<I", 0x0D: "<i",
           0x0E: "<Q", 0x0F: "<q"}
_BINOPS = {0x1A: operator.and_, 0x1C: operator.sub, 0x1E: operator.mul, 0x21: operator.or_,
           0x22: operator.add, 0x24: lambda a, b: a << b if b < 64 else 0, 0x25: operator.rshift,
           0x26: lambda a, b: _s64(a) >> b, 0x27: operator.xor,
           **{op: (lambda f: lambda a, b: int(f(_s64(a), _s64(b))))(f) for op, f in
              ((0x29, operator.eq), (0x2A, operator.ge), (0x2B, operator.gt), (0x2C, operator.le),
               (0x2D, operator.lt), (0x2E, operator.ne))}}
_STACK_OPS = {0x12: lambda st: st.append(st[-1]), 0x13: lambda st: st.pop(),        # dup, drop
              0x14: lambda st: st.append(st[-2]), 0x16: lambda st: st.insert(-1, st.pop()),  # over, swap
              0x1F: lambda st: st.append(-st.pop() & M64), 0x20: lambda st: st.append(~st.pop() & M64),
              0x96: lambda st: None}                                                  # neg, not, nop


def _eval_expr(expr, regs: dict, mem, push: int | None = None) -> int | None:
    """Evaluate a DWARF expression (the subset CFI uses); None if it needs something
    unknown (a register, unreadable memory) or uses an unsupported operation."""
    b = bytes(expr)
    st = [] if push is None else [push]
    i = 0
    try:
        while i < len(b):
            op = b[i]
            i += 1
            if 0x30 <= op <= 0x4F:                       # DW_OP_lit0..31
                st.append(op - 0x30)
            elif 0x70 <= op <= 0x8F or op == 0x92:       # DW_OP_breg0..31, bregx
                reg = op - 0x70
                if op == 0x92:
                    reg, i = leb128(b, i, False)
                off, i = leb128(b, i, True)
                if regs.get(reg) is None:
                    return None
                st.append((regs[reg] + off) & M64)
            elif op in _CONSTS:
                st.append(struct.unpack_from(_CONSTS[op], b, i)[0] & M64)
                i += struct.calcsize(_CONSTS[op])
            elif op in (0x10, 0x11, 0x23):               # constu, consts, plus_uconst
                v, i = leb128(b, i, op == 0x11)
                st.append((st.pop() + v if op == 0x23 else v) & M64)
            elif op in _BINOPS:
                rhs, lhs = st.pop(), st.pop()
                st.append(_BINOPS[op](lhs, rhs) & M64)
            elif op == 0x06:                             # deref
                st.append(_u64(mem, st.pop()))
                if st[-1] is None:
                    return None
            elif op in _STACK_OPS:
                _STACK_OPS[op](st)
            else:
                return None
    except (IndexError, struct.error):
        return None
    return st[-1] if st else None


# --- one step: callee registers -> caller registers ---
def _u64(mem, addr: int) -> int | None:
    data = mem.read(addr & M64, 8)
    return None if data is None else struct.unpack("<Q", data)[0]


def _row(fde, v: int):
    rows = [line for line in fde.get_decoded().table if line["pc"] <= v]
    return rows[-1] if rows else None


def _rule_value(rule, cfa: int, regs: dict, mem) -> int | None:
    t, arg = rule.type, rule.arg
    if t == "OFFSET":
        return _u64(mem, cfa + arg)
    if t == "VAL_OFFSET":
        return (cfa + arg) & M64
    if t == "REGISTER":
        return regs.get(arg)
    if t == "EXPRESSION":
        addr = _eval_expr(arg, regs, mem, push=cfa)
        return None if addr is None else _u64(mem, addr)
    if t == "VAL_EXPRESSION":
        return _eval_expr(arg, regs, mem, push=cfa)
    return None                                          # UNDEFINED, ARCHITECTURAL


def _cfi_step(fde, v: int, regs: dict, mem) -> tuple[dict | None, str | None]:
    """Caller registers per the CFI row for ``v``; (None, reason) if it cannot be done,
    (None, OUTERMOST) when the return address is undefined or 0."""
    row = _row(fde, v)
    if row is None:
        return None, f"empty CFI table for {v:#x}"
    rule = row["cfa"]
    if rule.expr is not None:
        cfa = _eval_expr(rule.expr, regs, mem)
        if cfa is None:
            return None, f"CFA expression not evaluable ({bytes(rule.expr).hex()})"
    elif rule.reg is None or regs.get(rule.reg) is None:
        return None, f"CFA register r{rule.reg} not known"
    else:
        cfa = (regs[rule.reg] + rule.offset) & M64
    ra_col = fde.cie["return_address_register"]
    ra_rule = row.get(ra_col)
    if ra_rule is None or ra_rule.type == "UNDEFINED":
        return None, OUTERMOST
    new = {r: regs[r] for r in CALLEE_SAVED if regs.get(r) is not None}
    new[RSP] = cfa
    for reg, r in row.items():
        if not isinstance(reg, int):
            continue
        val = regs.get(reg) if r.type == "SAME_VALUE" else _rule_value(r, cfa, regs, mem)
        if val is None:
            new.pop(reg, None)
        else:
            new[reg] = val
    if ra_col != RA:
        new[RA] = new.pop(ra_col, None)
    if new.get(RA) is None:
        return None, f"cannot read the return address (CFA {cfa:#x})"
    return (None, OUTERMOST) if new[RA] == 0 else (new, None)


def _fp_step(regs: dict, mem) -> tuple[dict | None, str | None]:
    rbp, rsp = regs.get(RBP), regs.get(RSP)
    if rbp is None or rbp % 8 or (rsp is not None and not rsp <= rbp < rsp + FP_MAX_FRAME):
        return None, "no CFI for this pc and rbp is not a frame pointer"
    saved, ra = _u64(mem, rbp), _u64(mem, rbp + 8)
    if saved is None or ra is None:
        return None, f"no CFI for this pc; cannot read the frame at rbp {rbp:#x}"
    if ra == 0:
        return None, OUTERMOST
    return {RBP: saved, RSP: rbp + 16, RA: ra}, None


# --- the walk ---
def _obj_of(pid: int, m: _Map, mem, seen: dict) -> tuple[_Obj | None, str | None]:
    """(object data, error) of mapping ``m``, memoised per unwind in ``seen``."""
    if m.start not in seen:
        try:
            seen[m.start] = (_open_obj(pid, m, mem), None)
        except (OSError, ELFError, DWARFError, ValueError, struct.error) as e:
            seen[m.start] = (None, f"cannot read {m.path or 'mapping'}: {e}")
    return seen[m.start]


def _frame(pc: int, m: _Map | None, obj: _Obj | None, how: str, regs: dict, debug_dirs):
    f = Frame(pc=pc, module=m.name if m else None, module_offset=None, symbol=None,
              symbol_offset=None, how=how, sp=regs.get(RSP))
    v = obj.vaddr(m, pc) if obj is not None else None
    if v is not None:
        f.module_offset = v
        with obj.lock:
            hit = obj.symbolize(v, debug_dirs)
        if hit:
            f.symbol, f.symbol_offset = hit
    return f, v


_PARSE_ERRORS = (ELFError, DWARFError, AssertionError, KeyError, ValueError, IndexError,
                 struct.error)


def _step(obj: _Obj | None, lookup: int | None, regs: dict, mem, after_fp: bool, err: str | None):
    """One frame up: (caller regs | None, stop reason | None, how, exact-pc for the caller)."""
    fde = None
    if obj is not None and lookup is not None:
        try:
            with obj.lock:
                fde = obj.cfi.find(lookup)
                if fde is not None:
                    new, reason = _cfi_step(fde, lookup, regs, mem)
                    signal = "S" in fde.cie["augmentation"].decode("ascii", "replace")
                    return new, reason, "cfi", signal       # caller of a signal frame: exact pc
        except _PARSE_ERRORS as e:                         # foreign CFI that pyelftools rejects
            return None, f"unusable CFI at {lookup:#x}: {type(e).__name__}: {e}", "cfi", False
    if after_fp:
        return None, "no CFI for this pc (after a frame-pointer step)", "fp", False
    new, reason = _fp_step(regs, mem)
    if reason and reason != OUTERMOST and err:
        reason = err
    return new, reason, "fp", False


def _walk(pid: int, maps, regs: dict, max_frames: int, debug_dirs, mem) -> list[Frame]:
    frames: list[Frame] = []
    seen, starts = {}, [m.start for m in maps]
    how, exact, after_fp = "first", True, False
    while True:
        pc = regs[RA]
        m = _find_map(maps, starts, pc)
        obj, err = _obj_of(pid, m, mem, seen) if m is not None and "x" in m.perms else (None, None)
        f, v = _frame(pc, m, obj, how, regs, debug_dirs)
        frames.append(f)
        if m is None or "x" not in m.perms:
            f.stop_reason = f"pc {pc:#x} is not in an executable mapping"
            break
        if len(frames) >= max(1, max_frames):
            f.stop_reason = f"max_frames ({max_frames}) reached"
            break
        lookup = v if (exact or v is None) else v - 1
        new, reason, how, exact = _step(obj, lookup, regs, mem, after_fp, err)
        after_fp = how == "fp"
        if reason == OUTERMOST:
            break
        if new is None:
            f.stop_reason = reason
            break
        if not exact and regs.get(RSP) is not None and new[RSP] <= regs[RSP]:
            f.stop_reason = "the caller's stack pointer is not above this frame's (corrupt stack?)"
            break
        regs = new
    return frames


def unwind(pid: int, regs: dict[str, int], max_frames: int = 64, debug_dirs=(),
           mem=None) -> list[Frame]:
    """Unwind thread state ``regs`` (names as in :data:`REGS`: rip, rsp, rbp, rbx, r12-r15;
    missing ones are unknown) of process ``pid``, reading its stack through ``mem``
    (``read(addr, n) -> bytes | None``; default /proc/PID/mem).  Frames innermost first;
    the last one carries ``stop_reason`` if the walk stopped before the outermost frame."""
    r = {REGS[k]: v & M64 for k, v in regs.items() if k in REGS and v is not None}
    if RA not in r:
        raise ValueError("regs must include rip")
    maps = _read_maps(pid)                           # sorted by address, as the kernel lists them
    own = mem is None
    if own:
        try:
            mem = ProcMem(pid)
        except PassiveError as e:
            raise UnwindError(str(e)) from None
    try:
        return _walk(pid, maps, r, max_frames, tuple(debug_dirs), mem)
    finally:
        if own:
            mem.close()
