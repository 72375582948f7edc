"""Small ELF facts via pyelftools: GNU build-id, SONAME, machine, glibc banner."""
from __future__ import annotations

import mmap
import re
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection

__all__ = ["ElfFacts", "elf_facts", "read_build_id", "is_elf", "GLIBC_BANNER_RE", "glibc_banner",
           "DEB_ARCH"]

# e_machine -> Debian architecture name (ELF class disambiguates x32, not handled)
DEB_ARCH = {
    "EM_X86_64": "amd64",
    "EM_AARCH64": "arm64",
    "EM_386": "i386",
    "EM_ARM": "armhf",
    "EM_PPC64": "ppc64el",
    "EM_S390": "s390x",
    "EM_RISCV": "riscv64",
    "EM_MIPS": "mips64el",
    "EM_LOONGARCH": "loong64",
}

GLIBC_BANNER_RE = re.compile(
    rb"GNU C Library \(([^)\n]{1,120})\) (?:stable |development )?release version (\d+\.\d+(?:\.\d+)?)")


@dataclass
class ElfFacts:
    build_id: str | None
    soname: str | None
    machine: str | None        # e.g. EM_X86_64
    arch: str | None           # Debian name, e.g. amd64
    elfclass: int | None
    has_debug_info: bool       # .debug_info / .zdebug_info present and non-empty (not NOBITS)


def is_elf(f) -> bool:
    pos = f.tell()
    try:
        return f.read(4) == b"\x7fELF"
    finally:
        f.seek(pos)


def _build_id_from(elf: ELFFile) -> str | None:
    for sec in elf.iter_sections():
        if isinstance(sec, NoteSection):
            for note in sec.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                    return str(note["n_desc"]).lower()
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_NOTE":
            for note in seg.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                    return str(note["n_desc"]).lower()
    return None


def elf_facts(f) -> ElfFacts:
    """Facts of the ELF file object ``f`` (binary, seekable).  Raises ValueError if not ELF."""
    try:
        elf = ELFFile(f)
    except ELFError as e:
        raise ValueError(f"not an ELF file: {e}") from None
    soname = None
    dyn = elf.get_section_by_name(".dynamic")
    if dyn is not None and dyn["sh_type"] != "SHT_NOBITS":
        try:
            for tag in dyn.iter_tags():
                if tag.entry.d_tag == "DT_SONAME":
                    soname = tag.soname
                    break
        except (ELFError, AttributeError, KeyError):
            soname = None
    has_dbg = False
    for name in (".debug_info", ".zdebug_info"):
        s = elf.get_section_by_name(name)
        if s is not None and s["sh_type"] != "SHT_NOBITS" and s["sh_size"] > 0:
            has_dbg = True
    machine = elf["e_machine"]
    return ElfFacts(build_id=_build_id_from(elf), soname=soname, machine=machine,
                    arch=DEB_ARCH.get(machine), elfclass=elf.elfclass, has_debug_info=has_dbg)


def read_build_id(path_or_file) -> str | None:
    """GNU build-id (lowercase hex) of an ELF file path or binary file object; None if
    the file has none or is not ELF."""
    if hasattr(path_or_file, "read"):
        try:
            return _build_id_from(ELFFile(path_or_file))
        except ELFError:
            return None
    with open(path_or_file, "rb") as f:
        try:
            return _build_id_from(ELFFile(f))
        except ELFError:
            return None


def glibc_banner(f) -> tuple[str, str] | None:
    """(distro text, upstream version) from libc.so.6's version banner, e.g.
    ("Debian GLIBC 2.31-13+deb11u11", "2.31"), or None."""
    try:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (ValueError, OSError, AttributeError):
        mm = None
    try:
        m = GLIBC_BANNER_RE.search(mm if mm is not None else f.read())
        if not m:
            return None
        return bytes(m.group(1)).decode("utf-8", "replace"), bytes(m.group(2)).decode()
    finally:
        if mm is not None:
            mm.close()
