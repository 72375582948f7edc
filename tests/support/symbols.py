"""Test support for gdbdiag.symbols (tests/test_symbols*.py, test_glibcsrc.py, …): local HTTP
servers in the layouts the sources expect, and fixtures built from *real* Debian
packages (downloaded once through the verified Debian path and kept under
``$GDBDIAG_TEST_CACHE``, default /var/cache/gdbdiag-test)."""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from contextlib import contextmanager

from gdbdiag.symbols import extract
from gdbdiag.symbols.archive import Context, DebianArchive, Settings
from gdbdiag.symbols.cache import SymbolCache
from gdbdiag.symbols.net import http_download, http_get, sha256_file

__all__ = ["TEST_CACHE", "ROOTFS_BASE", "rootfs", "serve_dir", "blackhole", "real_deb", "debian_mirror",
           "build_deb", "extract_debug_files", "tree_snapshot"]

TEST_CACHE = os.environ.get("GDBDIAG_TEST_CACHE", "/var/cache/gdbdiag-test")
# Root filesystems for the tests: the lab's own cache (scripts/test builds it with
# `gdbdiag lab prepare`), or a directory of <release>/ trees named by GDBDIAG_ROOTFS_BASE.
ROOTFS_BASE = os.environ.get("GDBDIAG_ROOTFS_BASE")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):  # keep pytest output clean
        pass


@contextmanager
def serve_dir(directory: str):
    """Serve ``directory`` on http://127.0.0.1:PORT (a thread); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=directory)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


@contextmanager
def blackhole():
    """A local TCP port that accepts connections (kernel backlog) and never answers;
    yields its base URL."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


def rootfs(rel: str, wait: float | None = None) -> str | None:
    """The debootstrapped rootfs of ``rel``: the lab's cached tree (built now if it is
    missing), or, with GDBDIAG_ROOTFS_BASE, the tree there once it has python3 (waits
    while it is being built, up to ``wait`` seconds; None if there is none)."""
    import time

    if ROOTFS_BASE is None:
        from gdbdiag.lab.rootfs import ensure_release
        return str(ensure_release(rel))
    if wait is None:
        wait = float(os.environ.get("GDBDIAG_ROOTFS_WAIT", "900"))
    d = os.path.join(ROOTFS_BASE, rel)
    t0 = time.monotonic()
    while True:
        if os.path.exists(os.path.join(d, "usr/bin/python3")) and os.path.exists(os.path.join(d, "var/lib/dpkg/status")):
            return d
        if not os.path.isdir(d) or time.monotonic() - t0 > wait:
            return None
        time.sleep(5)


def _archive(cache_dir: str) -> DebianArchive:
    return DebianArchive(Context(Settings(timeout=60, progress=False), SymbolCache(cache_dir)))


