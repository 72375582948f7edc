"""send_dg()'s probe points for the plugin, in the shape the session and the probes use.

The facts come from :mod:`gdbdiag.glibc`'s analyzer, which reads the machine code of the
target's own libc/libresolv (stripped is fine: no debug symbols needed). Its link-time
addresses are placed at the object's load bias, read from /proc/PID/maps (the mapping of
that file at file offset 0), never from gdb's symbols; the process's code bytes at every
probe PC are checked against the file before anything is armed.

DWARF, when gdb has the matching debug file, is enrichment only (:mod:`.dwarf`: homes
of ``<optimized out>`` locals, the bug-31890 locals, a cross-check of every probe point);
the probes always use the analyzer's addresses. See docs/send_dg-probes.md.

Read-only: it sets no breakpoint and writes nothing to the target.
"""
import gdb

from ..errors import GdbdiagError
from ..glibc.analyzer import AnalysisError, analyze_target
from ..glibc.codeflow import RES_STATE
from . import target as T

FUNC = "send_dg"
VERDICT = {True: "affected", False: "fixed", None: "unknown"}
DISASSEMBLY = "disassembly"        # provenance of everything the analyzer found


class NotLoaded(GdbdiagError, gdb.GdbError):
    """send_dg's object is not mapped yet (glibc < 2.34 maps libresolv at the first lookup)."""


# ---- the analyzer, placed in this process ------------------------------------------------
def analyse(detail=False, pid=None):
    """Probe points of send_dg in process ``pid`` (default: the selected inferior).
    Raises NotLoaded while send_dg's object is not mapped, gdb.GdbError when it cannot
    be found or the process's code is not the file's. ``detail`` adds the per-probe
    availability of every local (DWARF only; slow: one `info scope` per probe)."""
    pid = pid or gdb.selected_inferior().pid
    if not pid:
        raise gdb.GdbError("no process: attach to one first (attach PID)")
    try:
        objs = T.mapped_objects(pid)
    except OSError as exc:
        raise gdb.GdbError("cannot read the maps of process %d: %s" % (pid, exc)) from None
    res = _analyze(objs)
    where = res["send_dg_object"]
    if where is None:
        if "libresolv" not in objs:
            raise NotLoaded("send_dg is not loaded yet: libc has none and libresolv.so.2 is "
                            "not mapped (glibc < 2.34 loads it at the first lookup)")
        raise gdb.GdbError("send_dg not found in this process's glibc: %s" % res["unknown_reason"])
    out = adapt(res, objs, where)
    verify_code(out)
    from .dwarf import enrich        # .dwarf uses this module's probe_sites
    enrich(out, detail)
    return out


def _analyze(objs):
    if "libc" not in objs:
        raise gdb.GdbError("no libc.so.6 mapped in this process (static, musl or Go?)")
    res = objs.get("libresolv")
    try:
        return analyze_target("/", objs["libc"]["host"], res["host"] if res else None)
    except AnalysisError as exc:
        raise gdb.GdbError("cannot analyze this process's libc: %s" % exc) from None


def adapt(res, objs, where):
    """The analyzer's result (link-time addresses) as run-time probe points."""
    obj, m = res[where], objs[where]
    bias, sd, fix = m["bias"], obj["send_dg"], obj["fix_30081"]
    entry = bias + sd["start"]
    out = {"function": FUNC, "object": where, "objfile": m["path"], "host_file": m["host"],
           "build_id": obj.get("build_id"), "bias": bias, "entry": entry,
           "entry_file_offset": sd["file_offset"], "provenance": DISASSEMBLY,
           "ranges": [(bias + sd["start"], bias + sd["end"])] +
                     [(bias + c["start"], bias + c["end"]) for c in sd["cold"]],
           "calls": [_call(c, bias, entry) for c in obj["calls"]],
           "returns": [bias + r["addr"] for r in sd["returns"]],
           "return_file_offsets": [r["file_offset"] for r in sd["returns"]],
           "offsets": {k: v[0] for k, v in RES_STATE.items()},
           "flag_writes": [_write(w, bias, entry) for w in obj["sticky_writers"] if w.get("in_send_dg")],
           "reads__flags": obj.get("reads__flags"),
           "bug30081": VERDICT.get(fix.get("affected"), "unknown"),
           "bug30081_reason": fix.get("reason"), "bug30081_how": fix.get("how"),
           "single_request_home": fix.get("single_request_slot"),
           "probe_set_complete": obj.get("probe_set_complete"),
           "warnings": list(obj.get("warnings") or []) + list(res.get("notes") or []),
           "analysis_cached": obj.get("cached"), "getaddrinfo": _gai(res, objs),
           "dwarf": {"available": False}, "home_locations": {}, "bug31890_locals": None,
           "cross_check": [], "availability": {}}
    out["flag_field"] = sorted({w["field"] for w in out["flag_writes"]})
    return out


def _call(c, bias, entry):
    pc, ret = bias + c["call_addr"], bias + c["ret_addr"]
    d = {"kind": c["kind"], "callee": c.get("name"), "site": c.get("site"),
         "pc": pc, "off": pc - entry, "ret_pc": ret, "ret_off": ret - entry,
         "file_offset": c.get("call_file_offset"), "ret_file_offset": c.get("ret_file_offset"),
         "target": bias + c["target"] if c.get("target") is not None else None,
         "via": c.get("via"), "asm": c.get("insn")}
    if c["kind"] == "poll":
        d["timeout_arg"] = "0" if c.get("site") == "check" else "ptimeout"
    return d


