"""x86-64 code reading for the send_dg analyzer (capstone, AT&T syntax, structured
operands: no disassembly text is parsed).

* :func:`find_sticky_writers` — every instruction in the object's executable code that
  sets RES_SNGLKUP / RES_SNGLKUPREOP (0x200000 / 0x400000) in ``options`` or ``_flags``
  of a ``struct __res_state``: a byte-level prefilter over all executable segments, then
  a linear disassembly up to each candidate from the closest instruction boundary the
  ``.eh_frame`` FDE of its function proves (function start or CFI location), so bytes
  inside another instruction are rejected.  Forms: ``or``/``bts`` with an immediate into
  memory (any width), and ``or $imm,%reg`` followed by a store of that register.
* :func:`call_sites` — the poll / send / sendmmsg / recvfrom calls of a function, with
  their targets resolved through PLT slots, GOT slots or ``.dynsym``.
* :func:`disassemble` — one function (several ranges) as a list of capstone insns.

With capstone's AT&T syntax the operand list is in AT&T order: the destination is last.
"""
from __future__ import annotations

import re

import capstone
from capstone import x86_const as X

from .elfscan import ElfImage

__all__ = ["RES_STATE", "FLAG_BITS", "CALL_KINDS", "disassemble", "find_sticky_writers",
           "find_sticky_writers_slow", "call_sites", "resolve_call", "norm_callee", "reg64", "insn_text", "is_jump", "is_cond_jump", "is_uncond_jump",
           "ends_block", "direct_target", "mem_operand", "jump_targets"]

# struct __res_state: ABI-stable offsets (checked against DWARF when a debug file is given)
# struct __res_state (resolv/bits/types/res_state.h): public, ABI-stable offsets (x86-64)
RES_STATE = {"retrans": (0, 4), "options": (8, 8), "pfcode": (0x180, 8), "_flags": (0x1F8, 4),
             "_u._ext.nssocks": (0x208, 12)}
FLAG_FIELDS = ("options", "_flags")
FLAG_BITS = {0x200000: "RES_SNGLKUP", 0x400000: "RES_SNGLKUPREOP"}
CALL_KINDS = ("poll", "send", "sendmmsg", "recvfrom")
# send_dg(statp, buf, buflen, buf2, buflen2, ansp, anssizp, terrno, ns, v_circuit,
#         gotsomewhere, anscp, ansp2, anssizp2, resplen2, ansp2_malloced) (2.26 and later):
# the arguments after the sixth are on the stack, the 7th at the CFA. The first answer
# send_dg receives goes to ``*(anscp ?: ansp)``; getaddrinfo's path always passes anscp.
SEND_DG_STACK_ARGS = {name: 8 * i for i, name in enumerate(
    ("anssizp", "terrno", "ns", "v_circuit", "gotsomewhere", "anscp", "ansp2", "anssizp2",
     "resplen2", "ansp2_malloced"))}

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md.syntax = capstone.CS_OPT_SYNTAX_ATT
_md.detail = True
_md_lite = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)

_REG64: dict[str, str] = {}
for _r in ("ax", "bx", "cx", "dx"):
    for _a in ("r" + _r, "e" + _r, _r, _r[0] + "l", _r[0] + "h"):
        _REG64[_a] = "r" + _r
for _r in ("si", "di", "bp", "sp"):
    for _a in ("r" + _r, "e" + _r, _r, _r + "l"):
        _REG64[_a] = "r" + _r
for _i in range(8, 16):
    for _s in ("", "d", "w", "b"):
        _REG64[f"r{_i}{_s}"] = f"r{_i}"


def reg64(name: str) -> str:
    return _REG64.get(name, name)


def insn_text(i) -> str:
    return f"{i.mnemonic} {i.op_str}".strip()


def disassemble(img: ElfImage, ranges) -> list:
    """Capstone insns (with detail) of the address ranges [(lo, hi)], in address order."""
    out = []
    for lo, hi in sorted(ranges):
        code = img.read(lo, hi - lo)
        out += list(_md.disasm(code, lo))
    return out


def is_jump(i) -> bool:
    return i.group(capstone.CS_GRP_JUMP)


def is_cond_jump(i) -> bool:
    return i.group(capstone.CS_GRP_JUMP) and i.id not in (X.X86_INS_JMP, X.X86_INS_LJMP)


def is_uncond_jump(i) -> bool:
    return i.id in (X.X86_INS_JMP, X.X86_INS_LJMP)


