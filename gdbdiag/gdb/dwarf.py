"""What gdb's symbols add to the analyzer's probe points: enrichment and cross-check.

DWARF, when gdb has the matching debug file: the homes of locals that are
``<optimized out>`` (``home_locations``), the bug-31890 locals, per-probe local
availability (``resolv probes --detail``), and a cross-check of the analyzer against
DWARF/symtab (entry, bounds, every probe PC inside send_dg, call targets, statp's
register at the sticky-bit writer, single_request's home, struct offsets). A
disagreement is recorded in ``cross_check`` and printed; the probes always use the
analyzer's addresses.  Locations are gdb's own descriptions (``info scope``), parsed
here; everything else is gdb's Python API.

Read-only: it sets no breakpoint and writes nothing to the target.
"""
import re

import gdb

from ..glibc.codeflow import norm_callee
from .analysis import FUNC, probe_sites

WANTED_VARS = ("statp", "buf", "buflen", "buf2", "buflen2", "ansp", "anssizp",
               "resplen2", "hp", "hp2", "pfd", "resplen", "n", "seconds",
               "timeout", "ptimeout", "nwritten", "recvresp1", "recvresp2",
               "single_request", "single_request_reopen", "need_recompute",
               "thisansp", "thisresplenp", "thisanssizp", "anhp",
               "matching_query", "ndg", "sr")


def enrich(out, detail=False):
    """Add what gdb's symbols know; never change the analyzer's probe points."""
    out["cross_check"] += symtab_checks(out)
    sym = dwarf_send_dg(out["build_id"])
    if sym is None:
        out["dwarf"] = {"available": False, "reason": "gdb has no DWARF for send_dg in %s"
                        % out["objfile"]}
        return out
    out["dwarf"] = {"available": True, "objfile": sym.symtab.objfile.filename,
                    "symtab": sym.symtab.filename}
    cfa = body_cfa(out)
    out["cfa_minus_rsp"] = cfa
    out["cross_check"] += dwarf_checks(out, sym, cfa)
    polls = [c["pc"] for c in out["calls"] if c["kind"] == "poll"]
    out["home_locations"] = home_locations(out["entry"], cfa, min(polls) if polls else out["entry"])
    names = all_locals(out["ranges"])
    out["bug31890_locals"] = [v for v in ("skip_query_match", "thisansp_error") if v in names]
    if detail:
        out["availability"] = availability(out)
    return out


def dwarf_send_dg(build_id):
    """gdb's DWARF symbol of send_dg in the object with this build-id, or None."""
    try:
        syms = gdb.lookup_static_symbols(FUNC)
    except (gdb.error, AttributeError):
        return None
    for s in syms:
        o = s.symtab.objfile if s.symtab is not None else None
        if o is None or s.addr_class != gdb.SYMBOL_LOC_BLOCK:
            continue
        if build_id is None or build_id in (o.build_id, o.owner.build_id if o.owner else None):
            return s
    return None


def outer_function(pc):
    """The outermost function (not an inlined callee) whose DWARF block holds pc."""
    try:
        b = gdb.block_for_pc(pc)
    except RuntimeError:
        return None
    fn = None
    while b is not None and not (b.is_static or b.is_global):
        if b.function is not None:
            fn = b
        b = b.superblock
    return fn


def _chk(what, analyzer, gdb_says, source, agrees=None):
    if agrees is None and gdb_says is not None:
        agrees = analyzer == gdb_says
    return {"what": what, "analyzer": analyzer, "gdb": gdb_says, "source": source,
            "agrees": agrees}


def _name_at(addr):
    """gdb's symbol name at addr if addr is a symbol's start ('__poll@plt'), else None."""
    try:
        text = gdb.format_address(addr)
    except (gdb.error, AttributeError, RuntimeError):
        return None
    m = re.search(r"<([^<>]+)>$", text)
    return m.group(1) if m and "+" not in m.group(1) else None


def symtab_checks(out):
    """Names gdb's (minimal) symbols give: the call targets, and send_dg's entry when the
    object keeps a .symtab. Needs no DWARF; a target gdb cannot name is not checked."""
    checks = []
    for c in out["calls"]:
        name = _name_at(c["target"]) if c.get("target") else None
        if name is not None:
            checks.append(_chk("callee of the %s call at %#x" % (c["kind"], c["pc"]), c["kind"],
                               norm_callee(name), "symtab"))
    name = _name_at(out["entry"])
    if name is not None:
        checks.append(_chk("symbol at send_dg's entry %#x" % out["entry"], FUNC,
                           name.split("@")[0], "symtab"))
    gai = out.get("getaddrinfo")
    if gai:
        try:
            v = gdb.parse_and_eval("&'getaddrinfo'")
            checks.append(_chk("getaddrinfo", gai["pc"], int(v.cast(gdb.lookup_type("unsigned long"))),
                               "symtab"))
        except gdb.error:
            pass
    return checks


