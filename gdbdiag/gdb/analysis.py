"""Find probe points inside glibc's static send_dg() (resolv/res_send.c) from symbols,
disassembly and DWARF, without line numbers or hard-coded offsets; and decide from the
code whether the build has bug 30081's fix. See docs/send_dg-probes.md.

Used by the plugin (``resolv trace``, ``resolv probes``); also runnable on a file:
  gdb -nx -batch -iex 'set debug-file-directory DBGDIR' -x analysis.py OBJ
(OBJ = libresolv.so.2 for glibc < 2.34, libc.so.6 from 2.34; -iex, so the debug
directory is set before gdb loads OBJ; `set $probes_json = 1` first for JSON).
Read-only: it sets no breakpoint and writes nothing to the target.
"""
import json
import re

import gdb

FUNC = "send_dg"
WANTED_VARS = ("statp", "buf", "buflen", "buf2", "buflen2", "ansp", "anssizp",
               "resplen2", "hp", "hp2", "pfd", "resplen", "n", "seconds",
               "timeout", "ptimeout", "nwritten", "recvresp1", "recvresp2",
               "single_request", "single_request_reopen", "need_recompute",
               "thisansp", "thisresplenp", "thisanssizp", "anhp",
               "matching_query", "ndg", "sr")
# call targets of interest, by normalised name (see norm_callee)
CALL_KINDS = {"poll": "poll", "send": "send", "sendmmsg": "sendmmsg",
              "recvfrom": "recvfrom", "reopen": "reopen",
              "res_iclose": "res_iclose", "ioctl": "ioctl"}
FLAG_BITS = {0x00200000: "SNGLKUP", 0x00400000: "SNGLKUPREOP"}

_INSN_RE = re.compile(r"^\s*(?:=>\s*)?(0x[0-9a-f]+)\s+<([^>]*)>:\s*(.*?)\s*$")
_RANGE_RE = re.compile(r"^Address range (0x[0-9a-f]+) to (0x[0-9a-f]+):")
_CALL_RE = re.compile(r"^call[q]?\s+(0x[0-9a-f]+)(?:\s+<([^>]+)>)?")
_ICALL_RE = re.compile(r"^call[q]?\s+\*.*#\s*(0x[0-9a-f]+)(?:\s+<([^>]+)>)?")
_JMP_RE = re.compile(r"^(j[a-z]+)\s+(0x[0-9a-f]+)")
_MEM_RE = re.compile(r"(-?0x[0-9a-f]+|-?\d+)?\((%\w+)(?:,(%\w+),(\d))?\)")
_REG_RE = re.compile(r"%(\w+)")

_REG64 = {}
for _r in ("ax", "bx", "cx", "dx"):
    for _a in ("r%s" % _r, "e%s" % _r, _r, _r[0] + "l", _r[0] + "h"):
        _REG64[_a] = "r" + _r
for _r in ("si", "di", "bp", "sp"):
    for _a in ("r" + _r, "e" + _r, _r, _r + "l"):
        _REG64[_a] = "r" + _r
for _i in range(8, 16):
    for _s in ("", "d", "w", "b"):
        _REG64["r%d%s" % (_i, _s)] = "r%d" % _i


def reg64(name):
    return _REG64.get(name, name)


def norm_callee(sym):
    """__GI___poll, __poll@plt, __libc_send, __GI___libc_res_queriesmatch -> poll,
    poll, send, res_queriesmatch.  None for 'foo+12' (not a function start)."""
    if sym is None or "+" in sym:
        return None
    s = sym.split("@")[0]
    changed = True
    while changed:
        changed = False
        for p in ("__GI_", "__libc_", "__"):
            if s.startswith(p):
                s, changed = s[len(p):], True
    return s.lstrip("_")


