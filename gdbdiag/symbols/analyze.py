"""What a glibc build does about bug 30081, decided from its code where possible.

* :func:`analyze_send_dg` — which object defines ``send_dg`` and which field of
  ``struct __res_state`` it ORs the sticky bit into: gdbdiag.glibc's analyzer (the one
  home of this knowledge), cross-checked with DWARF when the debug file is at hand.
* :func:`source_has_30081_fix` — from the exact source Debian built (signed Sources
  index → ``.debian.tar.xz`` patches, and the upstream ``res_send.c`` when needed):
  does the error-answer path read ``if (buf2 != NULL && !single_request)`` (the fix,
  upstream commit af625987) or ``if (buf2 != NULL)``.
* :func:`version_table` — the fallback when no code can be inspected.
"""
from __future__ import annotations

import io
import lzma
import os
import re
import tarfile

from .identify import version_tuple

__all__ = ["analyze_send_dg", "version_table", "source_has_30081_fix", "FIX_RE", "UNFIXED_RE"]

SNGLKUP = 0x200000
SNGLKUPREOP = 0x400000

FIX_RE = re.compile(r"if\s*\(\s*buf2\s*!=\s*NULL\s*&&\s*!\s*single_request\s*\)")
UNFIXED_RE = re.compile(r"if\s*\(\s*buf2\s*!=\s*NULL\s*\)")


def analyze_send_dg(objects: list[tuple[str, str]], debug_dirs: list[str]) -> dict:
    """Which of ``objects`` [(soname, host path)] holds ``send_dg`` and where its sticky
    bit lives, from the code (gdbdiag.glibc's analyzer; a debug file found in
    ``debug_dirs`` by build-id makes it cross-check against DWARF).

    Returns {"send_dg_object", "sticky_field", "writes", "affected", "evidence"}."""
    from ..glibc.analyzer import analyze_object
    res = {"send_dg_object": None, "sticky_field": None, "writes": [], "affected": None,
           "evidence": None}
    for soname, path in objects:
        a = analyze_object(path)
        dbg = next((p for d in debug_dirs if a.get("build_id") for p in
                    [os.path.join(d, ".build-id", a["build_id"][:2], a["build_id"][2:] + ".debug")]
                    if os.path.exists(p)), None)
        if dbg:
            a = analyze_object(path, debug_file=dbg)
        if not a.get("send_dg"):
            continue
        w = [x for x in a["sticky_writers"] if x.get("in_send_dg") and x["bit"] == "RES_SNGLKUP"]
        res.update(send_dg_object=soname, sticky_field=a["sticky_field"],
                   writes=[x["insn"] for x in w], affected=a["fix_30081"]["affected"])
        check = (a.get("dwarf_check") or {}).get("agrees")
        res["evidence"] = (f"send_dg sets 0x{SNGLKUP:x} with `{w[0]['insn']}` at {w[0]['addr']:#x} "
                           f"(disassembly{', agrees with DWARF' if check else ''}); "
                           f"{a['sticky_field']} of struct __res_state")
        return res
    res["evidence"] = "send_dg not found in " + ", ".join(s for s, _ in objects)
    return res


def version_table(distro: str | None, package_version: str | None, glibc_version: str | None) -> dict:
    """The fallback verdict from versions alone: {"affected", "sticky_field", "reason"}
    ("affected" None = cannot tell from the version)."""
    g = version_tuple(glibc_version)
    pv = package_version or ""
    if g and g >= (2, 41):
        return {"affected": False, "sticky_field": "_flags", "reason": "glibc >= 2.41 has the upstream fix (af625987)"}
    m = re.match(r"^2\.36-9\+deb12u(\d+)", pv)
    if m:
        n = int(m.group(1))
        if n >= 9:
            return {"affected": False, "sticky_field": "_flags",
                    "reason": "Debian 2.36-9+deb12u9 and later carry the backport"}
        return {"affected": True, "sticky_field": "options", "reason": "Debian bookworm before 2.36-9+deb12u9"}
    if g and g < (2, 34):
        return {"affected": True, "sticky_field": "options",
                "reason": f"glibc {glibc_version}: no upstream branch below 2.34 received the fix"}
    if g and (2, 34) <= g < (2, 41):
        return {"affected": None, "sticky_field": None,
                "reason": f"glibc {glibc_version}: release branch got the fix in July 2024; depends on the distro's update"}
    return {"affected": None, "sticky_field": None, "reason": "unknown glibc version"}


