"""Make gdb load exactly the target's glibc objects and their verified debug files.

One function, :func:`gdb_setup_commands`, serves the in-gdb plugin and the batch
runner alike.  Per target mode (from :class:`~gdbdiag.symbols.identify.TargetIdent`):

* ``mntns`` (container with its own mount namespace): gdb's default sysroot
  ``target:`` already reads the container's files (gdb enters the mount namespace);
  we add the cache as debug-file-directory and point libthread-db-search-path at the
  container's libthread_db directory (``/proc/PID/root/…``, resolved safely).
* ``chroot`` (the process's root is not its mount namespace's "/", whether in the
  host's namespace or another): ``target:`` would read the namespace's files (the
  host's) and a plain ``set sysroot DIR`` follows the image's absolute symlinks
  (``lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/ld-2.31.so``) onto the host.
  So we build a *shadow sysroot* under the cache: for each library directory of the
  image, a directory of symlinks to the files resolved safely inside the root, and set
  ``sysroot`` to it, plus ``file`` of the executable resolved inside the root.
* ``host``: only the debug-file-directory.

After gdb has loaded, :func:`check_loaded` compares the build-ids of what gdb loaded
(:func:`objfiles_probe_command` / :func:`parse_objfiles_probe`, or
:func:`collect_objfiles` inside gdb) with the identified objects.

This module does not import ``gdb``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time

from .identify import TargetIdent, _which
from .rootinfo import TRIPLET, parse_ld_so_cache
from .rootfs import SafeRoot

__all__ = ["gdb_setup_commands", "build_shadow_sysroot", "gdb_quote", "objfiles_probe_command",
           "parse_objfiles_probe", "collect_objfiles", "check_loaded", "parse_info_sharedlibrary",
           "batch_argv", "PROBE_MARK"]

PROBE_MARK = "GDBDIAG-OBJFILES "

def gdb_quote(path: str) -> str:
    """gdb's `set` commands take the rest of the line literally; refuse the only
    characters that would break that (newlines)."""
    if "\n" in path or "\r" in path:
        raise ValueError(f"path with a newline: {path!r}")
    return path


def _lib_dirs(ident: TargetIdent, sroot: SafeRoot) -> list[str]:
    trip = TRIPLET.get(ident.arch or "amd64", "x86_64-linux-gnu")
    dirs = ["/lib64", "/lib", "/usr/lib", "/usr/lib64", f"/lib/{trip}", f"/usr/lib/{trip}",
            "/usr/local/lib", f"/usr/local/lib/{trip}"]
    try:
        for _k, v, _f in parse_ld_so_cache(sroot.read_bytes("/etc/ld.so.cache", 16 << 20)):
            if v.startswith("/"):
                dirs.append(os.path.dirname(v))
    except (OSError, ValueError):
        pass
    for o in ident.objects:
        if o.path:
            dirs.append(os.path.dirname(o.path))
    if ident.pid:
        try:
            with open(f"/proc/{ident.pid}/maps") as f:
                try:
                    rl = os.readlink(f"/proc/{ident.pid}/root")
                except OSError:
                    rl = "/"
                prefix = rl.rstrip("/") if rl != "/" else ""
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[5].startswith("/"):
                        p = parts[5].strip().removesuffix(" (deleted)")
                        if prefix and p.startswith(prefix + "/"):
                            p = p[len(prefix):]
                        dirs.append(os.path.dirname(p))
        except OSError:
            pass
    if ident.exe:
        dirs.append(os.path.dirname(ident.exe))
    out = []
    for d in dirs:
        d = os.path.normpath(d)
        if d not in out and d != "/":
            out.append(d)
    return out


def _clean_old(base_dir: str, keep: str, age: float = 86400.0):
    """Drop shadow sysroots not rebuilt for a day (they are per process)."""
    now = time.time()
    for n in os.listdir(base_dir):
        p = os.path.join(base_dir, n)
        try:
            if p != keep and now - os.lstat(p).st_mtime > age:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def build_shadow_sysroot(ident: TargetIdent, base_dir: str) -> str:
    """A directory usable as gdb's sysroot for a chroot target: for each library
    directory of the image (standard dirs, ld.so.cache dirs, dirs of mapped files), a
    real directory whose entries are symlinks to the *host* paths of the files resolved
    inside the root.  Rebuilt atomically under ``base_dir``; returns its path."""
    # a plain directory when there is one, else /proc/PID/root (the kernel follows that
    # into the process's root even from another mount namespace)
    base_root = ident.root_dir or ident.root
    sroot = SafeRoot(base_root)
    key = hashlib.sha256(f"{base_root}\0{ident.pid}".encode()).hexdigest()[:16]
    final = os.path.join(base_dir, key)
    os.makedirs(base_dir, exist_ok=True)
    _clean_old(base_dir, keep=final)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=base_dir)
    try:
        for d in _lib_dirs(ident, sroot):
            try:
                names = sroot.listdir(d)
            except (OSError, ValueError):
                continue
            sd = os.path.join(tmp, d.lstrip("/"))
            os.makedirs(sd, exist_ok=True)
            for n in names:
                try:
                    inner = sroot.resolve(f"{d}/{n}")
                    if not sroot.isfile(inner):
                        continue
                except (OSError, ValueError):
                    continue
                link = os.path.join(sd, n)
                if not os.path.lexists(link):
                    os.symlink(sroot.to_host(inner), link)
        old = None
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=".old-", dir=base_dir)
            os.rename(final, os.path.join(old, "x"))
        os.rename(tmp, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gdb_setup_commands(ident: TargetIdent, debug_dir: str | list[str], *, attached: bool = False,
                       thread_db: bool = True, sysroot_base: str | None = None) -> list[str]:
    """gdb commands that make gdb load this target's own files and our verified debug
    files.  Run them *before* ``attach PID`` (batch runner), or with ``attached=True``
    inside a gdb already attached (symbols are then re-read).

    ``debug_dir``: the cache's debug dir (``SymbolCache.debug_dir``), or a list.
    ``thread_db``: point libthread-db-search-path (and auto-load safe-path) at the
    target's own libthread_db — note that gdb dlopen()s that library into itself.
    ``sysroot_base``: where chroot shadow sysroots are built (default: next to
    ``debug_dir``, i.e. CACHE/sysroot)."""
    dirs = [debug_dir] if isinstance(debug_dir, str) else list(debug_dir)
    if ident.mode == "host" and "/usr/lib/debug" not in dirs:
        dirs.append("/usr/lib/debug")
    cmds: list[str] = []
    if ident.mode == "mntns":
        cmds.append("set sysroot target:")
    elif ident.mode == "chroot":
        base = sysroot_base or os.path.join(os.path.dirname(os.path.abspath(dirs[0])), "sysroot")
        cmds.append(f"set sysroot {gdb_quote(build_shadow_sysroot(ident, base))}")
    cmds.append(f"set debug-file-directory {gdb_quote(':'.join(os.path.abspath(d) for d in dirs))}")
    if thread_db and ident.mode in ("mntns", "chroot") and ident.thread_db_dir_host:
        td = gdb_quote(ident.thread_db_dir_host)
        cmds.append(f"add-auto-load-safe-path {td}")
        cmds.append(f"set libthread-db-search-path {td}")
    if ident.mode == "chroot" and ident.exe_host:
        cmds.append(f"file {gdb_quote(ident.exe_host)}")
    if attached:
        cmds += ["nosharedlibrary", "sharedlibrary"]
    return cmds


def batch_argv(ident: TargetIdent, debug_dir: str, commands: list[str], gdb: str = "gdb", **kw) -> list[str]:
    """argv for ``gdb -nx -batch``: setup, attach, ``commands``, detach."""
    argv = [gdb, "-nx", "-batch", "-ex", "set confirm off", "-ex", "set pagination off"]
    for c in gdb_setup_commands(ident, debug_dir, **kw):
        argv += ["-ex", c]
    argv += ["-ex", f"attach {ident.pid}"]
    for c in commands:
        argv += ["-ex", c]
    argv += ["-ex", "detach"]
    return argv


# -- after loading: what did gdb load? ---------------------------------------------
def objfiles_probe_command() -> str:
    """A one-line gdb command printing ``PROBE_MARK`` + JSON of gdb's objfiles."""
    return ("python import json as _j; print(" + repr(PROBE_MARK) + " + _j.dumps([{'filename': o.filename, "
            "'build_id': o.build_id, 'owner': (o.owner.filename if o.owner is not None else None)} "
            "for o in gdb.objfiles()]))")