class Insn:
    __slots__ = ("addr", "length", "off", "asm", "mnem", "ops")

    def __init__(self, addr, off, asm):
        self.addr, self.off, self.asm, self.length = addr, off, asm, None
        parts = asm.split(None, 1)
        self.mnem = parts[0] if parts else ""
        while self.mnem in ("rep", "repz", "repnz", "lock", "notrack", "bnd", "data16", "cs", "ds") \
                and len(parts) > 1:
            parts = parts[1].split(None, 1)
            self.mnem = parts[0]
        self.ops = parts[1].split("#")[0].strip() if len(parts) > 1 else ""

    @property
    def next(self):
        return self.addr + self.length


def is_padding(ins):
    return ins.mnem.startswith("nop") or (ins.mnem == "xchg" and ins.ops == "%ax,%ax")


def disassemble_function(name):
    """Return (ranges, insns) of a possibly non-contiguous function (gdb prints one
    'Address range' header per DW_AT_ranges entry, e.g. send_dg + send_dg.cold)."""
    text = gdb.execute("disassemble '%s'" % name, to_string=True)
    ranges, insns, cur = [], [], None
    for line in text.splitlines():
        m = _RANGE_RE.match(line)
        if m:
            cur = (int(m.group(1), 16), int(m.group(2), 16))
            ranges.append(cur)
            continue
        m = _INSN_RE.match(line)
        if not m:
            continue
        off = m.group(2)
        insns.append(Insn(int(m.group(1), 16), off, m.group(3)))
    if not ranges and insns:      # contiguous: gdb prints no header
        last = insns[-1]
        ln = gdb.selected_inferior().architecture().disassemble(last.addr)[0]["length"]
        ranges = [(insns[0].addr, last.addr + ln)]
    insns.sort(key=lambda i: i.addr)
    for a, b in zip(insns, insns[1:]):
        a.length = b.addr - a.addr
    if insns:
        arch = gdb.selected_inferior().architecture()
        for ins in insns:
            if ins.length is None or not any(lo <= ins.addr < hi and ins.addr + ins.length <= hi for lo, hi in ranges):
                ins.length = arch.disassemble(ins.addr)[0]["length"]
    return ranges, insns


def enclosing_function(pc):
    """Name of the innermost function block (an inlined callee, or send_dg itself)."""
    try:
        b = gdb.block_for_pc(pc)
    except RuntimeError:
        return None
    while b is not None and b.function is None:
        b = b.superblock
    return b.function.name if b is not None else None


def struct_offsets(tname, fields):
    t = gdb.lookup_type(tname)
    out = {}
    for f in t.fields():
        if f.name in fields:
            out[f.name] = f.bitpos // 8
    return out


def cfa_offset(insns):
    """CFA - rsp after the prologue (x86-64, no frame pointer): 8 (return address)
    + 8 per push + sub $imm,%rsp."""
    off = 8
    for ins in insns[:16]:
        if ins.mnem.startswith("push"):
            off += 8
        elif ins.mnem.startswith("sub") and ins.ops.endswith(",%rsp"):
            off += int(ins.ops.split(",")[0].lstrip("$"), 0)
            return off
    return None


# ---- DWARF locations through gdb's `info scope` -----------------------------------
_SYM_RE = re.compile(r"^Symbol (\S+) is (.*)$")
_RNG_RE = re.compile(r"Range (0x[0-9a-f]+)-(0x[0-9a-f]+): (.*)$")


def scope_locations(linespec):
    """Parse `info scope LINESPEC` into {name: [(lo, hi, desc)] or [(None, None, desc)]}.
    desc is gdb's description, e.g. 'a variable in $r14', 'DW_OP_fbreg -395',
    'the constant 1', 'optimized out'."""
    text = gdb.execute("info scope %s" % linespec, to_string=True)
    out, cur, rng = {}, None, None
    for line in text.splitlines():
        m = _SYM_RE.match(line)
        if m:
            cur = m.group(1)
            rest = m.group(2)
            out[cur] = []
            rng = None
            if not rest.startswith("multi-location"):
                out[cur].append([None, None, rest.rstrip(":").split(", length")[0]])
                rng = out[cur][-1]
            continue
        if cur is None:
            continue
        m = _RNG_RE.search(line)
        if m:
            rng = [int(m.group(1), 16), int(m.group(2), 16), m.group(3).rstrip(":")]
            out[cur].append(rng)
            continue
        s = line.strip()
        if rng is not None and s and not s.startswith(", length"):
            rng[2] += " " + (s.split(": ", 1)[1] if re.match(r"^\d+: ", s) else s)
    return out


