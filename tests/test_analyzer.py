"""gdbdiag.glibc: the symbol-less send_dg analyzer, on real Debian glibc builds.

1. the three lab root filesystems: every probe address of docs/send_dg-probes.md
   (sections 3, 6, 7, 8) is found again from the stripped objects alone;
2. with the matching libc6-dbg debug files: the DWARF/.symtab-derived probe set is the
   same, and the bug-30081 verdict equals debian-symbols/glibc-builds.json;
3. every amd64 libc6 build Debian's archive serves today (signed index path);
4. patched copies the analyzer cannot decide: None with a reason, never a guess.
"""
from __future__ import annotations

import json
import os
import re
import time

import pytest
from elftools.elf.elffile import ELFFile

from gdbdiag.glibc import ANALYZER_VERSION, analyze_object, analyze_target
from gdbdiag.glibc.builds import fetch_build, list_builds
from gdbdiag.glibc.codeflow import find_sticky_writers, find_sticky_writers_slow
from gdbdiag.glibc.elfscan import ElfImage, tpoff_relocs
from gdbdiag.symbols.analyze import version_table
from gdbdiag.symbols.cache import SymbolCache
from gdbdiag.symbols.debdata import load_data
from gdbdiag.symbols.identify import identify_root
from gdbdiag.symbols.sources import Settings, fetch_symbols
from support.symbols import TEST_CACHE, rootfs

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
LIBRESOLV = "/lib/x86_64-linux-gnu/libresolv.so.2"

# Expected values, from docs/send_dg-probes.md (found there with gdb + libc6-dbg).
# calls: {kind or "poll:site": [call addresses]}
LAB = {
    "bullseye": {
        "object": "libresolv", "field": "options", "affected": True,
        "writer": (0x9C0E, "orq $0x200000, 8(%r15)"), "reop": 0x9C75,
        "send_dg": (0x9000, 0x9D85, [(0x43B0, 0x43B5)]),
        "calls": {"poll:check": [0x92EA], "poll:wait": [0x925B], "send": [0x935F, 0x982A, 0x9A4E],
                  "sendmmsg": [0x993B], "recvfrom": [0x955B]},
        "pfcode": 0x9759, "slot": "rsp+0xb1", "tls": ("libresolv", 0x16FD8, 0),
    },
    "bookworm": {
        "object": "libc", "field": "_flags", "affected": False,
        "writer": (0x12F219, "orl $0x200000, 0x1f8(%r14)"), "reop": 0x12F2A6,
        "send_dg": (0x12E590, 0x12F3CC, [(0x27080, 0x27085)]),
        "calls": {"poll:check": [0x12EACC], "poll:wait": [0x12E7D8],
                  "send": [0x12E590 + 0x31F, 0x12E590 + 0x5CE, 0x12E590 + 0x807],
                  "sendmmsg": [0x12EEDB], "recvfrom": [0x12EC07]},
        "pfcode": 0x12EFC8, "slot": "rsp+0x85", "tls": ("libc", 0x1D2FC0, 8),
    },
    "trixie": {
        "object": "libc", "field": "_flags", "affected": False,
        "writer": (0x12E332, "orl $0x200000, 0x1f8(%r14)"), "reop": 0x12E361,
        "send_dg": (0x12D5D0, 0x12E453, [(0x2993D, 0x29942)]),
        "calls": {"poll:check": [0x12D801], "poll:wait": [0x12D90F],
                  "send": [0x12D5D0 + 0x2E5, 0x12D5D0 + 0x58B, 0x12D5D0 + 0xB15],
                  "sendmmsg": [0x12DED8], "recvfrom": [0x12DC27]},
        "pfcode": 0x12DF80, "slot": "rsp+0x99", "tls": ("libc", 0x1E4FE8, 0x20),
    },
}

def _file_offset(path: str, vaddr: int) -> int:
    """vaddr -> file offset by pyelftools (independent of the analyzer's own code)."""
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
                return vaddr - seg["p_vaddr"] + seg["p_offset"]
    raise AssertionError(f"{vaddr:#x} not in a PT_LOAD of {path}")


