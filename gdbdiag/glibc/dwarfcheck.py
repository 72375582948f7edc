"""Cross-check of the symbol-less analysis against a separate debug file (.symtab and
DWARF, e.g. from libc6-dbg): the same send_dg, the same call sites, the same struct
offsets, and the same home of ``single_request``.  Slow-ish (pyelftools on one CU), so
it runs only when a debug file is given; the analysis never depends on it.

Checks (each {"agrees": bool|None, ...} in ``details``):

* ``send_dg_bounds``: ``send_dg`` / ``send_dg.cold`` in the debug file's ``.symtab`` and
  the DW_AT_ranges of its DW_TAG_subprogram equal the .eh_frame bounds;
* ``calls_symtab``: walking those ranges and naming direct call targets with the debug
  file's ``.symtab`` (``__GI___poll``, ``__libc_send``...; PLT entries are named from
  their relocations, as gdb does) gives the same call sites;
* ``calls_dwarf``: the DW_TAG_call_site / DW_TAG_GNU_call_site entries of send_dg (their
  return PC and callee name) give the same return addresses per kind;
* ``struct_offsets``: ``struct __res_state`` members equal the ABI constants;
* ``single_request``: the stack slots of its location list (``DW_OP_fbreg N`` -> rsp +
  CFA offset + N) contain the home the flow analysis inferred.
"""
from __future__ import annotations

from . import codeflow as C
from .elfscan import ElfError, ElfImage

__all__ = ["dwarf_check"]


def _symtab_bounds(dbg: ElfImage) -> dict:
    out = {}
    for s in dbg.symtab():
        if s.type == "FUNC" and s.name in ("send_dg", "send_dg.cold") and s.name not in out:
            out[s.name] = (s.value, s.value + s.size)
    return out


def _calls_by_symtab(img: ElfImage, dbg: ElfImage, ranges) -> list[tuple]:
    names: dict[int, list[str]] = {}
    for s in dbg.symtab():
        if s.type in ("FUNC", "IFUNC") and s.shndx != 0:
            names.setdefault(s.value, []).append(s.name)
    insns = C.disassemble(img, ranges)
    out = []
    for i in insns:
        if not i.group(C.capstone.CS_GRP_CALL):
            continue
        _t, name, _how = C.resolve_call(img, i, names)
        kind = C.norm_callee(name)
        if kind in C.CALL_KINDS:
            out.append((kind, i.address, name))
    return sorted(out)


def _find_cu(dw, start: int):
    try:
        ar = dw.get_aranges()
        off = ar.cu_offset_at_addr(start) if ar is not None else None
    except Exception:               # damaged or absent aranges: scan the CUs
        off = None
    if off is not None:
        return dw.get_CU_at(off)
    for cu in dw.iter_CUs():
        n = cu.get_top_DIE().attributes.get("DW_AT_name")
        if n is not None and (n.value == b"res_send.c" or n.value.endswith(b"/res_send.c")):
            return cu
    return None


def _walk(die):
    for c in die.iter_children():
        yield c
        yield from _walk(c)


def _name(die) -> str | None:
    a = die.attributes.get("DW_AT_name")
    return a.value.decode("utf-8", "replace") if a is not None else None


def _dwarf_facts(debug_file: str, start: int) -> dict:
    from elftools.elf.elffile import ELFFile

    with open(debug_file, "rb") as f:
        elf = ELFFile(f)
        if not elf.has_dwarf_info():
            return {"error": "no DWARF in the debug file"}
        dw = elf.get_dwarf_info()
        cu = _find_cu(dw, start)
        if cu is None:
            return {"error": "no compilation unit for send_dg (res_send.c)"}
        out = {"cu": _name(cu.get_top_DIE()), "dwarf_version": cu["version"]}
        sub, struct = None, None
        for die in cu.iter_DIEs():
            if die.tag == "DW_TAG_subprogram" and _name(die) == "send_dg" and \
                    ("DW_AT_ranges" in die.attributes or "DW_AT_low_pc" in die.attributes):
                sub = die
            elif die.tag == "DW_TAG_structure_type" and _name(die) == "__res_state" \
                    and "DW_AT_declaration" not in die.attributes:
                struct = die
        if struct is not None:
            out["struct"] = {k: _member_offset(struct, k.split(".")) for k in C.RES_STATE}
        if sub is None:
            out["error"] = "no concrete DW_TAG_subprogram send_dg"
            return out
        out["ranges"] = _ranges(dw, cu, sub)
        out["call_sites"] = _call_sites(sub)
        out["single_request_fbreg"] = _fbreg_offsets(dw, cu, sub, "single_request")
        return out