def real_deb(package: str, version: str, arch: str = "amd64") -> tuple[str, dict, str, str]:
    """A real Debian package, downloaded once through the signed chain into
    TEST_CACHE/debs; returns (path, Packages entry, base URL, suite)."""
    arc = _archive(os.path.join(TEST_CACHE, "cache"))
    ent, base, suite, _signer, _notes = arc.find(package, version, arch, arc.suites_for(version))
    d = os.path.join(TEST_CACHE, "debs")
    os.makedirs(d, exist_ok=True)
    dest = os.path.join(d, os.path.basename(ent["Filename"]))
    if os.path.isfile(dest) and sha256_file(dest) == ent["SHA256"]:
        return dest, ent, base, suite
    tmp = tempfile.mkdtemp(dir=d)
    try:
        p = arc.download(ent, base, tmp)
        os.replace(p, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest, ent, base, suite


def debian_mirror(dest: str, suite: str, debs: dict[str, str], base: str = "http://deb.debian.org/debian",
                  arch: str = "amd64") -> str:
    """Lay out a local copy of one real suite in ``dest``: the real signed InRelease, the
    real Packages.xz it lists (by-hash and by name), and ``debs`` {pool Filename: local
    file} (pass a tampered file to test refusal).  Returns ``dest``."""

    ref = os.path.join(TEST_CACHE, "mirror-src", suite)
    inrel, rel = inrelease(base, suite, ref)
    name = f"main/binary-{arch}/Packages.xz"
    e = next(x for x in rel["SHA256"] if x["name"] == name)
    pk = os.path.join(ref, e["sha256"])
    if not os.path.isfile(pk):
        if os.path.exists(pk + ".part"):
            os.unlink(pk + ".part")
        http_download(f"{base}/dists/{suite}/main/binary-{arch}/by-hash/SHA256/{e['sha256']}",
                      pk + ".part", timeout=60, expect_sha256=e["sha256"], progress=False)
        os.replace(pk + ".part", pk)
    dd = os.path.join(dest, "dists", suite)
    os.makedirs(os.path.join(dd, f"main/binary-{arch}/by-hash/SHA256"), exist_ok=True)
    shutil.copyfile(inrel, os.path.join(dd, "InRelease"))
    shutil.copyfile(pk, os.path.join(dd, f"main/binary-{arch}/by-hash/SHA256", e["sha256"]))
    shutil.copyfile(pk, os.path.join(dd, name))
    for fn, local in debs.items():
        p = os.path.join(dest, fn)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        shutil.copyfile(local, p)
    return dest


def inrelease(base: str, suite: str, ref: str, refresh: bool = False):
    """(path, parsed deb822.Release) of ``suite``'s real InRelease, kept in ``ref``
    (downloaded when missing, or again with ``refresh``)."""
    from debian import deb822

    inrel = os.path.join(ref, "InRelease")
    if refresh or not os.path.isfile(inrel):
        os.makedirs(ref, exist_ok=True)
        data = http_get(f"{base}/dists/{suite}/InRelease", timeout=60)
        with open(inrel + ".part", "wb") as f:
            f.write(data)
        os.replace(inrel + ".part", inrel)
    with open(inrel, "rb") as f:
        return inrel, deb822.Release(f.read().decode())


def build_deb(dest: str, files: dict[str, str], package: str = "libc6-dbg", version: str = "1.0",
              arch: str = "amd64", compression: str = "xz", use_dpkg: bool = True) -> str:
    """Build a .deb at ``dest`` whose data holds ``files`` {path in package: local file}.
    With ``use_dpkg`` it is built by ``dpkg-deb -b -Z<compression>``; else assembled
    without dpkg (tar.<compression> here, compression in gz/xz/zst/none, binutils' ``ar``)."""
    tmp = tempfile.mkdtemp()
    try:
        root = os.path.join(tmp, "root")
        for inner, src in files.items():
            p = os.path.join(root, inner.lstrip("/"))
            os.makedirs(os.path.dirname(p), exist_ok=True)
            shutil.copyfile(src, p)
        os.makedirs(os.path.join(root, "DEBIAN"), exist_ok=True)
        with open(os.path.join(root, "DEBIAN", "control"), "w") as f:
            f.write(f"Package: {package}\nVersion: {version}\nArchitecture: {arch}\n"
                    "Maintainer: gdbdiag tests <tests@invalid>\nDescription: test fixture\n")
        if use_dpkg:
            z = {"gz": "gzip", "gzip": "gzip", "xz": "xz", "zst": "zstd", "zstd": "zstd", "none": "none"}[compression]
            subprocess.run(["dpkg-deb", "--root-owner-group", "-Z" + z, "-z1", "-b", root, dest],
                           check=True, capture_output=True)
            return dest
        return _build_deb_py(root, dest, compression)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_deb_py(root: str, dest: str, compression: str) -> str:
    import io
    import tarfile

    def tar_of(d, exclude=None) -> bytes:
        bio = io.BytesIO()
        with tarfile.open(fileobj=bio, mode="w", format=tarfile.GNU_FORMAT) as tf:
            for dp, dirs, files in os.walk(d):
                dirs[:] = sorted(x for x in dirs if x != exclude)
                for fn in sorted(files):
                    full = os.path.join(dp, fn)
                    tf.add(full, arcname="./" + os.path.relpath(full, d))
        return bio.getvalue()

    def compress(b: bytes, c: str) -> tuple[bytes, str]:
        if c in ("gz", "gzip"):
            import gzip
            return gzip.compress(b, 1), ".gz"
        if c == "xz":
            import lzma
            return lzma.compress(b, preset=0), ".xz"
        if c in ("zst", "zstd"):
            import zstandard
            return zstandard.ZstdCompressor(level=1).compress(b), ".zst"
        return b, ""

    control, cext = compress(tar_of(os.path.join(root, "DEBIAN")), "gz")
    data, dext = compress(tar_of(root, exclude="DEBIAN"), compression)
    members = {"debian-binary": b"2.0\n", "control.tar" + cext: control, "data.tar" + dext: data}
    tmp = tempfile.mkdtemp()
    try:
        for name, body in members.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(body)
        # binutils' ar (D: zero timestamps and ids), members in the order a .deb needs;
        # `ar r` adds to an existing archive: start from none
        if os.path.exists(dest):
            os.unlink(dest)
        subprocess.run(["ar", "rcD", os.path.abspath(dest)] + list(members), cwd=tmp, check=True,
                       capture_output=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def extract_debug_files(deb: str, build_ids: set[str], dest_dir: str) -> dict[str, str]:
    """{build-id: path} of the debug files for ``build_ids`` in a real -dbg package."""
    os.makedirs(dest_dir, exist_ok=True)
    out = {}
    for c in extract.scan_deb(deb, build_ids, dest_dir):
        if c.build_id in build_ids:
            p = os.path.join(dest_dir, c.build_id + ".debug")
            os.replace(c.path, p)
            out[c.build_id] = p
    return out


def tree_snapshot(root: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under ``root`` (symlinks too)."""
    out = {}
    for dp, dirs, files in os.walk(root):
        for fn in files:
            p = os.path.join(dp, fn)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out
