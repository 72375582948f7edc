"""Everything gdbdiag needs to probe glibc's static ``send_dg()``, found from the ELF
files alone (stripped is the normal case): the sticky-bit writer, send_dg's bounds,
its poll/send/sendmmsg/recvfrom call sites, ``getaddrinfo``, the ``__resp`` TLS slot,
and whether the build has the bug-30081 fix.  Pure host-side code: no gdb.

Results are JSON-serializable dicts, cached by build-id in
``<cache>/analysis/<build-id>-v<ANALYZER_VERSION>.json`` (``<cache>`` as in
:func:`gdbdiag.symbols.cache.default_cache_dir`: ``$GDBDIAG_CACHE``, else
``$XDG_CACHE_HOME/gdbdiag``, else ``~/.cache/gdbdiag``).  A cached result is used only
if the file's sha256 matches the one recorded in it.  Results cross-checked with a
debug file are cached separately (``...-v<N>-dwarf.json``).

All addresses are the object's ELF virtual (link-time) addresses; every probe address
also comes with its ``file_offset`` (what kernel uprobes want).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time

from ..errors import GdbdiagError
from . import codeflow as C
from .elfscan import ElfError, ElfImage
from .fix30081 import decide_fix

__all__ = ["ANALYZER_VERSION", "analyze_object", "analyze_target", "default_analysis_dir", "AnalysisError"]

ANALYZER_VERSION = 4


class AnalysisError(GdbdiagError):
    """The object cannot be analyzed at all (not an x86-64 ELF, unreadable)."""


def default_analysis_dir() -> str:
    from ..symbols.cache import default_cache_dir
    return os.path.join(default_cache_dir(), "analysis")


# ---------------------------------------------------------------------------------------
# send_dg
# ---------------------------------------------------------------------------------------
def _is_snglkup(w: dict) -> bool:
    return w["bit"] == "RES_SNGLKUP" or "RES_SNGLKUP" in w.get("also", [])


def _looks_like_send_dg(kinds: set[str]) -> bool:
    return {"poll", "recvfrom"} <= kinds and bool(kinds & {"send", "sendmmsg"})


def _pick_send_dg(img: ElfImage, writers: list[dict]) -> tuple[tuple | None, list, str | None]:
    """(send_dg main range, its insns, unknown_reason).  send_dg = the one function that
    holds a RES_SNGLKUP writer *and* calls poll, recvfrom and send/sendmmsg (libc's
    resolv.conf option parser also sets RES_SNGLKUP, for ``options single-request``)."""
    funcs: dict[tuple, list[dict]] = {}
    for w in writers:
        if _is_snglkup(w):
            funcs.setdefault(tuple(w["function"]), []).append(w)
    if not funcs:
        return None, [], "no sticky-bit writer found"
    cands, others = [], []
    for fn, ws in funcs.items():
        insns = C.disassemble(img, [fn])
        kinds = {c["kind"] for c in C.call_sites(img, insns)}
        (cands if _looks_like_send_dg(kinds) else others).append((fn, insns, ws))
    if len(cands) == 1:
        return cands[0][0], cands[0][1], None
    desc = "; ".join(f"{ws[0]['insn']} at {ws[0]['addr']:#x} in [{fn[0]:#x},{fn[1]:#x})"
                     for fn, _i, ws in (cands or others))
    if not cands:
        return None, [], ("no sticky-bit writer in a function that calls poll, recvfrom and send/sendmmsg "
                          f"(writers only in: {desc})")
    return None, [], f"{len(cands)} candidate writers in different functions: {desc}"


def _cold_parts(img: ElfImage, fn: tuple, insns) -> list[tuple[int, int]]:
    """Out-of-line fragments (``send_dg.cold``): jump targets outside the main range that
    start an FDE whose CFA at entry is already a body frame (not a function entry)."""
    out = []
    for i in insns:
        t = C.direct_target(i) if C.is_jump(i) else None
        if t is None or fn[0] <= t < fn[1]:
            continue
        fde = img.fde_at(t)
        if fde is None:
            continue
        rows = img.cfi_rows((fde[0], fde[1]))
        if rows and rows[0][1] not in (None, 8) and (fde[0], fde[1]) not in out:
            out.append((fde[0], fde[1]))
    return sorted(out)


def _send_dg_facts(img: ElfImage, fn: tuple, main_insns, writers) -> dict:
    cold = _cold_parts(img, fn, main_insns)
    insns = sorted(main_insns + C.disassemble(img, cold), key=lambda i: i.address)
    calls = C.call_sites(img, insns)
    targets = C.jump_targets(insns)
    warnings = [f"return address {c['ret_addr']:#x} of the {c['kind']} call at {c['call_addr']:#x} "
                "is also a jump target" for c in calls if c["ret_addr"] in targets]
    if any(C.is_jump(i) and C.direct_target(i) is None for i in insns):
        warnings.append("send_dg has indirect jumps: the return-address check is incomplete")
    mine = [w for w in writers if tuple(w["function"]) == fn]
    snglkup = [w for w in mine if _is_snglkup(w)]
    fix = decide_fix(insns, snglkup[0]["addr"], snglkup[0])
    if len(snglkup) > 1:
        fix["note"] = f"{len(snglkup)} RES_SNGLKUP writers in send_dg; single_request's home taken at the first"
    rets, tail = returns(insns, [fn] + cold)
    if tail:
        warnings.append(f"send_dg leaves by {len(tail)} tail jump(s): returns seen only at ret")
    return {"send_dg": {"start": fn[0], "end": fn[1], "file_offset": img.off(fn[0]),
                        "cold": [{"start": a, "end": b, "file_offset": img.off(a)} for a, b in cold],
                        "returns": [{"addr": r, "file_offset": img.off(r)} for r in rets]},
            "calls": calls, "fix_30081": fix, "warnings": warnings,
            "sticky_field": snglkup[0]["field"], "reads__flags": _reads_flags(insns)}


def returns(insns, ranges) -> tuple[list[int], list[int]]:
    """The function's ``ret`` instructions (probe points for its return, no uretprobe: a
    return probe rewrites the return address on the thread's stack) and its tail jumps
    out of ``ranges`` (returns that no probe inside it sees)."""
    inside = lambda a: any(lo <= a < hi for lo, hi in ranges)      # noqa: E731
    rets = [i.address for i in insns if i.id == C.X.X86_INS_RET]
    tail = [i.address for i in insns if C.is_jump(i) and not C.is_cond_jump(i)
            and C.direct_target(i) is not None and not inside(C.direct_target(i))]
    return rets, tail


def _function_facts(img: ElfImage, name: str) -> dict | None:
    """An exported function's entry and returns (bounds from its FDE)."""
    g = img.defined(name)
    if g is None:
        return None
    out = {"addr": g.value, "file_offset": img.off(g.value)}
    fn = img.function_at(g.value)
    if fn is not None:
        rets, tail = returns(C.disassemble(img, [fn]), [fn])
        out.update(end=fn[1], returns=[{"addr": r, "file_offset": img.off(r)} for r in rets],
                   tail_jumps=tail)
    return out


