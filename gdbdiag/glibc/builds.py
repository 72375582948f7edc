"""The glibc builds Debian's archive serves today, and their resolver objects.

* :func:`list_builds` — every ``libc6`` version (one architecture) listed in the signed
  Packages indexes of the given suites.  Each index comes through the verified path of
  :class:`gdbdiag.symbols.archive.DebianArchive` (InRelease checked with gpgv ->
  Packages by its SHA256 -> entries).
* :func:`fetch_build` — download one build's ``libc6`` .deb (checked by the SHA256 in
  that Packages index), extract only ``libc.so.6`` and ``libresolv.so.2`` (plus the
  ``libc-2.31.so`` / ``libresolv-2.31.so`` files they link to in older builds), and keep
  them under ``<cache>/glibc-builds/<version>/`` so that a second run downloads nothing.

Used by the analyzer's archive-sweep test; meant for a CLI too.
"""
from __future__ import annotations

import json
import os
import re
import shutil

from ..errors import GdbdiagError
from ..symbols import extract
from ..symbols.archive import Context, DebianArchive, Settings, SourceError
from ..symbols.cache import SymbolCache, atomic_write_json, default_cache_dir

__all__ = ["DEFAULT_SUITES", "list_builds", "fetch_build", "builds_dir", "BuildError"]

# (suite, which mirror)
DEFAULT_SUITES = ["bullseye", "bullseye-security", "bullseye-updates", "bookworm", "bookworm-security",
                  "bookworm-updates", "trixie", "trixie-security", "trixie-updates", "sid", "experimental"]
_WANTED = re.compile(r"^(?:usr/)?lib/x86_64-linux-gnu/"
                     r"(libc\.so\.6|libc-[\d.]+\.so|libresolv\.so\.2|libresolv-[\d.]+\.so)$")
META = "build.json"


class BuildError(GdbdiagError):
    """A build could not be fetched or extracted (str() is the reason)."""


def builds_dir(cache_dir: str | None = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), "glibc-builds")


def _archive(cache_dir: str | None, settings: Settings | None) -> DebianArchive:
    s = settings or Settings(timeout=60, progress=False)
    return DebianArchive(Context(s, SymbolCache(cache_dir)))


def _base_for(arc: DebianArchive, suite: str) -> str:
    s = arc.ctx.settings
    return s.debian_security_mirror if suite.endswith("-security") else s.debian_mirror


def list_builds(suites=None, arch: str = "amd64", package: str = "libc6", cache_dir: str | None = None,
                settings: Settings | None = None) -> dict:
    """{"builds": [{version, arch, package, suites, base, entry}], "suites": {suite: status}}.

    ``entry`` is the verified Packages entry (Filename, Size, SHA256).  A suite that does
    not exist (no InRelease) or has no ``package`` is reported in ``suites``, not raised.
    Versions are in the order first seen (suite order)."""
    arc = _archive(cache_dir, settings)
    builds: dict[str, dict] = {}
    status: dict[str, str] = {}
    for suite in suites or DEFAULT_SUITES:
        base = _base_for(arc, suite)
        try:
            idx, signer, notes = arc.packages(base, suite, arch)
        except SourceError as e:
            status[suite] = f"skipped: {e}"
            continue
        except Exception as e:          # network: FetchError and friends
            status[suite] = f"error: {e}"
            continue
        ents = [e for e in idx.get(package, []) if e["Architecture"] == arch]
        status[suite] = f"{len(ents)} {package} build(s); InRelease signed by {signer}" + (
            f"; {'; '.join(notes)}" if notes else "")
        for e in ents:
            b = builds.setdefault(e["Version"], {"version": e["Version"], "arch": arch, "package": package,
                                                 "suites": [], "base": base, "entry": e})
            if b["entry"]["SHA256"] != e["SHA256"]:
                status[suite] += f"; {e['Version']} differs from {b['suites'][0]}'s (kept the first)"
                continue
            b["suites"].append(suite)
    return {"builds": list(builds.values()), "suites": status}


def _extract(deb: str, dest: str) -> dict:
    """Extract the wanted libraries (files and the symlinks between them) into ``dest``."""
    files, links = {}, {}
    with extract.open_data_tar(deb) as tf:
        for m in tf:
            name = m.name[2:] if m.name.startswith("./") else m.name.lstrip("/")
            mm = _WANTED.match(name)
            if not mm:
                continue
            base = mm.group(1)
            if m.issym():
                links[base] = os.path.basename(m.linkname)
            elif m.isreg():
                src = tf.extractfile(m)
                with open(os.path.join(dest, base), "wb") as o:
                    shutil.copyfileobj(src, o, 1 << 20)
                files[base] = name
    for base, target in links.items():
        if target not in files:
            raise BuildError(f"{base} -> {target}: link target not in the package")
        os.symlink(target, os.path.join(dest, base))
    for want in ("libc.so.6", "libresolv.so.2"):
        if want not in files and want not in links:
            raise BuildError(f"no {want} in {os.path.basename(deb)}")
    return {"files": files, "links": links}


def fetch_build(build: dict, cache_dir: str | None = None, settings: Settings | None = None) -> dict:
    """The extracted objects of one build from :func:`list_builds`: {version, dir, libc,
    libresolv, libresolv_real, downloaded}.  Cached by version (and checked against the
    .deb's SHA256 recorded at extraction)."""
    d = os.path.join(builds_dir(cache_dir), build["version"].replace("/", "_"))
    meta_p = os.path.join(d, META)
    meta = None
    try:
        with open(meta_p) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        pass
    downloaded = False
    if meta is None or meta.get("deb_sha256") != build["entry"]["SHA256"]:
        meta = _download_and_extract(build, d, cache_dir, settings)
        downloaded = True
    return {"version": build["version"], "dir": d, "libc": os.path.join(d, "libc.so.6"),
            "libresolv": os.path.join(d, "libresolv.so.2"),
            "libresolv_real": os.path.realpath(os.path.join(d, "libresolv.so.2")),
            "suites": meta.get("suites"), "downloaded": downloaded}


def _download_and_extract(build: dict, d: str, cache_dir, settings) -> dict:
    arc = _archive(cache_dir, settings)
    parent = os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
    work = arc.ctx.cache.tmpdir()
    staging = os.path.join(parent, f".tmp-{os.path.basename(d)}-{os.getpid()}")
    try:
        deb = arc.download(build["entry"], build["base"], work)      # SHA256-checked
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        got = _extract(deb, staging)
        meta = {"version": build["version"], "package": build["package"], "arch": build["arch"],
                "suites": build["suites"], "filename": build["entry"]["Filename"],
                "deb_sha256": build["entry"]["SHA256"],
                "verified": ["InRelease gpgv", "Packages SHA256", ".deb SHA256"], **got}
        atomic_write_json(os.path.join(staging, META), meta)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(staging, d)
        return meta
    except (SourceError, extract.ExtractError) as e:
        raise BuildError(f"{build['version']}: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
