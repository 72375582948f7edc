"""Identify the glibc objects a target's resolver uses, as the target sees them.

Three entry points:

* :func:`identify_process` — a live PID: objects from ``/proc/PID/maps``, read through
  ``/proc/PID/map_files`` (the very file mapped, even if replaced on disk since); objects
  not mapped yet (glibc < 2.34 loads libresolv/libnss_dns at the first lookup) are
  located in the target's root via its ``etc/ld.so.cache`` or standard lib dirs.
* :func:`identify_file` — one ELF object, optionally inside a rootfs directory.
* :func:`identify_root` — the glibc objects of a rootfs directory.

Everything inside a foreign root is read through :class:`~gdbdiag.symbols.rootfs.SafeRoot`.
"""
from __future__ import annotations

import os
import re
import shlex
import struct
from dataclasses import asdict, dataclass, field

from . import elfinfo
from .rootfs import SafeRoot

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
_TRIPLET = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu", "i386": "i386-linux-gnu",
            "armhf": "arm-linux-gnueabihf", "ppc64el": "powerpc64le-linux-gnu", "s390x": "s390x-linux-gnu",
            "riscv64": "riscv64-linux-gnu"}


class IdentifyError(Exception):
    """The target cannot be identified (one-line reason in str())."""


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

    def safe_root(self) -> SafeRoot:
        return SafeRoot(self.root)


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
# os-release, dpkg
# ---------------------------------------------------------------------------------
def parse_os_release(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, v = line.split("=", 1)
        try:
            parts = shlex.split(v)
            v = parts[0] if parts else ""
        except ValueError:
            v = v.strip("'\"")
        out[k.strip()] = v
    return out


def read_os_release(sroot: SafeRoot) -> dict:
    """{id, version_id, codename, pretty_name, ...} from the root's os-release (read
    through the safe resolver; etc/os-release is usually a link to ../usr/lib/os-release)."""
    for p in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            raw = parse_os_release(sroot.read_text(p, limit=64 << 10))
        except (OSError, ValueError):
            continue
        d = {"id": raw.get("ID"), "version_id": raw.get("VERSION_ID"),
             "codename": raw.get("VERSION_CODENAME") or raw.get("UBUNTU_CODENAME"),
             "pretty_name": raw.get("PRETTY_NAME"), "id_like": raw.get("ID_LIKE")}
        if not d["codename"] and raw.get("VERSION"):
            m = re.search(r"\(([a-z]+)\)", raw["VERSION"])
            if m:
                d["codename"] = m.group(1)
        if not d["codename"] and d["id"] == "debian" and not d["version_id"]:
            # testing/sid: "trixie/sid" in debian_version
            try:
                dv = sroot.read_text("/etc/debian_version", limit=256).strip()
                d["debian_version"] = dv
            except (OSError, ValueError):
                pass
        return {k: v for k, v in d.items() if v}
    return {}


def dpkg_owner(sroot: SafeRoot, inner_path: str) -> str | None:
    """The dpkg package (as named by its info/*.list file, e.g. "libc6:amd64") that
    ships ``inner_path`` (canonical).  Paths in .list files are compared after safe
    resolution, so /lib/x/libc.so.6 (bullseye) matches /usr/lib/x/libc-2.31.so."""
    info = "/var/lib/dpkg/info"
    try:
        lists = [n for n in sroot.listdir(info) if n.endswith(".list")]
    except OSError:
        return None
    stem = re.split(r"[-.]", os.path.basename(inner_path))[0]
    # try the likely ones first
    lists.sort(key=lambda n: (not n.startswith("libc6"), n))
    for n in lists:
        try:
            text = sroot.read_text(f"{info}/{n}", limit=16 << 20)
        except (OSError, ValueError):
            continue
        for line in text.splitlines():
            b = os.path.basename(line)
            # only names of the same stem can be the file or a link to it
            # (libc.so.6 -> libc-2.31.so); compare after safe resolution
            if not line.startswith("/") or re.split(r"[-.]", b)[0] != stem or ".so" not in b:
                continue
            try:
                if sroot.resolve(line) == inner_path:
                    return n[:-len(".list")]
            except (OSError, ValueError):
                continue
    return None


def dpkg_package(sroot: SafeRoot, name: str, arch: str | None = None) -> dict | None:
    """The installed paragraph of package ``name`` (``name:arch`` accepted) from
    var/lib/dpkg/status, as {package, version, source, architecture}."""
    from debian import deb822

    if ":" in name:
        name, arch = name.split(":", 1)
    try:
        f = sroot.open("/var/lib/dpkg/status")
    except OSError:
        return None
    with f:
        best = None
        for p in deb822.Deb822.iter_paragraphs(f, use_apt_pkg=False):
            if p.get("Package") != name:
                continue
            if "installed" not in p.get("Status", "").split()[-1:]:
                continue
            if arch and p.get("Architecture") not in (arch, "all"):
                continue
            src = p.get("Source", name).split(" ")[0]
            best = {"package": name, "version": p.get("Version"), "source": src,
                    "architecture": p.get("Architecture")}
            break
    return best


# ---------------------------------------------------------------------------------
# ld.so.cache
# ---------------------------------------------------------------------------------
_NEW_MAGIC = b"glibc-ld.so.cache1.1"
_OLD_MAGIC = b"ld.so-1.7.0"


def parse_ld_so_cache(data: bytes) -> list[tuple[str, str, int]]:
    """Entries (soname, path, flags) of an ld.so.cache (new format, possibly after the
    old-format compat block)."""
    off = 0
    if data.startswith(_OLD_MAGIC):
        (nlibs,) = struct.unpack_from("<I", data, 12)
        off = 16 + nlibs * 12
        off = (off + 7) & ~7  # the new header is aligned
        idx = data.find(_NEW_MAGIC, off - 8 if off >= 8 else 0)
        if idx < 0:
            return []
        off = idx
    if data[off:off + len(_NEW_MAGIC)] != _NEW_MAGIC:
        return []
    nlibs, _len_strings = struct.unpack_from("<II", data, off + 20)
    hdr = 48
    out = []
    for i in range(nlibs):
        e = off + hdr + i * 24
        if e + 24 > len(data):
            break
        flags, key, value, _osv, _hwcap = struct.unpack_from("<iIIIQ", data, e)

        def s(o):
            o += off
            end = data.find(b"\0", o)
            return data[o:end].decode("utf-8", "replace") if 0 <= o < len(data) and end > 0 else ""
        out.append((s(key), s(value), flags))
    return out


def _arch_of(sroot: SafeRoot, inner: str) -> str | None:
    try:
        with sroot.open(inner) as f:
            return elfinfo.elf_facts(f).arch
    except (OSError, ValueError):
        return None


def find_library(sroot: SafeRoot, soname: str, arch: str | None, hint_dirs=()) -> str | None:
    """Where the target's dynamic loader would find ``soname``: its ld.so.cache first,
    then ``hint_dirs`` (e.g. the directory of the mapped libc), then standard dirs.
    Returns the canonical path inside the root, or None."""
    cands: list[str] = []
    try:
        for key, value, _flags in parse_ld_so_cache(sroot.read_bytes("/etc/ld.so.cache", 16 << 20)):
            if key == soname:
                cands.append(value)
    except (OSError, ValueError):
        pass
    trip = _TRIPLET.get(arch or "")
    dirs = list(hint_dirs)
    if trip:
        dirs += [f"/lib/{trip}", f"/usr/lib/{trip}"]
    dirs += ["/lib64", "/usr/lib64", "/lib", "/usr/lib"]
    cands += [f"{d.rstrip('/')}/{soname}" for d in dirs]
    seen = set()
    for c in cands:
        try:
            inner = sroot.resolve(c)
        except (OSError, ValueError):
            continue
        if inner in seen or not sroot.isfile(inner):
            continue
        seen.add(inner)
        if arch is None or _arch_of(sroot, inner) == arch:
            return inner
    return None


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


def _proc_maps(pid: int) -> list[tuple[str, int, str, str]]:
    """[(range "start-end", offset, path, raw path)] for file mappings."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.rstrip("\n").split(None, 5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            out.append((parts[0], int(parts[2], 16), parts[5], parts[5]))
    return out


def identify_process(pid: int) -> TargetIdent:
    """Identify the resolver's glibc objects of a live process."""
    proc = f"/proc/{pid}"
    if not os.path.isdir(proc):
        raise IdentifyError(f"no such process: {pid}")
    try:
        root_link = os.readlink(f"{proc}/root")
        same_mnt = os.stat(f"{proc}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
        maps = _proc_maps(pid)
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
    sroot = SafeRoot(root)
    # /proc/PID/maps and /proc/PID/exe show paths from the namespace's "/": strip the chroot
    prefix = root_link.rstrip("/") if root_link != "/" and not root_link.endswith(" (deleted)") else None

    def target_view(p: str) -> tuple[str, bool]:
        deleted = p.endswith(" (deleted)")
        if deleted:
            p = p[: -len(" (deleted)")]
        if prefix and (p == prefix or p.startswith(prefix + "/")):
            p = p[len(prefix):] or "/"   # /proc/PID/maps shows host paths for a chroot
        return p, deleted

    t = TargetIdent(kind="process", mode=mode, root=root, root_dir=root_dir, pid=pid,
                    mount_ns="host" if same_mnt else "own")
    try:
        exe, _ = target_view(os.readlink(f"{proc}/exe"))
        t.exe = exe
        try:
            t.exe_host = sroot.host_path(exe)
        except (OSError, ValueError):
            t.exe_host = None
    except OSError:
        pass
    t.distro = read_os_release(sroot)

    found: dict[str, ObjectIdent] = {}
    for rng, off, raw, _ in maps:
        path, deleted = target_view(raw)
        name = _which(os.path.basename(path))
        if name is None or name in found or off != 0:
            continue
        mf = f"{proc}/map_files/{rng}"
        try:
            with open(mf, "rb") as f:
                o = _object_from_file(name, f, path, mf, loaded=True)
        except (OSError, ValueError) as e:
            t.warnings.append(f"cannot read mapped {path} via {mf}: {e}")
            continue
        if o.soname and o.soname != name:
            continue
        o.deleted = deleted
        found[name] = o
    libc = found.get(LIBC)
    if libc is None:
        raise IdentifyError(f"process {pid} has no libc.so.6 mapped (static or not glibc?)")
    t.arch = libc.arch
    libc_dir = os.path.dirname(libc.path) if libc.path else None
    for name in resolver_sonames(libc.glibc_version):
        if name in found:
            continue
        p = find_library(sroot, name, libc.arch, [libc_dir] if libc_dir else [])
        if p is None:
            t.warnings.append(f"{name} is not mapped and not found in the target's root")
            continue
        with sroot.open(p) as f:
            o = _object_from_file(name, f, p, sroot.to_host(p), loaded=False)
        o.note = "not-mapped"
        found[name] = o
    t.objects = [found[n] for n in (LIBC, LIBRESOLV, LIBNSS_DNS)
                 if n in found and n in resolver_sonames(libc.glibc_version)]
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
            arch = _arch_of(sroot, libc_path)
            break
    if not libc_path:
        raise IdentifyError(f"no libc.so.6 found in {root}")
    t = TargetIdent(kind="rootfs", mode="file", root=sroot.root, root_dir=sroot.root, arch=arch)
    t.distro = read_os_release(sroot)
    with sroot.open(libc_path) as f:
        libc = _object_from_file(LIBC, f, libc_path, sroot.to_host(libc_path), loaded=False)
    objs = [libc]
    d = os.path.dirname(libc_path)
    for name in resolver_sonames(libc.glibc_version)[1:]:
        p = find_library(sroot, name, arch, [d])
        if p:
            with sroot.open(p) as f:
                objs.append(_object_from_file(name, f, p, sroot.to_host(p), loaded=False))
    t.objects = objs
    _fill_package(t, sroot, libc)
    _find_thread_db(t, sroot, [d])
    return t