def _write(w, bias, entry):
    field = w["field"]
    what = "SNGLKUPREOP" if w["bit"].endswith("REOP") else "SNGLKUP"
    pc = bias + w["addr"]
    return {"pc": pc, "off": pc - entry, "file_offset": w.get("file_offset"), "field": field,
            "flag": ("RES_F_" if field == "_flags" else "RES_") + what,
            "base_reg": "%" + w["base_reg"], "asm": w.get("insn")}


def _gai(res, objs):
    g = (res.get("libc") or {}).get("getaddrinfo")
    if not g or "libc" not in objs:
        return None
    return {"pc": objs["libc"]["bias"] + g["addr"], "file_offset": g.get("file_offset")}


def probe_sites(out):
    """[(run-time pc, file offset, what)] of every probe point inside send_dg."""
    sites = [(out["entry"], out["entry_file_offset"], "entry")]
    sites += [(w["pc"], w["file_offset"], "writer %s" % w["flag"]) for w in out["flag_writes"]]
    for c in out["calls"]:
        sites += [(c["pc"], c["file_offset"], "%s call" % c["kind"]),
                  (c["ret_pc"], c["ret_file_offset"], "%s return" % c["kind"])]
    sites += [(pc, fo, "ret") for pc, fo in zip(out["returns"], out["return_file_offsets"])]
    return sites


def verify_code(out, n=4):
    """The process's code at every probe PC must be its file's bytes at that file offset
    (gdb reads through its own breakpoints): a wrong load bias, or a file that is not
    the one mapped, would put an int3 inside an instruction. Refuse to go on then."""
    inf = gdb.selected_inferior()
    bad = []
    with open(out["host_file"], "rb") as fh:
        for pc, fo, what in probe_sites(out):
            fh.seek(fo)
            want = fh.read(n)
            try:
                got = bytes(inf.read_memory(pc, n))
            except gdb.MemoryError as exc:
                got = str(exc).encode()
            if got != want:
                bad.append("%s at %#x" % (what, pc))
    if bad:
        raise gdb.GdbError("the code of %s in this process is not its file's at %s: not arming"
                           % (out["objfile"], ", ".join(bad[:4])))


# ---- `resolv probes` ------------------------------------------------------------------
def disagreements(r):
    return [c for c in r.get("cross_check", []) if c["agrees"] is False]


def report(r):
    P = print
    e = r["entry"]
    P("send_dg @ %#x in %s (%s, build-id %s, loaded at %#x)  ranges: %s" % (
        e, r["objfile"], r["object"], r["build_id"], r["bias"],
        ", ".join("[%#x,%#x)" % tuple(x) for x in r["ranges"])))
    P("found by: disassembly of the stripped object (gdbdiag.glibc analyzer%s); DWARF: %s" % (
        ", cached" if r.get("analysis_cached") else "",
        "yes (%s)" % r["dwarf"]["objfile"] if r["dwarf"]["available"] else "no (not needed)"))
    P("struct __res_state offsets (ABI): %s" % r["offsets"])
    P("\ncall sites (pc = call insn, ret = insn after the call):")
    for c in r["calls"]:
        extra = (" site=%s timeout=%s" % (c["site"], c["timeout_arg"])) if c["kind"] == "poll" else ""
        P("  %-10s %-14s call %#x (+%#x)  ret %#x (+%#x)%s" % (
            c["kind"], c["callee"], c["pc"], c["off"], c["ret_pc"], c["ret_off"], extra))
    P("\nsticky flag writes (break here = the moment the thread switches):")
    for w in r["flag_writes"]:
        P("  %#x (+%#x)  statp->%s |= %s   [%s]   statp in %s" % (
            w["pc"], w["off"], w["field"], w["flag"], w["asm"], w["base_reg"]))
    P("  flags written to: %s; send_dg also reads _flags: %s" % (r["flag_field"], r["reads__flags"]))
    P("returns: %s" % ", ".join("%#x" % x for x in r["returns"]))
    P("\nbug 30081: %s (%s): %s" % (r["bug30081"], r["bug30081_how"], r["bug30081_reason"]))
    P("  single_request's home: %s" % r["single_request_home"])
    if r["dwarf"]["available"]:
        P("  bug 31890 fix locals present: %s" % (r["bug31890_locals"] or "none"))
        P("\ninferred homes (where DWARF says <optimized out>; rsp+off in the body): %s" % ", ".join(
            "%s=%s" % (k, ("rsp+%#x" % v[1]) if v[0] == "slot" else "$" + v[1])
            for k, v in r["home_locations"].items()))
    _report_checks(r)
    for w in r["warnings"]:
        P("warning: %s" % w)
    _report_availability(r)


def _report_checks(r):
    checks = r.get("cross_check", [])
    if not checks:
        return
    bad = disagreements(r)
    print("\ncross-check with gdb's symbols: %d checks, %d agree, %d disagree, %d undecided" % (
        len(checks), sum(1 for c in checks if c["agrees"]), len(bad),
        sum(1 for c in checks if c["agrees"] is None)))
    for c in bad:
        print("  DISAGREE (%s) %s: analyzer %s, gdb %s" % (c["source"], c["what"], c["analyzer"], c["gdb"]))


def _report_availability(r):
    if not r["availability"]:
        return
    from .dwarf import WANTED_VARS
    P = print
    P("\nlocal availability at probe pcs (yes / OUT = <optimized out> / entry = entry_value / const / - = not in scope):")
    cols = list(WANTED_VARS)
    P("  %-28s %s" % ("probe", " ".join("%-4.4s" % c for c in cols)))
    for k, row in r["availability"].items():
        P("  %-28s %s" % (k, " ".join("%-4.4s" % row[c] for c in cols)))
    P("  columns: " + ", ".join(cols))
