"""Refresh ``debian-symbols/`` from Debian's archive (``scripts/refresh-debian-symbols``).

For the current libc6 of each suite (bullseye, bookworm, trixie, each with -security
and -updates, and sid), on amd64: download ``libc6`` and ``libc6-dbg`` (signed chain),
record the build-ids of libc.so.6 / libresolv.so.2 / libnss_dns.so.2, find ``send_dg``
and the sticky flag's field from the code (gdb on the verified debug files), and decide
bug 30081 from the source Debian built.  Builds already in the data are kept (old
containers still run them); known ones are not downloaded again unless ``--force``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from . import analyze, extract
from .cache import SymbolCache
from .debdata import default_data_path, load_data, save_data
from .identify import LIBC, LIBNSS_DNS, LIBRESOLV, ObjectIdent, TargetIdent, _which, resolver_sonames
from .archive import Context, DebianArchive, Settings, SourceError
from .sources import fetch_symbols

ROLES = (LIBC, LIBRESOLV, LIBNSS_DNS)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def current_versions(archive: DebianArchive, arch: str, log) -> dict[str, list[tuple[str, str]]]:
    """{libc6 version: [(base, suite), ...]} over all suites (libc6-dbg must exist too)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for base, suite in archive.all_suites():
        try:
            idx, _signer, _notes = archive.packages(base, suite, arch)
        except SourceError as e:
            log(f"  {suite}: {e}")
            continue
        dbg = {e["Version"] for e in idx.get("libc6-dbg", []) if e["Architecture"] == arch}
        for e in idx.get("libc6", []):
            if e["Architecture"] == arch and e["Version"] in dbg:
                out.setdefault(e["Version"], []).append((base, suite))
    return out


