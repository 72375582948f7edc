"""The glibc source a target was built from, for showing the lines around each probe.

:func:`fetch_source` finds Debian's ``glibc`` source package at exactly the target's
version through the same signed chain as the symbols (:class:`~.sources.DebianArchive`):
InRelease (gpgv, Debian archive keyrings) → ``main/source/Sources`` (SHA256 from
InRelease) → ``.dsc``, ``.orig.tar.xz``, ``.debian.tar.xz`` (SHA256 and size from the
Sources entry; the ``.dsc``'s own checksums must agree).  Only part of the tree is
extracted (:data:`EXTRACT`, ``resolv/`` above all), then the quilt series of
``debian/patches/series`` is applied to it: each patch is cut down to the files that
were extracted (patches touching none of them are *skipped*), applied with GNU
``patch`` (``-F0``, like dpkg-source) or, without it, a small Python applier; a patch
that does not apply is noted (*failed*, with the files) and the series goes on.

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

import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field

from .cache import SymbolCache, atomic_write_json

__all__ = ["GlibcSourceError", "SourceNotFound", "NotCached", "SourceTree", "fetch_source", "load_cached",
           "source_dir", "highlight", "describe", "EXTRACT", "split_patch", "apply_patch_py"]

SCHEMA = "gdbdiag.glibcsrc/1"
PACKAGE = "glibc"

#: what is extracted from the upstream tarball (directory prefixes or single files)
EXTRACT = ("resolv/", "include/", "nss/", "sysdeps/posix/getaddrinfo.c")
#: what is kept from the Debian tarball
DEBIAN_KEEP = "debian/patches/"

_VERSION_RE = re.compile(r"^[0-9][0-9A-Za-z.+~:-]*$")


class GlibcSourceError(Exception):
    """The source cannot be had; ``reason`` (= str()) is one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SourceNotFound(GlibcSourceError):
    """The archive does not have glibc at this version (index or pool)."""


class NotCached(GlibcSourceError):
    """Offline, and the version is not in the cache."""


def _one_line(s: str) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= 300 else s[:297] + "..."


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
# patches
# ---------------------------------------------------------------------------------
_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


@dataclass
class FilePatch:
    old: str | None          # path after stripping, None = /dev/null
    new: str | None
    hunks: list[tuple[int, int, int, int, list[str]]]   # (old_start, old_len, new_start, new_len, lines)

    @property
    def target(self) -> str | None:
        return self.new if self.new is not None else self.old

    def render(self) -> str:
        """This section as a ``-p1`` unified diff with normalized headers."""
        t = self.target
        out = [f"--- {'a/' + t if self.old is not None else '/dev/null'}\n",
               f"+++ {'b/' + t if self.new is not None else '/dev/null'}\n"]
        for os_, ol, ns, nl, body in self.hunks:
            out.append(f"@@ -{os_},{ol} +{ns},{nl} @@\n")
            out += [ln if ln.endswith("\n") else ln + "\n" for ln in body]
        return "".join(out)


def _hdr_path(line: str, strip: int) -> str | None:
    p = line[4:].rstrip("\r\n")
    if "\t" in p:
        p = p.split("\t", 1)[0]
    else:   # "path  2020-01-01 00:00:00.000000000 +0000"
        p = re.sub(r"\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? [+-]\d{4}$", "", p)
    p = p.strip()
    if p.startswith('"') and p.endswith('"'):
        p = p[1:-1]
    if p == "/dev/null":
        return None
    return _safe_rel(p, strip)


def split_patch(text: str, strip: int = 1) -> list[FilePatch]:
    """The per-file sections of a unified diff (hunks counted, so ``--- `` inside a
    hunk is not taken for a header)."""
    lines = _split_lines(text)
    n, i, out = len(lines), 0, []
    while i < n:
        if (lines[i].startswith("--- ") and i + 2 < n and lines[i + 1].startswith("+++ ")
                and lines[i + 2].startswith("@@ ")):
            old, new = _hdr_path(lines[i], strip), _hdr_path(lines[i + 1], strip)
            j = i + 2
            hunks = []
            while j < n and lines[j].startswith("@@ "):
                m = _HUNK_RE.match(lines[j])
                if not m:
                    break
                os_, ol = int(m.group(1)), int(m.group(2) if m.group(2) is not None else 1)
                ns, nl = int(m.group(3)), int(m.group(4) if m.group(4) is not None else 1)
                j += 1
                body, ro, rn = [], ol, nl
                while j < n and (ro > 0 or rn > 0):
                    ln = lines[j]
                    c = ln[:1]
                    if c == " " or ln in ("\n", "\r\n"):
                        ro, rn = ro - 1, rn - 1
                        body.append(ln if c == " " else " " + ln)
                    elif c == "-":
                        ro -= 1
                        body.append(ln)
                    elif c == "+":
                        rn -= 1
                        body.append(ln)
                    elif c == "\\":
                        body.append(ln)
                    else:
                        break
                    j += 1
                while j < n and lines[j].startswith("\\"):
                    body.append(lines[j])
                    j += 1
                hunks.append((os_, ol, ns, nl, body))
            if (old or new) and hunks:
                out.append(FilePatch(old, new, hunks))
            i = j
        else:
            i += 1
    return out


