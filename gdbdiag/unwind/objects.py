"""Per-object data for the unwinder: the target's mappings, and what each ELF object gives.

The mappings come from ``/proc/PID/maps``; objects are opened as the *target* sees them
(``/proc/PID/map_files/<start>-<end>``, else ``/proc/PID/root/<path>``: a container's own
files, never the host's).  Of each object: its PT_LOADs (file offset -> virtual address),
its CFI, decoded by pyelftools (the FDE of a PC comes from ``.eh_frame_hdr``'s sorted table,
one FDE parsed per lookup, else from all FDEs sorted once, else from ``.debug_frame``), and
its symbols: the object's ``.symtab``/``.dynsym`` and the ``.symtab`` of its debug file (by
build-id, in ``debug_dirs``: static functions like ``send_dg`` are named only there); a PC
outside every sized symbol stays unnamed, as in gdb.  Per-object data is cached by build-id
(LRU); :func:`clear_cache` empties the cache.
"""
from __future__ import annotations

import io
import os
import struct
import threading
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.dwarf.callframe import FDE, CallFrameInfo
from elftools.dwarf.structs import DWARFStructs
from elftools.elf.elffile import ELFFile

from ..procfs import mapped_file
from ..symbols.elfinfo import read_build_id
from .cfa import M64

CACHE_SIZE = 48


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
    """The mappings of ``pid``, sorted by address as the kernel lists them (FileNotFoundError
    or PermissionError if they cannot be read)."""
    with open(f"/proc/{pid}/maps") as f:
        lines = f.read().splitlines()
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
