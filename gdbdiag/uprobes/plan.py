"""From the analyzer's findings about a target's glibc to a probe plan (host paths)."""
from __future__ import annotations

import os

from ..errors import EXIT_REFUSED, GdbdiagError
from .program import Plan


class NoPlan(GdbdiagError):
    """The probe points cannot be placed; the message says why (one line)."""
    code = EXIT_REFUSED


def target_file(pid: int, path: str) -> str:
    """The target's file as the host reaches it. ``path`` comes from the target's own
    view (/proc/PID/maps or its ld.so.cache): the kernel's canonical path inside its
    mount namespace, so /proc/PID/root + path walks no symlink of the image."""
    return f"/proc/{pid}/root{path}"


def _object(ident, soname_prefix: str):
    for o in ident.objects:
        if o.name.startswith(soname_prefix) and o.path:
            return o
    return None


def analyze(pid: int, ident, debug_files: dict | None = None) -> dict:
    from ..glibc.analyzer import analyze_target
    libc = _object(ident, "libc.so")
    if libc is None:
        raise NoPlan("no libc.so.6 found in the target")
    res = _object(ident, "libresolv.so")
    return analyze_target(f"/proc/{pid}/root", target_file(pid, libc.path),
                          target_file(pid, res.path) if res else None, debug_files or {})


def shared_pidns(pid: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of our PID namespace when the target is in it too (a debug
    container sharing the target's): there `pid` is not the host's TGID, which is what
    bpf_get_current_pid_tgid() returns, so the programs compare the namespace's numbers."""
    try:
        mine, theirs = os.stat("/proc/self/ns/pid"), os.stat(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    same = (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
    # the host's own namespace (PROC_PID_INIT_INO): host PIDs are what the kernel reports
    return (mine.st_dev, mine.st_ino) if same and mine.st_ino != 0xEFFFFFFC else None


def make_plan(pid: int, ident, analysis: dict) -> Plan:
    """File offsets of every probe point (uprobes are placed by file offset)."""
    where = analysis.get("send_dg_object")
    if not where:
        raise NoPlan("send_dg not found: " + (analysis.get("unknown_reason") or "unknown reason"))
    obj = analysis[where]
    if not obj.get("probe_set_complete"):
        raise NoPlan("send_dg's probe set is incomplete: " + "; ".join(obj.get("warnings") or ["?"]))
    libc = analysis["libc"]
    path = _object(ident, "libc.so" if where == "libc" else "libresolv.so").path
    writers = [{"addr_offset": w["file_offset"], "base_reg": w["base_reg"], "field": w["field"],
                "bit": w["bit"], "cfa_rsp": w.get("cfa_rsp")} for w in obj.get("sticky_writers", []) if w.get("in_send_dg")]
    gai = libc.get("getaddrinfo") or {}
    return Plan(pid=pid, send_dg_file=target_file(pid, path),
                libc_file=target_file(pid, _object(ident, "libc.so").path),
                send_dg_entry=obj["send_dg"]["file_offset"], writers=writers,
                gai_entry=gai.get("file_offset"), pidns=shared_pidns(pid))
