"""One glibc process: each thread's sticky bit and its resolver wait now, read through
/proc only (:class:`gdbdiag.passive.PassiveSampler`: ``/proc/PID/mem`` for ``_res``,
``task/TID/syscall`` for the wait; never a ptrace stop).

A wait is send_dg's when the thread is in ``poll``/``ppoll`` on one fd with
``events == POLLIN`` and a timeout, the fd is a UDP socket (the sampler checks that),
and at least one of:

* the fd is one of the thread's own resolver sockets (``_res._u._ext.nssocks[]``, read
  from its ``_res``), and/or
* a return address on the user stack above the saved stack pointer is send_dg's own
  poll call site (the analyzer's ``poll`` call, ``wait`` site), or lies inside
  send_dg's bounds (the analyzer's, or a debug file's).

``since_ms`` is a lower bound of how long the wait has lasted (:mod:`.clock`).
"""
from __future__ import annotations

import os
import struct
import time

from ..glibc.codeflow import RES_STATE
from ..passive import STALL_MIN_MS, FileFacts, PassiveError, PassiveSampler, ThreadSample
from .builds import Build
from .classify import EXITED, NO_STATE, UNREADABLE, GlibcProc, Skip
from .clock import SchedClock

NSSOCKS_OFF, NSSOCKS_SIZE = RES_STATE["_u._ext.nssocks"]
STACK_SCAN = 1024


def open_sampler(p: GlibcProc, build: Build | None, files: FileFacts) -> PassiveSampler | Skip:
    try:
        smp = PassiveSampler(p.pid, affected=build.affected if build else None, files=files,
                             glibc_version=build.glibc_version if build else None)
    except PassiveError as e:
        if not os.path.exists(f"/proc/{p.pid}"):
            return Skip(p.pid, EXITED, "exited while being read", p.comm, p.container)
        msg = str(e)
        reason = UNREADABLE if "cannot read" in msg else NO_STATE
        return Skip(p.pid, reason, msg, p.comm, p.container)
    return smp


def apply_analysis(smp: PassiveSampler, build: Build | None) -> list[int]:
    """Give the sampler send_dg's bounds from the analyzer when no debug file did
    (its frame check then works without symbols); return the run-time addresses of
    send_dg's poll call sites (the return addresses a thread waiting there has on its
    stack). Called before every sample: the sampler re-locates when glibc < 2.34 maps
    libresolv at the first lookup."""
    lay = smp.layout
    sd = build.send_dg if build else None
    if not sd:
        return []
    obj = lay.objects.get(sd["role"])
    if not obj or (sd.get("build_id") and obj.get("build_id") != sd["build_id"]):
        return []          # not mapped yet, or another file than the analyzed one
    bias = obj["bias"]
    if not lay.send_dg:
        lay.send_dg = sorted((bias + lo, bias + hi) for lo, hi in sd["ranges"])
        lay.send_dg_from = "analyzer (send_dg's .eh_frame bounds, found from its code)"
    return [bias + a for a in sd["poll_wait"]]


def _nssocks(smp: PassiveSampler, resp: int | None) -> list[int] | None:
    if not resp:
        return None
    b = smp.mem.read(resp + NSSOCKS_OFF, NSSOCKS_SIZE)
    return None if b is None else list(struct.unpack(f"<{NSSOCKS_SIZE // 4}i", b))


