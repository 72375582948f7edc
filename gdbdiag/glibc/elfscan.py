"""Fast, read-only access to the parts of an x86-64 ELF shared object that the send_dg
analyzer needs: program headers (virtual address <-> file offset), sections, the GNU
build-id, ``.dynsym``, RELA relocations, PLT slots and ``.eh_frame`` function bounds.

Everything is parsed with :mod:`struct` from the file's bytes (one read), because
pyelftools' generic paths are too slow for libc.so.6 on the attach path (its
``EH_CFI_entries()`` alone takes ~0.5 s there; the ``.eh_frame_hdr`` table read here
takes ~1 ms).  pyelftools is used only by :func:`tpoff_relocs` (for :mod:`gdbdiag.passive.layout`), which
takes a pyelftools ``ELFFile``.
"""
from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

from ..errors import GdbdiagError

__all__ = ["ElfImage", "ElfError", "Sym", "Reloc", "tpoff_relocs", "R_X86_64_GLOB_DAT",
           "R_X86_64_JUMP_SLOT", "R_X86_64_TPOFF64"]

EM_X86_64 = 62
PT_LOAD, PT_NOTE, PT_GNU_EH_FRAME = 1, 4, 0x6474E550
PF_X = 1
SHT_RELA, SHT_NOBITS = 4, 8
R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT, R_X86_64_TPOFF64 = 6, 7, 18
NT_GNU_BUILD_ID = 3
STT_NAMES = {0: "NOTYPE", 1: "OBJECT", 2: "FUNC", 3: "SECTION", 4: "FILE", 6: "TLS", 10: "IFUNC"}


class ElfError(GdbdiagError, ValueError):
    """Not an ELF64 x86-64 object this analyzer can read (str() is the reason)."""


@dataclass(frozen=True)
class Sym:
    name: str
    value: int
    size: int
    type: str          # FUNC, OBJECT, TLS, IFUNC, ...
    bind: int          # 0 local, 1 global, 2 weak
    shndx: int         # 0 = undefined


@dataclass(frozen=True)
class Reloc:
    offset: int        # r_offset (the slot's virtual address)
    type: int
    sym: int           # symbol index into .dynsym (0 = none)
    addend: int


def leb128(b: bytes, i: int, signed: bool = False) -> tuple[int, int]:
    """A (U|S)LEB128 number at ``b[i]``: (value, index after it)."""
    v = shift = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return (v - (1 << shift) if signed and c & 0x40 else v), i


def _uleb(b: bytes, i: int) -> tuple[int, int]:
    return leb128(b, i)


def _sleb(b: bytes, i: int) -> tuple[int, int]:
    return leb128(b, i, True)