def _hunk_sides(body: list[str]) -> tuple[list[str], list[str]]:
    old: list[str] = []
    new: list[str] = []
    last: tuple = ()
    for ln in body:
        if ln.startswith("\\"):   # "\ No newline at end of file" refers to the previous line
            for side in last:
                if side:
                    side[-1] = side[-1].rstrip("\n")
            continue
        c, t = ln[:1], ln[1:]
        if not t.endswith("\n"):
            t += "\n"
        if c == " ":
            old.append(t)
            new.append(t)
            last = (old, new)
        elif c == "-":
            old.append(t)
            last = (old,)
        elif c == "+":
            new.append(t)
            last = (new,)
    return old, new


def apply_patch_py(fp: FilePatch, content: str | None) -> str | None:
    """Apply one file section to ``content`` (None: the file does not exist) like
    ``patch -F0``: every hunk's old side must match exactly, at its line or at an
    offset.  Returns the new content (None: file deleted); raises ValueError."""
    if fp.old is None:
        if content is not None:
            raise ValueError(f"{fp.target}: patch creates a file that already exists")
        src: list[str] = []
    else:
        if content is None:
            raise ValueError(f"{fp.target}: no such file")
        src = _split_lines(content)
    offset = 0
    res: list[str] = []
    pos = 0
    for os_, _ol, _ns, _nl, body in fp.hunks:
        old, new = _hunk_sides(body)
        anchor = os_ - 1 if old else os_          # 0-based first old line / insertion point
        want = anchor + offset
        found = None
        for at in sorted(range(pos, len(src) - len(old) + 1), key=lambda a: (abs(a - want), a)):
            if src[at:at + len(old)] == old:
                found = at
                break
        if found is None:
            raise ValueError(f"{fp.target}: hunk at line {os_} does not apply")
        res += src[pos:found]
        res += new
        pos = found + len(old)
        offset = found - anchor
    res += src[pos:]
    if fp.new is None:
        return None
    return "".join(res)


class _Patcher:
    """Applies a quilt series to the partial tree ``root``."""

    def __init__(self, root: str, use_gnu_patch: bool | None = None):
        self.root = root
        self.gnu = shutil.which("patch") if use_gnu_patch in (None, True) else None
        if use_gnu_patch and not self.gnu:
            raise GlibcSourceError("GNU patch is not installed")
        self.applied: list[str] = []
        self.skipped: list[str] = []
        self.failed: list[dict] = []
        self.touched: dict[str, list[str]] = {}

    def _exists(self, rel: str) -> bool:
        return os.path.isfile(os.path.join(self.root, rel))

    def relevant(self, sections: list[FilePatch]) -> list[FilePatch]:
        out = []
        for fp in sections:
            t = fp.target
            if t is None:
                continue
            if self._exists(t) or (fp.old is None and _wanted(t)):
                out.append(fp)
        return out

    def _gnu(self, text: str, dry: bool) -> tuple[bool, str]:
        fd, pf = tempfile.mkstemp(prefix=".patch-", suffix=".diff", dir=os.path.dirname(self.root))
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        try:
            argv = [self.gnu, "-s", "-t", "-F0", "-N", "-p1", "-u", "-E", "--no-backup-if-mismatch",
                    "-r", "-", "-d", self.root, "-i", pf]
            if dry:
                argv.insert(1, "--dry-run")
            p = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                               env={**os.environ, "LC_ALL": "C"}, stdin=subprocess.DEVNULL)
            msg = (p.stdout + p.stderr).strip().splitlines()
            return p.returncode == 0, (msg[0] if msg else f"patch exited {p.returncode}")
        finally:
            os.unlink(pf)

    def _py(self, sections: list[FilePatch], dry: bool) -> tuple[bool, str]:
        results = {}
        for fp in sections:
            t = fp.target
            path = os.path.join(self.root, t)
            if t in results:
                cur = results[t]
            else:
                try:
                    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                        cur = f.read()
                except FileNotFoundError:
                    cur = None
            try:
                results[t] = apply_patch_py(fp, cur)
            except ValueError as e:
                return False, str(e)
        if not dry:
            for t, content in results.items():
                path = os.path.join(self.root, t)
                if content is None:
                    os.unlink(path)
                else:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
                        f.write(content)
        return True, ""

    def _apply(self, sections: list[FilePatch], dry: bool) -> tuple[bool, str]:
        if self.gnu:
            return self._gnu("".join(fp.render() for fp in sections), dry)
        return self._py(sections, dry)

    def series(self, name: str, text: str, strip: int):
        sections = self.relevant(split_patch(text, strip))
        if not sections:
            self.skipped.append(name)
            return
        ok, msg = self._apply(sections, dry=True)
        if ok:
            self._apply(sections, dry=False)
            self.applied.append(name)
            for fp in sections:
                self.touched.setdefault(fp.target, []).append(name)
            return
        # the whole patch does not apply: keep what does, file by file, and say which failed
        by_file: dict[str, list[FilePatch]] = {}
        for fp in sections:
            by_file.setdefault(fp.target, []).append(fp)
        bad, good = [], []
        for t, fps in by_file.items():
            ok1, _m = self._apply(fps, dry=True)
            if ok1:
                self._apply(fps, dry=False)
                good.append(t)
                self.touched.setdefault(t, []).append(name)
            else:
                bad.append(t)
        self.failed.append({"patch": name, "files": bad, "applied_files": good, "reason": _one_line(msg)})


