"""The safety net outside gdb: if gdb dies with breakpoints inserted, put the code back.

``gdbdiag attach`` starts this in its own session before gdb arms anything. It waits
on gdb's pidfd (woken the instant gdb exits, however it exits: quit, crash, SIGKILL) and
then, if the target's code differs from its files at any PC the plugin recorded as armed
(GDBDIAG_ARMED_FILE, rewritten atomically before any probe is inserted):

1. seizes every thread of the target (PTRACE_SEIZE): from here on an int3 still in
   memory is a ptrace stop for us, not a fatal SIGTRAP;
2. writes the original bytes back (read from the mapped files, as the target sees them);
3. interrupts each thread; one that stopped on our int3 (rip == armed pc + 1) is moved
   back to the breakpoint address and its SIGTRAP discarded;
4. detaches, and checks the code bytes once more.

Remaining window (documented): a thread that executes an int3 between gdb's death and
step 1 (microseconds after the pidfd wakes us) gets a SIGTRAP with no tracer. A thread
that gdb had stopped at a breakpoint but not yet handled when it died is restarted by
the kernel at pc+1 before anyone can fix it.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import json
import os
import select
import signal
import sys
import time

PTRACE_CONT, PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_DETACH = 7, 12, 13, 17
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207
WALL = 0x40000000
RIP = 16            # index of rip in struct user_regs_struct (x86-64)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


class Regs(ctypes.Structure):
    _fields_ = [("r", ctypes.c_ulonglong * 27)]


def _ptrace(req, tid, addr=None, data=None):
    r = _libc.ptrace(req, tid, addr, data)
    if r == -1:
        e = ctypes.get_errno()
        if e:
            raise OSError(e, f"ptrace({req}, {tid}): {os.strerror(e)}")
    return r


def original_bytes(pid: int, pcs: list[int]) -> dict[int, int]:
    """The byte the file on disk has at each pc (None when not in a file mapping)."""
    from .codecheck import exec_mappings
    out = {}
    maps = exec_mappings(pid)
    for pc in pcs:
        for m in maps:
            if m["start"] <= pc < m["end"]:
                with open(f"/proc/{pid}/map_files/{m['range']}", "rb") as fh:
                    fh.seek(m["offset"] + pc - m["start"])
                    out[pc] = fh.read(1)[0]
                break
    return out


def current_bytes(pid: int, pcs) -> dict[int, int]:
    out = {}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for pc in pcs:
            mem.seek(pc)
            out[pc] = mem.read(1)[0]
    return out


def restore(pid: int, pcs: list[int], log=print) -> dict:
    """Make the target's code at ``pcs`` equal its files again, fixing trapped threads."""
    result = {"armed": len(pcs), "patched": 0, "rewound": [], "threads": 0, "errors": []}
    if not pcs:
        return result
    want = original_bytes(pid, pcs)
    have = current_bytes(pid, want)
    bad = [pc for pc in want if have[pc] != want[pc]]
    if not bad:
        return result
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    seized = []
    for tid in tids:
        try:
            _ptrace(PTRACE_SEIZE, tid)
            seized.append(tid)
        except OSError as exc:
            result["errors"].append(f"seize {tid}: {exc}")
    result["threads"] = len(seized)
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        for pc in bad:
            mem.seek(pc)
            mem.write(bytes([want[pc]]))
            result["patched"] += 1
    armed = set(pcs)
    for tid in seized:
        try:
            _ptrace(PTRACE_INTERRUPT, tid)
        except OSError as exc:
            result["errors"].append(f"interrupt {tid}: {exc}")
    for tid in seized:
        try:
            if _settle(pid, tid, armed):
                result["rewound"].append(tid)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                result["errors"].append(f"thread {tid}: {exc}")
            try:
                _ptrace(PTRACE_DETACH, tid)
            except OSError:
                pass
    after = current_bytes(pid, want)
    result["still_different"] = [hex(pc) for pc in want if after[pc] != want[pc]]
    log(f"gdbdiag supervisor: restored {result['patched']} byte(s) in pid {pid}, "
        f"rewound {len(result['rewound'])} thread(s)")
    return result


def _sigtrap_pending(pid: int, tid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as fh:
            for line in fh:
                if line.startswith("SigPnd:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTRAP - 1)))
    except OSError:
        pass
    return False


def _settle(pid: int, tid: int, armed: set) -> bool:
    """Take one seized, interrupted thread to a clean detach. True if it had trapped on
    one of our int3s (its rip is moved back onto the restored instruction)."""
    rewound = False
    for _ in range(4):
        _, status = os.waitpid(tid, WALL)
        if not os.WIFSTOPPED(status):
            return rewound                          # the thread exited meanwhile
        event, sig = status >> 16, os.WSTOPSIG(status)
        regs = Regs()
        _ptrace(PTRACE_GETREGS, tid, None, ctypes.addressof(regs))
        at_trap = (regs.r[RIP] - 1) in armed
        if event == 0:                              # signal-delivery-stop
            if sig == signal.SIGTRAP and (at_trap or rewound):
                if at_trap and not rewound:
                    regs.r[RIP] -= 1
                    _ptrace(PTRACE_SETREGS, tid, None, ctypes.addressof(regs))
                    rewound = True
                _ptrace(PTRACE_DETACH, tid, None, None)     # the SIGTRAP is dropped
                return rewound
            _ptrace(PTRACE_DETACH, tid, None, ctypes.c_void_p(sig))   # a real signal
            return rewound
        # the PTRACE_INTERRUPT stop: a SIGTRAP from our int3 may still be queued behind it
        if at_trap and not rewound and _sigtrap_pending(pid, tid):
            regs.r[RIP] -= 1
            _ptrace(PTRACE_SETREGS, tid, None, ctypes.addressof(regs))
            rewound = True
            _ptrace(PTRACE_CONT, tid, None, None)   # next stop: that SIGTRAP's delivery
            continue
        _ptrace(PTRACE_DETACH, tid, None, None)
        return rewound
    _ptrace(PTRACE_DETACH, tid, None, None)
    return rewound


def read_armed(path: str) -> list[int]:
    try:
        with open(path) as fh:
            return [int(pc) for pc in json.load(fh).get("pcs", [])]
    except (OSError, ValueError):
        return []


def watch(target: int, gdb_pid: int, armed_file: str, log=print) -> dict:
    """Block until gdb exits, then repair the target if needed."""
    try:
        fd = os.pidfd_open(gdb_pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            fd = None
        else:
            raise
    if fd is not None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll(1000):
            pass
        os.close(fd)
    # gdb is gone. Its armed file says which PCs it may have left with an int3.
    if not os.path.exists(f"/proc/{target}"):
        return {"target": "gone"}
    pcs = read_armed(armed_file)
    return restore(target, pcs, log=log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gdbdiag.supervisor")
    ap.add_argument("--target", type=int, required=True)
    ap.add_argument("--gdb", type=int, required=True)
    ap.add_argument("--armed", required=True)
    ap.add_argument("--log", default=None)
    args = ap.parse_args(argv)
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)     # outlive the runner's signals until gdb is gone
    out = open(args.log, "a") if args.log else sys.stderr

    def log(msg):
        out.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        out.flush()

    log(f"gdbdiag supervisor: watching gdb {args.gdb} for target {args.target}")
    res = watch(args.target, args.gdb, args.armed, log=log)
    log(f"gdbdiag supervisor: done {json.dumps(res)}")
    try:
        os.unlink(args.armed)
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
