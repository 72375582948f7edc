"""One unwinding step, callee registers -> caller registers (x86-64, DWARF numbering).

:func:`_cfi_step` applies the CFI row of a PC: its CFA and register rules, DWARF-expression
ones included (PLT stubs, signal trampolines, realigned stacks), which :func:`_eval_expr`
evaluates here.  A PC without CFI gets :func:`_fp_step`, one frame-pointer step, when ``rbp``
looks sane.  Registers are dicts of DWARF column -> value; memory is anything with
``read(addr, n) -> bytes | None``.
"""
from __future__ import annotations

import operator
import struct

from ..glibc.elfscan import leb128

M64 = (1 << 64) - 1
RA = 16                                  # DWARF x86-64 return-address column
RSP, RBP = 7, 6
REGS = {"rax": 0, "rdx": 1, "rcx": 2, "rbx": 3, "rsi": 4, "rdi": 5, "rbp": 6, "rsp": 7,
        **{f"r{i}": i for i in range(8, 16)}, "rip": RA}
CALLEE_SAVED = (3, 6, 12, 13, 14, 15)
FP_MAX_FRAME = 1 << 20                   # rbp must lie within 1 MiB above rsp for an fp step
OUTERMOST = "outermost"


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