def _parse_series(text: str) -> list[tuple[str, int]]:
    out = []
    for ln in text.splitlines():
        ln = ln.split("#", 1)[0].strip()
        if not ln:
            continue
        parts = ln.split()
        strip = 1
        for opt in parts[1:]:
            m = re.match(r"^-p(\d+)$", opt)
            if m:
                strip = int(m.group(1))
        out.append((parts[0], strip))
    return out


# ---------------------------------------------------------------------------------
# fetching
# ---------------------------------------------------------------------------------
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
        raise GlibcSourceError(f"{os.path.basename(path)}: cannot unpack ({_one_line(e)})") from None
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
        raise GlibcSourceError(f"{os.path.basename(path)}: cannot unpack ({_one_line(e)})") from None
    return series, patches


def _entries(archive, version: str, suites):
    """Yield (Sources entry + base/suite, base, suite, signer, notes) of glibc ``version``
    for each suite that lists it, in order; then raise SourceNotFound /
    GlibcSourceError if none did."""
    from .net import FetchError
    from .sources import SourceError

    errors, tried, hits = [], [], 0
    for base, suite in suites:
        tried.append(suite)
        try:
            idx, signer, notes = archive.sources(base, suite)
        except (SourceError, FetchError) as e:
            errors.append(_one_line(e))
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


class _PoolMissing(Exception):
    pass


def _download(archive, ent: dict, suite: str, dl: str) -> tuple[str, str, str, list[str]]:
    """(.dsc, orig tarball, Debian tarball) paths and the .dsc's file list, each checked
    by SHA256 and size against ``ent`` (the verified Sources entry)."""
    from .sources import SourceError

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
            raise GlibcSourceError(_one_line(e)) from None

    dsc_path = get(dsc)
    tarballs = _dsc_tarballs(dsc_path, files, suite)
    orig = next((n for n in tarballs if ".orig.tar." in n and not n.endswith(".asc")), None)
    deb_tar = next((n for n in tarballs if ".debian.tar." in n), None)
    if orig is None or deb_tar is None:
        raise GlibcSourceError(f"{dsc}: expected an .orig.tar.* and a .debian.tar.* (3.0 quilt), got {tarballs}")
    return dsc_path, get(orig), get(deb_tar), [dsc] + tarballs


