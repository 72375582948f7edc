"""Does this send_dg carry the fix for glibc bug 30081?  Decided from instruction flow
alone (no DWARF, no version), see docs/send_dg-probes.md section 7.

The fix turns the error-answer path's ``if (buf2 != NULL)`` (back to ``wait``) into
``if (buf2 != NULL && !single_request)``; when the guard fails, control reaches
``if (!statp->pfcode) return close_and_return_error (...)`` -- the only read of
``statp->pfcode`` in send_dg.  So:

1. find the single ``cmp $0x0, 0x180(%reg)`` (pfcode, non-rsp base);
2. find the entries of the straight-line run that ends at it (jumps into the run, and
   the fall-through of a conditional jump right before it; an unconditional entry is
   followed one block further back);
3. find ``single_request``'s home from the code: the SNGLKUP writer's path sets it to
   true right next to the ``or`` (bullseye: ``movb $0x1,0xb1(%rsp)``), i.e. a byte store
   of 1 into a stack slot, or a move of 1 into a callee-saved register, in the writer's
   basic block;
4. backward-slice each entry's condition (flags setter, then through mov/movz/setcc/and
   ...) into stack slots and registers.  Fixed iff some entry is conditioned on the home;
   affected iff the block has entries, every condition was resolved, and none is.
   Anything else: ``affected`` None with the reason.
"""
from __future__ import annotations

import capstone
from capstone import x86_const as X

from .codeflow import (RES_STATE, ends_block, insn_text, is_cond_jump, is_uncond_jump,
                       jump_targets, mem_operand, reg64)

__all__ = ["decide_fix", "find_pfcode_tests", "single_request_home", "slice_condition"]

CALLEE_SAVED = ("rbx", "rbp", "r12", "r13", "r14", "r15")
_CMP_LIKE = (X.X86_INS_CMP, X.X86_INS_TEST, X.X86_INS_BT)
_NO_MEMORY_READ = (X.X86_INS_LEA,)        # an address computation reads no slot


def _contiguous(insns, k: int) -> bool:
    return k + 1 < len(insns) and insns[k].address + insns[k].size == insns[k + 1].address


def _slot(i, mem) -> int | None:
    if mem is not None and mem.mem.base and i.reg_name(mem.mem.base) == "rsp" and mem.mem.index == 0:
        return mem.mem.disp
    return None


def find_pfcode_tests(insns) -> list[int]:
    """Indexes of ``cmp $0x0, PFCODE(%reg)`` with a non-rsp/rip base."""
    pf = RES_STATE["pfcode"][0]
    out = []
    for n, i in enumerate(insns):
        if i.id != X.X86_INS_CMP or len(i.operands) != 2:
            continue
        a, b = i.operands
        if a.type == X.X86_OP_IMM and a.imm == 0 and b.type == X.X86_OP_MEM and b.mem.disp == pf \
                and b.mem.index == 0 and b.mem.base and reg64(i.reg_name(b.mem.base)) not in ("rsp", "rip"):
            out.append(n)
    return out


def _is_zeroing(i) -> bool:
    ops = i.operands
    return (i.id in (X.X86_INS_XOR, X.X86_INS_SUB) and len(ops) == 2
            and all(o.type == X.X86_OP_REG for o in ops) and ops[0].reg == ops[1].reg)


def slice_condition(insns, j: int, window: int = 24) -> dict:
    """Backward slice of the flags that the conditional jump ``insns[j]`` tests, over
    the straight-line code before it.  Returns {slots (rsp offsets read), regs (read by
    the slice), live (regs whose origin lies before the window), insns, resolved}."""
    need, slots, regs, used = {"flags"}, set(), set(), []
    k = j - 1
    while k >= 0 and j - k <= window and need and _contiguous(insns, k):
        i = insns[k]
        if ends_block(i) and not is_cond_jump(i):
            break
        r, w = i.regs_access()
        rn = {reg64(i.reg_name(x)) for x in r} - {"rip", "rsp"}
        wn = {reg64(i.reg_name(x)) for x in w} - {"rip", "rsp"}
        flags_r, flags_w = "rflags" in rn, "rflags" in wn
        rn.discard("rflags")
        wn.discard("rflags")
        slot = _slot(i, mem_operand(i))
        hit = False
        if "flags" in need and flags_w:
            need.discard("flags")
            hit = True
        elif wn & need and i.id not in _CMP_LIKE:
            need -= wn
            hit = True
            if flags_r:
                need.add("flags")
        if hit:
            src = set() if _is_zeroing(i) else rn
            need |= src
            regs |= src
            if slot is not None and i.id not in _NO_MEMORY_READ:
                slots.add(slot)
            used.append(i)
        k -= 1
    return {"slots": sorted(slots), "regs": sorted(regs), "live": sorted(need - {"flags"}),
            "insns": [insn_text(u) for u in reversed(used)], "resolved": "flags" not in need}


def _block_start(insns, n: int, targets) -> int:
    """Index of the first insn of the basic block holding insns[n]."""
    k = n
    while k > 0 and _contiguous(insns, k - 1) and not ends_block(insns[k - 1]) \
            and insns[k].address not in targets:
        k -= 1
    return k