def ends_block(i) -> bool:
    """Control leaves the straight line here (jumps, calls, returns, traps)."""
    return (i.group(capstone.CS_GRP_JUMP) or i.group(capstone.CS_GRP_CALL) or i.group(capstone.CS_GRP_RET)
            or i.id in (X.X86_INS_UD2, X.X86_INS_HLT, X.X86_INS_INT3))


def direct_target(i) -> int | None:
    if i.operands and i.operands[0].type == X.X86_OP_IMM and (i.group(capstone.CS_GRP_JUMP)
                                                              or i.group(capstone.CS_GRP_CALL)):
        return i.operands[0].imm
    return None


def jump_targets(insns) -> dict[int, list[int]]:
    """{target address: [index of each jmp/jcc that goes there]} (direct jumps only)."""
    out: dict[int, list[int]] = {}
    for n, i in enumerate(insns):
        if i.group(capstone.CS_GRP_JUMP):
            t = direct_target(i)
            if t is not None:
                out.setdefault(t, []).append(n)
    return out


def mem_operand(i):
    for o in i.operands:
        if o.type == X.X86_OP_MEM:
            return o
    return None


def _field_of(disp: int):
    for name in FLAG_FIELDS:
        off, size = RES_STATE[name]
        if off <= disp < off + size:
            return name, off, size
    return None


# ---------------------------------------------------------------------------------------
# sticky-bit writers
# ---------------------------------------------------------------------------------------
# or r/m,imm (80 /1, 81 /1) with a disp8/disp32 memory operand, or reg,imm32 (81 /1
# mod=11); bts r/m,imm8 (0f ba /5); or %eax,imm32 (0d) with a sticky bit in byte 2.
# Separate patterns: one alternation with a bare \x0d branch scans 2-3x slower.
_PREFILTERS = [re.compile(rb"[\x80\x81][\x48-\x4f\x88-\x8f\xc8-\xcf]", re.S),
               re.compile(rb"\x0f\xba[\x68-\x6f\xa8-\xaf]", re.S),
               re.compile(rb"\x0d..[\x20-\x7f\xa0-\xff]", re.S)]


def _disp_at(d: bytes, p: int) -> tuple[int, int] | None:
    """(disp, end offset) of the ModRM at d[p] (mod 01/10 only)."""
    modrm = d[p]
    at = p + 1 + ((modrm & 7) == 4)
    if modrm >> 6 == 1:
        return int.from_bytes(d[at:at + 1], "little", signed=True), at + 1
    if modrm >> 6 == 2:
        return int.from_bytes(d[at:at + 4], "little", signed=True), at + 4
    return None


_STICKY = 0x600000


def _store_follows(d: bytes, p: int, span: int = 24) -> bool:
    """A ``mov %reg, disp(%base)`` (89 /r) into options/_flags within ``span`` bytes."""
    q = d.find(b"\x89", p, p + span)
    while q != -1:
        r = _disp_at(d, q + 1) if (d[q + 1] >> 6) in (1, 2) else None
        if r is not None and _field_of(r[0]) is not None:
            return True
        q = d.find(b"\x89", q + 1, p + span)
    return False


def _mem_candidate(d: bytes, p: int) -> bool:
    """or/bts with an immediate into disp(%base): does the effective mask hit a sticky bit
    of options/_flags?  (Operand size from the prefixes; exact check later by capstone.)"""
    op = d[p]
    r = _disp_at(d, p + (2 if op == 0x0F else 1))
    if r is None:
        return False
    disp, imm_at = r
    f = _field_of(disp)
    if f is None:
        return False
    # the bytes before the opcode may or may not be prefixes: accept any reading
    if op == 0x0F:                       # bts: bit number mod the operand width
        masks = [1 << (d[imm_at] % bits) for bits in (16, 32, 64)]
    elif op == 0x80:
        masks = [d[imm_at]]
    else:                                # imm32, or imm16 after a 0x66 prefix
        masks = [int.from_bytes(d[imm_at:imm_at + n], "little") for n in (2, 4)]
    return any((m << (8 * (disp - f[1]))) & _STICKY for m in masks)


def _prefilter(img: ElfImage) -> list[int]:
    """Virtual addresses of byte positions that may start a sticky-bit writer (loose:
    some are not instruction boundaries; the linear disassembly decides)."""
    out = []
    for lo, hi in img.exec_ranges():
        base = img.off(lo)
        d = img.data[base:base + (hi - lo) + 8]
        hits = sorted(m.start() for r in _PREFILTERS for m in r.finditer(d, 0, hi - lo))
        for p in hits:
            op = d[p]
            if op == 0x80 and d[p + 1] >= 0xC8:
                continue
            if op == 0x0D or (op == 0x81 and d[p + 1] >= 0xC8):
                imm_at = p + 1 if op == 0x0D else p + 2
                if int.from_bytes(d[imm_at:imm_at + 4], "little") & _STICKY and _store_follows(d, imm_at + 4):
                    out.append(lo + p)
            elif _mem_candidate(d, p):
                out.append(lo + p)
    return out


