"""The project's data about glibc builds it has verified (``debian-symbols/``), and
``gdbdiag check``: is this target's build affected by bug 30081?

Data file (``debian-symbols/glibc-builds.json``, written by
``scripts/refresh-debian-symbols``)::

    {"schema": "gdbdiag.debian-symbols/1", "generated": "...", "builds": [
      {"distro": "debian", "package": "libc6", "version": "2.31-13+deb11u11", "arch": "amd64",
       "glibc": "2.31", "suites": ["bullseye"], "first_seen": "...", "last_seen": "...",
       "objects": {"libc.so.6": {"build_id": "...", "path": "/lib/x86_64-linux-gnu/libc-2.31.so"}, ...},
       "send_dg_object": "libresolv.so.2",
       "sticky_flag": {"field": "options", "by": "code", "evidence": "..."},
       "bug30081": {"affected": true, "fixed_by": "code", "evidence": "...",
                    "version_table": {"affected": true, "reason": "..."}}}]}

``fixed_by`` is ``"code"`` when the verdict comes from the source Debian built
(``.debian.tar.xz`` patches / upstream ``res_send.c``), ``"version-table"`` when only
the version could decide.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .analyze import version_table
from .cache import atomic_write_bytes
from .identify import TargetIdent

__all__ = ["SCHEMA", "default_data_path", "load_data", "save_data", "match_build", "check_target"]

SCHEMA = "gdbdiag.debian-symbols/1"


def default_data_path() -> str:
    env = os.environ.get("GDBDIAG_DEBIAN_SYMBOLS")
    if env:
        return env
    return str(Path(__file__).resolve().parents[2] / "debian-symbols" / "glibc-builds.json")


def load_data(path: str | None = None) -> dict:
    p = path or default_data_path()
    try:
        with open(p) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {"schema": SCHEMA, "builds": []}
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{p}: unknown schema {data.get('schema')!r}")
    return data


def save_data(data: dict, path: str | None = None):
    data = dict(data)
    data["schema"] = SCHEMA
    data["builds"] = sorted(data.get("builds", []), key=lambda b: (b.get("distro", ""), b.get("arch", ""),
                                                                   b.get("glibc", ""), b.get("version", "")))
    atomic_write_bytes(path or default_data_path(), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def match_build(data: dict, ident: TargetIdent) -> tuple[dict | None, str | None]:
    """(build, how): by the build-id of any of the target's objects first, then by
    (distro, package version, arch)."""
    bids = {o.build_id for o in ident.objects if o.build_id}
    for b in data.get("builds", []):
        if bids & {o.get("build_id") for o in b.get("objects", {}).values()}:
            return b, "build-id"
    distro = ident.distro.get("id") or ("debian" if (ident.glibc_banner or "").startswith("Debian") else None)
    for b in data.get("builds", []):
        if (b.get("version") == ident.package_version and ident.package_version
                and b.get("arch") == (ident.arch or b.get("arch"))
                and (distro is None or b.get("distro") == distro)):
            return b, "package-version"
    return None, None


def check_target(ident: TargetIdent, data: dict | None = None) -> dict:
    """Verdict for the target: {"affected": True/False/None, "matched_by", "sticky_field",
    "send_dg_object", "fixed_by", "evidence", "build"}."""
    data = data if data is not None else load_data()
    b, how = match_build(data, ident)
    out = {"target": {"pid": ident.pid, "mode": ident.mode, "distro": ident.distro,
                      "glibc": ident.glibc_version, "package_version": ident.package_version,
                      "arch": ident.arch,
                      "build_ids": {o.name: o.build_id for o in ident.objects}},
           "matched_by": how, "build": b}
    if b is not None:
        bug = b.get("bug30081", {})
        out.update(affected=bug.get("affected"), fixed_by=bug.get("fixed_by"), evidence=bug.get("evidence"),
                   sticky_field=(b.get("sticky_flag") or {}).get("field"), send_dg_object=b.get("send_dg_object"))
        if how == "package-version":
            out["note"] = ("matched by package version only: the target's build-ids are not in the data "
                           "(rebuilt or patched locally?)")
        return out
    vt = version_table(ident.distro.get("id"), ident.package_version, ident.glibc_version)
    from .identify import resolver_sonames
    out.update(affected=vt["affected"], fixed_by="version-table", evidence=vt["reason"],
               sticky_field=vt["sticky_field"],
               send_dg_object="libc.so.6" if resolver_sonames(ident.glibc_version) == ["libc.so.6"] else "libresolv.so.2",
               note="build not in debian-symbols data: decided from the version alone")
    return out