def _reads_flags(insns) -> bool:
    off = C.RES_STATE["_flags"][0]
    for i in insns:
        m = C.mem_operand(i)
        if m is not None and m.mem.disp == off and i.id not in (C.X.X86_INS_LEA,) \
                and i.reg_name(m.mem.base) not in ("rsp", "rip", None):
            if i.mnemonic.startswith(("mov", "test", "cmp")):
                return True
    return False


def _check_calls(calls: list[dict]) -> list[str]:
    kinds = [c["kind"] for c in calls]
    sites = sorted(c.get("site") for c in calls if c["kind"] == "poll")
    missing = []
    if sites != ["check", "wait"]:
        missing.append(f"poll sites {sites} (want one check, one wait)")
    for k in ("send", "sendmmsg", "recvfrom"):
        if k not in kinds:
            missing.append(f"no {k} call")
    return missing


# ---------------------------------------------------------------------------------------
# one object
# ---------------------------------------------------------------------------------------
def _analyze(img: ElfImage) -> dict:
    t0 = time.perf_counter()
    writers, stats = C.find_sticky_writers(img)
    t1 = time.perf_counter()
    fn, main_insns, reason = _pick_send_dg(img, writers)
    res = {"has_send_dg": fn is not None, "send_dg": None, "unknown_reason": reason, "calls": [],
           "fix_30081": {"affected": None, "how": "instruction flow", "reason": reason}, "warnings": [],
           "sticky_writers": writers, "sticky_field": None, "probe_set_complete": False}
    for w in writers:
        w["in_send_dg"] = fn is not None and tuple(w["function"]) == fn
        w["cfa_rsp"] = img.cfa_at(tuple(w["function"]), w["addr"])
    if fn is not None:
        res.update(_send_dg_facts(img, fn, main_insns, writers))
        incomplete = _check_calls(res["calls"])
        res["probe_set_complete"] = not incomplete
        if incomplete:
            res["warnings"].append("probe set incomplete: " + "; ".join(incomplete))
    t2 = time.perf_counter()
    res["getaddrinfo"] = _function_facts(img, "getaddrinfo")
    slots = img.tls_slots("__resp")
    res["res_tls"] = None if not slots else dict(slots[0], others=slots[1:])
    res["timing_ms"] = {"writers": round((t1 - t0) * 1e3, 1), "send_dg": round((t2 - t1) * 1e3, 1),
                        "total": round((time.perf_counter() - t0) * 1e3, 1)}
    res["scan"] = stats
    return res


