"""The cached, patched partial glibc tree: lookup by DWARF file name, lines, highlighting.

Cache (``CACHE`` = the symbols cache root)::

    CACHE/source/glibc/VERSION/meta.json   provenance, patches, a SHA256 manifest
    CACHE/source/glibc/VERSION/tree/…      resolv/…, include/…, …

A cached entry is used without any network access; every file read is checked against
the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from ...errors import GdbdiagError
from ..cache import SymbolCache

SCHEMA = "gdbdiag.glibcsrc/1"
PACKAGE = "glibc"

#: what is extracted from the upstream tarball (directory prefixes or single files)
EXTRACT = ("resolv/", "include/", "nss/", "sysdeps/posix/getaddrinfo.c")

_VERSION_RE = re.compile(r"^[0-9][0-9A-Za-z.+~:-]*$")


class GlibcSourceError(GdbdiagError):
    """The source cannot be had; ``reason`` (= str()) is one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SourceNotFound(GlibcSourceError):
    """The archive does not have glibc at this version (index or pool)."""


class NotCached(GlibcSourceError):
    """Offline, and the version is not in the cache."""


def _wanted(rel: str, prefixes=EXTRACT) -> bool:
    return any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in prefixes)


def _split_lines(text: str) -> list[str]:
    """Lines with their "\\n" (only "\\n" ends a line: glibc has form feeds, which
    str.splitlines would also split at)."""
    parts = text.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def _safe_rel(name: str, strip: int) -> str | None:
    """Member name → safe relative path after dropping ``strip`` components, or None."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if len(parts) <= strip or any(p == ".." for p in parts):
        return None
    return "/".join(parts[strip:])


# ---------------------------------------------------------------------------------
# the tree
# ---------------------------------------------------------------------------------
@dataclass
class SourceTree:
    """An extracted, patched partial glibc tree (``root``) and its ``meta``."""
    version: str
    root: str
    meta: dict = field(default_factory=dict)
    _by_base: dict | None = field(default=None, repr=False)
    _checked: dict = field(default_factory=dict, repr=False)

    @property
    def files(self) -> list[str]:
        return sorted(self.meta.get("manifest", {}))

    def resolve(self, dwarf_filename: str, comp_dir: str | None = None) -> str | None:
        """The tree-relative path of a DWARF file name, or None.

        Accepts ``./resolv/res_send.c``, ``resolv/res_send.c``, ``res_send.c``,
        ``/build/glibc-XXXX/resolv/res_send.c``, ``../include/resolv.h`` — each optionally
        relative to ``comp_dir`` (DW_AT_comp_dir).  The longest path suffix present in
        the tree wins; a bare base name is matched when it is unambiguous (``resolv/``
        preferred)."""
        manifest = self.meta.get("manifest", {})
        if not dwarf_filename:
            return None
        name = os.path.normpath(dwarf_filename.replace("\\", "/"))
        cands = []
        if comp_dir and not name.startswith("/"):
            cands.append(os.path.normpath(comp_dir.replace("\\", "/") + "/" + name))
        cands.append(name)
        for c in cands:
            parts = [p for p in c.split("/") if p not in ("", ".", "..")]
            for i in range(len(parts)):
                rel = "/".join(parts[i:])
                if rel in manifest and (i < len(parts) - 1 or len(parts) == 1):
                    return rel
        if "/" in name:    # a path whose directories are not in the tree: no guessing
            return None
        if self._by_base is None:
            self._by_base = {}
            for rel in manifest:
                self._by_base.setdefault(os.path.basename(rel), []).append(rel)
        hits = self._by_base.get(name, [])
        if len(hits) == 1:
            return hits[0]
        for pref in ([os.path.basename(os.path.normpath(comp_dir)) + "/"] if comp_dir else []) + ["resolv/"]:
            m = [h for h in hits if h.startswith(pref) and "/" not in h[len(pref):]]
            if len(m) == 1:
                return m[0]
        return None

    def text(self, rel: str) -> str:
        """The content of tree file ``rel``, checked against the manifest."""
        manifest = self.meta.get("manifest", {})
        if rel not in manifest:
            raise GlibcSourceError(f"{rel} is not in the glibc {self.version} source tree")
        path = os.path.join(self.root, rel)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise GlibcSourceError(f"cached source {path} unreadable ({e.strerror or e})") from None
        if rel not in self._checked:
            if hashlib.sha256(data).hexdigest() != manifest[rel]:
                raise GlibcSourceError(f"cached source {path} does not match its manifest (damaged cache entry)")
            self._checked[rel] = data.decode("utf-8", "replace")
        return self._checked[rel]

    def lines(self, dwarf_filename: str, line: int, context: int = 4,
              comp_dir: str | None = None) -> list[tuple[int, str]]:
        """[(number, text)] of lines ``line-context`` … ``line+context`` (1-based,
        clipped to the file) of the file DWARF calls ``dwarf_filename``; [] when the
        file is not in the tree or ``line`` is past its end."""
        rel = self.resolve(dwarf_filename, comp_dir)
        if rel is None or line < 1:
            return []
        src = [ln.rstrip("\n") for ln in _split_lines(self.text(rel))]
        if line > len(src):
            return []
        lo, hi = max(1, line - context), min(len(src), line + context)
        return [(n, src[n - 1]) for n in range(lo, hi + 1)]


# ---------------------------------------------------------------------------------
# highlighting
# ---------------------------------------------------------------------------------
def highlight(lines: list[tuple[int, str]], current_line: int | None, color: bool) -> str:
    """Numbered lines, ``=>`` marking ``current_line``; C syntax colours (pygments
    TerminalFormatter) when ``color`` and pygments is importable, plain text otherwise."""
    if not lines:
        return ""
    codes = [t.expandtabs(8).rstrip("\r\n") for _, t in lines]
    if color:
        try:
            from pygments import highlight as _hl
            from pygments.formatters import TerminalFormatter
            from pygments.lexers import CLexer

            out = _hl("\n".join(codes) + "\n", CLexer(stripnl=False, stripall=False, ensurenl=True),
                      TerminalFormatter())
            colored = out.split("\n")
            if colored and colored[-1] == "":
                colored.pop()
            if len(colored) == len(codes):
                codes = colored
        except Exception:   # no pygments / lexer trouble: plain
            pass
    width = max(len(str(n)) for n, _ in lines)
    out = []
    for (n, _), code in zip(lines, codes):
        mark = "=> " if n == current_line else "   "
        out.append(f"{mark}{n:>{width}}\t{code}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------
def _check_version(v: str) -> str:
    if not isinstance(v, str) or not _VERSION_RE.match(v) or "/" in v:
        raise GlibcSourceError(f"not a Debian package version: {v!r}")
    return v


def source_dir(version: str, cache_dir: str | None = None) -> str:
    """CACHE/source/glibc/VERSION."""
    return os.path.join(SymbolCache(cache_dir).root, "source", PACKAGE, _check_version(version))


def load_cached(version: str, cache_dir: str | None = None) -> SourceTree | None:
    """The cached tree of ``version``, or None (no network, no python-debian)."""
    d = source_dir(version, cache_dir)
    try:
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if meta.get("schema") != SCHEMA or meta.get("version") != version or not os.path.isdir(os.path.join(d, "tree")):
        return None
    return SourceTree(version, os.path.join(d, "tree"), meta)


# ---------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------
def describe(tree: SourceTree) -> dict:
    """What the tree is, for ``--json`` and humans."""
    m = tree.meta
    return {
        "schema": SCHEMA,
        "package": m.get("package", PACKAGE),
        "version": tree.version,
        "origin": m.get("origin"),
        "verified": m.get("verified", []),
        "notes": m.get("notes", []),
        "path": tree.root,
        "files": m.get("files", []),
        "extracted": m.get("extracted", []),
        "tree_files": len(m.get("manifest", {})),
        "patch_tool": m.get("patch_tool"),
        "series": m.get("series"),
        "patches_applied": m.get("patches_applied", []),
        "patches_skipped": m.get("patches_skipped", []),
        "patches_failed": m.get("patches_failed", []),
        "patched_files": m.get("patched_files", {}),
        "created": m.get("created"),
    }
