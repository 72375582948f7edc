"""Reading the stopped target from inside gdb: registers, memory, locals, threads.

Everything returns ``(value, provenance)`` or plain values with the caller labelling
them; nothing here writes to the target.
"""
import os
import re
import struct

import gdb

MASK64 = (1 << 64) - 1


def lwp() -> int:
    t = gdb.selected_thread()
    return t.ptid[1] if t is not None else 0


def thread_name() -> str:
    t = gdb.selected_thread()
    return (t.name or "") if t is not None else ""


def reg(name: str) -> int:
    return int(gdb.selected_frame().read_register(name)) & MASK64


def sreg32(name: str) -> int:
    """A 32-bit signed register value (int arguments and return values)."""
    v = reg(name) & 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def sreg64(name: str) -> int:
    v = reg(name)
    return v - (1 << 64) if v & (1 << 63) else v


def mem(addr: int, n: int) -> bytes:
    return bytes(gdb.selected_inferior().read_memory(addr, n))


def u64(addr):
    return struct.unpack("<Q", mem(addr, 8))[0]


def u32(addr):
    return struct.unpack("<I", mem(addr, 4))[0]


def i32(addr):
    return struct.unpack("<i", mem(addr, 4))[0]


def cstring(addr: int, limit: int = 256) -> str | None:
    if not addr:
        return None
    try:
        return gdb.Value(addr).cast(gdb.lookup_type("char").pointer()).string(errors="replace", length=-1)[:limit]
    except gdb.error:
        raw = mem(addr, limit)
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def read_var(name: str):
    """A local/argument of the selected frame, or None if DWARF has no value here."""
    try:
        v = gdb.selected_frame().read_var(name)
    except (ValueError, gdb.error):
        return None
    if v.is_optimized_out:
        return None
    try:
        if v.type.strip_typedefs().code == gdb.TYPE_CODE_PTR:
            return int(v.cast(gdb.lookup_type("unsigned long")))
        return int(v)
    except (gdb.error, TypeError, ValueError):
        return None


def read_param_at_entry(name: str):
    """A parameter's value at function entry (DWARF entry value, from the caller's
    call-site information): right for parameters the function never assigns, even
    where the location list of the variable itself is wrong (seen: send_dg's buf2 at
    the sticky-flag write in Debian 2.31)."""
    try:
        v = gdb.parse_and_eval("%s@entry" % name)
        if v.is_optimized_out:
            return None
        return int(v.cast(gdb.lookup_type("unsigned long"))) if \
            v.type.strip_typedefs().code == gdb.TYPE_CODE_PTR else int(v)
    except (gdb.error, ValueError, TypeError):
        return read_var(name)


def app_stack(limit: int = 16, namer=None) -> list:
    """Function names from the selected frame outwards (the application stack).
    ``namer(pc)`` names frames gdb has no symbol for (send_dg, from its machine code)."""
    out = []
    f = gdb.selected_frame()
    while f is not None and len(out) < limit:
        name = f.name()
        if name is None:
            try:
                pc = f.pc()
                name = (namer(pc) if namer else None) or "0x%x" % pc
            except gdb.error:
                name = "??"
        out.append(name)
        try:
            f = f.older()
        except gdb.error:
            break
    return out


# -- the target's glibc objects, from /proc/PID/maps (no symbols) -----------------------
OBJECT_RE = {
    "libc": re.compile(r"^libc(?:-\d[\d.]*)?\.so(?:\.6)?$"),
    "libresolv": re.compile(r"^libresolv(?:-\d[\d.]*)?\.so(?:\.2)?$"),
}


def role_of(path: str):
    """'libc' / 'libresolv' for a path (or gdb objfile name, 'target:' or not), else None."""
    base = os.path.basename(path.removesuffix(" (deleted)"))
    for role, rx in OBJECT_RE.items():
        if rx.match(base):
            return role
    return None


def _maps_lines(pid: int):
    with open("/proc/%d/maps" % pid) as fh:
        for line in fh:
            parts = line.rstrip("\n").split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                yield {"start": lo, "end": hi, "offset": int(parts[2], 16),
                       "inode": int(parts[4]), "path": parts[5], "range": parts[0]}


def _host_path(pid: int, m: dict) -> str:
    """The mapped file as this (host) process reaches it: /proc/PID/root + the maps path,
    if that is the very inode mapped (for a chroot, maps paths carry the chroot's
    prefix: it is stripped); else the kernel's /proc/PID/map_files link."""
    root = "/proc/%d/root" % pid
    path = m["path"].removesuffix(" (deleted)")
    cands = [root + path]
    try:
        prefix = os.readlink(root).rstrip("/")
    except OSError:
        prefix = ""
    if prefix and path.startswith(prefix + "/"):
        cands.append(root + path[len(prefix):])
    for c in cands:
        try:
            if os.stat(c).st_ino == m["inode"]:
                return c
        except OSError:
            continue
    return "/proc/%d/map_files/%s" % (pid, m["range"])


def mapped_objects(pid: int) -> dict:
    """{"libc"|"libresolv": {path, host, bias, range}} for the objects mapped in process
    ``pid``. ``bias`` is where the object was loaded: the start of its mapping at file
    offset 0 (shared objects are linked at 0, so run-time address = bias + link-time
    address). Read from /proc/PID/maps, independent of what gdb has loaded."""
    out = {}
    for m in _maps_lines(pid):
        role = role_of(m["path"])
        if role is None or m["offset"] != 0:
            continue
        if role in out and out[role]["bias"] <= m["start"]:
            continue
        out[role] = {"path": m["path"].removesuffix(" (deleted)"), "bias": m["start"],
                     "range": m["range"], "inode": m["inode"]}
    for role, o in out.items():
        o["host"] = _host_path(pid, o)
    return out
