"""The glibc source a target was built from, for showing the lines around each probe.

:func:`fetch_source` finds Debian's ``glibc`` source package at exactly the target's
version through the same signed chain as the symbols
(:class:`~gdbdiag.symbols.archive.DebianArchive`; :mod:`.archive` here): InRelease
(gpgv, Debian archive keyrings) → ``main/source/Sources`` (SHA256 from InRelease) →
``.dsc``, ``.orig.tar.xz``, ``.debian.tar.xz`` (SHA256 and size from the Sources entry;
the ``.dsc``'s own checksums must agree).  Only part of the tree is extracted
(:data:`EXTRACT`, ``resolv/`` above all), then the quilt series of
``debian/patches/series`` is applied to it with GNU ``patch`` (:mod:`.patches`).

Cache (``CACHE`` = the symbols cache root)::

    CACHE/source/glibc/VERSION/meta.json   provenance, patches, a SHA256 manifest
    CACHE/source/glibc/VERSION/tree/…      resolv/…, include/…, …

built in ``CACHE/tmp/…`` and renamed into place in one step, so a failed or refused
fetch leaves nothing behind and a reader sees a whole entry or none.  A cached entry is
used without any network access; every file read is checked against the manifest.

:meth:`SourceTree.lines` maps a DWARF file name (``./resolv/res_send.c``,
``res_send.c`` + comp dir, …) and line to the numbered lines around it;
:func:`highlight` renders them (pygments C lexer when available) with ``=>`` on the
current line.
"""
from __future__ import annotations

import os
import shutil
import time

from ..cache import SymbolCache, atomic_write_json
from ..net import sha256_file
from .archive import Downloaded, download_verified, _extract_orig, _read_debian_patches
from .patches import PATCH_TOOL, FilePatch, Patcher, gnu_patch, parse_series, split_patch
from .tree import (EXTRACT, PACKAGE, SCHEMA, GlibcSourceError, NotCached, SourceNotFound, SourceTree,
                   _check_version, describe, highlight, load_cached, source_dir)

__all__ = ["GlibcSourceError", "SourceNotFound", "NotCached", "SourceTree", "fetch_source", "load_cached",
           "source_dir", "highlight", "describe", "EXTRACT", "split_patch", "parse_series", "FilePatch",
           "Patcher"]


def fetch_source(package_version: str, settings=None, cache_dir: str | None = None,
                 offline: bool = False) -> SourceTree:
    """The patched partial glibc source tree of Debian package version
    ``package_version`` (e.g. ``2.36-9+deb12u14``), from the cache or fetched, verified
    and cached.  ``settings`` is a :class:`~gdbdiag.symbols.archive.Settings` (mirrors,
    keyrings, timeouts, ``debian_suites``, ``offline``); ``offline`` (or
    ``settings.offline``) uses the cache only.  Raises :class:`GlibcSourceError`
    (:class:`SourceNotFound`, :class:`NotCached`) with a one-line reason."""
    version = _check_version(package_version)
    cache = SymbolCache(cache_dir)
    hit = load_cached(version, cache.root)
    if hit is not None:
        return hit
    from ..archive import Context, DebianArchive, Settings

    settings = settings or Settings()
    _check_fetchable(version, cache, offline or settings.offline)
    patch = gnu_patch()               # before any download: without it there is no tree
    archive = DebianArchive(Context(settings, cache))
    cache.clean_tmp()
    t0 = time.monotonic()
    work = cache.tmpdir()
    try:
        got = download_verified(archive, version, work)
        entry = os.path.join(work, "entry")
        meta = _build_entry(got, version, os.path.join(entry, "tree"), patch)
        meta["seconds"] = round(time.monotonic() - t0, 2)
        atomic_write_json(os.path.join(entry, "meta.json"), meta)
        return _install(entry, version, cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_fetchable(version: str, cache: SymbolCache, offline: bool) -> None:
    """Refuse what no download can give: offline, or an Ubuntu build."""
    if offline:
        raise NotCached(f"glibc source {version} is not in the cache ({source_dir(version, cache.root)}) and offline")
    if "ubuntu" in version:
        raise SourceNotFound(f"{version} is an Ubuntu build; only Debian's archive is searched for glibc source")


def _build_entry(got: Downloaded, version: str, tree: str, patch: str) -> dict:
    """Unpack the wanted part of the upstream tarball into ``tree``, apply the Debian
    series; returns the entry's meta (provenance, patches, manifest)."""
    os.makedirs(tree)
    extracted = _extract_orig(got.orig, tree)
    os.unlink(got.orig)
    if not any(g.startswith("resolv/") for g in extracted):
        raise GlibcSourceError(f"{os.path.basename(got.orig)}: no resolv/ directory in the upstream tarball")
    series_text, patches = _read_debian_patches(got.debian)
    os.unlink(got.debian)
    patcher = Patcher(tree, patch)
    series = parse_series(series_text or "")
    for name, strip in series:
        data = patches.get(name)
        if data is None:
            patcher.missing(name)
        else:
            patcher.series(name, data.decode("utf-8", "surrogateescape"), strip)
    return {
        "schema": SCHEMA, "package": PACKAGE, "version": version,
        **got.provenance(),
        "extracted": list(EXTRACT),
        "patch_tool": PATCH_TOOL,
        "series": len(series),
        "patches_applied": patcher.applied,
        "patches_skipped": patcher.skipped,
        "patches_failed": patcher.failed,
        "patched_files": patcher.touched,
        "manifest": _manifest(tree),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _manifest(tree: str) -> dict[str, str]:
    """{path relative to ``tree``: SHA256} of every file under it."""
    manifest = {}
    for dp, _dirs, fns in os.walk(tree):
        for fn in fns:
            p = os.path.join(dp, fn)
            manifest[os.path.relpath(p, tree)] = sha256_file(p)
    return manifest


def _install(entry: str, version: str, cache: SymbolCache) -> SourceTree:
    """Rename the finished ``entry`` into the cache in one step; the tree as cached."""
    dst = source_dir(version, cache.root)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.rename(entry, dst)
    except OSError:
        other = load_cached(version, cache.root)   # a concurrent fetch won the race
        if other is None:
            raise GlibcSourceError(f"cannot install the source tree into {dst}") from None
        return other
    got_tree = load_cached(version, cache.root)
    if got_tree is None:
        raise GlibcSourceError(f"source tree vanished from {dst}")
    return got_tree