def _mask_of(i, op_imm, mem) -> int:
    if i.id == X.X86_INS_BTS:
        return 1 << (op_imm % (8 * mem.size))
    return op_imm & ((1 << (8 * mem.size)) - 1)


def _writer_record(img, i, mem, mask_raw, base_name, store=None) -> dict | None:
    f = _field_of(mem.mem.disp)
    if f is None:
        return None
    name, off, size = f
    mask = (mask_raw << (8 * (mem.mem.disp - off))) & ((1 << (8 * size)) - 1)
    bits = [b for b in FLAG_BITS if mask & b]
    if not bits:
        return None
    w = store or i
    rec = {"addr": w.address, "file_offset": img.off(w.address), "length": w.size,
           "insn": insn_text(w), "base_reg": base_name, "disp": mem.mem.disp, "width": mem.size,
           "field": name, "bit": FLAG_BITS[bits[0]], "mask": mask}
    if len(bits) > 1:
        rec["also"] = [FLAG_BITS[b] for b in bits[1:]]
    if store is not None:
        rec["via"] = {"addr": i.address, "insn": insn_text(i)}
    return rec


def _state_mem(i, mem) -> str | None:
    """Base register name of a plausible ``statp->field`` operand (no rsp/rip, no index)."""
    if mem is None or mem.mem.index != 0 or mem.mem.base == 0 or mem.mem.segment != 0:
        return None
    b = reg64(i.reg_name(mem.mem.base))
    return None if b in ("rsp", "rip") else b


def _writers_in(img: ElfImage, insns) -> list[dict]:
    out = []
    for n, i in enumerate(insns):
        if i.id not in (X.X86_INS_OR, X.X86_INS_BTS) or len(i.operands) != 2:
            continue
        src, dst = i.operands
        if src.type != X.X86_OP_IMM:
            continue
        if dst.type == X.X86_OP_MEM:
            base = _state_mem(i, dst)
            rec = base and _writer_record(img, i, dst, _mask_of(i, src.imm, dst), base)
            if rec:
                out.append(rec)
        elif dst.type == X.X86_OP_REG and i.id == X.X86_INS_OR and src.imm & _STICKY:
            rec = _store_of_reg(img, insns, n, reg64(i.reg_name(dst.reg)), src.imm)
            if rec:
                out.append(rec)
    return out


def _store_of_reg(img, insns, n, reg, imm, window=4) -> dict | None:
    """``or $imm,%reg`` at insns[n], then ``mov %reg, field(%base)`` within ``window``."""
    for j in insns[n + 1:n + 1 + window]:
        if ends_block(j):
            return None
        if j.id == X.X86_INS_MOV and len(j.operands) == 2:
            s, d = j.operands
            if s.type == X.X86_OP_REG and reg64(j.reg_name(s.reg)) == reg and d.type == X.X86_OP_MEM:
                base = _state_mem(j, d)
                return base and _writer_record(img, insns[n], d, imm, base, store=j)
        _r, w = j.regs_access()
        if any(reg64(j.reg_name(x)) == reg for x in w):
            return None
    return None


def _confirm(img: ElfImage, a: int, fn: tuple[int, int]) -> tuple[list[dict], int]:
    """Writers whose opcode byte is at ``a``: disassemble linearly from the closest
    known instruction boundary at or before ``a`` (function start or a CFI location),
    so a byte pattern inside another instruction is rejected.  (writers, bytes decoded)"""
    start = max((loc for loc, _c in img.cfi_rows(fn) if loc <= a), default=fn[0])
    code = img.read(start, a + 16 - start)
    for addr, size, _m, _o in _md_lite.disasm_lite(code, start):
        if addr > a:
            break
        if addr >= a - 3 and addr + size > a:
            insns = list(_md.disasm(img.read(addr, min(fn[1], addr + 48) - addr), addr))
            ws = _writers_in(img, insns[:6])
            return [w for w in ws if (w.get("via") or w)["addr"] == addr], a - start
    return [], a - start


def find_sticky_writers_slow(img: ElfImage) -> list[dict]:
    """Reference for tests: the same writers by a linear disassembly of every .eh_frame
    function (seconds on libc, not for the attach path)."""
    out = {}
    for b, e in img.functions():
        for w in _writers_in(img, disassemble(img, [(b, e)])):
            out[w["addr"]] = dict(w, function=[b, e])
    return sorted(out.values(), key=lambda w: w["addr"])


