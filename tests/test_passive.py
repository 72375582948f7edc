"""Passive mode (gdbdiag.passive): sampling a live target's resolver state without ever
stopping it -- on a host process made to look like a stalled resolver, and on lab
containers (bullseye = affected, bookworm/trixie = fixed)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from gdbdiag.core import events as E
from gdbdiag.passive import RESOLVER_WAIT, PassiveSampler, parse_syscall_line


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _status(pid: int, tid: int, key: str) -> str | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


class Untouched:
    """``on_sample`` hook: after every snapshot, no thread of the target is stopped
    ('t'/'T') or traced."""

    def __init__(self, pid: int):
        self.pid, self.checks, self.bad = pid, 0, []

    def __call__(self, _snap):
        self.checks += 1
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{self.pid}/task")]
        except OSError:
            return
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            tracer = _status(self.pid, tid, "TracerPid")
            if state in ("t", "T") or tracer not in (None, "0"):
                self.bad.append((tid, state, tracer))


def kinds(res, kind, lwp=None):
    return [e for e in res["events"] if e.kind == kind and (lwp is None or e.lwp == lwp)]


def fetch_symbols(pid: int):
    """Fetch + verify the target's debug files into the symbol cache (works from empty)."""
    from gdbdiag.gdbdrive import setup_commands
    _cmds, info = setup_commands(pid)
    assert info["ok"], info["fetch"]


# ---------------------------------------------------------------------------------------
# no lab
# ---------------------------------------------------------------------------------------
def test_parse_syscall_line():
    assert parse_syscall_line("running\n") == {"nr": None, "running": True}
    assert parse_syscall_line("-1 0x7ffd1000 0x7f001234\n") == {"nr": -1, "args": [], "sp": 0x7ffd1000,
                                                                "pc": 0x7f001234}
    sc = parse_syscall_line("7 0x7ffe0 0x1 0x1386 0x0 0x2 0x7f 0x7ffd0 0x7f5\n")
    assert sc == {"nr": 7, "args": [0x7ffe0, 1, 0x1386, 0, 2, 0x7f], "sp": 0x7ffd0, "pc": 0x7f5}
    assert parse_syscall_line("") is None and parse_syscall_line(None) is None
    assert parse_syscall_line("garbage here") is None


FAKE = textwrap.dedent(r"""
    import ctypes, select, socket, sys, threading, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.__res_state.restype = ctypes.c_void_p

    def waiter():
        libc.prctl(15, b"fake-resolver", 0, 0, 0)          # PR_SET_NAME
        sys.stdin.readline()                                 # the test says go
        opts = ctypes.c_ulong.from_address(libc.__res_state() + 8)
        opts.value |= 0x200000                               # RES_SNGLKUP, in this thread's _res
        time.sleep(0.3)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        p = select.poll()
        p.register(s, select.POLLIN)
        p.poll(1500)                                         # nothing comes: a 1.5 s "stall"
        print("timed-out", flush=True)
        time.sleep(60)

    def churn():                                             # threads coming and going
        while True:
            ts = [threading.Thread(target=time.sleep, args=(0.002,)) for _ in range(6)]
            [t.start() for t in ts]
            [t.join() for t in ts]

    threading.Thread(target=waiter, daemon=True).start()
    threading.Thread(target=churn, daemon=True).start()
    print("ready", flush=True)
    time.sleep(60)
""")


