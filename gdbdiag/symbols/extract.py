"""Pull debug files out of .deb/.ddeb packages and directories.

Two interchangeable back ends read a package's data tarball:

* ``dpkg-deb --fsys-tarfile`` when dpkg-deb is installed (it knows every format dpkg
  does), streamed into :mod:`tarfile`;
* pure Python: python-debian's :mod:`debian.debfile` reads the ar archive and finds
  the ``data.tar.{gz,xz,bz2,zst}`` member, which is decompressed with
  gzip/lzma/bz2/zstandard and streamed into :mod:`tarfile`.

Either way only regular files under ``usr/lib/debug/`` are considered: files in the
``.build-id/xx/yyyy.debug`` layout are taken by name when their id is wanted; any other
ELF file there (path-based layout, e.g. Ubuntu 18.04's
``usr/lib/debug/lib/x86_64-linux-gnu/libc-2.27.so``) is matched by its real build-id.
Nothing is ever written outside ``dest_dir``; member names are not used as paths.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

from debian.arfile import ArError
from debian.debfile import DebFile

from ..errors import GdbdiagError, one_line
from . import elfinfo

__all__ = ["ExtractError", "DebugCandidate", "have_dpkg_deb", "open_data_tar", "extract_elf_members",
           "scan_deb", "scan_dir", "scan_file"]

MAX_MEMBER = 2 << 30


class ExtractError(GdbdiagError):
    """The package cannot be read; str() is a one-line cause."""


@dataclass
class DebugCandidate:
    path: str              # extracted (or in-place) file
    build_id: str | None   # its real build-id
    member: str            # name inside the package / path in the directory
    has_debug_info: bool


def have_dpkg_deb() -> bool:
    return shutil.which("dpkg-deb") is not None


def _data_member(f):
    """The ``data.tar.*`` member of the .deb open as ``f`` (python-debian's
    :class:`~debian.debfile.DebFile` reads the ar archive and checks the parts of a
    binary package), as a file object reading only that member."""
    try:
        deb = DebFile(fileobj=f)
    except ArError as e:       # DebError is an ArError too
        raise ExtractError(f"not a Debian package ({one_line(e)})") from None
    except (OSError, ValueError) as e:
        raise ExtractError(f"corrupt ar archive ({one_line(e)})") from None
    return next(m for m in deb.getmembers() if m.name.startswith("data.tar"))


def _decompressor(name: str, raw):
    if name.endswith(".tar"):
        return raw
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if name.endswith(".xz") or name.endswith(".lzma"):
        return lzma.LZMAFile(raw, "rb")
    if name.endswith(".bz2"):
        return bz2.BZ2File(raw, "rb")
    if name.endswith(".zst"):
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    raise ExtractError(f"unsupported compression of {name}")


@contextmanager
def open_data_tar(deb_path: str, use_dpkg: bool | None = None):
    """Context manager yielding a streaming :class:`tarfile.TarFile` of the package's
    data; ``use_dpkg`` None = dpkg-deb when installed."""
    if use_dpkg is None:
        use_dpkg = have_dpkg_deb()
    if use_dpkg:
        err = tempfile.TemporaryFile()
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb_path], stdout=subprocess.PIPE,
                                stderr=err, stdin=subprocess.DEVNULL)
        failed = None
        try:
            try:
                tf = tarfile.open(fileobj=proc.stdout, mode="r|")
            except tarfile.TarError as e:
                failed = e
                tf = None
            if tf is not None:
                try:
                    yield tf
                except tarfile.TarError as e:
                    failed = e
            # drain so dpkg-deb can finish and report
            while proc.stdout.read(1 << 16):
                pass
        finally:
            proc.stdout.close()
            rc = proc.wait()
            err.seek(0)
            msg = err.read().decode("utf-8", "replace").strip().splitlines()
            err.close()
        if rc != 0:
            raise ExtractError(f"dpkg-deb: {msg[-1] if msg else f'exit {rc}'}")
        if failed is not None:
            raise ExtractError(f"corrupt package data: {failed}")
        return
    with open(deb_path, "rb") as f:
        member = _data_member(f)
        # streamed: python-debian's DebPart.tgz() would need the whole member in memory
        # (and an unzstd binary for .zst); tarfile reads it once, front to back
        stream = _decompressor(member.name, member)
        try:
            tf = tarfile.open(fileobj=stream, mode="r|")
            yield tf
        except (tarfile.TarError, lzma.LZMAError, OSError, EOFError, zlib.error) as e:
            raise ExtractError(f"corrupt package data ({member.name}): {e}") from None


def _bid_from_name(member: str) -> str | None:
    # usr/lib/debug/.build-id/ab/cdef....debug
    parts = member.split("/")
    if len(parts) >= 2 and parts[-2] and len(parts[-2]) == 2 and parts[-1].endswith(".debug") \
            and ".build-id" in parts:
        bid = (parts[-2] + parts[-1][: -len(".debug")]).lower()
        if all(c in "0123456789abcdef" for c in bid):
            return bid
    return None


def _facts(path: str):
    try:
        with open(path, "rb") as f:
            if not elfinfo.is_elf(f):
                return None
            return elfinfo.elf_facts(f)
    except (OSError, ValueError):
        return None


def scan_deb(deb_path: str, wanted: set[str], dest_dir: str, use_dpkg: bool | None = None) -> list[DebugCandidate]:
    """Extract the debug files of the wanted build-ids from a .deb/.ddeb into
    ``dest_dir`` (files named by counter); returns candidates with their real build-ids
    (to be verified by the caller).  Unwanted ELF files are deleted right away."""
    wanted = {w.lower() for w in wanted}
    out: list[DebugCandidate] = []
    k = 0
    with open_data_tar(deb_path, use_dpkg) as tf:
        for m in tf:
            if not m.isreg():
                continue
            name = m.name[2:] if m.name.startswith("./") else m.name.lstrip("/")
            if not name.startswith("usr/lib/debug/"):
                continue
            by_name = _bid_from_name(name)
            if by_name is not None and by_name not in wanted:
                continue
            if m.size > MAX_MEMBER:
                continue
            k += 1
            dst = _copy_elf_member(tf, m, os.path.join(dest_dir, f"member{k}.debug"))
            if dst is None:
                continue
            facts = _facts(dst)
            bid = facts.build_id if facts else None
            if bid in wanted or by_name is not None:
                out.append(DebugCandidate(dst, bid, name, bool(facts and facts.has_debug_info)))
            else:
                os.unlink(dst)
    return out


def scan_file(path: str, wanted: set[str]) -> DebugCandidate | None:
    facts = _facts(path)
    if facts is None:
        return None
    return DebugCandidate(path, facts.build_id, path, facts.has_debug_info)


def scan_dir(root: str, wanted: set[str], max_files: int = 200000) -> list[DebugCandidate]:
    """Debug files for the wanted ids in a directory tree: first the build-id layout
    (``.build-id/xx/yyyy.debug`` at ``root`` or ``root/usr/lib/debug``), then any ELF
    file (path-based layout) matched by its real build-id.  Files are used in place."""
    wanted = {w.lower() for w in wanted}
    out: dict[str, DebugCandidate] = {}
    for base in (root, os.path.join(root, "usr/lib/debug"), os.path.join(root, "debug")):
        for bid in wanted:
            p = os.path.join(base, ".build-id", bid[:2], bid[2:] + ".debug")
            if bid not in out and os.path.isfile(p):
                c = scan_file(p, wanted)
                if c:
                    out[bid] = c
    if wanted - set(out):
        n = 0
        for d, dirs, files in os.walk(root):
            dirs.sort()
            for fn in sorted(files):
                n += 1
                if n > max_files:
                    break
                p = os.path.join(d, fn)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                c = scan_file(p, wanted)
                if c and c.build_id in wanted and c.build_id not in out:
                    out[c.build_id] = c
    return list(out.values())


def extract_elf_members(deb_path: str, want_name, dest_dir: str, use_dpkg: bool | None = None) -> list[tuple[str, str, "elfinfo.ElfFacts"]]:
    """Extract the regular ELF files whose member name satisfies ``want_name(name)``
    into ``dest_dir``; returns [(member, path, facts)]."""
    out = []
    k = 0
    with open_data_tar(deb_path, use_dpkg) as tf:
        for m in tf:
            if not m.isreg() or m.size > MAX_MEMBER:
                continue
            name = m.name[2:] if m.name.startswith("./") else m.name.lstrip("/")
            if not want_name(name):
                continue
            k += 1
            dst = _copy_elf_member(tf, m, os.path.join(dest_dir, f"elf{k}-{os.path.basename(name)}"))
            if dst is None:
                continue
            facts = _facts(dst)
            if facts is not None:
                out.append((name, dst, facts))
    return out


def _copy_elf_member(tf, member, dst: str) -> str | None:
    """Copy a tar member to ``dst`` if it is an ELF file (else nothing); return dst."""
    src = tf.extractfile(member)
    if src is None:
        return None
    head = src.read(4)
    if head != b"\x7fELF":
        return None
    with open(dst, "xb") as o:
        o.write(head)
        shutil.copyfileobj(src, o, 1 << 20)
    return dst
