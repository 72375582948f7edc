"""Root filesystems for lab containers.

Debian releases are built once with debootstrap (minbase + redis-server + python3) and
cached under ``<cache>/rootfs/<release>``; a user's image (a directory, or a tarball as
``docker export`` / ``podman export`` write) is used as it is, or unpacked once into
``<cache>/images/<sha256>``. Containers never write into these trees: each lab mounts an
overlay on top (see container.py).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import LabError

RELEASES = {
    # release: (glibc upstream version, what the lab expects of it)
    "bullseye": ("2.31", "affected by bug 30081: serial mode + error answer stalls"),
    "bookworm": ("2.36", "serial mode engages; stall fixed by Debian's backport"),
    "trixie": ("2.41", "serial mode engages (flag in _res._flags); stall fixed upstream"),
}
PACKAGES = ("redis-server", "python3")
STAMP = ".gdbdiag-rootfs.json"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The lab cache: --cache, $GDBDIAG_LAB_CACHE, else /var/cache/gdbdiag (root) or XDG."""
    if override:
        return Path(override)
    env = os.environ.get("GDBDIAG_LAB_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/gdbdiag")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "gdbdiag"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def rootfs_info(root: Path) -> dict | None:
    try:
        return json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None


def ensure_release(release: str, cache: str | os.PathLike | None = None,
                   mirror: str | None = None, log=None) -> Path:
    """Return the cached rootfs of ``release``, building it with debootstrap if needed."""
    if release not in RELEASES:
        raise LabError(f"unknown release {release!r} (choose from {', '.join(RELEASES)})")
    base = cache_dir(cache) / "rootfs"
    root = base / release
    if rootfs_info(root):
        return root
    if not shutil.which("debootstrap"):
        raise LabError("debootstrap is not installed (run scripts/setup, or apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise LabError("building a lab root filesystem needs root (debootstrap)")
    mirror = mirror or os.environ.get("GDBDIAG_DEBIAN_MIRROR") or DEFAULT_MIRROR
    with _locked(base / f".{release}.lock"):
        if rootfs_info(root):          # built by a concurrent run while we waited
            return root
        tmp = base / f".{release}.building"
        if tmp.exists():
            shutil.rmtree(tmp)
        cmd = ["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
               release, str(tmp), mirror]
        if log:
            log(f"building {release} root filesystem with debootstrap (once; cached in {root})")
        t0 = time.monotonic()
        logfile = base / f"{release}.debootstrap.log"
        with open(logfile, "w") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        if rc != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = _tail(logfile)
            if "Failed getting release file" in tail or "Couldn't download" in tail \
                    or "Temporary failure" in tail:
                raise LabError(f"Debian archive unreachable at {mirror} (see {logfile})")
            raise LabError(f"debootstrap {release} failed (exit {rc}): {tail.strip()[-200:]}")
        # Keep the tree small: apt lists and the .deb cache are not needed to run.
        shutil.rmtree(tmp / "var/cache/apt/archives", ignore_errors=True)
        (tmp / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        info = {
            "release": release,
            "glibc": _dpkg_version(tmp, "libc6"),
            "redis": _dpkg_version(tmp, "redis-server"),
            "python3": _dpkg_version(tmp, "python3"),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.monotonic() - t0, 1),
            "mirror": mirror,
        }
        (tmp / STAMP).write_text(json.dumps(info, indent=1) + "\n")
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    return root


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _dpkg_version(root: Path, package: str) -> str | None:
    from debian.deb822 import Deb822
    status = root / "var/lib/dpkg/status"
    try:
        with open(status, encoding="utf-8", errors="replace") as fh:
            for para in Deb822.iter_paragraphs(fh):
                if para.get("Package") == package and "installed" in para.get("Status", ""):
                    return para.get("Version")
    except OSError:
        return None
    return None


def ensure_user_rootfs(spec: str, cache: str | os.PathLike | None = None) -> Path:
    """A user's root filesystem: a directory (used in place, read-only) or a tarball."""
    p = Path(spec)
    if p.is_dir():
        if not (p / "bin").exists() and not (p / "usr/bin").exists():
            raise LabError(f"{p} does not look like a root filesystem (no bin/ or usr/bin/)")
        return p.resolve()
    if not p.is_file():
        raise LabError(f"--rootfs {spec}: no such directory or tarball")
    digest = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    base = cache_dir(cache) / "images"
    root = base / digest.hexdigest()[:24]
    with _locked(base / f".{root.name}.lock"):
        if (root / ".gdbdiag-image").exists():
            return root
        tmp = base / f".{root.name}.unpacking"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # GNU tar handles every compression docker/podman exports use and keeps owners,
        # modes and device nodes as root; members are confined to tmp (no absolute paths).
        r = subprocess.run(["tar", "-x", "-p", "--numeric-owner", "-f", str(p), "-C", str(tmp)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise LabError(f"cannot unpack {p}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'tar failed'}")
        (tmp / ".gdbdiag-image").write_text(json.dumps({"source": str(p.resolve())}) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root