def dwarf_checks(out, sym, cfa):
    fb = outer_function(out["entry"])
    checks = [_chk("send_dg entry", out["entry"], int(sym.value().address), "dwarf")]
    if fb is not None:
        lo, hi = min(r[0] for r in out["ranges"]), max(r[1] for r in out["ranges"])
        checks.append(_chk("send_dg bounds", [lo, hi], [fb.start, fb.end], "dwarf"))
    for pc, _fo, what in probe_sites(out) + [(r[0], None, "range start") for r in out["ranges"]]:
        b = outer_function(pc)
        name = b.function.name if b is not None else None
        checks.append(_chk("%s %#x is in send_dg" % (what, pc), FUNC, name, "dwarf"))
    have = struct_offsets("struct __res_state", tuple(out["offsets"]))
    for k, v in sorted(have.items()):
        checks.append(_chk("struct __res_state.%s offset" % k, out["offsets"][k], v, "dwarf"))
    checks += _writer_checks(out, cfa)
    return checks


def _writer_checks(out, cfa):
    """DWARF's location of statp at each sticky-bit writer, and of single_request."""
    checks = []
    for w in out["flag_writes"]:
        desc = loc_at(scope_locations("*%#x" % w["pc"]).get("statp", []), w["pc"])
        m = re.fullmatch(r"a variable in \$(\w+)", (desc or "").strip())
        checks.append(_chk("statp's register at the %s writer %#x" % (w["flag"], w["pc"]),
                           w["base_reg"].lstrip("%"), m.group(1) if m else None, "dwarf"))
    home = out.get("single_request_home")
    if home and home.startswith("rsp+"):
        sc = scope_locations("*%#x" % out["entry"])
        slots = sorted(rsp_slots(sc.get("single_request", []), cfa))
        if slots:
            checks.append(_chk("single_request's home (bug-30081 decision)", home,
                               ["rsp+%#x" % s for s in slots], "dwarf",
                               agrees=int(home[4:], 16) in slots))
    return checks


def body_cfa(out):
    """CFA - rsp at the sticky-bit writer (send_dg's body), from the object's .eh_frame."""
    from ..glibc.elfscan import ElfError, ElfImage
    if not out["flag_writes"]:
        return None
    bias = out["bias"]
    fn = (out["ranges"][0][0] - bias, out["ranges"][0][1] - bias)
    at = out["flag_writes"][0]["pc"] - bias
    try:
        rows = [c for loc, c in ElfImage(out["host_file"]).cfi_rows(fn) if loc <= at]
    except (OSError, ElfError):
        return None
    return rows[-1] if rows else None


def struct_offsets(tname, fields):
    try:
        t = gdb.lookup_type(tname)
    except gdb.error:
        return {}
    return {f.name: f.bitpos // 8 for f in t.fields() if f.name in fields}


def availability(out):
    """Per probe PC: is each local readable there by DWARF (yes / OUT / entry / const / -)."""
    avail = {}
    for c in out["calls"]:
        for key in ("pc", "ret_pc"):
            pc = c[key]
            sc = scope_locations("*%#x" % pc)
            avail["%s@%s+%#x" % (c["kind"], "call" if key == "pc" else "ret", pc - out["entry"])] = {
                v: classify(loc_at(sc[v], pc)) if v in sc else "-" for v in WANTED_VARS}
    for w in out["flag_writes"]:
        sc = scope_locations("*%#x" % w["pc"])
        avail["flagwrite:%s+%#x" % (w["flag"], w["off"])] = {
            v: classify(loc_at(sc[v], w["pc"])) if v in sc else "-" for v in WANTED_VARS}
    return avail


_LOCALS_CACHE = {}


def all_locals(ranges, step=8):
    """Names of all locals declared anywhere in the function (every nested block met at
    the PCs of its ranges, sampled every ``step`` bytes)."""
    key = tuple(ranges)
    if key in _LOCALS_CACHE:
        return _LOCALS_CACHE[key]
    names, seen = set(), set()
    for lo, hi in ranges:
        for pc in range(lo, hi, step):
            try:
                b = gdb.block_for_pc(pc)
            except RuntimeError:
                continue
            while b is not None and not (b.is_static or b.is_global):
                if (b.start, b.end) not in seen:
                    seen.add((b.start, b.end))
                    names |= {s.name for s in b}
                b = b.superblock
    _LOCALS_CACHE[key] = names
    return names


# ---- DWARF locations through gdb's `info scope` -----------------------------------
_SYM_RE = re.compile(r"^Symbol (\S+) is (.*)$")


_RNG_RE = re.compile(r"Range (0x[0-9a-f]+)-(0x[0-9a-f]+): (.*)$")


def scope_locations(linespec):
    """Parse `info scope LINESPEC` into {name: [(lo, hi, desc)] or [(None, None, desc)]}.
    desc is gdb's description, e.g. 'a variable in $r14', 'DW_OP_fbreg -395',
    'the constant 1', 'optimized out'."""
    try:
        text = gdb.execute("info scope %s" % linespec, to_string=True)
    except gdb.error:
        return {}
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


def _home_key(desc, cfa):
    m = re.search(r"DW_OP_fbreg (-?\d+)", desc)
    if m and desc.count("DW_OP_") == 1 and "piece" not in desc and cfa is not None:
        return ("slot", cfa + int(m.group(1)))
    r = re.fullmatch(r"a variable in \$(\w+)", desc.strip())
    if r and r.group(1) in ("rbx", "rbp", "r12", "r13", "r14", "r15"):
        return ("reg", r.group(1))
    return None


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
                key = _home_key(desc, cfa) if hi > start else None
                if key:
                    cover[key] = cover.get(key, 0) + (hi - lo)
            if cover:
                out[v] = max(cover.items(), key=lambda kv: kv[1])[0]
                break
    return out