class ElfImage:
    """One ELF64 little-endian x86-64 file, read once into memory."""

    def __init__(self, path: str, data: bytes | None = None):
        self.path = path
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        self.data = data
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise ElfError(f"{path}: not an ELF64 little-endian file")
        (self.e_type, machine, _v, _entry, phoff, shoff, _fl, _ehs, phentsize, phnum,
         shentsize, shnum, shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
        if machine != EM_X86_64:
            raise ElfError(f"{path}: machine {machine} is not x86-64")
        self.phdrs = [struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
        self.loads = sorted((p[3], p[6], p[2], p[5], p[1]) for p in self.phdrs if p[0] == PT_LOAD)
        self.sections: dict[str, tuple] = {}
        self._read_sections(shoff, shentsize, shnum, shstrndx)
        self._dynsym: list[Sym] | None = None
        self._dynsym_by_name: dict[str, list[Sym]] | None = None
        self._relocs: list[Reloc] | None = None
        self._fdes: list[tuple[int, int]] | None = None
        self._slots: dict | None = None
        self._funcs: dict | None = None

    # -- headers -----------------------------------------------------------------------
    def _read_sections(self, shoff, shentsize, shnum, shstrndx):
        d = self.data
        self._shdrs = []
        if not shoff or not shnum or shoff + shnum * shentsize > len(d):
            return
        hdrs = [struct.unpack_from("<IIQQQQIIQQ", d, shoff + i * shentsize) for i in range(shnum)]
        stroff = hdrs[shstrndx][4] if shstrndx < shnum else 0
        for h in hdrs:
            name = d[stroff + h[0]:d.index(b"\0", stroff + h[0])].decode("ascii", "replace")
            # (type, flags, addr, offset, size, link, entsize)
            self.sections.setdefault(name, (h[1], h[2], h[3], h[4], h[5], h[6], h[9]))
        self._shdrs = hdrs

    def off(self, vaddr: int) -> int | None:
        """File offset of virtual address ``vaddr`` (None if no PT_LOAD maps it from the file)."""
        for va, _mem, off, filesz, _fl in self.loads:
            if va <= vaddr < va + filesz:
                return vaddr - va + off
        return None

    def read(self, vaddr: int, n: int) -> bytes:
        o = self.off(vaddr)
        return b"" if o is None else self.data[o:o + n]

    def exec_ranges(self) -> list[tuple[int, int]]:
        """[(vaddr lo, vaddr hi)] of the executable PT_LOAD segments (file-backed part)."""
        return [(va, va + filesz) for va, _m, _o, filesz, fl in self.loads if fl & PF_X]

    def section_range(self, name: str) -> tuple[int, int] | None:
        s = self.sections.get(name)
        return None if s is None else (s[2], s[2] + s[4])

    def build_id(self) -> str | None:
        d = self.data
        for p in self.phdrs:
            if p[0] != PT_NOTE:
                continue
            i, end = p[2], p[2] + p[5]
            while i + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", d, i)
                name = d[i + 12:i + 12 + namesz]
                desc_at = i + 12 + ((namesz + 3) & ~3)
                if ntype == NT_GNU_BUILD_ID and name.rstrip(b"\0") == b"GNU":
                    return d[desc_at:desc_at + descsz].hex()
                i = desc_at + ((descsz + 3) & ~3)
        return None

    # -- symbols and relocations ----------------------------------------------------------
    def _symtab(self, secname: str) -> list[Sym]:
        s = self.sections.get(secname)
        if s is None or s[0] == SHT_NOBITS:
            return []
        _t, _f, _a, off, size, link, entsize = s
        strsec = self._shdrs[link]
        stroff = strsec[4]
        d = self.data
        out = []
        for name, info, _other, shndx, value, size_ in struct.iter_unpack("<IBBHQQ", d[off:off + size]):
            end = d.find(b"\0", stroff + name)
            out.append(Sym(d[stroff + name:end].decode("ascii", "replace"), value, size_,
                           STT_NAMES.get(info & 0xF, str(info & 0xF)), info >> 4, shndx))
        return out

    def dynsym(self) -> list[Sym]:
        if self._dynsym is None:
            self._dynsym = self._symtab(".dynsym")
        return self._dynsym

    def symtab(self) -> list[Sym]:
        """The full ``.symtab`` (present in debug files and unstripped objects)."""
        return self._symtab(".symtab")

    def dynsym_named(self, name: str) -> list[Sym]:
        if self._dynsym_by_name is None:
            m: dict[str, list[Sym]] = {}
            for s in self.dynsym():
                m.setdefault(s.name.split("@")[0], []).append(s)
            self._dynsym_by_name = m
        return self._dynsym_by_name.get(name, [])

    def defined(self, name: str, types=("FUNC", "IFUNC")) -> Sym | None:
        for s in self.dynsym_named(name):
            if s.shndx != 0 and s.type in types:
                return s
        return None

    def relocs(self) -> list[Reloc]:
        """All RELA relocations (.rela.dyn, .rela.plt, ...)."""
        if self._relocs is None:
            out = []
            for typ, _f, _a, off, size, _l, _e in self.sections.values():
                if typ != SHT_RELA:
                    continue
                for r_off, info, add in struct.iter_unpack("<QQq", self.data[off:off + size]):
                    out.append(Reloc(r_off, info & 0xFFFFFFFF, info >> 32, add))
            self._relocs = out
        return self._relocs

    def slot_symbol(self, slot: int) -> tuple[str, int] | None:
        """(symbol name, reloc type) of the GLOB_DAT/JUMP_SLOT relocation at GOT ``slot``."""
        if self._slots is None:
            syms = self.dynsym()
            self._slots = {r.offset: (syms[r.sym].name, r.type) for r in self.relocs()
                           if r.type in (R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT) and 0 < r.sym < len(syms)}
        return self._slots.get(slot)

    def functions_by_address(self) -> dict[int, list[str]]:
        """{st_value: [names]} of the defined FUNC/IFUNC symbols of ``.dynsym``."""
        if self._funcs is None:
            self._funcs = {}
            for s in self.dynsym():
                if s.shndx != 0 and s.type in ("FUNC", "IFUNC"):
                    self._funcs.setdefault(s.value, []).append(s.name)
        return self._funcs

    def tls_slots(self, sym: str = "__resp") -> list[dict]:
        """GOT slots of R_X86_64_TPOFF64 relocations that resolve to ``sym``: a named one,
        or an anonymous one (local TLS) whose addend is ``sym``'s ``st_value``."""
        syms = self.dynsym()
        val = next((s.value for s in self.dynsym_named(sym) if s.type == "TLS" and s.shndx != 0), None)
        named, anon = [], []
        for r in self.relocs():
            if r.type != R_X86_64_TPOFF64:
                continue
            if r.sym == 0:
                if val is not None and r.addend == val:
                    anon.append({"got_addr": r.offset, "addend": r.addend, "symbol": None,
                                 "how": f"anonymous TPOFF64, addend {val:#x} = {sym} st_value"})
            elif r.sym < len(syms) and syms[r.sym].name.split("@")[0] == sym and r.addend == 0:
                named.append({"got_addr": r.offset, "addend": 0, "symbol": sym, "how": f"TPOFF64 {sym}"})
        return named + anon

    # -- .eh_frame function bounds ---------------------------------------------------------
    def _read_enc(self, enc: int, at: int, base_vaddr: int) -> tuple[int, int]:
        """Decode a DW_EH_PE-encoded pointer at file offset ``at`` (virtual ``base_vaddr``);
        returns (value, next file offset).  pcrel/datarel are resolved by the caller's base."""
        fmt = enc & 0x0F
        size, code = {0x0: (8, "<Q"), 0x2: (2, "<H"), 0x3: (4, "<I"), 0x4: (8, "<Q"), 0xA: (2, "<h"),
                      0xB: (4, "<i"), 0xC: (8, "<q")}.get(fmt, (None, None))
        if fmt == 0x1:
            v, nxt = _uleb(self.data, at)
        elif fmt == 0x9:
            v, nxt = _sleb(self.data, at)
        elif size is None:
            raise ElfError(f"unsupported pointer encoding {enc:#x}")
        else:
            v, nxt = struct.unpack_from(code, self.data, at)[0], at + size
        app = enc & 0x70
        if app in (0x10, 0x30):       # pcrel, datarel (base given by the caller)
            v += base_vaddr
        return v & 0xFFFFFFFFFFFFFFFF, nxt

    def _hdr_table(self) -> list[tuple[int, int]] | None:
        """[(initial_loc, FDE vaddr)] from .eh_frame_hdr (sorted), or None."""
        ph = next((p for p in self.phdrs if p[0] == PT_GNU_EH_FRAME), None)
        if ph is None:
            return None
        hoff, hva, d = ph[2], ph[3], self.data
        _ver, ptr_enc, cnt_enc, tab_enc = d[hoff:hoff + 4]
        _ehf, i = self._read_enc(ptr_enc, hoff + 4, hva + 4)
        count, i = self._read_enc(cnt_enc, i, hva + (i - hoff))
        if tab_enc != 0x3B or count == 0:      # datarel|sdata4 is what every linker writes
            return None
        raw = struct.unpack_from(f"<{2 * count}i", d, i)
        return [(hva + raw[k], hva + raw[k + 1]) for k in range(0, 2 * count, 2)]

    def _fde(self, fde_va: int) -> tuple[int, int, bytes]:
        """(pc_begin, pc_end, CFA instructions: the CIE's initial ones, then the FDE's)."""
        d = self.data
        o = self.off(fde_va)
        length, cie_ptr = struct.unpack_from("<Ii", d, o)
        if length == 0xFFFFFFFF:
            raise ElfError("64-bit .eh_frame is not supported")
        enc, body, initial = self._cie(o + 4 - cie_ptr)
        at = o + 8
        begin, at = self._read_enc(enc, at, fde_va + 8)
        rng, at = self._read_enc(enc & 0x0F, at, 0)
        if body:
            alen, at = _uleb(d, at)
            at += alen
        return begin, begin + rng, initial + d[at:o + 4 + length]

    def _cie(self, cie_o: int) -> tuple[int, bool, bytes]:
        """(FDE pointer encoding, has augmentation data, initial instructions) of a CIE."""
        d = self.data
        (cie_len,) = struct.unpack_from("<I", d, cie_o)
        version = d[cie_o + 8]
        aug_end = d.index(b"\0", cie_o + 9)
        aug = d[cie_o + 9:aug_end].decode("ascii", "replace")
        i = aug_end + 1
        if "eh" in aug:
            i += 8
        _ca, i = _uleb(d, i)
        _da, i = _sleb(d, i)
        if version == 1:
            i += 1
        else:
            _rr, i = _uleb(d, i)
        enc = 0x00
        if aug.startswith("z"):
            alen, i = _uleb(d, i)
            j = i
            for c in aug[1:]:
                if c == "R":
                    enc = d[j]
                    j += 1
                elif c == "L":
                    j += 1
                elif c == "P":
                    _p, j = self._read_enc(d[j], j + 1, 0)
            i += alen
        return enc, aug.startswith("z"), d[i:cie_o + 4 + cie_len]

    def fde_starts(self) -> list[tuple[int, int]]:
        if self._fdes is None:
            t = self._hdr_table()
            if t is None:
                raise ElfError(f"{self.path}: no usable .eh_frame_hdr (function bounds unknown)")
            self._fdes = t
        return self._fdes

    def functions(self) -> list[tuple[int, int]]:
        """Every distinct non-empty [start, end) that an FDE describes, in address order."""
        out = {(b, e) for b, e, _i in (self._fde(va) for _s, va in self.fde_starts()) if e > b}
        return sorted(out)

    def function_at(self, addr: int) -> tuple[int, int] | None:
        """[start, end) of the .eh_frame FDE that covers ``addr``, else None."""
        t = self.fde_starts()
        k = bisect.bisect_right(t, (addr, 1 << 64)) - 1
        if k < 0:
            return None
        begin, end, _ins = self._fde(t[k][1])
        return (begin, end) if begin <= addr < end else None

    def cfi_rows(self, fn: tuple[int, int]) -> list[tuple[int, int | None]]:
        """[(address, CFA offset or None)] at each location the FDE of ``fn`` describes
        (its start, then every ``DW_CFA_advance_loc`` target).  Each address is an
        instruction boundary, by construction of the assembler's CFI labels (code
        alignment factor 1, as on x86-64)."""
        got = self.fde_at(fn[0])
        if got is None:
            return [(fn[0], None)]
        return cfa_rows(fn[0], got[2])

    def cfa_at(self, fn: tuple[int, int], addr: int) -> int | None:
        """CFA - rsp just before the instruction at ``addr`` of ``fn``, or None where
        the CFA is not rsp-based there."""
        rows = [c for loc, c in self.cfi_rows(fn) if loc <= addr]
        return rows[-1] if rows else None

    def fde_at(self, start: int) -> tuple[int, int, bytes] | None:
        """The FDE that begins exactly at ``start``: (begin, end, CFA instructions)."""
        t = self.fde_starts()
        k = bisect.bisect_left(t, (start, 0))
        if k < len(t) and t[k][0] == start:
            return self._fde(t[k][1])
        return None


# DW_CFA opcodes (low 6 bits zero) -> operand kinds: u uleb, s sleb, b block, 1/2/4 fixed
_CFA_OPS = {0x00: "", 0x05: "uu", 0x06: "u", 0x07: "u", 0x08: "u", 0x09: "uu", 0x0A: "", 0x0B: "",
            0x0C: "uu", 0x0D: "u", 0x0E: "u", 0x0F: "b", 0x10: "ub", 0x11: "us", 0x12: "us", 0x13: "s",
            0x14: "uu", 0x15: "us", 0x16: "ub", 0x2E: "u", 0x2F: "uu"}


def cfa_rows(start: int, ins: bytes) -> list[tuple[int, int | None]]:
    """Walk FDE CFA instructions: [(location, CFA offset at that location or None if it
    is not rsp-based or unknown)].  Stops quietly at anything it does not know."""
    loc, cfa, rows, i, stack = start, None, [], 0, []
    rows.append([loc, cfa])
    while i < len(ins):
        op = ins[i]
        i += 1
        hi, lo = op & 0xC0, op & 0x3F
        adv = None
        if hi == 0x40:
            adv = lo
        elif hi == 0x80:
            _v, i = _uleb(ins, i)
        elif hi == 0xC0:
            pass
        elif op in (0x02, 0x03, 0x04):
            n = {0x02: 1, 0x03: 2, 0x04: 4}[op]
            adv, i = int.from_bytes(ins[i:i + n], "little"), i + n
        elif op in _CFA_OPS:
            vals = []
            for k in _CFA_OPS[op]:
                if k == "s":
                    v, i = _sleb(ins, i)
                else:
                    v, i = _uleb(ins, i)
                    if k == "b":
                        i += v
                vals.append(v)
            if op == 0x0E:
                cfa = vals[0]
            elif op == 0x0C:
                cfa = vals[1] if vals[0] == 7 else None
            elif op in (0x0D, 0x0F, 0x12, 0x13):
                cfa = None
            elif op == 0x0A:
                stack.append(cfa)
            elif op == 0x0B and stack:
                cfa = stack.pop()
        else:
            break
        if adv is not None:
            loc += adv
            rows.append([loc, cfa])
        else:
            rows[-1][1] = cfa
    return [(a, c) for a, c in rows]


def tpoff_relocs(elf, sym: str = "__resp") -> list[tuple[int, str]]:
    """Input: a pyelftools ``ELFFile`` on an open file, plus the TLS symbol name; output
    ``[(r_offset, how)]``, the GOT
    slots of the ``R_X86_64_TPOFF64`` relocations that resolve to ``sym`` (named ones first,
    then anonymous ones whose addend is ``sym``'s ``.dynsym`` st_value)."""
    stream = elf.stream
    pos = stream.tell()
    try:
        stream.seek(0)
        img = ElfImage(getattr(stream, "name", "<stream>"), stream.read())
    except ElfError:
        return []
    finally:
        stream.seek(pos)
    return [(s["got_addr"], s["how"]) for s in img.tls_slots(sym)]