def fetch_source(package_version: str, settings=None, cache_dir: str | None = None,
                 offline: bool = False, use_gnu_patch: bool | None = None) -> SourceTree:
    """The patched partial glibc source tree of Debian package version
    ``package_version`` (e.g. ``2.36-9+deb12u14``), from the cache or fetched, verified
    and cached.  ``settings`` is a :class:`~.sources.Settings` (mirrors, keyrings,
    timeouts, ``debian_suites``, ``offline``); ``offline`` (or ``settings.offline``)
    uses the cache only.  ``use_gnu_patch``: None = GNU patch when installed, False =
    the Python applier.  Raises :class:`GlibcSourceError` (:class:`SourceNotFound`,
    :class:`NotCached`) with a one-line reason."""
    version = _check_version(package_version)
    cache = SymbolCache(cache_dir)
    hit = load_cached(version, cache.root)
    if hit is not None:
        return hit
    from .sources import Context, DebianArchive, Settings

    settings = settings or Settings()
    if offline or settings.offline:
        raise NotCached(f"glibc source {version} is not in the cache ({source_dir(version, cache.root)}) and offline")
    if "ubuntu" in version:
        raise SourceNotFound(f"{version} is an Ubuntu build; only Debian's archive is searched for glibc source")
    ctx = Context(settings, cache)
    archive = DebianArchive(ctx)
    cache.clean_tmp()
    t0 = time.monotonic()
    work = cache.tmpdir()
    try:
        missing = []
        for ent, base, suite, signer, notes in _entries(archive, version, archive.suites_for(version)):
            dl = os.path.join(work, f"dl-{len(missing)}")
            os.makedirs(dl)
            try:
                _dsc_path, orig_path, deb_path, names = _download(archive, ent, suite, dl)
                break
            except _PoolMissing as e:   # listed, but not in this suite's pool: another suite may have it
                missing.append(f"{suite}: {e}")
                shutil.rmtree(dl, ignore_errors=True)
        else:
            raise SourceNotFound(f"glibc {version} is listed in the archive's Sources but missing from the pool "
                                 f"({'; '.join(missing)}); not trying another version")
        files = {f["name"]: f for f in ent["files"]}
        verified = [f"InRelease gpgv ({signer})", "Sources SHA256", ".dsc SHA256", "tarballs SHA256 (Sources and .dsc)"]
        verified += notes
        notes_out = [f"pool file missing in {m}" for m in missing]

        entry = os.path.join(work, "entry")
        tree = os.path.join(entry, "tree")
        os.makedirs(tree)
        got = _extract_orig(orig_path, tree)
        os.unlink(orig_path)
        if not any(g.startswith("resolv/") for g in got):
            raise GlibcSourceError(f"{os.path.basename(orig_path)}: no resolv/ directory in the upstream tarball")
        series_text, patches = _read_debian_patches(deb_path)
        os.unlink(deb_path)
        patcher = _Patcher(tree, use_gnu_patch)
        series = _parse_series(series_text or "")
        for name, strip in series:
            data = patches.get(name)
            if data is None:
                patcher.failed.append({"patch": name, "files": [], "applied_files": [],
                                       "reason": "listed in series but not in the Debian tarball"})
                continue
            patcher.series(name, data.decode("utf-8", "surrogateescape"), strip)

        manifest = {}
        for dp, _dirs, fns in os.walk(tree):
            for fn in fns:
                p = os.path.join(dp, fn)
                manifest[os.path.relpath(p, tree)] = _sha256_file(p)
        meta = {
            "schema": SCHEMA, "package": PACKAGE, "version": version,
            "origin": f"debian {suite}/main {PACKAGE} {version}",
            "suite": suite, "mirror": base, "directory": ent["Directory"], "signer": signer,
            "verified": verified, "notes": notes_out,
            "files": [dict(files[n]) for n in names if n in files],
            "extracted": list(EXTRACT),
            "patch_tool": "GNU patch -F0" if patcher.gnu else "python (exact context, offsets)",
            "series": len(series),
            "patches_applied": patcher.applied,
            "patches_skipped": patcher.skipped,
            "patches_failed": patcher.failed,
            "patched_files": patcher.touched,
            "manifest": manifest,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.monotonic() - t0, 2),
        }
        atomic_write_json(os.path.join(entry, "meta.json"), meta)
        dst = source_dir(version, cache.root)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.rename(entry, dst)
        except OSError:
            other = load_cached(version, cache.root)   # a concurrent fetch won the race
            if other is None:
                raise GlibcSourceError(f"cannot install the source tree into {dst}") from None
            return other
    finally:
        shutil.rmtree(work, ignore_errors=True)
    got_tree = load_cached(version, cache.root)
    if got_tree is None:
        raise GlibcSourceError(f"source tree vanished from {dst}")
    return got_tree


def _dsc_tarballs(dsc_path: str, files: dict, suite: str) -> list[str]:
    """The files a (Sources-verified) .dsc lists; each must be in the Sources entry with
    the same SHA256 and size."""
    from debian import deb822

    with open(dsc_path, "rb") as f:
        raw = f.read()
    try:
        d = deb822.Dsc(raw.decode("utf-8", "replace"))
    except Exception as e:   # python-debian raises assorted errors on garbage
        raise GlibcSourceError(f"{os.path.basename(dsc_path)}: unparsable ({_one_line(e)})") from None
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