def loc_at(locs, pc):
    """The location description that covers pc, or None (= <optimized out> there)."""
    for lo, hi, desc in locs:
        if lo is None or lo <= pc < hi:
            return desc
    return None


def classify(desc):
    if desc is None:
        return "OUT"
    if "DW_OP_entry_value" in desc or "DW_OP_GNU_entry_value" in desc:
        return "entry"        # value at function entry; needs caller call-site info
    if desc.startswith("the constant") or "DW_OP_lit" in desc and "stack_value" in desc:
        return "const"
    if "optimized out" in desc:
        return "OUT"
    if "empty" in desc and "piece" in desc:
        return "part"         # some pieces (e.g. timeout.tv_sec) are optimized out
    return "yes"


def rsp_slots(locs, cfa):
    """All stack slots (as rsp offsets) a variable lives in ("home slots"), from the
    location-list entries that are a plain DW_OP_fbreg N (or DW_OP_breg7 N) alone;
    computed values such as `fbreg N; deref; lit0; eq` are not homes."""
    slots = set()
    for _lo, _hi, desc in locs:
        if desc.count("DW_OP_") != 1 or "piece" in desc:
            continue
        m = re.search(r"DW_OP_fbreg (-?\d+)", desc)
        if m and cfa is not None:
            slots.add(cfa + int(m.group(1)))
        m = re.search(r"DW_OP_breg7 \[\$rsp\] (-?\d+)", desc)
        if m:
            slots.add(int(m.group(1)))
    return slots


def home_locations(func_entry, cfa, body_start,
                   names=("single_request", "single_request_reopen", "recvresp1",
                          "recvresp2", "nwritten")):
    """Inferred "home" of each variable where DWARF has lost it: the plain stack slot
    (rsp offset) or callee-saved register that its location list uses most in the
    function body (ranges at or after body_start = the first poll call, so the
    set-up code before the wait loop does not count).  Returns {var: ("slot", off)
    | ("reg", name)}.  This is an inference, to be reported as such."""
    sc = scope_locations("*%#x" % func_entry)
    out = {}
    for v in names:
        locs = sc.get(v, [])
        if any(lo is None for lo, _hi, _d in locs):
            continue                  # one location for the whole scope: DWARF suffices
        for start in (body_start, 0):     # body ranges first; all ranges as fallback
            cover = {}
            for lo, hi, desc in locs:
                if hi <= start:
                    continue
                key = None
                m = re.search(r"DW_OP_fbreg (-?\d+)", desc)
                if m and desc.count("DW_OP_") == 1 and "piece" not in desc and cfa is not None:
                    key = ("slot", cfa + int(m.group(1)))
                r = re.fullmatch(r"a variable in \$(\w+)", desc.strip())
                if r and r.group(1) in ("rbx", "rbp", "r12", "r13", "r14", "r15"):
                    key = ("reg", r.group(1))
                if key:
                    cover[key] = cover.get(key, 0) + (hi - lo)
            if cover:
                out[v] = max(cover.items(), key=lambda kv: kv[1])[0]
                break
    return out


# ---- analysis ------------------------------------------------------------------------
def operands(ins):
    """(regs read, rsp slots read, dest reg or None) for simple AT&T forms."""
    ops = ins.ops
    mems = _MEM_RE.findall(ops)
    slots = set()
    for disp, base, _idx, _sc in mems:
        if base == "%rsp":
            slots.add(int(disp or "0", 0))
    regs = set(reg64(r) for r in _REG_RE.findall(ops))
    # destination = last operand if it is a plain register
    parts = [p.strip() for p in re.split(r",(?![^()]*\))", ops)] if ops else []
    dest = None
    if parts and re.fullmatch(r"%\w+", parts[-1]):
        dest = reg64(parts[-1][1:])
    return regs, slots, dest


