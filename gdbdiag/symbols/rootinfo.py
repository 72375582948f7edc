"""What a root filesystem says about itself, read through :class:`~.rootfs.SafeRoot`:
its os-release, dpkg's records (which package owns a file, an installed package's
version), and where its dynamic loader finds a library (``etc/ld.so.cache``, then the
standard directories)."""
from __future__ import annotations

import os
import re
import shlex
import struct

from . import elfinfo
from .rootfs import SafeRoot

__all__ = ["parse_os_release", "read_os_release", "dpkg_owner", "dpkg_package", "parse_ld_so_cache",
           "find_library", "arch_of", "TRIPLET"]

# Debian multiarch triplets, for the standard library directories
TRIPLET = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu", "i386": "i386-linux-gnu",
           "armhf": "arm-linux-gnueabihf", "ppc64el": "powerpc64le-linux-gnu", "s390x": "s390x-linux-gnu",
           "riscv64": "riscv64-linux-gnu"}


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
# ld.so.cache, library lookup
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


def arch_of(sroot: SafeRoot, inner: str) -> str | None:
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
    trip = TRIPLET.get(arch or "")
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
        if arch is None or arch_of(sroot, inner) == arch:
            return inner
    return None
