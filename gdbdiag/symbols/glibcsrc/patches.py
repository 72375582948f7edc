"""Debian's quilt series (``debian/patches/series``), applied to the partial tree.

Each patch is parsed with :mod:`unidiff` into its per-file sections and cut down to the
files that were extracted (a patch touching none of them is *skipped*); what is left is
applied with GNU ``patch`` (``-F0``, exact context, like dpkg-source).  A patch that
does not apply as a whole is applied file by file: the files it cannot change are noted
(*failed*, with the reason) and the series goes on.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from unidiff import PatchSet
from unidiff.errors import UnidiffParseError

from ...errors import one_line
from .tree import GlibcSourceError, _safe_rel, _wanted

#: how the tree is patched (meta.json ``patch_tool``)
PATCH_TOOL = "GNU patch -F0"

# "path  2020-01-01 00:00:00.000000000 +0000": a timestamp after blanks, not a tab
_STAMP_RE = re.compile(r"\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? [+-]\d{4}$")


def gnu_patch() -> str:
    """The path of GNU patch; GlibcSourceError when it is not installed."""
    path = shutil.which("patch")
    if path is None:
        raise GlibcSourceError("GNU patch is not installed (Debian package `patch`): "
                               "cannot apply Debian's patches to the glibc source")
    return path


@dataclass
class FilePatch:
    """One file's section of a patch: paths after ``-pN`` (None = /dev/null), hunks."""
    old: str | None
    new: str | None
    hunks: list            # unidiff Hunks

    @property
    def target(self) -> str | None:
        return self.new if self.new is not None else self.old

    def render(self) -> str:
        """This section as a ``-p1`` unified diff with normalized headers."""
        t = self.target
        return (f"--- {'a/' + t if self.old is not None else '/dev/null'}\n"
                f"+++ {'b/' + t if self.new is not None else '/dev/null'}\n"
                + "".join(str(h) for h in self.hunks))


def _path(name: str, strip: int) -> str | None:
    p = _STAMP_RE.sub("", name).strip()
    if p.startswith('"') and p.endswith('"'):
        p = p[1:-1]
    if p == "/dev/null":
        return None
    return _safe_rel(p, strip)


def split_patch(text: str, strip: int = 1) -> list[FilePatch]:
    """The per-file sections of a unified diff that change text (binary and
    metadata-only sections are left out).  Raises ValueError when it is not a diff
    unidiff can read."""
    try:
        files = PatchSet(text)
    except UnidiffParseError as e:
        raise ValueError(f"unparsable diff: {one_line(e)}") from None
    out = []
    for pf in files:
        if pf.is_binary_file or not len(pf):
            continue
        old, new = _path(pf.source_file, strip), _path(pf.target_file, strip)
        if old or new:
            out.append(FilePatch(old, new, list(pf)))
    return out


def parse_series(text: str) -> list[tuple[str, int]]:
    """[(patch name, -p strip level)] of a quilt series file."""
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


class Patcher:
    """Applies a quilt series to the partial tree ``root`` with GNU patch; records what
    was applied, skipped (touches no extracted file) and failed."""

    def __init__(self, root: str, patch: str | None = None):
        self.root = root
        self.patch = patch or gnu_patch()
        self.applied: list[str] = []
        self.skipped: list[str] = []
        self.failed: list[dict] = []
        self.touched: dict[str, list[str]] = {}

    def relevant(self, sections: list[FilePatch]) -> list[FilePatch]:
        """The sections that change a file of the tree (or create a wanted one)."""
        out = []
        for fp in sections:
            t = fp.target
            if t is None:
                continue
            if os.path.isfile(os.path.join(self.root, t)) or (fp.old is None and _wanted(t)):
                out.append(fp)
        return out

    def _apply(self, sections: list[FilePatch], dry: bool) -> tuple[bool, str]:
        """Run GNU patch on ``sections`` (``--dry-run`` when ``dry``): (ok, first line)."""
        fd, pf = tempfile.mkstemp(prefix=".patch-", suffix=".diff", dir=os.path.dirname(self.root))
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("".join(fp.render() for fp in sections))
        try:
            argv = [self.patch, "-s", "-t", "-F0", "-N", "-p1", "-u", "-E", "--no-backup-if-mismatch",
                    "-r", "-", "-d", self.root, "-i", pf]
            if dry:
                argv.insert(1, "--dry-run")
            p = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                               env={**os.environ, "LC_ALL": "C"}, stdin=subprocess.DEVNULL)
            msg = (p.stdout + p.stderr).strip().splitlines()
            return p.returncode == 0, (msg[0] if msg else f"patch exited {p.returncode}")
        finally:
            os.unlink(pf)

    def _fail(self, name: str, files: list[str], applied_files: list[str], reason: str) -> None:
        self.failed.append({"patch": name, "files": files, "applied_files": applied_files,
                            "reason": one_line(reason)})

    def missing(self, name: str) -> None:
        """A patch the series lists but the Debian tarball does not hold."""
        self._fail(name, [], [], "listed in series but not in the Debian tarball")

    def series(self, name: str, text: str, strip: int) -> None:
        """Apply patch ``name`` (its ``text``, ``-p{strip}``)."""
        try:
            sections = self.relevant(split_patch(text, strip))
        except ValueError as e:
            self._fail(name, [], [], str(e))
            return
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
        self._apply_by_file(name, sections, msg)

    def _apply_by_file(self, name: str, sections: list[FilePatch], msg: str) -> None:
        """The whole patch does not apply: keep what does, file by file, and say which failed."""
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
        self._fail(name, bad, good, msg)