# a bool in a stack slot: `cmpb $0x0,OFF(%rsp)`, `testb $0x1,OFF(%rsp)`, `movzbl OFF(%rsp),%reg`
_BYTE_SLOT_RE = re.compile(r"^(cmpb\s+\$0x0|testb\s+\$0x1|movzbl|movsbl)\s*,?.*\(%rsp\)")
# a pointer/int test: `cmpq $0x0,...`, `test %rax,%rax`, `cmpl ...`
_WIDE_TEST_RE = re.compile(r"^(cmpq|testq|cmpl|testl|test\s+%r\w+,%r|test\s+%e\w+,%e)")
_FLAG_SETTERS = ("cmp", "test", "bt", "and", "or", "xor", "sub", "add")
_FLAG_USERS = ("set", "cmov", "sbb", "adc")


def slice_condition(insns, idx, window=24):
    """Backward slice (straight-line, fall-through only) of the condition of the
    conditional jump insns[idx].  Returns (slots, regs_at_window_start, path)."""
    need = {"flags"}
    slots, used = set(), []
    i = idx - 1
    while i >= 0 and idx - i <= window and need:
        ins = insns[i]
        m = ins.mnem
        if m.startswith(("call", "ret", "jmp")):
            break
        regs, sl, dest = operands(ins)
        writes_flags = m.startswith(_FLAG_SETTERS) and not m.startswith("cmov")
        if "flags" in need and writes_flags:
            need.discard("flags")
            # test/cmp/bt read both operands; and/or/... read both too
            need |= regs
            slots |= sl
            used.append(ins)
        elif dest and dest in need and not m.startswith(("cmp", "test", "bt")):
            need.discard(dest)
            if m.startswith(("mov", "lea", "set", "cmov")):
                # pure data movement: the sources are the operands before the last
                src_regs = ({reg64(r) for r in _REG_RE.findall(ins.ops.rsplit(",", 1)[0])}
                            if "," in ins.ops else set())
            else:
                src_regs = regs       # and/or/xor/add/...: the destination is a source too
            need |= src_regs
            slots |= sl
            if m.startswith(_FLAG_USERS):
                need.add("flags")
            used.append(ins)
        i -= 1
    need.discard("rsp")
    return slots, need - {"flags"}, list(reversed(used))