def _dynsym_value(path: str, name: str) -> int:
    with open(path, "rb") as f:
        sec = ELFFile(f).get_section_by_name(".dynsym")
        return next(s["st_value"] for s in sec.get_symbol_by_name(name) if s["st_shndx"] != "SHN_UNDEF")


def _calls_by_kind(calls: list[dict]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for c in calls:
        k = f"poll:{c['site']}" if c["kind"] == "poll" else c["kind"]
        out.setdefault(k, []).append(c["call_addr"])
    return {k: sorted(v) for k, v in out.items()}


def _snglkup_in_send_dg(obj: dict) -> list[dict]:
    return [w for w in obj["sticky_writers"] if w.get("in_send_dg") and w["bit"] == "RES_SNGLKUP"]


@pytest.fixture(scope="module")
def lab_roots():
    roots = {}
    for rel in LAB:
        r = rootfs(rel)
        assert r is not None, f"no {rel} rootfs"
        roots[rel] = r
    return roots


# ---------------------------------------------------------------------------------------
# 1. the lab root filesystems, stripped objects only
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", list(LAB))
def test_lab_rootfs_probe_set(rel, lab_roots, tmp_path):
    exp = LAB[rel]
    res = analyze_target(lab_roots[rel], LIBC, LIBRESOLV, cache_dir=str(tmp_path))
    assert res["send_dg_object"] == exp["object"], res["unknown_reason"]
    obj = res[exp["object"]]
    assert obj["provenance"] == "disassembly" and obj["cached"] is False and obj["has_send_dg"]
    other = res["libresolv" if exp["object"] == "libc" else "libc"]
    assert other is not None and not other["has_send_dg"] and other["send_dg"] is None

    (w,) = _snglkup_in_send_dg(obj)                       # exactly one SNGLKUP writer
    assert (w["addr"], w["insn"]) == exp["writer"]
    assert w["field"] == exp["field"] == res["sticky_field"]
    assert w["file_offset"] == _file_offset(obj["path"], w["addr"])
    assert [x["addr"] for x in obj["sticky_writers"] if x.get("in_send_dg") and x["bit"] == "RES_SNGLKUPREOP"] \
        == [exp["reop"]]

    lo, hi, cold = exp["send_dg"]
    sd = obj["send_dg"]
    assert (sd["start"], sd["end"]) == (lo, hi)
    assert [(c["start"], c["end"]) for c in sd["cold"]] == cold
    assert sd["file_offset"] == _file_offset(obj["path"], lo)

    assert _calls_by_kind(obj["calls"]) == exp["calls"]
    for c in obj["calls"]:
        assert c["ret_addr"] == c["call_addr"] + 5
        assert c["call_file_offset"] == _file_offset(obj["path"], c["call_addr"])
        assert c["ret_file_offset"] == _file_offset(obj["path"], c["ret_addr"])
    assert obj["probe_set_complete"] and obj["warnings"] == []

    libc = res["libc"]
    gai = _dynsym_value(libc["path"], "getaddrinfo")
    assert {k: libc["getaddrinfo"][k] for k in ("addr", "file_offset")} == \
        {"addr": gai, "file_offset": _file_offset(libc["path"], gai)}
    assert libc["getaddrinfo"]["returns"] and libc["getaddrinfo"]["tail_jumps"] == []

    tls_role, got, addend = exp["tls"]
    assert res[tls_role]["res_tls"]["got_addr"] == got and res[tls_role]["res_tls"]["addend"] == addend

    fix = obj["fix_30081"]
    assert fix["affected"] is exp["affected"] is res["affected_30081"], fix["reason"]
    assert fix["how"] == "instruction flow"
    assert fix["pfcode_test"] == exp["pfcode"] and fix["single_request_slot"] == exp["slot"]
    assert any(e["tests_single_request"] for e in fix["entries"]) is (not exp["affected"])


TLS_SLOTS = {   # the GOT slots of __resp's TPOFF64 relocations (send_dg-probes.md §8)
    "bullseye": {LIBC: 0x1CDFF0, LIBRESOLV: 0x16FD8},
    "bookworm": {LIBC: 0x1D2FC0, LIBRESOLV: 0xDFA8},
    "trixie": {LIBC: 0x1E4FE8, LIBRESOLV: 0xDFB8},
}


@pytest.mark.parametrize("rel", list(LAB))
def test_tls_slot_of_resp(rel, lab_roots):
    """tpoff_relocs (what passive sampling uses to find each thread's _res)."""
    for p in (LIBC, LIBRESOLV):
        host = os.path.realpath(os.path.join(lab_roots[rel], p.lstrip("/")))   # relative links only
        with open(host, "rb") as f:
            slots = tpoff_relocs(ELFFile(f))
        assert [off for off, _how in slots] == [TLS_SLOTS[rel][p]]


@pytest.mark.slow
@pytest.mark.parametrize("rel", list(LAB))
def test_prefilter_misses_no_writer(rel, lab_roots):
    """The byte prefilter finds the same writers as disassembling every function."""
    for p in (LIBC, LIBRESOLV):
        img = ElfImage(os.path.realpath(os.path.join(lab_roots[rel], p.lstrip("/"))))
        fast, _stats = find_sticky_writers(img)
        assert [w["addr"] for w in fast] == [w["addr"] for w in find_sticky_writers_slow(img)]


def test_cache_by_build_id_and_content(lab_roots, tmp_path):
    libc = os.path.join(lab_roots["trixie"], "lib/x86_64-linux-gnu/libc.so.6")
    a = analyze_object(libc, cache_dir=str(tmp_path))
    f = tmp_path / f"{a['build_id']}-v{ANALYZER_VERSION}.json"
    assert f.is_file() and json.loads(f.read_text())["sha256"] == a["sha256"]
    b = analyze_object(libc, cache_dir=str(tmp_path))
    assert a["cached"] is False and b["cached"] is True
    strip = ("cached", "load_ms", "path")
    assert {k: v for k, v in b.items() if k not in strip} == \
        json.loads(json.dumps({k: v for k, v in a.items() if k not in strip}))
    # a modified copy keeps the build-id but must not be served the original's result
    copy = tmp_path / "libc.so.6"
    data = bytearray(open(libc, "rb").read())
    off = a["fix_30081"]["single_request_set_by"]["addr"]       # movb $1, 0x99(%rsp)
    data[_file_offset(libc, off) + 7] = 2
    copy.write_bytes(bytes(data))
    c = analyze_object(str(copy), cache_dir=str(tmp_path))
    assert c["build_id"] == a["build_id"] and c["cached"] is False
    assert c["fix_30081"]["affected"] is None
    assert json.loads(f.read_text())["sha256"] == a["sha256"]    # the original's entry is kept


# ---------------------------------------------------------------------------------------
# 2. against the debug files (libc6-dbg of the rootfs's exact version)
# ---------------------------------------------------------------------------------------
def _debug_files(root: str) -> tuple[str, dict]:
    ident = identify_root(root)
    res = fetch_symbols(ident, Settings(sources=["debian"], timeout=60, progress=False),
                        SymbolCache(os.path.join(TEST_CACHE, "cache")))
    assert res.ok, [(o.name, o.error) for o in res.objects]
    return ident.package_version, {o.build_id: o.debug_file for o in res.objects}


def _data_build(version: str) -> dict | None:
    return next((b for b in load_data()["builds"] if b["version"] == version and b["arch"] == "amd64"), None)


@pytest.mark.slow
@pytest.mark.parametrize("rel", list(LAB))
def test_lab_rootfs_against_debug_files(rel, lab_roots, tmp_path):
    version, dbg = _debug_files(lab_roots[rel])
    res = analyze_target(lab_roots[rel], LIBC, LIBRESOLV, debug_files=dbg, cache_dir=str(tmp_path))
    obj = res[res["send_dg_object"]]
    assert obj["provenance"] == "disassembly+dwarf"
    chk = obj["dwarf_check"]
    det = chk["details"]
    assert chk["agrees"] is True, json.dumps(det, indent=1)
    for k in ("send_dg_bounds", "calls_symtab", "calls_dwarf", "struct_offsets", "single_request"):
        assert det[k]["agrees"] is True, (k, det[k])
    assert det["calls_symtab"]["count"] == det["calls_dwarf"]["count"] == len(obj["calls"]) == 7
    # the object without send_dg: its .symtab has none either
    other = res["libresolv" if res["send_dg_object"] == "libc" else "libc"]
    if other.get("dwarf_check"):
        assert other["dwarf_check"]["agrees"] is True
    b = _data_build(version)
    assert b is not None, f"{version} missing from debian-symbols/glibc-builds.json"
    assert b["objects"][{"libc": "libc.so.6", "libresolv": "libresolv.so.2"}[res["send_dg_object"]]][
        "build_id"] == obj["build_id"]
    assert res["affected_30081"] is b["bug30081"]["affected"]
    assert res["sticky_field"] == b["sticky_flag"]["field"]


# ---------------------------------------------------------------------------------------
# 3. every amd64 libc6 build the archive serves today
# ---------------------------------------------------------------------------------------
def _upstream(version: str) -> str:
    return re.match(r"^(\d+\.\d+)", version).group(1)


@pytest.mark.slow
def test_archive_sweep(tmp_path):
    listing = list_builds()
    builds = listing["builds"]
    suites_with = {s for b in builds for s in b["suites"]}
    for s in ("bullseye", "bullseye-security", "bookworm", "bookworm-security", "trixie", "sid"):
        assert s in suites_with, listing["suites"]
    rows, by_table = [], []
    for b in builds:
        f = fetch_build(b)
        assert fetch_build(b)["downloaded"] is False            # second run: no download
        t0 = time.perf_counter()
        res = analyze_target("/", f["libc"], f["libresolv"], cache_dir=str(tmp_path))
        ms = (time.perf_counter() - t0) * 1e3
        want_obj = "libresolv" if _upstream(b["version"]) < "2.34" else "libc"
        assert res["send_dg_object"] == want_obj, (b["version"], res["unknown_reason"])
        obj = res[want_obj]
        (w,) = _snglkup_in_send_dg(obj)
        assert obj["probe_set_complete"], (b["version"], obj["warnings"])
        assert res["affected_30081"] is not None, (b["version"], res["unknown_reason"])
        data = _data_build(b["version"])
        if data is not None:
            soname = {"libc": "libc.so.6", "libresolv": "libresolv.so.2"}[want_obj]
            assert obj["build_id"] == data["objects"][soname]["build_id"], b["version"]
            assert res["affected_30081"] is data["bug30081"]["affected"], b["version"]
            assert res["sticky_field"] == data["sticky_flag"]["field"], b["version"]
        else:
            vt = version_table("debian", b["version"], _upstream(b["version"]))
            assert vt["affected"] is not None and res["affected_30081"] is vt["affected"], (b["version"], vt)
            by_table.append(b["version"])
        rows.append({"version": b["version"], "suites": b["suites"], "object": want_obj,
                     "writer": f"{w['addr']:#x} {w['insn']}", "field": w["field"],
                     "send_dg": f"{obj['send_dg']['start']:#x}", "calls": len(obj["calls"]),
                     "affected": res["affected_30081"], "ms": round(ms, 1),
                     "analysis_ms": obj["timing_ms"]["total"], "checked_by": "version-table"
                     if b["version"] in by_table else "glibc-builds.json"})
    print("\n" + "\n".join(json.dumps(r) for r in rows))
    assert len(rows) >= 6


# ---------------------------------------------------------------------------------------
# 4. cannot decide: a reason, never a guess
# ---------------------------------------------------------------------------------------
def _patched(src: str, dst, patches: list[tuple[int, bytes, bytes]]) -> str:
    data = bytearray(open(src, "rb").read())
    for off, old, new in patches:
        assert data[off:off + len(old)] == old, (hex(off), data[off:off + len(old)].hex())
        data[off:off + len(new)] = new
    dst.write_bytes(bytes(data))
    return str(dst)


@pytest.fixture(scope="module")
def trixie_libc(lab_roots):
    return os.path.join(lab_roots["trixie"], "lib/x86_64-linux-gnu/libc.so.6")


def test_no_writer_means_no_send_dg(trixie_libc, tmp_path):
    a = analyze_object(trixie_libc, cache_dir=str(tmp_path))
    (w,) = _snglkup_in_send_dg(a)
    imm_at = w["file_offset"] + w["length"] - 4
    p = _patched(trixie_libc, tmp_path / "libc.so.6", [(imm_at, b"\x00\x00\x20\x00", b"\x00\x00\x00\x01")])
    r = analyze_object(p, cache_dir=str(tmp_path / "c2"))
    assert r["has_send_dg"] is False and r["send_dg"] is None and r["calls"] == []
    assert "no sticky-bit writer in a function that calls poll" in r["unknown_reason"]
    assert r["fix_30081"]["affected"] is None
    # the resolv.conf option parser still sets RES_SNGLKUP: it is reported, not taken for send_dg
    assert any(x["bit"] == "RES_SNGLKUP" for x in r["sticky_writers"])


def test_no_pfcode_test_means_unknown(trixie_libc, tmp_path):
    a = analyze_object(trixie_libc, cache_dir=str(tmp_path))
    off = _file_offset(trixie_libc, a["fix_30081"]["pfcode_test"])
    # cmpq $0, 0x180(%r14) = 49 83 be 80 01 00 00 00 -> disp 0x188
    p = _patched(trixie_libc, tmp_path / "libc.so.6", [(off, bytes.fromhex("4983be80010000"),
                                                        bytes.fromhex("4983be88010000"))])
    r = analyze_object(p, cache_dir=str(tmp_path / "c2"))
    assert r["has_send_dg"] and r["probe_set_complete"]
    assert r["fix_30081"]["affected"] is None and "pfcode" in r["fix_30081"]["reason"]


def test_no_single_request_home_means_unknown(trixie_libc, tmp_path):
    a = analyze_object(trixie_libc, cache_dir=str(tmp_path))
    home = a["fix_30081"]["single_request_set_by"]
    assert home["insn"] == "movb $1, 0x99(%rsp)"
    off = _file_offset(trixie_libc, home["addr"])
    p = _patched(trixie_libc, tmp_path / "libc.so.6", [(off, bytes.fromhex("c684249900000001"),
                                                        bytes.fromhex("c684249900000000"))])
    r = analyze_object(p, cache_dir=str(tmp_path / "c2"))
    assert r["has_send_dg"]
    assert r["fix_30081"]["affected"] is None and "single_request" in r["fix_30081"]["reason"]
    t = analyze_target("/", p, None, cache_dir=str(tmp_path / "c2"))
    assert t["send_dg_object"] == "libc" and t["affected_30081"] is None and t["unknown_reason"]


def test_two_candidate_writers_is_not_guessed(lab_roots, tmp_path):
    """Two send_dg candidates in one target (libc 2.41 and libresolv 2.31 side by side) ->
    no pick.  (Two candidates inside one object cannot be made by patching bytes in
    place: no other function of these objects calls poll, recvfrom and send.)"""
    bull = os.path.join(lab_roots["bullseye"], "lib/x86_64-linux-gnu/libresolv-2.31.so")
    trixie = os.path.join(lab_roots["trixie"], "lib/x86_64-linux-gnu/libc.so.6")
    t = analyze_target("/", trixie, bull, cache_dir=str(tmp_path))
    assert t["send_dg_object"] is None and t["affected_30081"] is None
    assert "both" in t["unknown_reason"]