def _poll_site(smp: PassiveSampler, sp: int, sites: list[int]) -> int | None:
    """A return address into send_dg's poll call on the stack above ``sp``."""
    if not sites:
        return None
    for n in (STACK_SCAN, 512, 256, 128):
        b = smp.mem.read(sp, n)
        if b is not None:
            break
    else:
        return None
    want = set(sites)
    for (w,) in struct.iter_unpack("<Q", b[: len(b) // 8 * 8]):
        if w in want:
            return w
    return None


def wait_record(smp: PassiveSampler, s: ThreadSample, build: Build | None, sites: list[int],
                clock: SchedClock) -> dict:
    p = s.poll
    ev = [f"{'ppoll' if p['nr'] == 271 else 'poll'}(1 fd, POLLIN, timeout {p['timeout_ms']} ms)",
          f"fd {p['fd']} is a UDP socket (inode {p['udp_inode']})"]
    socks = _nssocks(smp, s.resp)
    own = None if socks is None else p["fd"] in [x for x in socks if x > 0]
    if own:
        ev.append(f"fd {p['fd']} is this thread's resolver socket (_res nssocks {socks})")
    site = _poll_site(smp, p.get("sp") or 0, sites)
    if site is not None:
        ev.append(f"return address {site:#x} on its stack is send_dg's poll call")
    elif s.frame_confirmed:
        ev.append("a return address on its stack lies in send_dg")
    confirmed = bool(own or site is not None or s.frame_confirmed)
    since = clock.blocked_ms(smp.pid, s.tid)
    seen_at = time.time()          # when the age was read: it began no later than seen_at - since
    affected = build.affected if build else None
    sticky_affected = bool(confirmed and s.sticky and affected is True)
    doomed = sticky_affected and since is not None and since >= STALL_MIN_MS
    return {"confirmed": confirmed, "fd": p["fd"], "timeout_ms": p["timeout_ms"],
            "fd_is_resolver_socket": own, "poll_call_site": site,
            "frame_in_send_dg": s.frame_confirmed,
            "since_ms": None if since is None else round(since, 1),
            "since_kind": "lower_bound" if since is not None else None,
            "since_from": "sched-clock" if since is not None else None,
            "stall": since is not None and since >= STALL_MIN_MS,
            "doomed": doomed, "sticky_on_affected_build": sticky_affected, "evidence": ev,
            "doomed_basis": ("sticky thread of an affected build in send_dg's POLLIN wait for "
                             f">= {STALL_MIN_MS / 1000:.0f} s: after an error answer in "
                             "single-request mode this wait can only time out (inferred: "
                             "send_dg's locals are not readable without probes)") if doomed else None,
            "nvcsw": p.get("nvcsw"), "args": p.get("args"), "seen_at": round(seen_at, 6)}


def thread_record(smp: PassiveSampler, s: ThreadSample, build: Build | None, sites: list[int],
                  clock: SchedClock) -> dict:
    readable = s.resp is not None and s.options is not None
    rec = {"tid": s.tid, "ns_tid": s.ns_tid, "name": s.name,
           "sticky": bool(s.sticky) if readable else None,
           "sticky_field": s.sticky_field, "options": s.options, "flags": s.flags,
           "state_from": s.source, "wait": None}
    if s.in_resolver_poll and s.poll is not None:
        rec["wait"] = wait_record(smp, s, build, sites, clock)
    return rec


def read_process(p: GlibcProc, smp: PassiveSampler, build: Build | None,
                 clock: SchedClock) -> dict | Skip:
    """One sample of every thread of ``p``; a Skip when it exited meanwhile."""
    sites = apply_analysis(smp, build)
    samples = smp.sample()
    sites = apply_analysis(smp, build) or sites      # a re-locate may have mapped libresolv
    if not samples or not smp.alive():
        return Skip(p.pid, EXITED, "exited while being read", p.comm, p.container)
    threads = [thread_record(smp, s, build, sites, clock) for s in samples]
    lay = smp.layout
    main = next((t for t in threads if t["tid"] == p.pid), None)
    return {"pid": p.pid, "ns_pid": main["ns_tid"] if main else None, "comm": p.comm,
            "container": p.container, "build_id": build.build_id if build else None,
            "libc_file": p.libc_key, "libc_path": p.libc_path, "starttime": p.starttime,
            "threads": threads,
            "sticky_threads": sum(1 for t in threads if t["sticky"]),
            "unreadable_threads": sum(1 for t in threads if t["sticky"] is None),
            "resolver_waits": sum(1 for t in threads if t["wait"] and t["wait"]["confirmed"]),
            "layout": {"res_off_from": lay.res_off_from, "tpoff_from": lay.tpoff_from,
                       "lists_from": lay.lists_from, "send_dg_from": lay.send_dg_from,
                       "notes": list(lay.notes)}}