def _scan_patches(debian_tar_xz: bytes) -> tuple[str | None, list[str]]:
    """(patch file adding the fix, series) from a .debian.tar.xz."""
    series: list[str] = []
    patches: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(debian_tar_xz), mode="r:*") as tf:
        for m in tf:
            if not m.isreg():
                continue
            n = m.name
            if n.endswith("debian/patches/series"):
                series = [ln.split()[0] for ln in tf.extractfile(m).read().decode("utf-8", "replace").splitlines()
                          if ln.strip() and not ln.startswith("#")]
            elif "/debian/patches/" in f"/{n}" and m.size < (64 << 20):
                patches[n.split("debian/patches/", 1)[1]] = tf.extractfile(m).read().decode("utf-8", "replace")
    for name in series:
        text = patches.get(name, "")
        for line in text.splitlines():
            if line.startswith("+") and FIX_RE.search(line):
                return name, series
    return None, series


def _upstream_res_send(orig_tar_xz_path: str) -> str | None:
    with lzma.open(orig_tar_xz_path) as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
        for m in tf:
            if m.isreg() and m.name.endswith("/resolv/res_send.c"):
                return tf.extractfile(m).read().decode("utf-8", "replace")
    return None


def source_has_30081_fix(archive, version: str, suites, work: str, orig_cache: dict | None = None) -> dict:
    """Decide from Debian's source package of glibc ``version`` whether send_dg has the
    30081 fix.  ``archive`` is a :class:`~gdbdiag.symbols.archive.DebianArchive`.
    Returns {"fixed": bool|None, "evidence": str}."""
    ent = archive.find_source("glibc", version, suites)
    if ent is None:
        return {"fixed": None, "evidence": f"glibc {version} source not found in the archive"}
    files = {f["name"]: f for f in ent["files"]}
    deb_tar = next((n for n in files if n.endswith(".debian.tar.xz")), None)
    if deb_tar is None:
        return {"fixed": None, "evidence": "no .debian.tar.xz in the source package"}
    p = archive.download_source_file(ent, deb_tar, work)
    with open(p, "rb") as f:
        data = f.read()
    os.unlink(p)
    patch, _series = _scan_patches(data)
    if patch:
        return {"fixed": True, "evidence": f"{deb_tar}: debian/patches/{patch} adds `if (buf2 != NULL && !single_request)`"}
    orig = next((n for n in files if ".orig.tar." in n and n.endswith(".xz")), None)
    if orig is None:
        return {"fixed": None, "evidence": "no upstream tarball listed"}
    key = files[orig]["sha256"]
    if orig_cache is not None and key in orig_cache:
        upstream = orig_cache[key]
    else:
        op = archive.download_source_file(ent, orig, work)
        try:
            text = _upstream_res_send(op)
        finally:
            os.unlink(op)
        upstream = None if text is None else bool(FIX_RE.search(text))
        if upstream is False and text is not None and not UNFIXED_RE.search(text):
            upstream = None
        if orig_cache is not None:
            orig_cache[key] = upstream
    if upstream is True:
        return {"fixed": True, "evidence": f"{orig}: resolv/res_send.c has `if (buf2 != NULL && !single_request)`"}
    if upstream is False:
        return {"fixed": False, "evidence": f"{orig}: resolv/res_send.c has `if (buf2 != NULL)` on the error path "
                                            f"and no patch of {deb_tar} changes it"}
    return {"fixed": None, "evidence": f"{orig}: send_dg error path not recognised"}
