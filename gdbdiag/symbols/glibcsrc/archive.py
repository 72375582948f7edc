"""glibc's Debian source package at one version, through the signed chain.

InRelease (gpgv, Debian archive keyrings) → ``main/source/Sources`` (SHA256 from
InRelease) → ``.dsc``, ``.orig.tar.xz``, ``.debian.tar.xz`` (SHA256 and size from the
Sources entry; the ``.dsc``'s own checksums must agree), then only the wanted part of
each tarball is unpacked (:data:`~.tree.EXTRACT` of the upstream tree, ``debian/patches/``
of the Debian one).
"""
from __future__ import annotations

import lzma
import os
import shutil
import tarfile
from dataclasses import dataclass, field

from ...errors import one_line
from ..archive import SourceError
from ..net import FetchError
from .tree import PACKAGE, GlibcSourceError, SourceNotFound, _safe_rel, _wanted

#: what is kept from the Debian tarball
DEBIAN_KEEP = "debian/patches/"


def _extract_orig(path: str, tree: str) -> list[str]:
    """Stream the upstream tarball; write the :data:`EXTRACT` members under ``tree``."""
    got = []
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                rel = _safe_rel(m.name, 1)
                if rel is None or not m.isreg() or not _wanted(rel):
                    continue
                dst = os.path.join(tree, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with tf.extractfile(m) as src, open(dst, "xb") as out:
                    shutil.copyfileobj(src, out)
                got.append(rel)
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as e:
        raise GlibcSourceError(f"{os.path.basename(path)}: cannot unpack ({one_line(e)})") from None
    return got


def _read_debian_patches(path: str) -> tuple[str | None, dict[str, bytes]]:
    """(series text, {name under debian/patches/: bytes}) from the Debian tarball."""
    patches: dict[str, bytes] = {}
    series = None
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                rel = _safe_rel(m.name, 0)
                if rel is None or not m.isreg() or not rel.startswith(DEBIAN_KEEP):
                    continue
                name = rel[len(DEBIAN_KEEP):]
                data = tf.extractfile(m).read()
                if name == "series":
                    series = data.decode("utf-8", "replace")
                else:
                    patches[name] = data
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as e:
        raise GlibcSourceError(f"{os.path.basename(path)}: cannot unpack ({one_line(e)})") from None
    return series, patches


def _entries(archive, version: str, suites):
    """Yield (Sources entry + base/suite, base, suite, signer, notes) of glibc ``version``
    for each suite that lists it, in order; then raise SourceNotFound /
    GlibcSourceError if none did."""
    errors, tried, hits = [], [], 0
    for base, suite in suites:
        tried.append(suite)
        try:
            idx, signer, notes = archive.sources(base, suite)
        except (SourceError, FetchError) as e:
            errors.append(one_line(e))
            continue
        ent = idx.get(version)
        if ent and ent.get("Package") == PACKAGE:
            hits += 1
            yield dict(ent, base=base, suite=suite), base, suite, signer, notes
    if hits:
        return
    if errors and len(errors) == len(tried):
        more = f" (and {len(errors) - 1} more suite(s) failed)" if len(errors) > 1 else ""
        raise GlibcSourceError(f"glibc source index unreadable: {errors[0]}{more}")
    msg = f"glibc source {version} is in none of {', '.join(tried)}"
    if errors:
        msg += f"; {len(errors)} suite(s) unreadable: {errors[0]}"
    raise SourceNotFound(msg)


class _PoolMissing(GlibcSourceError):
    """Listed in a suite's Sources, but not in its pool (another suite may have it)."""


def _download(archive, ent: dict, suite: str, dl: str) -> tuple[str, str, str, list[str]]:
    """(.dsc, orig tarball, Debian tarball) paths and the .dsc's file list, each checked
    by SHA256 and size against ``ent`` (the verified Sources entry)."""
    files = {f["name"]: f for f in ent["files"]}
    dsc = next((n for n in files if n.endswith(".dsc")), None)
    if dsc is None:
        raise GlibcSourceError(f"glibc {ent['Version']} in {suite}: no .dsc listed in Sources")

    def get(name: str) -> str:
        try:
            return archive.download_source_file(ent, name, dl)
        except SourceError as e:
            if str(e).startswith(("HTTP 404", "HTTP 410")):
                raise _PoolMissing(f"{ent['base'].rstrip('/')}/{ent['Directory']}/{name}") from None
            raise GlibcSourceError(one_line(e)) from None

    dsc_path = get(dsc)
    tarballs = _dsc_tarballs(dsc_path, files, suite)
    orig = next((n for n in tarballs if ".orig.tar." in n and not n.endswith(".asc")), None)
    deb_tar = next((n for n in tarballs if ".debian.tar." in n), None)
    if orig is None or deb_tar is None:
        raise GlibcSourceError(f"{dsc}: expected an .orig.tar.* and a .debian.tar.* (3.0 quilt), got {tarballs}")
    return dsc_path, get(orig), get(deb_tar), [dsc] + tarballs


def _dsc_tarballs(dsc_path: str, files: dict, suite: str) -> list[str]:
    """The files a (Sources-verified) .dsc lists; each must be in the Sources entry with
    the same SHA256 and size."""
    from debian import deb822

    with open(dsc_path, "rb") as f:
        raw = f.read()
    try:
        d = deb822.Dsc(raw.decode("utf-8", "replace"))
    except Exception as e:   # python-debian raises assorted errors on garbage
        raise GlibcSourceError(f"{os.path.basename(dsc_path)}: unparsable ({one_line(e)})") from None
    fmt = str(d.get("Format", "")).strip()
    if fmt != "3.0 (quilt)":
        raise GlibcSourceError(f"{os.path.basename(dsc_path)}: source format {fmt!r}, expected '3.0 (quilt)'")
    out = []
    for e in d.get("Checksums-Sha256", []):
        name = e["name"]
        s = files.get(name)
        if s is None:
            raise GlibcSourceError(f"{os.path.basename(dsc_path)} lists {name}, which {suite} Sources does not")
        if s["sha256"] != e["sha256"].lower() or int(s["size"]) != int(e["size"]):
            raise GlibcSourceError(f"{name}: .dsc and {suite} Sources disagree on its SHA256/size — refused")
        out.append(name)
    if not out:
        raise GlibcSourceError(f"{os.path.basename(dsc_path)}: no Checksums-Sha256")
    return out


@dataclass
class Downloaded:
    """glibc's source package at one version: its files, checked, and where from."""
    ent: dict                 # the verified Sources entry (+ base, suite)
    base: str
    suite: str
    signer: str
    notes: list[str]          # the index's own notes (e.g. by-hash fallbacks)
    orig: str                 # the upstream tarball
    debian: str               # the Debian tarball
    names: list[str]          # the .dsc and the files it lists
    missing: list[str] = field(default_factory=list)    # "suite: url" of pool files missing elsewhere

    @property
    def verified(self) -> list[str]:
        return [f"InRelease gpgv ({self.signer})", "Sources SHA256", ".dsc SHA256",
                "tarballs SHA256 (Sources and .dsc)"] + list(self.notes)

    def provenance(self) -> dict:
        """The meta.json fields that say where the tree comes from."""
        version = self.ent["Version"]
        files = {f["name"]: f for f in self.ent["files"]}
        return {"origin": f"debian {self.suite}/main {PACKAGE} {version}",
                "suite": self.suite, "mirror": self.base, "directory": self.ent["Directory"],
                "signer": self.signer, "verified": self.verified,
                "notes": [f"pool file missing in {m}" for m in self.missing],
                "files": [dict(files[n]) for n in self.names if n in files]}


def download_verified(archive, version: str, work: str) -> Downloaded:
    """The first suite (in :meth:`~..archive.DebianArchive.suites_for` order) that lists
    glibc ``version`` and has its files in its pool: files downloaded under ``work`` and
    checked.  A suite whose pool lacks a listed file is noted and the next one tried; no
    other version is ever tried.  Raises SourceNotFound / GlibcSourceError."""
    missing: list[str] = []
    for ent, base, suite, signer, notes in _entries(archive, version, archive.suites_for(version)):
        dl = os.path.join(work, f"dl-{len(missing)}")
        os.makedirs(dl)
        try:
            _dsc_path, orig, deb, names = _download(archive, ent, suite, dl)
        except _PoolMissing as e:   # listed, but not in this suite's pool: another suite may have it
            missing.append(f"{suite}: {e}")
            shutil.rmtree(dl, ignore_errors=True)
            continue
        return Downloaded(ent, base, suite, signer, notes, orig, deb, names, missing)
    raise SourceNotFound(f"glibc {version} is listed in the archive's Sources but missing from the pool "
                         f"({'; '.join(missing)}); not trying another version")