def test_host_process_sticky_wait_and_stall_without_stopping_it(tmp_path):
    """A host process whose thread sets RES_SNGLKUP in its own _res, then blocks 1.5 s in
    poll(POLLIN) on a UDP socket, while other threads churn. No debug file (empty cache):
    ABI offsets, no frame check."""
    p = subprocess.Popen([sys.executable, "-c", FAKE], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        watch = Untouched(p.pid)
        with PassiveSampler(p.pid, interval=0.02, affected=True, cache_dir=str(tmp_path)) as smp:
            assert smp.layout.res_off_from == "abi" and smp.layout.tpoff is not None
            assert smp.layout.lists and not smp.layout.send_dg
            first = smp.sample()
            main = [s for s in first if s.tid == p.pid]
            assert main and main[0].source == "thread-list" and main[0].resp == smp.layout.main_res
            assert not any(s.sticky for s in first)
            sent = []

            def go(snap):
                watch(snap)
                if not sent and watch.checks >= 5:
                    p.stdin.write("go\n")
                    p.stdin.flush()
                    sent.append(time.time())

            found: list = []
            res = smp.run(6.0, on_sample=go, on_event=found.append,
                          until=lambda: any(e.kind == E.STALL for e in found))
    finally:
        os.killpg(p.pid, 9)
        p.wait()
    assert watch.checks > 20 and watch.bad == []
    th = {t["name"]: t for t in res["threads"]}
    fake = th["fake-resolver"]
    assert fake["sticky"] and fake["sticky_field"] == "options"
    eng = kinds(res, E.STICKY_ENGAGED, fake["lwp"])
    assert len(eng) == 1 and eng[0].data["cause"].startswith("set between two samples")
    assert eng[0].prov["options"] == "memory" and eng[0].t > sent[0]
    doomed = kinds(res, E.DOOMED_POLL, fake["lwp"])
    assert len(doomed) == 1 and doomed[0].data["predicted_ms"] == 1500
    assert doomed[0].data["frame_confirmed"] is None          # no debug file: not checked
    stall = kinds(res, E.STALL, fake["lwp"])
    assert len(stall) == 1 and 1350 <= stall[0].data["measured_ms"] <= 1700, stall[0].data
    assert stall[0].prov["measured_ms"] == "measured"
    assert not [e for e in res["events"] if e.lwp != fake["lwp"]]   # churned threads: nothing
    assert res["samples"] > 20 and res["overhead"]["seconds_in_sampling"] > 0


# ---------------------------------------------------------------------------------------
# labs
# ---------------------------------------------------------------------------------------
@pytest.mark.lab
def test_bullseye_redis_sticky_doomed_poll_and_stall(lab_factory):
    lab = lab_factory(release="bullseye", workload="redis", fault="none")
    fetch_symbols(lab.pid)
    watch = Untouched(lab.pid)
    with PassiveSampler(lab.pid, affected=True) as smp:
        lay = smp.layout
        assert lay.glibc_version == "2.31"
        assert lay.res_off == {"options": 8, "_flags": 504} and lay.res_off_from.startswith("dwarf:")
        assert lay.lists_from == "libpthread .symtab"
        assert [n for n, _ in lay.lists] == ["stack_used", "__stack_user"]
        assert lay.tpoff_from.startswith("libc") and lay.pthread_off == {"list": 704, "tid": 720}
        pre = smp.run(1.5, on_sample=watch)
        assert not kinds(pre, E.STICKY_ENGAGED)
        assert {t["lwp"] for t in pre["threads"]} == {int(t) for t in os.listdir(f"/proc/{lab.pid}/task")}
        assert not any(t["sticky"] for t in pre["threads"])
        t_inject = time.time()
        lab.inject()
        found: list = []
        res = smp.run(22.0, on_sample=watch, on_event=found.append,
                      until=lambda: any(e.kind == E.STALL for e in found))
    assert watch.checks > 100 and watch.bad == []
    assert _status(lab.pid, lab.pid, "TracerPid") == "0"
    eng = kinds(res, E.STICKY_ENGAGED)
    assert [e.lwp for e in eng] == [lab.pid], [e.to_json() for e in eng]
    assert eng[0].data["field"] == "options" and eng[0].t - t_inject < 8.5
    doomed = kinds(res, E.DOOMED_POLL, lab.pid)
    assert doomed and doomed[0].data["frame_confirmed"] is True
    assert 4000 <= doomed[0].data["predicted_ms"] <= 5000
    stall = kinds(res, E.STALL, lab.pid)
    assert stall and 4500 <= stall[0].data["measured_ms"] <= 5500, stall[0].data
    assert stall[0].data["timed_out"] and stall[0].t > doomed[0].t
    main = [t for t in res["threads"] if t["lwp"] == lab.pid][0]
    assert main["name"] == "redis-server" and main["options"] & 0x200000
    # the lost answer itself was a resolver wait of the not-yet-sticky thread
    assert any(not e.data["sticky"] for e in kinds(res, RESOLVER_WAIT, lab.pid))


@pytest.mark.lab
@pytest.mark.parametrize("release,version", [("bookworm", "2.36"), ("trixie", "2.41")])
def test_fixed_builds_sticky_via_flags_no_stall(lab_factory, release, version):
    lab = lab_factory(release=release, workload="redis", fault="none")
    fetch_symbols(lab.pid)
    watch = Untouched(lab.pid)
    with PassiveSampler(lab.pid, affected=False) as smp:
        lay = smp.layout
        assert lay.glibc_version == version and lay.res_off_from.startswith("dwarf:")
        assert lay.lists_from.startswith("ld.so _rtld_global")
        assert [n for n, _ in lay.lists] == ["_dl_stack_used", "_dl_stack_user"]
        assert lay.send_dg and lay.send_dg_object == "libc.so.6"
        assert not any(s.sticky for s in smp.sample())
        lab.inject()
        found: list = []

        def done():
            e = [x for x in found if x.kind == E.STICKY_ENGAGED]
            return bool(e) and time.time() > e[0].t + 3.5      # a few more lookups, serial
        res = smp.run(16.0, on_sample=watch, on_event=found.append, until=done)
    assert watch.bad == []
    eng = kinds(res, E.STICKY_ENGAGED)
    assert [e.lwp for e in eng] == [lab.pid]
    assert eng[0].data["field"] == "_flags" and not eng[0].data["options"] & 0x600000
    assert eng[0].data["flags"] & 0x200000
    assert not kinds(res, E.STALL) and not kinds(res, E.DOOMED_POLL)
    # in sticky mode the SERVFAIL ends the lookup at once: no wait outlives an interval
    assert not [e for e in kinds(res, RESOLVER_WAIT) if e.data["sticky"]]
    assert any(e.data["frame_confirmed"] for e in kinds(res, RESOLVER_WAIT))   # the lost AAAA


@pytest.mark.lab
def test_bullseye_resolver_only_the_thread_that_lost_an_answer(lab_factory):
    lab = lab_factory(release="bullseye", workload="resolver", fault="drop-aaaa-once",
                      fault_match="keydb-0*")
    fetch_symbols(lab.pid)
    watch = Untouched(lab.pid)
    with PassiveSampler(lab.pid, affected=True) as smp:
        found: list = []

        def done():
            e = [x for x in found if x.kind == E.STICKY_ENGAGED]
            return bool(e) and time.time() > e[0].t + 1.0
        res = smp.run(15.0, on_sample=watch, on_event=found.append, until=done)
    assert watch.bad == []
    th = {t["name"]: t for t in res["threads"]}
    assert {"res-keydb-0", "res-keydb-2"} <= set(th)
    assert [n for n, t in th.items() if t["sticky"]] == ["res-keydb-0"]
    assert th["res-keydb-2"]["options"] & 0x1 and not th["res-keydb-2"]["options"] & 0x600000
    eng = kinds(res, E.STICKY_ENGAGED)
    assert [e.data["thread_name"] for e in eng] == ["res-keydb-0"]