def collect_objfiles(gdb_module) -> list[dict]:
    """Inside gdb: the same data as the probe, from the gdb module passed in."""
    return [{"filename": o.filename, "build_id": o.build_id,
             "owner": o.owner.filename if o.owner is not None else None}
            for o in gdb_module.objfiles()]


def parse_objfiles_probe(text: str) -> list[dict]:
    for line in text.splitlines():
        if line.startswith(PROBE_MARK):
            return json.loads(line[len(PROBE_MARK):])
    raise ValueError("no objfiles probe output")


def parse_info_sharedlibrary(text: str) -> list[dict]:
    """Rows of ``info sharedlibrary``: {from, to, syms_read, debug_info, path}."""
    rows = []
    rx = re.compile(r"^(0x[0-9a-f]+)?\s+(0x[0-9a-f]+)?\s+(Yes|No)\s*(\(\*\))?\s+(\S.*)$")
    for line in text.splitlines():
        m = rx.match(line.strip()) if line.strip() else None
        if m and not line.startswith("From"):
            rows.append({"from": m.group(1), "to": m.group(2), "syms_read": m.group(3) == "Yes",
                         "debug_info": m.group(3) == "Yes" and not m.group(4), "path": m.group(5).strip()})
    return rows


def check_loaded(ident: TargetIdent, objfiles: list[dict], debug_dir: str | list[str]) -> list[str]:
    """Problems (empty list = all good) with what gdb loaded for the target's glibc
    objects: each mapped object must be loaded with its own build-id, with its
    separate debug file from ``debug_dir`` (same build-id); no other libc/libresolv/
    libnss_dns (e.g. the host's) may be loaded."""
    dirs = [debug_dir] if isinstance(debug_dir, str) else list(debug_dir)
    dirs = [os.path.abspath(d).rstrip("/") + "/" for d in dirs]
    problems = []
    mains = [o for o in objfiles if not o.get("owner")]
    for o in ident.objects:
        hits = [m for m in mains if m.get("build_id") == o.build_id]
        if not hits:
            if o.loaded:
                problems.append(f"{o.name}: gdb loaded no object with build-id {o.build_id}")
            continue
        main = hits[0]
        dbg = [d for d in objfiles if d.get("owner") == main["filename"] and d.get("build_id") == o.build_id]
        if not dbg:
            problems.append(f"{o.name}: no separate debug file loaded for {main['filename']}")
        elif not any(os.path.abspath(dbg[0]["filename"]).startswith(d) for d in dirs):
            problems.append(f"{o.name}: debug file {dbg[0]['filename']} is not from {', '.join(dirs)}")
    names = {o.name: o for o in ident.objects}
    for m in mains:
        role = _which(os.path.basename(m.get("filename") or ""))
        if role in names and m.get("build_id") != names[role].build_id:
            # e.g. the host's libc.so.6 instead of the target's
            problems.append(f"gdb loaded {m['filename']} (build-id {m.get('build_id')}), "
                            f"not the target's {role} ({names[role].build_id})")
    return problems
