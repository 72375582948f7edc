"""The symbol cache, keyed by GNU build-id.

Layout (``CACHE`` = ``--cache`` or ``$XDG_CACHE_HOME/gdbdiag`` or ``~/.cache/gdbdiag``)::

    CACHE/debug/.build-id/ab/cdef….debug   verified debug files: CACHE/debug is usable
                                            as gdb's debug-file-directory as it is
    CACHE/meta/ab/cdef….json               where each came from and how it was verified
    CACHE/index/…                          archive index files (InRelease, parsed Packages)
    CACHE/sysroot/…                        shadow sysroots for chroot targets (gdbload)
    CACHE/tmp/…                            work dirs of running fetches (removed on exit)

Every write is a temp file in the same directory + fsync + rename, so a reader never
sees a half-written file and a failed or interrupted run leaves nothing behind but,
at worst, an orphan in CACHE/tmp (cleaned by :meth:`SymbolCache.clean_tmp`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from ..errors import GdbdiagError
from . import elfinfo

__all__ = ["SymbolCache", "default_cache_dir", "atomic_write_bytes", "atomic_write_json", "VerifyError",
           "verify_debug_file"]


class VerifyError(GdbdiagError):
    """A debug file is refused; str() is a one-line cause."""


def default_cache_dir() -> str:
    env = os.environ.get("GDBDIAG_CACHE")
    if env:
        return env
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "gdbdiag")
    return os.path.join(os.path.expanduser("~"), ".cache", "gdbdiag")


def _fsync_dir(d: str):
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes, mode: int = 0o644):
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        _fsync_dir(d)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def verify_debug_file(path: str, build_id: str) -> None:
    """Raise VerifyError unless ``path`` is an ELF debug file with exactly ``build_id``."""
    try:
        with open(path, "rb") as f:
            if not elfinfo.is_elf(f):
                raise VerifyError("not an ELF file")
            facts = elfinfo.elf_facts(f)
    except (OSError, ValueError) as e:
        raise VerifyError(f"unreadable ELF ({e})") from None
    if facts.build_id is None:
        raise VerifyError("debug file has no build-id")
    if facts.build_id != build_id.lower():
        raise VerifyError(f"build-id mismatch: debug file has {facts.build_id}, target object has {build_id}")
    if not facts.has_debug_info:
        raise VerifyError("no DWARF (.debug_info) in the file")


class SymbolCache:
    def __init__(self, root: str | None = None):
        self.root = os.path.abspath(root or default_cache_dir())

    # paths ---------------------------------------------------------------------
    @property
    def debug_dir(self) -> str:
        """The directory to give gdb as debug-file-directory."""
        return os.path.join(self.root, "debug")

    def debug_path(self, build_id: str) -> str:
        b = build_id.lower()
        return os.path.join(self.debug_dir, ".build-id", b[:2], b[2:] + ".debug")

    def meta_path(self, build_id: str) -> str:
        b = build_id.lower()
        return os.path.join(self.root, "meta", b[:2], b[2:] + ".json")

    @property
    def index_dir(self) -> str:
        return os.path.join(self.root, "index")

    def tmpdir(self) -> str:
        """A fresh work directory under CACHE/tmp (same filesystem: renames are atomic).
        The caller removes it (``shutil.rmtree``)."""
        base = os.path.join(self.root, "tmp")
        os.makedirs(base, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"fetch-{os.getpid()}-", dir=base)

    def clean_tmp(self, older_than: float = 3600.0):
        base = os.path.join(self.root, "tmp")
        if not os.path.isdir(base):
            return
        now = time.time()
        for n in os.listdir(base):
            p = os.path.join(base, n)
            try:
                if now - os.lstat(p).st_mtime > older_than:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass

    # lookups -------------------------------------------------------------------
    def lookup(self, build_id: str, verify: bool = True) -> str | None:
        """Path of the cached debug file for ``build_id``, or None.  With ``verify``
        the file's build-id is re-read (cheap) so a damaged entry is never used."""
        p = self.debug_path(build_id)
        if not os.path.isfile(p):
            return None
        if verify:
            try:
                verify_debug_file(p, build_id)
            except VerifyError:
                return None
        return p

    def meta(self, build_id: str) -> dict | None:
        try:
            with open(self.meta_path(build_id)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    # writes --------------------------------------------------------------------
    def install(self, build_id: str, src: str, meta: dict, move: bool = False) -> str:
        """Verify ``src`` against ``build_id`` and put it in the cache atomically.
        Raises VerifyError (cache unchanged) if it does not match."""
        verify_debug_file(src, build_id)
        dst = self.debug_path(build_id)
        d = os.path.dirname(dst)
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
        os.close(fd)
        try:
            if move:
                try:
                    os.replace(src, tmp)
                except OSError:  # other filesystem
                    shutil.copyfile(src, tmp)
            else:
                shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            verify_debug_file(tmp, build_id)   # what lands is what was checked
            os.replace(tmp, dst)
            _fsync_dir(d)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        m = dict(meta)
        m.setdefault("build_id", build_id.lower())
        m.setdefault("installed", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        m["size"] = os.path.getsize(dst)
        atomic_write_json(self.meta_path(build_id), m)
        return dst
