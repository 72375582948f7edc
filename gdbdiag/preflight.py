"""Host side: may we attach to this PID at all? One-line causes, no side effects."""
from __future__ import annotations

import os

from .errors import EXIT_REFUSED, GdbdiagError

CAP_SYS_PTRACE = 19


def _status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def refuse(msg: str):
    raise GdbdiagError(msg, EXIT_REFUSED)


def check_target(pid: int) -> dict:
    """Raise GdbdiagError(EXIT_REFUSED) with the cause, or return facts about the target."""
    if pid <= 0:
        refuse(f"{pid} is not a process ID")
    if pid == os.getpid():
        refuse("refusing to attach to gdbdiag itself")
    try:
        st = _status(pid)
    except FileNotFoundError:
        refuse(f"no process {pid}")
    except PermissionError:
        refuse(f"cannot read /proc/{pid}/status: permission denied")
    state = st.get("State", "")
    if state.startswith("Z"):
        refuse(f"process {pid} is a zombie (exited, not yet reaped by its parent): nothing to attach to")
    if state.startswith("X"):
        refuse(f"process {pid} is exiting")
    tracer = int(st.get("TracerPid", "0") or 0)
    if tracer:
        try:
            who = open(f"/proc/{tracer}/comm").read().strip()
        except OSError:
            who = "?"
        refuse(f"process {pid} is already traced by PID {tracer} ({who}); only one tracer "
               "at a time — detach that one first")
    _check_ptrace_permission(pid, st)
    return {"pid": pid, "name": st.get("Name"), "threads": int(st.get("Threads", "1")),
            "nspid": [int(x) for x in st.get("NSpid", str(pid)).split()]}


def _caps() -> int:
    return int(_status(os.getpid()).get("CapEff", "0"), 16)


def _check_ptrace_permission(pid: int, st: dict) -> None:
    has_cap = bool(_caps() & (1 << CAP_SYS_PTRACE))
    try:
        scope = int(open("/proc/sys/kernel/yama/ptrace_scope").read().strip())
    except (OSError, ValueError):
        scope = None                   # no Yama LSM: classic ptrace rules only
    if scope == 3:
        refuse("Yama ptrace_scope is 3 (no attach at all, until reboot): gdbdiag cannot "
               "attach on this node")
    if scope == 2 and not has_cap:
        refuse("Yama ptrace_scope is 2 (admin-only attach) and this process lacks "
               "CAP_SYS_PTRACE (Kubernetes: `kubectl debug --profile=sysadmin`, or "
               "securityContext.capabilities.add: [SYS_PTRACE])")
    uids = [int(x) for x in st.get("Uid", "0 0 0 0").split()]
    if not has_cap and os.geteuid() not in (uids[0], uids[1], uids[2]):
        refuse(f"no ptrace permission: process {pid} runs as uid {uids[1]} and gdbdiag lacks "
               "CAP_SYS_PTRACE (run as root, or in Kubernetes add SYS_PTRACE: "
               "`kubectl debug --profile=sysadmin` / capabilities.add: [SYS_PTRACE])")
    # classic rule (cap_ptrace_access_check): without CAP_SYS_PTRACE, a tracer must hold
    # every capability the target holds — a root debug container with all capabilities
    # dropped (kubectl debug --profile=restricted) cannot attach to a root container
    their = int(st.get("CapPrm", "0") or "0", 16)
    if not has_cap and their & ~_caps():
        refuse(f"no ptrace permission: process {pid} holds capabilities this process lacks "
               "and gdbdiag lacks CAP_SYS_PTRACE (grant SYS_PTRACE and SYS_ADMIN: "
               "`gdbdiag pod --caps minimal`, docs/field.md)")
    if scope == 1 and not has_cap:
        refuse("Yama ptrace_scope is 1 (only a parent may attach) and this process lacks "
               "CAP_SYS_PTRACE (run as root, `sysctl kernel.yama.ptrace_scope=0`, or in "
               "Kubernetes add SYS_PTRACE)")


def check_resolver(pid: int) -> dict:
    """Does the process use glibc's resolver? Refuse musl, static and Go programs."""
    maps = []
    try:
        with open(f"/proc/{pid}/maps") as fh:
            maps = [l.split(None, 5)[5].strip() for l in fh if len(l.split(None, 5)) == 6]
    except OSError as exc:
        refuse(f"cannot read /proc/{pid}/maps: {exc.strerror}")
    names = {os.path.basename(m) for m in maps if m.startswith("/")}
    if any(n.startswith("ld-musl") or n.startswith("libc.musl") for n in names):
        refuse(f"process {pid} uses musl libc, not glibc: its resolver has no send_dg and no "
               "sticky single-request mode — nothing for gdbdiag to diagnose")
    if any(n == "libc.so.6" or (n.startswith("libc-2.") and n.endswith(".so")) for n in names):
        return {"libc": "glibc"}
    exe = f"/proc/{pid}/exe"
    kind = "statically linked"
    try:
        with open(exe, "rb") as fh:
            data = fh.read(1 << 20)
        if b"Go build ID" in data or b"runtime.goexit" in data or b"\xff Go buildinf" in data:
            kind = "a Go program (its resolver is Go's own, or cgo through a libc it does not map)"
    except OSError:
        pass
    refuse(f"process {pid} does not map glibc's libc.so.6 ({kind}): there is no glibc resolver "
           "to trace")