def _cache_file(cache_dir: str, bid: str, dwarf: bool) -> str:
    return os.path.join(cache_dir, f"{bid}-v{ANALYZER_VERSION}{'-dwarf' if dwarf else ''}.json")


def _load_cached(p: str, sha: str) -> tuple[dict | None, bool]:
    """(result, another file's result is stored there).  A result is reused only for the
    same file content: a patched copy keeps its build-id but not its sha256."""
    try:
        with open(p) as f:
            r = json.load(f)
    except (OSError, ValueError):
        return None, False
    if r.get("analyzer_version") != ANALYZER_VERSION:
        return None, False
    if r.get("sha256") != sha:
        return None, True
    return r, False


def analyze_object(path: str, debug_file: str | None = None, cache_dir: str | None = None) -> dict:
    """Analyze one ELF object (libc.so.6, libresolv.so.2, libresolv-2.31.so).

    Keys: build_id, path, sha256, analyzer_version, provenance ("disassembly" or
    "disassembly+dwarf"), has_send_dg, sticky_writers, send_dg ({start, end,
    file_offset, cold: [{start, end}]} or None), unknown_reason, calls, fix_30081,
    getaddrinfo, res_tls, sticky_field, probe_set_complete, warnings, timing_ms, cached,
    and with ``debug_file`` also dwarf_check.  Raises AnalysisError for non-x86-64/ELF."""
    t0 = time.perf_counter()
    try:
        with open(path, "rb") as f:
            data = f.read()
        img = ElfImage(path, data)
    except (OSError, ElfError) as e:
        raise AnalysisError(str(e)) from None
    sha = hashlib.sha256(data).hexdigest()
    bid = img.build_id()
    cdir = cache_dir or default_analysis_dir()
    cpath = _cache_file(cdir, bid, bool(debug_file)) if bid else None
    other = False
    if cpath:
        r, other = _load_cached(cpath, sha)
        if r is not None:
            r.update(path=path, cached=True, load_ms=round((time.perf_counter() - t0) * 1e3, 1))
            return r
    res = {"build_id": bid, "path": path, "sha256": sha, "analyzer_version": ANALYZER_VERSION,
           "provenance": "disassembly"}
    try:
        res.update(_analyze(img))
    except (ElfError, struct.error, IndexError, ValueError, TypeError) as e:
        # foreign input: a damaged or unusual object is "cannot tell", not a crash
        reason = f"cannot analyze the code: {type(e).__name__}: {e}"
        res.update(has_send_dg=False, send_dg=None, unknown_reason=reason, calls=[], sticky_writers=[],
                   sticky_field=None, getaddrinfo=None, res_tls=None, warnings=[reason],
                   fix_30081={"affected": None, "how": "instruction flow", "reason": reason})
        return dict(res, cached=False)
    if debug_file:
        from .dwarfcheck import dwarf_check
        res["dwarf_check"] = dwarf_check(img, res, debug_file)
        if res["dwarf_check"].get("used"):
            res["provenance"] = "disassembly+dwarf"
    if other:
        res["warnings"] = res["warnings"] + [
            f"not cached: {cpath} holds the analysis of another file with build-id {bid} (different sha256)"]
    elif cpath:
        from ..symbols.cache import atomic_write_json
        try:
            atomic_write_json(cpath, dict(res, path=None))
        except OSError as e:
            res["warnings"] = res["warnings"] + [f"analysis not cached: {e}"]
    res["cached"] = False
    res["load_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    return res


# ---------------------------------------------------------------------------------------
# a target: libc + libresolv
# ---------------------------------------------------------------------------------------
def _inside(root: str, path: str | None) -> str | None:
    """Host path of ``path`` as seen inside ``root`` (absolute symlinks resolved inside
    the root).  A path already under ``root`` is accepted as it is."""
    if path is None:
        return None
    if not root or root == "/":
        return path
    from ..symbols.rootfs import SafeRoot
    rp = os.path.abspath(root).rstrip("/")
    inner = path[len(rp):] if path.startswith(rp + "/") else path
    sroot = SafeRoot(root)
    return sroot.to_host(sroot.resolve(inner))


def _build_id_of(path: str) -> str | None:
    try:
        return ElfImage(path).build_id()
    except (OSError, ElfError):
        return None


def analyze_target(root: str, libc_path: str, libresolv_path: str | None,
                   debug_files: dict | None = None, cache_dir: str | None = None) -> dict:
    """Analyze a target's libc and (when present) libresolv; pick the one holding send_dg
    (glibc 2.31: libresolv; 2.34+: libc).  Paths are as the target sees them, inside
    ``root`` ("/" or None for the host; /proc/PID/root or a rootfs directory otherwise).
    ``debug_files``: {"libc"|"libresolv"|build-id: debug file path}.

    Returns {send_dg_object: "libc"|"libresolv"|None, libc, libresolv (each an
    :func:`analyze_object` result, or None), affected_30081, sticky_field,
    unknown_reason, res_tls (libc's __resp slot, else libresolv's, with "object"),
    notes}.  Raises AnalysisError when libc cannot be read; a missing or unreadable
    libresolv is a note."""
    debug_files = debug_files or {}
    out = {"send_dg_object": None, "libc": None, "libresolv": None, "affected_30081": None,
           "sticky_field": None, "unknown_reason": None, "notes": []}
    for role, p in (("libc", libc_path), ("libresolv", libresolv_path)):
        try:
            host = _inside(root, p)
        except OSError as e:
            if role == "libc":
                raise AnalysisError(f"{p} inside {root}: {e}") from None
            out["notes"].append(f"libresolv {p} not analyzed: {e}")
            continue
        if host is None:
            continue
        dbg = debug_files.get(role)
        if dbg is None and debug_files:
            dbg = debug_files.get(_build_id_of(host))
        try:
            r = analyze_object(host, debug_file=dbg, cache_dir=cache_dir)
        except AnalysisError as e:
            if role == "libc":
                raise
            out["notes"].append(f"libresolv {p} not analyzed: {e}")
            continue
        out[role] = r
    tls = [dict(out[r]["res_tls"], object=r) for r in ("libc", "libresolv") if out[r] and out[r].get("res_tls")]
    out["res_tls"] = tls[0] if tls else None
    holders = [role for role in ("libc", "libresolv") if out[role] and out[role]["has_send_dg"]]
    if len(holders) == 1:
        r = out[holders[0]]
        out.update(send_dg_object=holders[0], affected_30081=r["fix_30081"]["affected"],
                   sticky_field=r["sticky_field"])
        if r["fix_30081"]["affected"] is None:
            out["unknown_reason"] = r["fix_30081"]["reason"]
    elif not holders:
        out["unknown_reason"] = "; ".join(f"{role}: {out[role]['unknown_reason']}" for role in ("libc", "libresolv")
                                          if out[role]) or "no object analyzed"
    else:
        out["unknown_reason"] = "both libc and libresolv hold a send_dg candidate"
    return out
