"""`gdbdiag scan`: every glibc process read through /proc only, on real lab containers of
the three Debian releases (bullseye affected by bug 30081, bookworm and trixie fixed),
one bullseye thread made sticky by a lost AAAA answer. Every target's TracerPid is
sampled while the scan runs: it must stay 0 (no ptrace, ever)."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gdbdiag.lab import container
from gdbdiag.scan.classify import REASONS, classify
from gdbdiag.scan.scanner import Scanner
from gdbdiag.scan.targets import Selection
from gdbdiag.scan.watch import Watcher
from gdbdiag.scan import watch as watch_mod

ROOT = Path(__file__).resolve().parents[1]
GDBDIAG = [sys.executable, "-m", "gdbdiag.cli"]
RUNC = ["runc", "--root", str(container.RUNC_ROOT)]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _tid_named(pid: int, name: str) -> int:
    for t in os.listdir(f"/proc/{pid}/task"):
        if Path(f"/proc/{pid}/task/{t}/comm").read_text().strip() == name:
            return int(t)
    raise AssertionError(f"no thread {name} in {pid}")


def _dns_log(lab) -> list[dict]:
    out = []
    for line in Path(lab.dns_log).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


class TracerWatch:
    """Samples TracerPid and the state of every thread of ``pids`` in a loop, in a thread,
    while a scan runs: any tracer or stopped thread is recorded."""

    def __init__(self, pids):
        self.pids, self.samples, self.bad = list(pids), 0, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            for pid in self.pids:
                try:
                    tids = os.listdir(f"/proc/{pid}/task")
                except OSError:
                    continue
                for tid in tids:
                    try:
                        st = Path(f"/proc/{pid}/task/{tid}/status").read_text()
                    except OSError:
                        continue
                    f = dict(line.split(":\t", 1) for line in st.splitlines() if ":\t" in line)
                    if f.get("TracerPid", "0").strip() != "0" or f.get("State", "")[:1] in ("t", "T"):
                        self.bad.append((pid, tid, f.get("TracerPid"), f.get("State")))
            self.samples += 1
            time.sleep(0.002)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _cli(*args, env=None, check=True, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run(GDBDIAG + list(args), capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env=env)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def _sticky(rep) -> list[tuple[int, int, str, str]]:
    return [(p["pid"], t["tid"], t["name"], t["sticky_field"])
            for p in rep["processes"] for t in p["threads"] if t["sticky"]]


# ---------------------------------------------------------------------------------------
# labs: one per release; bullseye's res-keydb-0 loses one AAAA answer at its first lookup
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labs():
    if os.geteuid() != 0:
        pytest.fail("lab containers need root", pytrace=False)
    tag = f"sc{os.getpid() % 10000}"
    started: list[str] = []

    def start(name, **kw):
        started.append(name)
        return container.up(container.LabSpec(name=name, workload="resolver", **kw))
    try:
        out = {"bullseye": start(f"{tag}-bu", release="bullseye", fault="drop-aaaa-once",
                                 fault_match="keydb-0*"),
               "bookworm": start(f"{tag}-bo", release="bookworm", fault="none"),
               "trixie": start(f"{tag}-tr", release="trixie", fault="none")}
        deadline = time.time() + 30
        dropped = []
        while time.time() < deadline and not dropped:
            dropped = [r for r in _dns_log(out["bullseye"]) if r.get("action") == "dropped"]
            time.sleep(0.2)
        assert dropped, "the bullseye lab's DNS server dropped no AAAA answer"
        # the thread switches when its poll for the lost answer times out (5 s)
        time.sleep(max(0.0, dropped[0]["t"] + 5.5 - time.time()))
        out["dropped"] = dropped
        yield out
    finally:
        problems = []
        for n in reversed(started):
            problems += container.down(n, quiet=True) + container.leftovers(n)
        assert not problems, problems


# ---------------------------------------------------------------------------------------
# the three releases, through the CLI: table facts, --json, --prom; TracerPid stays 0
# ---------------------------------------------------------------------------------------
@pytest.mark.lab
def test_three_releases_sticky_thread_verdicts_json_prom_no_ptrace(labs, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    bu, bo, tr = labs["bullseye"], labs["bookworm"], labs["trixie"]
    sticky_tid = _tid_named(bu.pid, "res-keydb-0")
    assert labs["dropped"][0]["qname"].startswith("keydb-0.")     # ground truth: its answer was lost
    prom = tmp_path / "gdbdiag.prom"
    for attempt in range(12):           # until the sticky thread is caught in its doomed poll
        t0 = time.time()
        with TracerWatch([bu.pid, bo.pid, tr.pid]) as tw:
            r = _cli("scan", "--container", bu.runc_id, bo.runc_id, tr.runc_id, "--json",
                     "--prom", str(prom))
        t1 = time.time()
        rep = json.loads(r.stdout)
        w = [t["wait"] for p in rep["processes"] for t in p["threads"] if t["tid"] == sticky_tid][0]
        if w and w["doomed"]:
            break
        time.sleep(0.5)
    assert tw.samples > 20 and tw.bad == [], (tw.samples, tw.bad[:5])
    # exactly that thread is sticky, in `options` (glibc 2.31)
    assert _sticky(rep) == [(bu.pid, sticky_tid, "res-keydb-0", "options")]
    by_pid = {p["pid"]: p for p in rep["processes"]}
    assert set(by_pid) == {bu.pid, bo.pid, tr.pid}
    for lab in (bu, bo, tr):
        p = by_pid[lab.pid]
        assert p["container"] == lab.runc_id
        assert {t["tid"] for t in p["threads"]} == {int(x) for x in os.listdir(f"/proc/{lab.pid}/task")}
        assert all(t["sticky"] is not None for t in p["threads"])      # every _res was read
    # one build per release: bullseye affected, bookworm and trixie not, decided from code
    builds = {b["glibc_version"]: b for b in rep["builds"]}
    assert set(builds) == {"2.31", "2.36", "2.41"}
    assert builds["2.31"]["affected"] is True and builds["2.31"]["bug_30081"] == "affected"
    assert builds["2.36"]["affected"] is False and builds["2.41"]["affected"] is False
    for v, b in builds.items():
        assert b["how"] == "instruction flow" and b["decided_by"].startswith("code"), b
        assert b["package"].startswith(f"libc6 {v}-") and b["processes"] == 1
        assert b["build_id"] == by_pid[{"2.31": bu, "2.36": bo, "2.41": tr}[v].pid]["build_id"]
    assert builds["2.31"]["send_dg_object"] == "libresolv" and builds["2.31"]["sticky_field"] == "options"
    assert builds["2.41"]["send_dg_object"] == "libc" and builds["2.41"]["sticky_field"] == "_flags"
    # its doomed poll: send_dg's, on its own resolver socket; the age is a true lower bound
    assert w and w["confirmed"] and w["doomed"], w
    assert w["fd_is_resolver_socket"] is True and w["poll_call_site"] is not None
    assert 0 < w["timeout_ms"] <= 5000 and w["since_kind"] == "lower_bound"
    fd_link = os.readlink(f"/proc/{bu.pid}/fd/{w['fd']}")
    assert fd_link.startswith("socket:[")
    sent = [x["tx"] for x in _dns_log(bu) if x["qname"] == "keydb-0.keydb." and x["qtype"] == "A"
            and x.get("tx") and x["tx"] < t1]
    began = max(x for x in sent if x < t1 - w["since_ms"] / 1000 + 0.05)    # its A answer went out
    assert w["since_ms"] <= (t1 - began) * 1000 + 5, (w, t1 - began)
    assert w["since_ms"] >= (t0 - began) * 1000 * 0.9 - 100, (w, t0 - began)
    assert rep["totals"]["doomed_waits"] == 1 and rep["totals"]["sticky_threads"] == 1
    # --prom: parsed by prometheus_client's own parser
    text = prom.read_text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    info = {s.labels["glibc_version"]: s.labels for s in fams["gdbdiag_glibc_build_info"].samples}
    assert {v: i["bug30081"] for v, i in info.items()} == {"2.31": "affected", "2.36": "fixed", "2.41": "fixed"}
    aff = {s.labels["build_id"]: s.value for s in fams["gdbdiag_glibc_build_affected"].samples}
    assert aff == {builds["2.31"]["build_id"]: 1, builds["2.36"]["build_id"]: 0, builds["2.41"]["build_id"]: 0}
    st = fams["gdbdiag_thread_sticky"].samples
    assert [(s.labels["pid"], s.labels["tid"], s.labels["field"], s.labels["container"]) for s in st] == \
        [(str(bu.pid), str(sticky_tid), "options", bu.runc_id)]
    waits = fams["gdbdiag_thread_resolver_wait_seconds"].samples
    assert any(s.labels["tid"] == str(sticky_tid) and s.labels["doomed"] == "true" and s.value >= 1
               for s in waits)
    assert fams["gdbdiag_sticky_threads"].samples[0].value == 1
    assert {s.labels["result"]: s.value for s in fams["gdbdiag_scan_processes"].samples} == \
        {"scanned": 3, "skipped": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["gdbdiag.prom"]       # no temporary left


@pytest.mark.lab
def test_node_wide_scan_names_containers_and_counts_skips(labs):
    bu = labs["bullseye"]
    sticky_tid = _tid_named(bu.pid, "res-keydb-0")
    with TracerWatch([bu.pid]) as tw:
        rep = json.loads(_cli("scan", "--json").stdout)
    assert tw.bad == []
    assert rep["selection"]["mode"] == "node"
    by_pid = {p["pid"]: p for p in rep["processes"]}
    for name in ("bullseye", "bookworm", "trixie"):
        assert by_pid[labs[name].pid]["container"] == labs[name].runc_id
    assert (bu.pid, sticky_tid, "res-keydb-0", "options") in _sticky(rep)
    lab_pids = {labs[n].pid for n in ("bullseye", "bookworm", "trixie")}
    assert not [s for s in _sticky(rep) if s[0] in lab_pids - {bu.pid}]
    counts = rep["skipped"]["counts"]
    assert counts.get("kernel_thread", 0) > 0 and set(counts) <= set(REASONS)
    # the same container found by its cgroup alone (no runc state: how Kubernetes nodes look)
    from gdbdiag.scan.targets import Container, all_pids, members
    assert members(Container(id=bu.runc_id, source="cgroup"), all_pids()) == [bu.pid]
    t = rep["totals"]
    assert t["processes_seen"] == t["processes_scanned"] + t["processes_skipped"]
    assert t["processes_scanned"] == len(rep["processes"]) >= 3
    # the table: the sticky thread and the affected build
    text = _cli("scan", "--container", bu.runc_id).stdout
    assert "AFFECTED (instruction flow)" in text and "res-keydb-0" in text and "STICKY" in text
    assert "no process was stopped" in text


# ---------------------------------------------------------------------------------------
# --watch: a thread becomes sticky, a stall begins and ends, a process appears and exits
# ---------------------------------------------------------------------------------------
@pytest.mark.lab
def test_watch_transitions(labs, lab_factory, tmp_path):
    bu = labs["bullseye"]
    wl = lab_factory(release="trixie", workload="resolver", fault="none", names=("keydb-0.keydb",))
    bu_tid = _tid_named(bu.pid, "res-keydb-0")
    wl_tid = _tid_named(wl.pid, "res-keydb-0")
    events: queue.Queue = queue.Queue()
    seen: list[dict] = []
    stop = threading.Event()
    sel = Selection(containers=[wl.runc_id, bu.runc_id])
    with TracerWatch([bu.pid, wl.pid]) as tw, Scanner(sel, keep_samplers=True) as sc:
        th = threading.Thread(target=watch_mod.run, args=(sc, 0.2),
                              kwargs={"stop": stop.is_set, "emit": events.put}, daemon=True)
        th.start()

        def wait_for(pred, timeout):
            end = time.time() + timeout
            while time.time() < end:
                try:
                    ev = events.get(timeout=0.2)
                except queue.Empty:
                    continue
                seen.append(ev)
                if pred(ev):
                    return ev
            raise AssertionError(f"no such event in {timeout} s; seen: {[e['event'] for e in seen]}")
        try:
            start = wait_for(lambda e: e["event"] == "watch_started", 10)
            t_inject = time.time()
            wl.inject()                         # its next AAAA answer is lost: sticky in ~5 s
            pidfile = tmp_path / "exec.pid"
            subprocess.run(RUNC + ["exec", "-d", "--pid-file", str(pidfile), wl.runc_id,
                                   "sleep", "60"], check=True, timeout=30)
            xpid = int(pidfile.read_text())
            appeared = wait_for(lambda e: e["event"] == "process_appeared" and e["pid"] == xpid, 10)
            os.kill(xpid, signal.SIGKILL)       # the process this test started
            exited = wait_for(lambda e: e["event"] == "process_exited" and e["pid"] == xpid, 10)
            became = wait_for(lambda e: e["event"] == "thread_sticky" and e["pid"] == wl.pid, 20)
            ended = wait_for(lambda e: e["event"] == "stall_ended" and e["pid"] == bu.pid, 25)
        finally:
            stop.set()
            th.join(10)
    seen += [events.get() for _ in range(events.qsize())]
    assert tw.samples > 100 and tw.bad == [], tw.bad[:5]
    assert start["totals"]["sticky_threads"] == 1
    initial = [e for e in seen if e["event"] == "thread_sticky" and e["pid"] == bu.pid]
    assert [(e["tid"], e["already"], e["field"]) for e in initial] == [(bu_tid, True, "options")]
    # a pass may see it before runc's init has exec'd sleep: its name is what it was then
    assert appeared["comm"] in ("sleep", "runc:[2:INIT]") and appeared["container"] == wl.runc_id
    assert exited["container"] == wl.runc_id
    # became sticky while watched: that thread, in _flags (trixie), after the lost answer
    assert (became["tid"], became["thread"], became["field"], became["already"]) == \
        (wl_tid, "res-keydb-0", "_flags", False)
    assert became["flags"] & 0x200000 and not became["options"] & 0x600000
    lost = [r for r in _dns_log(wl) if r.get("action") == "dropped"]
    assert len(lost) == 1 and lost[0]["t"] >= t_inject - 0.5 and became["time"] > lost[0]["t"]
    assert [e for e in seen if e["event"] == "thread_sticky" and not e["already"]] == [became]
    # bullseye's doomed polls: a stall began, then ended, about 5 s long
    began = [e for e in seen if e["event"] == "stall_began" and e["tid"] == bu_tid]
    assert began and began[0]["doomed"] and began[0]["sticky"] and began[0]["since_ms"] >= 1000
    assert ended["tid"] == bu_tid and ended["doomed"] and ended["ended_by"].startswith("returned")
    assert ended["duration_max_ms"] is not None and ended["duration_max_ms"] <= ended["timeout_ms"]
    assert ended["duration_ms"] <= ended["duration_max_ms"]
    if ended["duration_kind"] == "measured":
        assert 4300 <= ended["duration_ms"] <= 5050 and ended["timed_out"], ended
    # trixie's one stall: the wait for the lost answer itself (parallel mode, not doomed),
    # which timed out, and the switch to single-request mode came right after it
    wl_stalls = [e for e in seen if e["event"] in ("stall_began", "stall_ended") and e["pid"] == wl.pid]
    assert [e["event"] for e in wl_stalls] == ["stall_began", "stall_ended"], wl_stalls
    assert not any(e["doomed"] or e["sticky"] for e in wl_stalls)
    assert wl_stalls[1]["duration_ms"] >= 3000 and wl_stalls[1]["time"] <= became["time"]


@pytest.mark.lab
def test_watch_cli_json_lines_and_prom(labs, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    prom = tmp_path / "node.prom"
    r = _cli("scan", "--watch", "0.3", "--passes", "3", "--container", labs["bookworm"].runc_id,
             "--prom", str(prom))
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    assert lines and lines[0]["event"] == "watch_started"
    assert lines[0]["builds"][0]["glibc_version"] == "2.36"
    fams = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    assert fams["gdbdiag_scan_passes"].samples[0].value == 3
    assert fams["gdbdiag_sticky_threads"].samples[0].value == 0
    # a DaemonSet pod is stopped with SIGTERM: the watch ends cleanly after its pass
    p = subprocess.Popen(GDBDIAG + ["scan", "--watch", "0.3", "--container", labs["bookworm"].runc_id],
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert json.loads(p.stdout.readline())["event"] == "watch_started"
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------------------
# processes that are not glibc, gone, or unreadable: skipped with a reason, never a crash
# ---------------------------------------------------------------------------------------
_PAUSE_C = "#include <unistd.h>\nint main(void) { for (;;) pause(); }\n"
_NOLIBC_C = ("void _start(void) { for (;;) __asm__ volatile (\"mov $34, %%eax; syscall\" "
             "::: \"rax\", \"rcx\", \"r11\", \"memory\"); }\n")


def _build(tmp_path, name, src, *flags, cc="gcc"):
    c = tmp_path / f"{name}.c"
    c.write_text(src)
    exe = tmp_path / name
    subprocess.run([cc, "-O1", *flags, "-o", str(exe), str(c)], check=True)
    return str(exe)


def test_skips_static_non_glibc_kernel_zombie_unreadable(tmp_path):
    exes = {"static": _build(tmp_path, "static", _PAUSE_C, "-static"),
            "not_glibc": _build(tmp_path, "nolibc", _NOLIBC_C, "-nostdlib", "-fno-stack-protector",
                                "-Wl,--dynamic-linker=/lib64/ld-linux-x86-64.so.2"),
            "musl": _build(tmp_path, "musl", _PAUSE_C, cc="musl-gcc")}     # scripts/setup: musl-tools
    procs = {k: subprocess.Popen([v], start_new_session=True) for k, v in exes.items()}
    glibc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    zombie = subprocess.Popen(["true"])
    try:
        time.sleep(0.3)
        pids = [p.pid for p in procs.values()] + [glibc.pid, zombie.pid, 2]
        rep = json.loads(_cli("scan", "--json", "--pid", *map(str, pids)).stdout)
        why = {s["pid"]: s["reason"] for s in rep["skipped"]["processes"]}
        assert {why[p.pid] for p in procs.values()} == set(procs), why
        for k, p in procs.items():
            assert why[p.pid] == k
        assert why[zombie.pid] == "zombie" and why[2] == "kernel_thread"
        assert [p["pid"] for p in rep["processes"]] == [glibc.pid]
        assert rep["processes"][0]["threads"][0]["sticky"] is False
        # another user without CAP_SYS_PTRACE cannot read a root process: unreadable, one report
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            *GDBDIAG, "scan", "--json", "--pid", str(glibc.pid)],
                           capture_output=True, text=True, cwd=ROOT, timeout=60,
                           env=dict(os.environ, HOME="/nonexistent"))
        assert r.returncode == 0, r.stderr
        skipped = json.loads(r.stdout)["skipped"]["processes"]
        assert [(s["pid"], s["reason"]) for s in skipped] == [(glibc.pid, "unreadable")]
    finally:
        for p in list(procs.values()) + [glibc]:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        zombie.wait()


def test_process_exiting_mid_scan(tmp_path):
    a = subprocess.Popen(["sleep", "60"])
    b = subprocess.Popen(["sleep", "60"])
    c = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.1)
        gone = classify(c.pid)
        c.kill()
        c.wait()
        # a group's first process gone before its build is read: the next one is used
        live = classify(b.pid)
        from gdbdiag.scan.builds import BuildCache
        bld = BuildCache(str(tmp_path)).for_group([gone, live])
        assert bld is not None and bld.example_pid == b.pid and bld.affected is not None

        def kill_a(p):
            if p.pid == a.pid:
                a.kill()
                a.wait()
        with Scanner(Selection(pids=[a.pid, b.pid]), before_read=kill_a) as sc:
            rep = sc.scan()
        assert [(s["pid"], s["reason"]) for s in rep["skipped"]["processes"]] == [(a.pid, "exited")]
        assert [p["pid"] for p in rep["processes"]] == [b.pid]
    finally:
        for p in (a, b, c):
            p.kill()
            p.wait()


def test_node_scans_under_process_churn():
    churn = subprocess.Popen(["sh", "-c", "while :; do /bin/true; done"], start_new_session=True)
    try:
        time.sleep(0.2)
        with Scanner(Selection()) as sc:
            reps = [sc.scan() for _ in range(3)]
    finally:
        os.killpg(churn.pid, signal.SIGKILL)
        churn.wait()
    for rep in reps:
        t = rep["totals"]
        assert t["processes_seen"] == t["processes_scanned"] + t["processes_skipped"]
        assert set(rep["skipped"]["counts"]) <= set(REASONS)


def test_read_only_cache_still_scans(tmp_path):
    """The DaemonSet's root filesystem is read-only: the analyzer's cache cannot be
    written, the verdict is still made."""
    p = subprocess.Popen(["sleep", "60"])
    try:
        env = dict(os.environ, GDBDIAG_CACHE="/proc/self/gdbdiag-cache-is-not-writable")
        rep = json.loads(_cli("scan", "--json", "--pid", str(p.pid), env=env).stdout)
    finally:
        p.kill()
        p.wait()
    (b,) = rep["builds"]
    assert b["affected"] is not None and b["analysis_cached"] is False
    assert any("not cached" in e for e in b["errors"]), b["errors"]
    assert rep["processes"][0]["pid"] == p.pid


def test_bad_input_one_line_no_side_effect(tmp_path):
    prom = tmp_path / "x.prom"
    for args, code in ((["--passes", "2"], 2), (["--watch", "0"], 2), (["--prom", str(tmp_path / "x.txt")], 2),
                       (["--prom", str(tmp_path / "no" / "x.prom")], 2),
                       (["--container", "no-such-container-xyz", "--prom", str(prom)], 3),
                       (["--container", "a/b"], 2), (["--pid", "0"], 2),
                       (["--pid", "999999999", "--prom", str(prom)], 3)):
        r = _cli("scan", *args, check=False)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("gdbdiag"), r.stderr
        assert r.stdout == "" and not prom.exists()


# ---------------------------------------------------------------------------------------
# transitions from synthetic reports (pure)
# ---------------------------------------------------------------------------------------
def _rep(t, procs):
    return {"time": t, "processes": procs, "builds": [], "totals": {}, "skipped": {"counts": {}},
            "selection": {}}


def _proc(pid, start, threads):
    return {"pid": pid, "starttime": start, "comm": "x", "container": None, "build_id": "b",
            "threads": threads}


def _th(tid, sticky=False, wait=None):
    return {"tid": tid, "name": f"t{tid}", "sticky": sticky, "sticky_field": "options" if sticky else None,
            "options": 0x200000 if sticky else 0, "flags": 0, "wait": wait}


def _w(since, args=(1, 1, 5000), nvcsw=7):
    return {"confirmed": True, "since_ms": since, "fd": 4, "timeout_ms": 5000, "doomed": True,
            "args": list(args), "nvcsw": nvcsw, "evidence": []}


def test_watcher_transitions_pure():
    got = []
    w = Watcher(emit=got.append)
    w.feed(_rep(100.0, [_proc(10, 1, [_th(11)])]))
    w.feed(_rep(101.0, [_proc(10, 1, [_th(11, wait=_w(300.0))])]))         # a wait, 0.3 s old
    w.feed(_rep(102.0, [_proc(10, 1, [_th(11, True, wait=_w(1300.0))])]))  # stall, sticky now
    w.feed(_rep(105.8, [_proc(10, 1, [_th(11, True)])]))                   # it returned
    w.feed(_rep(106.0, [_proc(10, 2, [_th(10)])]))                         # PID reused
    kinds = [e["event"] for e in got]
    assert kinds == ["watch_started", "thread_sticky", "stall_began", "stall_ended",
                     "process_exited", "process_appeared"], kinds
    sticky, began, ended = got[1], got[2], got[3]
    assert began["since_ms"] == pytest.approx(1300.0) and began["doomed"]
    assert sticky["already"] is False and sticky["tid"] == 11
    # began between 100.0 (not in it) and 100.7 (0.3 s old at 101.0); last seen 102.0, gone at 105.8
    assert ended["duration_ms"] == pytest.approx(1300.0)
    assert ended["duration_max_ms"] == pytest.approx(5000.0)    # min(105.8 - 100.0, timeout)
    assert ended["duration_kind"] == "lower_bound" and not ended["timed_out"]
    assert w.counters == {"sticky_transitions": 1, "stalls": 1, "passes": 5}


# ---------------------------------------------------------------------------------------
# the DaemonSet, offline; the benchmark, small
# ---------------------------------------------------------------------------------------
def test_daemonset_manifest_valid_and_least_privilege():
    import kubernetes_validate
    import yaml
    from gdbdiag import __version__
    from gdbdiag.cli import build_parser
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "daemonset.yaml").read_text()) if d]
    assert [d["kind"] for d in docs] == ["DaemonSet"]
    ds = docs[0]
    kubernetes_validate.validate(ds, "1.30.0", strict=True)
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True and not spec.get("hostNetwork") and not spec.get("hostIPC")
    (c,) = spec["containers"]
    assert c["image"] == f"gdbdiag:{__version__}"
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert c["command"][0] == "gdbdiag"
    args = build_parser().parse_args(c["command"][1:])
    assert args.command == "scan" and args.watch == 10 and args.prom.endswith(".prom")
    (m,) = c["volumeMounts"]                       # the only writable path
    assert not m.get("readOnly") and os.path.dirname(args.prom) == m["mountPath"]
    (v,) = spec["volumes"]
    assert v["name"] == m["name"] and ("hostPath" in v or "emptyDir" in v)
    bad = yaml.safe_load((ROOT / "deploy" / "daemonset.yaml").read_text())
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30.0", strict=True)


@pytest.mark.lab
def test_bench_small(labs, tmp_path):
    out = _cli("scan", "--bench", "--container", labs["bullseye"].runc_id, labs["trixie"].runc_id).stdout
    for word in ("cold", "disk-warm", "watch", "ms/process", "analysis ms (cold)", "2.31", "2.41"):
        assert word in out, out
    fig = tmp_path / "bench.json"
    r = subprocess.run([str(ROOT / "scripts" / "bench-scan"), "--labs-per-release", "1",
                        "--procs-per-lab", "4", "--json", str(fig)],
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    f = json.loads(fig.read_text())
    assert len(f["setup"]["labs"]) == 3
    for run in ("cold", "disk-warm", "watch"):
        assert f[run]["scanned"] >= 12 and f[run]["per_process_ms"] > 0
    assert {b["glibc"] for b in f["builds"]} >= {"2.31", "2.36", "2.41"}
    for name in f["setup"]["labs"]:                 # the benchmark removed its labs
        assert container.leftovers(name) == []