def analyse(func=FUNC, detail=False):
    """Probe points of send_dg in the loaded objects. ``detail`` adds the per-probe
    availability of every local (slow: one `info scope` per probe)."""
    out = {"function": func}
    try:
        sym = gdb.lookup_static_symbol(func) or gdb.lookup_global_symbol(func)
    except gdb.error:
        sym = None
    if sym is None:
        try:
            sym = gdb.lookup_symbol(func)[0]
        except gdb.error:
            sym = None
    if sym is None:
        raise gdb.GdbError("%s: no debug symbol (need the matching libc6-dbg / debuginfo)" % func)
    out["symtab"] = sym.symtab.filename if sym.symtab else None
    out["objfile"] = sym.symtab.objfile.filename if sym.symtab else None
    ranges, insns = disassemble_function(func)
    entry = int(sym.value().address)
    out["entry"] = entry
    out["ranges"] = ranges
    jump_targets = {}
    for n, ins in enumerate(insns):
        m = _JMP_RE.match(ins.asm)
        if m:
            jump_targets.setdefault(int(m.group(2), 16), []).append(n)

    # 1. call sites
    calls = []
    for n, ins in enumerate(insns):
        m = _CALL_RE.match(ins.asm) or _ICALL_RE.match(ins.asm)
        if not m:
            continue
        kind = CALL_KINDS.get(norm_callee(m.group(2)))
        if not kind:
            continue
        c = {"kind": kind, "callee": m.group(2), "pc": ins.addr, "off": ins.addr - entry,
             "inlined_in": enclosing_function(ins.addr),
             "ret_pc": ins.next, "ret_off": ins.next - entry,
             "ret_is_jump_target": ins.next in jump_targets}
        if kind == "poll":
            # poll(pfd, 1, 0) vs poll(pfd, 1, ptimeout): look at how %edx is set
            for k in range(n - 1, max(n - 12, -1), -1):
                p = insns[k]
                if p.mnem.startswith(("call", "jmp", "ret")):
                    break
                _r, _s, d = operands(p)
                if d == "rdx":
                    c["timeout_arg"] = "0" if p.mnem == "xor" and p.ops in ("%edx,%edx", "%rdx,%rdx") else "ptimeout"
                    break
            else:
                c["timeout_arg"] = "?"
            c.setdefault("timeout_arg", "ptimeout (set on another path)")
        calls.append(c)
    out["calls"] = calls
    out["returns"] = [ins.addr for ins in insns if ins.mnem.startswith("ret")]

    # 2. struct offsets and sticky-flag writes
    offs = struct_offsets("struct __res_state", ("options", "_flags", "pfcode", "retrans", "nscount"))
    out["offsets"] = offs
    field_at = {offs["options"]: ("options", 8), offs["_flags"]: ("_flags", 4)}
    writes, reads_flags_field = [], False
    for ins in insns:
        m = ins.mnem
        mm = _MEM_RE.search(ins.ops)
        if m.startswith(("or", "bts")) and mm and ins.ops.startswith("$"):
            disp = int(mm.group(1) or "0", 0)
            imm = int(ins.ops.split(",")[0][1:], 0)
            for foff, (fname, fsize) in field_at.items():
                if foff <= disp < foff + fsize:
                    bit = (1 << imm) if m.startswith("bts") else imm
                    mask = bit << (8 * (disp - foff))
                    for b, what in FLAG_BITS.items():
                        if mask & b:
                            writes.append({"pc": ins.addr, "off": ins.addr - entry, "field": fname,
                                           "flag": ("RES_F_" if fname == "_flags" else "RES_") + what,
                                           "base_reg": mm.group(2), "asm": ins.asm})
        if mm and m.startswith(("mov", "test", "cmp")):
            disp = int(mm.group(1) or "0", 0)
            if disp == offs["_flags"] and mm.group(2) != "%rsp":
                reads_flags_field = True
    out["flag_writes"] = writes
    out["flag_field"] = sorted({w["field"] for w in writes})
    out["reads__flags"] = reads_flags_field

    # 3. DWARF: homes of single_request, availability at each probe pc
    cfa = cfa_offset(insns)
    out["cfa_minus_rsp"] = cfa
    entry_scope = scope_locations("*%#x" % entry)
    sr_locs = entry_scope.get("single_request", [])
    sr_slots = rsp_slots(sr_locs, cfa)
    out["single_request_slots"] = sorted(sr_slots)
    polls = [c["pc"] for c in calls if c["kind"] == "poll"]
    out["home_locations"] = home_locations(entry, cfa, min(polls) if polls else entry)

    # 4. bug-30081 fix signature: predecessors of the `statp->pfcode` test
    pf = offs["pfcode"]
    verdicts = []
    for n, ins in enumerate(insns):
        mm = _MEM_RE.search(ins.ops)
        if not (ins.mnem.startswith("cmp") and mm and ins.ops.startswith("$0x0,")
                and mm.group(2) != "%rsp" and int(mm.group(1) or "0", 0) == pf):
            continue
        # entries into the straight-line run that ends at the pfcode test: jumps to
        # any of its instructions, plus the fall-through of the conditional jump
        # that precedes the run (padding nops and plain moves are part of the run)
        preds = list(jump_targets.get(ins.addr, []))
        k = n - 1
        while k >= 0 and not _JMP_RE.match(insns[k].asm) and \
                not insns[k].mnem.startswith(("ret", "call", "ud2", "hlt")):
            preds += jump_targets.get(insns[k].addr, [])
            k -= 1
        lead = k + 1
        if k >= 0 and _JMP_RE.match(insns[k].asm) and insns[k].mnem != "jmp":
            preds.append(k)
        tests = []
        for p in preds:
            if not _JMP_RE.match(insns[p].asm) or insns[p].mnem == "jmp":
                # unconditional jump: look at the block it ends (one level)
                tests.append({"pred": insns[p].addr, "kind": "jmp", "tests_single_request": None})
                continue
            slots, regs, used = slice_condition(insns, p)
            sr_reg = any(loc_at(sr_locs, u.addr) == "a variable in $%s" % r for u in used for r in regs)
            hit = bool(slots & sr_slots) or sr_reg
            # no-DWARF fallback signal: the condition is a byte-sized flag kept in a
            # stack slot (bool single_request), not a pointer/int (buf2, recvresp*)
            byte_flag = any(_BYTE_SLOT_RE.match(u.asm) for u in used) and \
                not any(_WIDE_TEST_RE.match(u.asm) for u in used)
            tests.append({"pred": insns[p].addr, "off": insns[p].addr - entry, "kind": insns[p].mnem,
                          "slots": sorted(slots), "regs": sorted(regs),
                          "cond": [u.asm for u in used], "tests_single_request": hit,
                          "byte_flag": byte_flag})
        verdicts.append({"byte_flag_guard": any(t.get("byte_flag") for t in tests),
                         "pfcode_test": ins.addr, "off": ins.addr - entry,
                         "leader": insns[lead].addr, "preds": tests,
                         "single_request_guard": any(t["tests_single_request"] for t in tests)})
    out["pfcode_blocks"] = verdicts
    if not verdicts or not sr_slots:
        out["bug30081"] = "unknown"
    elif all(v["single_request_guard"] for v in verdicts):
        out["bug30081"] = "fixed"
    elif not any(v["single_request_guard"] for v in verdicts):
        out["bug30081"] = "affected"
    else:
        out["bug30081"] = "unknown (mixed)"
    out["bug30081_nodwarf_heuristic"] = (
        "unknown" if not verdicts else
        "fixed" if all(v["byte_flag_guard"] for v in verdicts) else
        "affected" if not any(v["byte_flag_guard"] for v in verdicts) else "unknown (mixed)")
    # related fix, visible as new locals: bug 31890 adds skip_query_match/thisansp_error
    out["bug31890_locals"] = [v for v in ("skip_query_match", "thisansp_error")
                              if v in _all_locals(insns)]

    # 5. local-variable availability at each probe pc (call site, return site)
    avail = {}
    if not detail:
        out["availability"] = avail
        return out
    for c in calls:
        for key in ("pc", "ret_pc"):
            pc = c[key]
            sc = scope_locations("*%#x" % pc)
            avail["%s@%s+%#x" % (c["kind"], "call" if key == "pc" else "ret", pc - entry)] = {
                v: classify(loc_at(sc[v], pc)) if v in sc else "-" for v in WANTED_VARS}
    for w in writes:
        sc = scope_locations("*%#x" % w["pc"])
        avail["flagwrite:%s+%#x" % (w["flag"], w["off"])] = {
            v: classify(loc_at(sc[v], w["pc"])) if v in sc else "-" for v in WANTED_VARS}
    out["availability"] = avail
    return out