def single_request_home(insns, w: int, writer: dict, targets, back: int = 6, fwd: int = 4):
    """[(kind, where, insn text, address)]: stores of 1 next to the SNGLKUP writer insns[w] in
    its basic block -- a byte store into an rsp slot, or 1 into a callee-saved register."""
    lo = max(_block_start(insns, w, targets), w - back)
    hi = w
    while hi + 1 < len(insns) and hi - w < fwd and _contiguous(insns, hi) and not ends_block(insns[hi]) \
            and insns[hi + 1].address not in targets:
        hi += 1
    found = []
    for i in insns[lo:hi + 1]:
        if i.id != X.X86_INS_MOV or len(i.operands) != 2:
            continue
        s, d = i.operands
        if s.type != X.X86_OP_IMM or s.imm != 1:
            continue
        if d.type == X.X86_OP_MEM and d.size == 1 and _slot(i, d) is not None:
            found.append(("slot", d.mem.disp, insn_text(i), i.address))
        elif d.type == X.X86_OP_REG and reg64(i.reg_name(d.reg)) in CALLEE_SAVED \
                and reg64(i.reg_name(d.reg)) != writer["base_reg"]:
            found.append(("reg", reg64(i.reg_name(d.reg)), insn_text(i), i.address))
    return found


def _entries(insns, n: int, targets) -> tuple[int, list[tuple[str, int]]]:
    """(leader index, [(kind, index)]) of the straight-line run that ends at insns[n]:
    kind "jcc"/"jmp" for jumps into it, "fallthrough" (a conditional jump right before
    it) or "after-call" (a call right before it)."""
    k = n - 1
    while k >= 0 and _contiguous(insns, k) and not ends_block(insns[k]):
        k -= 1
    lead = k + 1
    out = []
    for m in range(lead, n + 1):
        for j in targets.get(insns[m].address, []):
            out.append(("jmp" if is_uncond_jump(insns[j]) else "jcc", j))
    if k >= 0 and _contiguous(insns, k):
        if is_cond_jump(insns[k]):
            out.append(("fallthrough", k))
        elif insns[k].group(capstone.CS_GRP_CALL):
            out.append(("after-call", k))
    return lead, out


def _judge_entry(insns, kind, j, targets, home, depth) -> dict:
    e = {"from": insns[j].address, "kind": kind, "insn": insn_text(insns[j])}
    if kind in ("jcc", "fallthrough"):
        s = slice_condition(insns, j)
        e.update(cond=s["insns"], slots=s["slots"], regs=s["regs"], resolved=s["resolved"])
        hk, hv = home[0], home[1]
        e["tests_single_request"] = (hv in s["slots"]) if hk == "slot" else (hv in s["regs"])
        return e
    # unconditional: the block that ends here is entered how?
    if depth <= 0:
        e.update(resolved=False, tests_single_request=False, note="unconditional; not followed further")
        return e
    _lead, ents = _entries(insns, j, targets)
    sub = [_judge_entry(insns, k2, j2, targets, home, depth - 1) for k2, j2 in ents]
    e.update(via=sub, resolved=bool(sub) and all(x["resolved"] for x in sub),
             tests_single_request=any(x["tests_single_request"] for x in sub))
    return e


def decide_fix(insns, writer_addr: int, writer: dict) -> dict:
    """The ``fix_30081`` result for send_dg's insns (all its ranges, address order)."""
    out = {"affected": None, "how": "instruction flow", "reason": None, "pfcode_test": None,
           "single_request_slot": None, "entries": []}
    targets = jump_targets(insns)
    pf = find_pfcode_tests(insns)
    if len(pf) != 1:
        out["reason"] = ("no `cmp $0x0,0x180(%reg)` (statp->pfcode test) in send_dg" if not pf else
                         f"{len(pf)} pfcode tests in send_dg: " + ", ".join(hex(insns[n].address) for n in pf))
        return out
    n = pf[0]
    out["pfcode_test"] = insns[n].address
    w = next((k for k, i in enumerate(insns) if i.address == writer_addr), None)
    homes = single_request_home(insns, w, writer, targets) if w is not None else []
    if len(homes) != 1:
        out["reason"] = ("no store of 1 (single_request = true) next to the SNGLKUP writer" if not homes else
                         f"{len(homes)} candidate single_request homes next to the writer: "
                         + "; ".join(h[2] for h in homes))
        out["single_request_candidates"] = [h[2] for h in homes]
        return out
    home = homes[0]
    out["single_request_slot"] = f"rsp+{home[1]:#x}" if home[0] == "slot" else home[1]
    out["single_request_set_by"] = {"addr": home[3], "insn": home[2]}
    lead, ents = _entries(insns, n, targets)
    out["block_leader"] = insns[lead].address
    out["entries"] = [_judge_entry(insns, k, j, targets, home, depth=2) for k, j in ents]
    return _verdict(out)


def _verdict(out: dict) -> dict:
    ents = out["entries"]
    where = out["single_request_slot"]
    if any(e["tests_single_request"] for e in ents):
        hits = [e for e in ents if e["tests_single_request"]]
        out["affected"] = False
        out["reason"] = (f"{len(hits)} of {len(ents)} entries into the pfcode test are conditioned on "
                         f"single_request ({where}): `if (buf2 != NULL && !single_request)`")
    elif not ents:
        out["reason"] = "the pfcode test has no entry (unreachable?)"
    elif not all(e["resolved"] for e in ents):
        bad = [hex(e["from"]) for e in ents if not e["resolved"]]
        out["reason"] = ("no entry tests single_request, but the condition of entries "
                         f"{', '.join(bad)} was not resolved")
    else:
        out["affected"] = True
        out["reason"] = (f"none of the {len(ents)} entries into the pfcode test is conditioned on "
                         f"single_request ({where}): the error-answer path is `if (buf2 != NULL)`")
    return out
