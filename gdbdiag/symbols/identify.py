"""Identify the glibc objects a target's resolver uses, as the target sees them.

Three entry points:

* :func:`identify_process` — a live PID: objects from ``/proc/PID/maps``, read through
  ``/proc/PID/map_files`` (the very file mapped, even if replaced on disk since); objects
  not mapped yet (glibc < 2.34 loads libresolv/libnss_dns at the first lookup) are
  located in the target's root via its ``etc/ld.so.cache`` or standard lib dirs.
* :func:`identify_file` — one ELF object, optionally inside a rootfs directory.
* :func:`identify_root` — the glibc objects of a rootfs directory.

Everything inside a foreign root is read through :class:`~gdbdiag.symbols.rootfs.SafeRoot`;
what the root says about itself (os-release, dpkg, ld.so.cache) is :mod:`.rootinfo`'s.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

from ..errors import EXIT_USAGE, GdbdiagError
from ..procfs import mapped_file
from . import elfinfo
from .rootfs import SafeRoot
from .rootinfo import (arch_of, dpkg_owner, dpkg_package, find_library, parse_ld_so_cache, parse_os_release,
                       read_os_release)

__all__ = [
    "ObjectIdent", "TargetIdent", "IdentifyError",
    "identify_process", "identify_file", "identify_root",
    "parse_os_release", "read_os_release", "parse_ld_so_cache", "find_library",
    "dpkg_owner", "dpkg_package", "version_tuple", "resolver_sonames",
]

LIBC, LIBRESOLV, LIBNSS_DNS, THREAD_DB = "libc.so.6", "libresolv.so.2", "libnss_dns.so.2", "libthread_db.so.1"

_NAME_RE = {
    LIBC: re.compile(r"^libc(?:-\d[\d.]*)?\.so(?:\.6)?$"),
    LIBRESOLV: re.compile(r"^libresolv(?:-\d[\d.]*)?\.so(?:\.2)?$"),
    LIBNSS_DNS: re.compile(r"^libnss_dns(?:-\d[\d.]*)?\.so(?:\.2)?$"),
}

# Debian multiarch triplets, for the standard library directories


class IdentifyError(GdbdiagError):
    """The target cannot be identified (one-line reason in str())."""

    code = EXIT_USAGE


@dataclass
class ObjectIdent:
    name: str                      # soname: libc.so.6, libresolv.so.2, libnss_dns.so.2
    path: str | None               # canonical path as the target sees it (inside its root)
    host_path: str | None          # where this host reads it (map_files link or resolved root path)
    loaded: bool                   # mapped in the process (False: "not loaded yet" / rootfs / file)
    build_id: str | None
    arch: str | None = None
    soname: str | None = None
    glibc_version: str | None = None       # upstream, e.g. "2.31"
    package: str | None = None             # e.g. "libc6"
    package_version: str | None = None     # e.g. "2.31-13+deb11u11"
    deleted: bool = False                  # the mapped file was replaced/removed on disk
    note: str | None = None                # "not-mapped" when found in the root instead of the maps
    banner: str | None = None              # libc.so.6 only: "Debian GLIBC 2.31-13+deb11u11"

    @property
    def status(self) -> str:
        if self.loaded:
            return "loaded (deleted on disk)" if self.deleted else "loaded"
        return "not loaded yet" if self.note == "not-mapped" else "file"


@dataclass
class TargetIdent:
    kind: str                      # "process" | "file" | "rootfs"
    mode: str                      # "host" | "chroot" | "mntns" | "file"
    root: str                      # host path used to read the target's root ("/proc/PID/root", a dir, "/")
    root_dir: str | None = None    # the root as a plain host directory, when there is one (chroot/rootfs)
    mount_ns: str | None = None    # process: "host" (same mount namespace as us) or "own"
    pid: int | None = None
    exe: str | None = None         # executable as the target sees it
    exe_host: str | None = None    # host path of the executable, resolved inside the root
    distro: dict = field(default_factory=dict)     # id, version_id, codename, pretty_name
    glibc_version: str | None = None
    glibc_banner: str | None = None                # "Debian GLIBC 2.31-13+deb11u11"
    package: str | None = None
    package_version: str | None = None
    package_version_from: str | None = None        # "dpkg" | "banner"
    source_package: str | None = None
    arch: str | None = None
    thread_db: str | None = None                   # libthread_db.so.1 inside the root
    thread_db_dir_host: str | None = None          # its directory as a host path
    objects: list[ObjectIdent] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for o, od in zip(self.objects, d["objects"]):
            od["status"] = o.status
        return d

    def object(self, name: str) -> ObjectIdent | None:
        for o in self.objects:
            if o.name == name:
                return o
        return None


def version_tuple(v: str | None) -> tuple[int, ...]:
    if not v:
        return ()
    m = re.match(r"(\d+(?:\.\d+)*)", v)
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def resolver_sonames(glibc_version: str | None) -> list[str]:
    """The objects holding the resolver: since 2.34 libresolv/libnss_dns are merged into libc."""
    vt = version_tuple(glibc_version)
    if vt and vt >= (2, 34):
        return [LIBC]
    return [LIBC, LIBRESOLV, LIBNSS_DNS]


# ---------------------------------------------------------------------------------
# objects
# ---------------------------------------------------------------------------------
def _object_from_file(name: str, f, path: str | None, host_path: str | None, loaded: bool) -> ObjectIdent:
    facts = elfinfo.elf_facts(f)
    o = ObjectIdent(name=name, path=path, host_path=host_path, loaded=loaded,
                    build_id=facts.build_id, arch=facts.arch, soname=facts.soname)
    if name == LIBC:
        f.seek(0)
        b = elfinfo.glibc_banner(f)
        if b:
            o.banner, o.glibc_version = b
            o.package_version = _banner_pkg_version(b[0])
    return o


def _banner_pkg_version(banner: str) -> str | None:
    m = re.match(r"^(?:Debian|Ubuntu)\s+GLIBC\s+(\S+)$", banner.strip())
    return m.group(1) if m else None


def _which(basename: str) -> str | None:
    for n, rx in _NAME_RE.items():
        if rx.match(basename):
            return n
    return None


def _fill_package(t: TargetIdent, sroot: SafeRoot | None, libc: ObjectIdent | None):
    """Distro, package and version for the target, from dpkg (its own root) and the banner."""
    banner_ver = libc.package_version if libc else None
    if libc is not None:
        t.glibc_version = libc.glibc_version
        t.glibc_banner = libc.banner
        t.arch = t.arch or libc.arch
    pkg = None
    if sroot is not None and libc is not None:
        inner = None
        if libc.path:
            try:
                inner = sroot.resolve(libc.path)
            except (OSError, ValueError):
                inner = None
        owner = dpkg_owner(sroot, inner) if inner else None
        pkg = dpkg_package(sroot, owner or "libc6", libc.arch)
    if pkg:
        t.package, t.source_package = pkg["package"], pkg["source"]
        t.package_version, t.package_version_from = pkg["version"], "dpkg"
        if banner_ver and banner_ver != pkg["version"]:
            t.warnings.append(f"libc.so.6 in memory is {banner_ver} but dpkg has {pkg['version']} installed "
                              "(upgraded since the process started?): using the in-memory version")
            t.package_version, t.package_version_from = banner_ver, "banner"
    elif banner_ver:
        t.package, t.source_package = "libc6", "glibc"
        t.package_version, t.package_version_from = banner_ver, "banner"
    for o in t.objects:
        o.glibc_version = o.glibc_version or t.glibc_version
        if o.package_version is None and t.package_version:
            o.package, o.package_version = t.package, t.package_version
        elif o.package is None and o.package_version:
            o.package = t.package or "libc6"


def _find_thread_db(t: TargetIdent, sroot: SafeRoot, hint_dirs):
    p = find_library(sroot, THREAD_DB, t.arch, hint_dirs)
    if p:
        t.thread_db = p
        t.thread_db_dir_host = sroot.to_host(os.path.dirname(p))


def _proc_maps(pid: int) -> list[tuple[str, int, str, int]]:
    """[(range "start-end", offset, path, inode)] for file mappings."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.rstrip("\n").split(None, 5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            out.append((parts[0], int(parts[2], 16), parts[5], int(parts[4])))
    return out