def _member_offset(die, path: list[str]) -> int | None:
    """Offset of the (nested, e.g. ``_u._ext.nssocks``) member ``path`` of a struct DIE."""
    off = 0
    for i, name in enumerate(path):
        m = next((c for c in die.iter_children() if c.tag == "DW_TAG_member" and _name(c) == name), None)
        if m is None:
            return None
        loc = m.attributes.get("DW_AT_data_member_location")
        if loc is None and die.tag != "DW_TAG_union_type":     # union members sit at 0
            return None
        if loc is not None and not isinstance(loc.value, int):
            return None
        off += loc.value if loc is not None else 0
        if i + 1 < len(path):
            die = m.get_DIE_from_attribute("DW_AT_type")
            while die.tag in ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type"):
                die = die.get_DIE_from_attribute("DW_AT_type")
    return off


def _ranges(dw, cu, sub) -> list[tuple[int, int]]:
    if "DW_AT_low_pc" in sub.attributes:
        lo = sub.attributes["DW_AT_low_pc"].value
        hi = sub.attributes["DW_AT_high_pc"]
        return [(lo, hi.value if hi.form == "DW_FORM_addr" else lo + hi.value)]
    base = cu.get_top_DIE().attributes.get("DW_AT_low_pc")
    base = base.value if base is not None else 0
    out = []
    for e in dw.range_lists().get_range_list_at_offset(sub.attributes["DW_AT_ranges"].value, cu=cu):
        if hasattr(e, "begin_offset"):
            add = 0 if getattr(e, "is_absolute", False) else base
            out.append((e.begin_offset + add, e.end_offset + add))
        elif hasattr(e, "base_address"):
            base = e.base_address
    return sorted(out)


def _call_sites(sub) -> list[tuple[str, int]]:
    out = []
    for d in _walk(sub):
        if d.tag not in ("DW_TAG_call_site", "DW_TAG_GNU_call_site"):
            continue
        ret = d.attributes.get("DW_AT_call_return_pc") or d.attributes.get("DW_AT_low_pc")
        origin = next((k for k in ("DW_AT_call_origin", "DW_AT_abstract_origin") if k in d.attributes), None)
        if ret is None or origin is None:
            continue
        try:
            callee = d.get_DIE_from_attribute(origin)
        except Exception:           # a reference pyelftools cannot follow: leave it out
            continue
        out.append((_name(callee) or "?", ret.value))
    return out


def _fbreg_offsets(dw, cu, sub, var: str) -> list[int]:
    from elftools.dwarf.dwarf_expr import DWARFExprParser
    from elftools.dwarf.locationlists import LocationEntry, LocationExpr, LocationParser

    lp, xp = LocationParser(dw.location_lists()), DWARFExprParser(cu.structs)
    out = set()
    for v in _walk(sub):
        if v.tag != "DW_TAG_variable" or _name(v) != var or "DW_AT_location" not in v.attributes:
            continue
        ll = lp.parse_from_attribute(v.attributes["DW_AT_location"], cu["version"], v)
        for ent in (ll if isinstance(ll, list) else [ll]):
            if isinstance(ent, (LocationEntry, LocationExpr)):
                ops = xp.parse_expr(ent.loc_expr)
                if len(ops) == 1 and ops[0].op_name == "DW_OP_fbreg":
                    out.add(ops[0].args[0])
    return sorted(out)