def build_entry(archive: DebianArchive, ctx: Context, version: str, where, arch: str, settings: Settings,
                cache: SymbolCache, orig_cache: dict, log) -> dict:
    work = cache.tmpdir()
    try:
        ent, base, suite, _signer, _notes = archive.find("libc6", version, arch, where)
        deb = archive.download(ent, base, work)
        elfs = extract.extract_elf_members(
            deb, lambda n: _which(os.path.basename(n)) is not None and "/debug/" not in n, work,
            use_dpkg=settings.use_dpkg)
        os.unlink(deb)
        objs: dict[str, ObjectIdent] = {}
        paths: dict[str, str] = {}
        for member, path, facts in elfs:
            role = _which(os.path.basename(member))
            if role and facts.soname == role and role not in objs:
                objs[role] = ObjectIdent(name=role, path="/" + member, host_path=path, loaded=False,
                                         build_id=facts.build_id, arch=facts.arch, soname=facts.soname,
                                         package="libc6", package_version=version)
                paths[role] = path
        if LIBC not in objs:
            raise SourceError(f"no libc.so.6 in libc6 {version}")
        glibc = version.split("-")[0]
        for o in objs.values():
            o.glibc_version = glibc
        ident = TargetIdent(kind="file", mode="file", root="/", distro={"id": "debian"}, glibc_version=glibc,
                            package="libc6", package_version=version, package_version_from="archive",
                            arch=arch, objects=[objs[r] for r in ROLES if r in objs])
        res = fetch_symbols(ident, Settings(**{**settings.__dict__, "sources": ["debian"]}), cache)
        if not res.ok:
            raise SourceError(f"libc6-dbg {version}: " + "; ".join(o.error or "" for o in res.objects if o.error))
        order = [r for r in (LIBRESOLV, LIBC) if r in paths] if len(resolver_sonames(glibc)) > 1 else [LIBC]
        code = analyze.analyze_send_dg([(r, paths[r]) for r in order], [cache.debug_dir])
        fam = [w for w in archive.suites_for(version)]
        try:
            src = analyze.source_has_30081_fix(archive, version, fam + [w for w in where if w not in fam], work,
                                               orig_cache)
        except SourceError as e:
            src = {"fixed": None, "evidence": f"source not available: {e}"}
        vt = analyze.version_table("debian", version, glibc)
        if src["fixed"] is not None:
            bug = {"affected": not src["fixed"], "fixed_by": "code", "evidence": src["evidence"]}
        else:
            bug = {"affected": vt["affected"], "fixed_by": "version-table", "evidence": vt["reason"],
                   "code_check": src["evidence"]}
        bug["version_table"] = {"affected": vt["affected"], "reason": vt["reason"]}
        if vt["affected"] is not None and bug["affected"] != vt["affected"]:
            log(f"  NOTE {version}: code says affected={bug['affected']}, version table says {vt['affected']}")
        sticky = ({"field": code["sticky_field"], "by": "code", "evidence": code["evidence"]}
                  if code["sticky_field"] else
                  {"field": vt["sticky_field"], "by": "version-table", "evidence": code["evidence"]})
        return {
            "distro": "debian", "package": "libc6", "version": version, "arch": arch, "glibc": glibc,
            "objects": {r: {"build_id": objs[r].build_id, "path": objs[r].path} for r in ROLES if r in objs},
            "send_dg_object": code["send_dg_object"],
            "sticky_flag": sticky,
            "bug30081": bug,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def refresh(data_path: str | None = None, cache_dir: str | None = None, arch: str = "amd64", force: bool = False,
            settings: Settings | None = None, log=lambda m: print(m, file=sys.stderr)) -> dict:
    settings = settings or Settings()
    cache = SymbolCache(cache_dir)
    ctx = Context(settings, cache)
    archive = DebianArchive(ctx)
    data = load_data(data_path)
    builds = {(b["distro"], b["version"], b["arch"]): b for b in data.get("builds", [])}
    log("reading suites …")
    versions = current_versions(archive, arch, log)
    orig_cache = dict(data.get("upstream_res_send_fixed", {}))
    now = _now()
    for version, where in sorted(versions.items()):
        suites = sorted({s for _b, s in where})
        key = ("debian", version, arch)
        old = builds.get(key)
        if old and not force and old.get("objects") and old.get("bug30081"):
            log(f"{version}: known ({', '.join(suites)})")
        else:
            log(f"{version}: analysing ({', '.join(suites)}) …")
            try:
                entry = build_entry(archive, ctx, version, where, arch, settings, cache, orig_cache, log)
            except SourceError as e:
                log(f"  {version}: FAILED: {e}")
                continue
            entry["first_seen"] = (old or {}).get("first_seen", now)
            builds[key] = old = entry
            b = entry["bug30081"]
            log(f"  send_dg in {entry['send_dg_object']}, sticky flag in {entry['sticky_flag']['field']} "
                f"({entry['sticky_flag']['by']}), 30081 affected={b['affected']} ({b['fixed_by']})")
        old["suites"] = sorted(set(old.get("suites", [])) | set(suites))
        old["current_in"] = suites
        old["last_seen"] = now
    for k, b in builds.items():
        if k[1] not in versions:
            b["current_in"] = []
    data["builds"] = list(builds.values())
    data["generated"] = now
    data["upstream_res_send_fixed"] = orig_cache
    save_data(data, data_path)
    log(f"wrote {data_path or default_data_path()} ({len(builds)} builds)")
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="refresh-debian-symbols", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help=f"data file (default {default_data_path()})")
    ap.add_argument("--cache", default=None, help="symbol cache (default: the user cache)")
    ap.add_argument("--arch", default="amd64")
    ap.add_argument("--force", action="store_true", help="re-analyse builds already in the data")
    ap.add_argument("--debian-mirror", default=None)
    ap.add_argument("--debian-security-mirror", default=None)
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args(argv)
    s = Settings(timeout=a.timeout)
    if a.debian_mirror:
        s.debian_mirror = a.debian_mirror
    if a.debian_security_mirror:
        s.debian_security_mirror = a.debian_security_mirror
    refresh(a.data, a.cache, a.arch, a.force, s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