def _in_root(sroot: SafeRoot, name: str, inner: str) -> ObjectIdent:
    """Object ``name`` at ``inner`` (canonical) inside the root, not loaded;
    IdentifyError when it cannot be read or is not an ELF object."""
    try:
        with sroot.open(inner) as f:
            return _object_from_file(name, f, inner, sroot.to_host(inner), loaded=False)
    except (OSError, ValueError) as e:
        raise IdentifyError(f"{name} at {inner} in {sroot.root}: {e}") from None


def _process_root(pid: int) -> tuple[TargetIdent, str]:
    """The process's TargetIdent with its root, mode and mount namespace filled in, and
    its root link (``/proc/PID/root``'s target)."""
    proc = f"/proc/{pid}"
    if not os.path.isdir(proc):
        raise IdentifyError(f"no such process: {pid}")
    try:
        root_link = os.readlink(f"{proc}/root")
        same_mnt = os.stat(f"{proc}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
    except PermissionError as e:
        raise IdentifyError(f"cannot read /proc/{pid} ({e.strerror}): run as root or the process owner") from None
    except FileNotFoundError:
        raise IdentifyError(f"process {pid} went away") from None
    if root_link == "/":
        # the root of its mount namespace: the host's, or a container's (pivot_root)
        mode, root, root_dir = ("host", "/", "/") if same_mnt else ("mntns", f"{proc}/root", None)
    else:
        # chroot()ed, in the host's mount namespace or inside another one: gdb's
        # "target:" would read the namespace's "/", not the process's root
        mode, root = "chroot", f"{proc}/root"
        root_dir = (root_link if same_mnt and os.path.isdir(root_link) and os.path.samefile(root_link, root)
                    else None)
    t = TargetIdent(kind="process", mode=mode, root=root, root_dir=root_dir, pid=pid,
                    mount_ns="host" if same_mnt else "own")
    return t, root_link


class _TargetView:
    """Paths in /proc/PID/maps and /proc/PID/exe are seen from the namespace's "/": for
    a chroot()ed process they carry the chroot's prefix, stripped here."""

    def __init__(self, root_link: str):
        self.prefix = root_link.rstrip("/") if root_link != "/" and not root_link.endswith(" (deleted)") else None

    def __call__(self, p: str) -> tuple[str, bool]:
        """(path as the target sees it, deleted on disk)."""
        deleted = p.endswith(" (deleted)")
        if deleted:
            p = p[: -len(" (deleted)")]
        if self.prefix and (p == self.prefix or p.startswith(self.prefix + "/")):
            p = p[len(self.prefix):] or "/"   # /proc/PID/maps shows host paths for a chroot
        return p, deleted


def _exe_of(t: TargetIdent, sroot: SafeRoot, view: _TargetView) -> None:
    try:
        exe, _ = view(os.readlink(f"/proc/{t.pid}/exe"))
    except OSError:
        return
    t.exe = exe
    try:
        t.exe_host = sroot.host_path(exe)
    except (OSError, ValueError):
        t.exe_host = None


def _mapped_objects(t: TargetIdent, view: _TargetView) -> dict[str, ObjectIdent]:
    """The glibc objects mapped in the process, read through /proc/PID/map_files (the
    very file mapped); unreadable ones become warnings."""
    try:
        maps = _proc_maps(t.pid)
    except PermissionError as e:
        raise IdentifyError(f"cannot read /proc/{t.pid} ({e.strerror}): run as root or the process owner") from None
    except FileNotFoundError:
        raise IdentifyError(f"process {t.pid} went away") from None
    found: dict[str, ObjectIdent] = {}
    for rng, off, raw, inode in maps:
        path, deleted = view(raw)
        name = _which(os.path.basename(path))
        if name is None or name in found or off != 0:
            continue
        start, end = (int(x, 16) for x in rng.split("-"))
        via = mapped_file(t.pid, start, end, path, inode)
        if via is None:
            t.warnings.append(f"cannot read mapped {path}: /proc/{t.pid}/map_files needs "
                              "CAP_SYS_ADMIN and the path in its root is no longer that file")
            continue
        try:
            with open(via, "rb") as f:
                o = _object_from_file(name, f, path, via, loaded=True)
        except (OSError, ValueError) as e:
            t.warnings.append(f"cannot read mapped {path}: {e}")
            continue
        if o.soname and o.soname != name:
            continue
        o.deleted = deleted
        found[name] = o
    return found


def _not_yet_mapped(t: TargetIdent, sroot: SafeRoot, libc: ObjectIdent, found: dict[str, ObjectIdent]) -> None:
    """Add the resolver objects the process has not mapped yet (glibc < 2.34 loads
    libresolv/libnss_dns at the first lookup), as its loader would find them in its root."""
    libc_dir = os.path.dirname(libc.path) if libc.path else None
    for name in resolver_sonames(libc.glibc_version):
        if name in found:
            continue
        p = find_library(sroot, name, libc.arch, [libc_dir] if libc_dir else [])
        if p is None:
            t.warnings.append(f"{name} is not mapped and not found in the target's root")
            continue
        try:
            o = _in_root(sroot, name, p)
        except IdentifyError as e:
            t.warnings.append(f"{name} is not mapped and unreadable in the target's root: {e}")
            continue
        o.note = "not-mapped"
        found[name] = o


def identify_process(pid: int) -> TargetIdent:
    """Identify the resolver's glibc objects of a live process."""
    t, root_link = _process_root(pid)
    view = _TargetView(root_link)
    found = _mapped_objects(t, view)
    sroot = SafeRoot(t.root)
    _exe_of(t, sroot, view)
    t.distro = read_os_release(sroot)
    libc = found.get(LIBC)
    if libc is None:
        raise IdentifyError(f"process {pid} has no libc.so.6 mapped (static or not glibc?)")
    t.arch = libc.arch
    _not_yet_mapped(t, sroot, libc, found)
    t.objects = [found[n] for n in (LIBC, LIBRESOLV, LIBNSS_DNS)
                 if n in found and n in resolver_sonames(libc.glibc_version)]
    libc_dir = os.path.dirname(libc.path) if libc.path else None
    _fill_package(t, sroot, libc)
    _find_thread_db(t, sroot, [libc_dir] if libc_dir else [])
    return t


def identify_file(path: str, root: str | None = None) -> TargetIdent:
    """Identify one ELF object.  With ``root`` (a rootfs directory) ``path`` is taken
    inside that root (a host path under ``root`` is accepted too) and resolved safely;
    distro and package then come from that root."""
    if root:
        sroot = SafeRoot(root)
        rp = os.path.abspath(root).rstrip("/")
        inner = path
        if os.path.isabs(path) and (path == rp or path.startswith(rp + "/")):
            inner = path[len(rp):] or "/"
        try:
            inner = sroot.resolve(inner)
            f = sroot.open(inner)
        except (OSError, ValueError) as e:
            raise IdentifyError(f"cannot open {path} inside {root}: {e}") from None
        host = sroot.to_host(inner)
        t = TargetIdent(kind="file", mode="file", root=sroot.root, root_dir=sroot.root)
        t.distro = read_os_release(sroot)
    else:
        sroot = None
        inner = host = os.path.abspath(path)
        try:
            f = open(host, "rb")
        except OSError as e:
            raise IdentifyError(f"cannot open {path}: {e.strerror}") from None
        t = TargetIdent(kind="file", mode="file", root="/", root_dir=None)
    with f:
        try:
            facts = elfinfo.elf_facts(f)
        except ValueError as e:
            raise IdentifyError(f"{path}: {e}") from None
        name = facts.soname or _which(os.path.basename(inner)) or os.path.basename(inner)
        f.seek(0)
        o = _object_from_file(name, f, inner, host, loaded=False)
    t.arch = o.arch
    t.objects = [o]
    libc = o if name == LIBC else None
    if libc is None:
        # a libresolv/libnss_dns alone: take the version from a sibling libc.so.6
        sib = os.path.join(os.path.dirname(inner), LIBC)
        try:
            if sroot is not None:
                sf = sroot.open(sib)
                sib_host = sroot.to_host(sroot.resolve(sib))
            else:
                sf = open(sib, "rb")
                sib_host = sib
            with sf:
                libc = _object_from_file(LIBC, sf, sib, sib_host, loaded=False)
        except (OSError, ValueError):
            libc = None
        if libc is None:
            m = re.search(r"-(\d+\.\d+)\.so$", inner)
            if m:
                o.glibc_version = m.group(1)
    if libc is not None and libc is not o:
        t.glibc_version = libc.glibc_version
        t.glibc_banner = libc.banner
        _fill_package(t, sroot, libc)
        o.package, o.package_version = t.package, t.package_version
        o.glibc_version = t.glibc_version
    else:
        _fill_package(t, sroot, libc)
    if sroot is not None:
        _find_thread_db(t, sroot, [os.path.dirname(inner)])
    return t


def identify_root(root: str) -> TargetIdent:
    """Identify the resolver's glibc objects of a rootfs directory (nothing is loaded)."""
    sroot = SafeRoot(root)
    arch = None
    libc_path = None
    for a in ("amd64", "arm64", "i386", None):
        libc_path = find_library(sroot, LIBC, a)
        if libc_path:
            arch = arch_of(sroot, libc_path)
            break
    if not libc_path:
        raise IdentifyError(f"no libc.so.6 found in {root}")
    libc = _in_root(sroot, LIBC, libc_path)
    t = TargetIdent(kind="rootfs", mode="file", root=sroot.root, root_dir=sroot.root, arch=arch)
    t.distro = read_os_release(sroot)
    objs = [libc]
    d = os.path.dirname(libc_path)
    for name in resolver_sonames(libc.glibc_version)[1:]:
        p = find_library(sroot, name, arch, [d])
        if p:
            objs.append(_in_root(sroot, name, p))
    t.objects = objs
    _fill_package(t, sroot, libc)
    _find_thread_db(t, sroot, [d])
    return t