def find_sticky_writers(img: ElfImage) -> tuple[list[dict], dict]:
    """(writers, stats).  Each writer gets ``function`` = its .eh_frame [start, end)."""
    cands = _prefilter(img)
    writers, decoded, nofde = {}, 0, 0
    for a in cands:
        fn = img.function_at(a)
        if fn is None:
            nofde += 1
            continue
        ws, n = _confirm(img, a, fn)
        decoded += n
        for w in ws:
            w["function"] = list(fn)
            writers[w["addr"]] = w
    stats = {"prefilter_hits": len(cands), "bytes_disassembled": decoded, "outside_eh_frame": nofde}
    return sorted(writers.values(), key=lambda w: w["addr"]), stats


# ---------------------------------------------------------------------------------------
# call sites
# ---------------------------------------------------------------------------------------
def norm_callee(sym: str | None) -> str | None:
    """``__GI___poll``, ``__poll@plt``, ``__libc_send``, ``recvfrom@GLIBC_2.2.5`` -> poll,
    poll, send, recvfrom.  None for ``foo+12`` (not a function start)."""
    if not sym or "+" in sym:
        return None
    s = sym.split("@")[0]
    changed = True
    while changed:
        changed = False
        for p in ("__GI_", "__libc_", "__"):
            if s.startswith(p):
                s, changed = s[len(p):], True
    return s.lstrip("_") or None


def _plt_slot(img: ElfImage, target: int) -> int | None:
    """GOT slot that the PLT entry at ``target`` jumps through (``jmp *disp(%rip)``)."""
    for i in _md.disasm(img.read(target, 16), target, 3):
        if i.id == X.X86_INS_JMP:
            m = mem_operand(i)
            if m is not None and i.reg_name(m.mem.base) == "rip":
                return i.address + i.size + m.mem.disp
            return None
    return None


def _in_plt(img: ElfImage, addr: int) -> bool:
    for name in (".plt", ".plt.sec", ".plt.got"):
        r = img.section_range(name)
        if r and r[0] <= addr < r[1]:
            return True
    return False


def resolve_call(img: ElfImage, i, local_names: dict[int, list[str]]) -> tuple[int | None, str | None, str]:
    """(target address, symbol name, how) of a call insn."""
    t = direct_target(i)
    if t is not None:
        if _in_plt(img, t):
            slot = _plt_slot(img, t)
            s = img.slot_symbol(slot) if slot is not None else None
            return t, (s[0] if s else None), "plt"
        names = local_names.get(t)
        return t, (_best_name(names) if names else None), "direct"
    m = mem_operand(i)
    if m is not None and i.reg_name(m.mem.base) == "rip" and m.mem.index == 0:
        slot = i.address + i.size + m.mem.disp
        s = img.slot_symbol(slot)
        return None, (s[0] if s else None), "got"
    return None, None, "indirect"


def _best_name(names: list[str]) -> str:
    for n in names:
        if norm_callee(n) in CALL_KINDS:
            return n
    return names[0]


def _poll_site(insns, n) -> str:
    """'check' when %edx is zeroed right before the call (poll(pfd, 1, 0)), else 'wait'."""
    for p in reversed(insns[max(0, n - 12):n]):
        if ends_block(p):
            break
        _r, w = p.regs_access()
        if any(reg64(p.reg_name(x)) == "rdx" for x in w):
            ops = p.operands
            if p.id == X.X86_INS_XOR and len(ops) == 2 and all(o.type == X.X86_OP_REG for o in ops) \
                    and ops[0].reg == ops[1].reg:
                return "check"
            if p.id == X.X86_INS_MOV and ops and ops[0].type == X.X86_OP_IMM and ops[0].imm == 0:
                return "check"
            return "wait"
    return "wait"


def call_sites(img: ElfImage, insns, kinds=CALL_KINDS) -> list[dict]:
    local = img.functions_by_address()
    out = []
    for n, i in enumerate(insns):
        if not i.group(capstone.CS_GRP_CALL):
            continue
        target, name, how = resolve_call(img, i, local)
        kind = norm_callee(name)
        if kind not in kinds:
            continue
        c = {"kind": kind, "call_addr": i.address, "call_file_offset": img.off(i.address),
             "ret_addr": i.address + i.size, "ret_file_offset": img.off(i.address + i.size),
             "target": target, "name": name, "via": how, "insn": insn_text(i)}
        if kind == "poll":
            c["site"] = _poll_site(insns, n)
        out.append(c)
    return out