def dwarf_check(img: ElfImage, res: dict, debug_file: str) -> dict:
    """{"used": bool, "agrees": bool|None, "details": {...}} (see the module doc)."""
    try:
        dbg = ElfImage(debug_file)
    except (OSError, ElfError) as e:
        return {"used": False, "agrees": None, "details": {"error": str(e)}}
    det: dict = {"debug_file": debug_file, "debug_build_id": dbg.build_id()}
    if det["debug_build_id"] != res.get("build_id"):
        det["error"] = f"build-id mismatch: debug file {det['debug_build_id']} vs object {res.get('build_id')}"
        return {"used": False, "agrees": False, "details": det}
    sd = res.get("send_dg")
    bounds = _symtab_bounds(dbg)
    if "send_dg" not in bounds:
        det["send_dg_bounds"] = {"agrees": sd is None, "symtab": None, "note": "no send_dg in .symtab"}
        return {"used": True, "agrees": sd is None, "details": det}
    ranges = [bounds["send_dg"]] + ([bounds["send_dg.cold"]] if "send_dg.cold" in bounds else [])
    ours = [] if sd is None else [(sd["start"], sd["end"])] + [(c["start"], c["end"]) for c in sd["cold"]]
    facts = _dwarf_facts(debug_file, bounds["send_dg"][0])
    det["dwarf"] = {k: facts.get(k) for k in ("cu", "dwarf_version", "error")}
    det["send_dg_bounds"] = {"agrees": sorted(ranges) == sorted(ours) and (
        "ranges" not in facts or facts["ranges"] == sorted(ours)),
        "symtab": [list(r) for r in ranges], "dwarf": facts.get("ranges"), "ours": [list(r) for r in ours]}
    det.update(_compare_calls(img, dbg, ranges, res, facts))
    det.update(_compare_layout(img, res, facts, bounds["send_dg"]))
    verdicts = [v["agrees"] for v in det.values() if isinstance(v, dict) and "agrees" in v]
    agrees = False if False in verdicts else (None if None in verdicts or not verdicts else True)
    return {"used": True, "agrees": agrees, "details": det}


def _compare_calls(img, dbg, ranges, res, facts) -> dict:
    ours = sorted((c["kind"], c["call_addr"]) for c in res.get("calls", []))
    sym = _calls_by_symtab(img, dbg, ranges)
    out = {"calls_symtab": {"agrees": [(k, a) for k, a, _n in sym] == ours,
                            "names": sorted({n for _k, _a, n in sym}), "count": len(sym)}}
    if "call_sites" in facts:
        dw = sorted((C.norm_callee(n), pc) for n, pc in facts["call_sites"] if C.norm_callee(n) in C.CALL_KINDS)
        mine = sorted((c["kind"], c["ret_addr"]) for c in res.get("calls", []))
        out["calls_dwarf"] = {"agrees": dw == mine, "count": len(dw),
                              "callees": sorted({n for n, _pc in facts["call_sites"]
                                                 if C.norm_callee(n) in C.CALL_KINDS})}
    return out


def _compare_layout(img, res, facts, fn) -> dict:
    out = {}
    st = facts.get("struct")
    if st:
        want = {k: v[0] for k, v in C.RES_STATE.items()}
        got = {k: st.get(k) for k in want}
        out["struct_offsets"] = {"agrees": got == want, "dwarf": got, "abi": want}
    fix = res.get("fix_30081") or {}
    home = fix.get("single_request_slot")
    fb = facts.get("single_request_fbreg")
    writer = next((w for w in res.get("sticky_writers", []) if w.get("in_send_dg")), None)
    if home and fb is not None and writer is not None:
        cfa = img.cfa_at(tuple(fn), writer["addr"])
        slots = [f"rsp+{cfa + n:#x}" for n in fb] if cfa is not None else []
        out["single_request"] = {"agrees": home in slots if slots else None, "dwarf_slots": slots,
                                 "ours": home, "cfa_minus_rsp": cfa}
    return out