_LOCALS_CACHE = {}


def _all_locals(insns):
    """Names of all locals declared anywhere in the function (all nested blocks)."""
    key = insns[0].addr
    if key not in _LOCALS_CACHE:
        names = set()
        seen = set()
        for ins in insns[::8]:
            try:
                b = gdb.block_for_pc(ins.addr)
            except RuntimeError:
                continue
            while b is not None and b.function is None:
                if (b.start, b.end) not in seen:
                    seen.add((b.start, b.end))
                    names |= {s.name for s in b}
                b = b.superblock
            if b is not None:
                names |= {s.name for s in b}
        _LOCALS_CACHE[key] = names
    return _LOCALS_CACHE[key]


def build_id_of(objfile_name):
    for o in gdb.objfiles():
        if o.filename == objfile_name or (o.owner and o.owner.filename == objfile_name):
            return o.build_id if o.owner is None else o.owner.build_id
    return None


def report(r):
    P = print
    e = r["entry"]
    P("send_dg @ %#x  ranges: %s" % (e, ", ".join("[%#x,%#x)" % x for x in r["ranges"])))
    P("objfile: %s  build-id: %s" % (r["objfile"], build_id_of(r["objfile"])))
    P("struct __res_state offsets: %s   CFA-rsp in body: %#x" % (r["offsets"], r["cfa_minus_rsp"]))
    P("\ncall sites (pc = call insn, ret = insn after the call):")
    for c in r["calls"]:
        extra = (" timeout=%s" % c["timeout_arg"]) if "timeout_arg" in c else ""
        amb = "  (ret pc is also a jump target!)" if c["ret_is_jump_target"] else ""
        if c["inlined_in"] and c["inlined_in"] != FUNC:
            amb += "  [in inlined %s]" % c["inlined_in"]
        P("  %-10s %-26s call %#x (+%#x)  ret %#x (+%#x)%s%s" % (
            c["kind"], c["callee"], c["pc"], c["off"], c["ret_pc"], c["ret_off"], extra, amb))
    P("\nsticky flag writes (break here = the moment the thread switches):")
    for w in r["flag_writes"]:
        P("  %#x (+%#x)  statp->%s |= %s   [%s]   statp in %s" % (
            w["pc"], w["off"], w["field"], w["flag"], w["asm"], w["base_reg"]))
    P("  flags written to: %s; send_dg also reads _flags: %s" % (r["flag_field"], r["reads__flags"]))
    P("\ninferred homes (where DWARF says <optimized out>; rsp+off in the body): %s" % ", ".join(
        "%s=%s" % (k, ("rsp+%#x" % v[1]) if v[0] == "slot" else "$" + v[1])
        for k, v in r["home_locations"].items()))
    P("\nbug 30081 signature: single_request home slots (rsp+): %s" % [hex(s) for s in r["single_request_slots"]])
    for v in r["pfcode_blocks"]:
        P("  pfcode test at %#x (+%#x), block leader %#x, guarded by single_request: %s" % (
            v["pfcode_test"], v["off"], v["leader"], v["single_request_guard"]))
        for t in v["preds"]:
            if t["kind"] == "jmp":
                P("     pred %#x jmp (unconditional)" % t["pred"])
            else:
                P("     pred %#x %-4s slots %s regs %s single_request=%s  via %s" % (
                    t["pred"], t["kind"], [hex(s) for s in t["slots"]], t["regs"],
                    t["tests_single_request"], " ; ".join(t["cond"])))
    P("  => bug 30081: %s   (no-DWARF byte-flag heuristic: %s)" % (
        r["bug30081"], r["bug30081_nodwarf_heuristic"]))
    P("  bug 31890 fix locals present: %s" % (r["bug31890_locals"] or "none"))
    if not r["availability"]:
        return
    P("\nlocal availability at probe pcs (yes / OUT = <optimized out> / entry = entry_value / const / - = not in scope):")
    cols = [v for v in WANTED_VARS]
    P("  %-28s %s" % ("probe", " ".join("%-4.4s" % c for c in cols)))
    for k, row in r["availability"].items():
        P("  %-28s %s" % (k, " ".join("%-4.4s" % row[c] for c in cols)))
    P("  columns: " + ", ".join(cols))


def main():
    r = analyse()
    try:
        as_json = int(gdb.parse_and_eval("$probes_json")) == 1
    except gdb.error:
        as_json = False
    if as_json:
        print(json.dumps(r, indent=1, default=str))
    else:
        report(r)


if __name__ == "__main__":
    main()
