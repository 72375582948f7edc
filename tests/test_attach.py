"""`gdbdiag attach` on lab containers: verdicts, every way a run can end, refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gdbdiag.codecheck import diff_code
from conftest import tracer_of

pytestmark = pytest.mark.lab
GD = [sys.executable, "-m", "gdbdiag.cli"]


class Runner:
    """`gdbdiag attach` as a subprocess whose stdout is read line by line."""

    def __init__(self, *args, prefix=(), env=None):
        self.p = subprocess.Popen([*prefix, *GD, "attach", *map(str, args)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                  env=dict(os.environ, **(env or {})))
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in l for l in self.lines):
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in output:\n" + "\n".join(self.lines[-30:]))

    def finish(self, timeout=90) -> int:
        try:
            rc = self.p.wait(timeout=timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
        self._t.join(5)
        return rc

    @property
    def text(self):
        return "\n".join(self.lines)

    def gdb_pid(self) -> int:
        kids = Path(f"/proc/{self.p.pid}/task/{self.p.pid}/children").read_text().split()
        for k in kids:
            if Path(f"/proc/{k}/comm").read_text().strip() == "gdb":
                return int(k)
        raise AssertionError("no gdb child")


def _target_unharmed(lab, writes):
    assert lab.alive()
    deadline = time.monotonic() + 10
    while tracer_of(lab.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tracer_of(lab.pid) == 0
    assert diff_code(lab.pid, ("libc", "libresolv", "libnss_dns")) == []
    acked = [w for w in writes if "error" not in w]
    assert acked, "the concurrent writer got nothing acknowledged"
    assert lab.redis_dbsize() >= len(acked)          # every acknowledged key is there
    assert lab.probe(seconds=1, interval=0.2)          # and it still answers


@pytest.mark.parametrize("backend,how", [
    ("uprobe", "SIGINT"), ("uprobe", "SIGTERM"), ("uprobe", "SIGHUP"), ("uprobe", "duration"),
    ("uprobe", "kill-runner"), ("gdb", "kill-gdb"), ("gdb", "kill-runner")])
def test_target_survives_every_way_a_run_ends(lab_factory, backend, how, tmp_path):
    # stalling bullseye with a concurrent writer: every acknowledged key must be there.
    # gdb backend: killed during a doomed poll, when no breakpoint can be hit (its
    # remaining hazard is a kill while a thread runs into a breakpoint: see README)
    lab = lab_factory(release="bullseye", workload="redis", fault="drop-aaaa-once")
    writes = []
    writer = threading.Thread(target=lambda: writes.extend(lab.probe(seconds=20, interval=0.05, write=True)))
    writer.start()
    r = Runner(lab.pid, "--backend", backend, "--duration", "10" if how == "duration" else "120",
               "--json", tmp_path / "rep.json")
    try:
        r.wait_for("gdbdiag: armed in", 60)
        if how == "duration":
            rc = r.finish(120)
            assert rc == 0
            assert json.loads((tmp_path / "rep.json").read_text())["run"]["ended_by"] == "duration"
        elif how.startswith("SIG"):
            time.sleep(3)
            os.kill(r.p.pid, getattr(signal, how))
            rc = r.finish(60)
            assert rc == 0, r.text
            assert f"gdbdiag: {how}: ending the run" in r.text
            assert "== verdict:" in r.text
        elif how == "kill-gdb":
            r.wait_for("doomed_poll", 30)
            os.kill(r.gdb_pid(), signal.SIGKILL)
            rc = r.finish(60)
            assert rc == 4, r.text
            assert "report rebuilt from the recorded events" in r.text
            assert "restored" in r.text or "supervisor" in r.text
            rebuilt = json.loads((tmp_path / "rep.json").read_text())
            assert rebuilt["run"]["error"] and rebuilt["run"]["source"] == "gdb"
            assert rebuilt["verdict"]["code"] == "STICKY_STALLING"
            assert any(e["kind"] == "doomed_poll" for e in rebuilt["events"])
            # the same glibc facts as a clean run's (they come from the stream's run record)
            clean = Runner(lab.pid, "--backend", "gdb", "--duration", "2", "--json",
                           tmp_path / "clean.json")
            assert clean.finish(120) == 0, clean.text
            facts = ("version", "distro_package", "build_id", "affected_30081", "affected_source",
                     "sticky_field", "send_dg_object", "bug31890_fixed")
            got = {k: rebuilt["glibc"].get(k) for k in facts}
            assert got == {k: json.loads((tmp_path / "clean.json").read_text())["glibc"].get(k)
                           for k in facts}
            assert got["affected_30081"] is True and got["sticky_field"] == "options" and got["version"]
        elif backend == "uprobe":           # the runner owns the probes: the kernel removes them
            r.wait_for("doomed_poll", 30)
            os.kill(r.p.pid, signal.SIGKILL)
            r.finish(10)
        else:                       # the runner itself dies: gdb gets SIGHUP from its pty
            r.wait_for("doomed_poll", 30)
            gdb = r.gdb_pid()
            os.kill(r.p.pid, signal.SIGKILL)
            r.finish(10)
            deadline = time.monotonic() + 20
            while Path(f"/proc/{gdb}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        if r.p.poll() is None:
            r.p.kill()
        writer.join(60)
    _target_unharmed(lab, writes)


# each release's verdict on the Redis workload that loses one AAAA answer
RELEASE_VERDICTS = [("bullseye", "STICKY_STALLING"), ("bookworm", "STICKY_NO_STALL"),
                    ("trixie", "STICKY_NO_STALL")]


@pytest.mark.parametrize("mode", ["armed", "full"])
@pytest.mark.parametrize("release,verdict", RELEASE_VERDICTS)
def test_verdicts(lab_factory, tmp_path, release, verdict, mode):
    # armed: the default (writers only until the switch); --full: every probe from the start
    lab = lab_factory(release=release, workload="redis", fault="none")
    out = tmp_path / "rep.json"
    r = Runner(lab.pid, "--duration", "40", "--until", "stall" if release == "bullseye" else "sticky",
               "--json", out, "--fail-on", "sticky", *(["--full"] if mode == "full" else []))
    r.wait_for("gdbdiag: armed in", 60)
    lab.inject()
    t0 = time.time()
    rc = r.finish(90)
    rep = json.loads(out.read_text())
    assert rep["schema"] == "gdbdiag.report/1"
    if release == "bullseye":
        # within one replication cycle after the drop: the lost AAAA (5 s) + one stall (5 s)
        assert time.time() - t0 < 25
    else:
        time.sleep(0)
    assert rep["verdict"]["code"] == verdict, rep["verdict"]
    assert rc == 1                                       # --fail-on sticky
    assert rep["glibc"]["sticky_field"] == ("options" if release == "bullseye" else "_flags")
    assert rep["glibc"]["affected_30081"] is (release == "bullseye")
    assert rep["run"]["backend"] == "uprobe"              # no debug symbols were needed
    for key in ("target", "glibc", "symbols", "events", "threads", "stalls", "verdict"):
        assert key in rep
    kinds = {e["kind"] for e in rep["events"]}
    assert "sticky_engaged" in kinds
    assert ("stall" in kinds) == (release == "bullseye")
    eng = [e for e in rep["events"] if e["kind"] == "sticky_engaged"][0]
    assert "AAAA answer for keydb-0.keydb.default.svc.cluster.local. lost" in eng["cause"]
    main = [t for t in rep["threads"] if t["lwp"] == lab.pid][0]
    if release == "bullseye":
        # the blocked application stack, unwound from /proc/PID/mem during the doomed poll
        assert {"send_dg", "getaddrinfo", "connectWithMaster", "replicationCron"} <= set(main["stack"])
        doomed = [e for e in rep["events"] if e["kind"] == "doomed_poll"]
        assert doomed and doomed[0]["predicted_ms"] > 4000
    assert main["lwp_target"] == 1 and main["sticky"]    # PID 1 inside its namespace
    assert main["since_how"] == "flag_write" and main["since"] >= t0 - 1
    assert rep["target"]["nspid"] == [lab.pid, 1]
    # named as started (redis-server is a symlink to redis-check-rdb in Debian)
    assert rep["target"]["exe"] == "/usr/bin/redis-server"
    assert rep["run"]["source"] == "uprobe"
    assert diff_code(lab.pid, ("libc", "libresolv", "libnss_dns")) == []


def test_gdb_backend_verdict(lab_factory, tmp_path):
    """--backend gdb (breakpoints, for hosts without uprobes) gives the same diagnosis."""
    lab = lab_factory(release="bullseye", workload="redis", fault="none")
    out = tmp_path / "rep.json"
    r = Runner(lab.pid, "--backend", "gdb", "--duration", "40", "--until", "stall", "--json", out)
    r.wait_for("gdbdiag: armed in", 60)
    lab.inject()
    assert r.finish(90) == 0, r.text
    rep = json.loads(out.read_text())
    assert rep["verdict"]["code"] == "STICKY_STALLING"
    assert rep["symbols"]["verified"] is True
    assert diff_code(lab.pid, ("libc", "libresolv", "libnss_dns")) == []


def test_no_probe_capabilities_says_so_and_samples(lab_factory, tmp_path):
    """Without CAP_PERFMON/CAP_BPF/CAP_SYS_ADMIN (ptrace still allowed): one line saying
    so and what happens instead, then a passive run — never a silent fallback."""
    lab = lab_factory(release="bullseye", workload="redis", fault="none")
    out = tmp_path / "rep.json"
    r = subprocess.run(["setpriv", "--bounding-set=-sys_admin,-perfmon,-bpf", *GD, "attach",
                        str(lab.pid), "--duration", "3", "--json", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    said = [l for l in r.stdout.splitlines() if "kernel probes unavailable" in l]
    assert len(said) == 1 and "sampling passively instead" in said[0], r.stdout
    assert json.loads(out.read_text())["run"]["mode"] == "passive"


def test_kernel_refuses_uprobes_without_sys_admin(lab_factory, tmp_path):
    """CAP_PERFMON + CAP_BPF without CAP_SYS_ADMIN: enough before Linux 6.16, refused by
    newer kernels at the first uprobe. Either way the run ends with a diagnosis: probes,
    or one line saying the kernel refused and a passive run (no symbols needed, offline)."""
    lab = lab_factory(release="bullseye", workload="redis", fault="none")
    out = tmp_path / "rep.json"
    r = subprocess.run(["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin",
                        *GD, "attach", str(lab.pid), "--duration", "3", "--offline",
                        "--symbols", "off", "--json", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    mode = json.loads(out.read_text())["run"]["mode"]
    said = [l for l in r.stdout.splitlines() if "kernel probes refused" in l]
    if mode == "passive":
        assert len(said) == 1 and "CAP_SYS_ADMIN" in said[0] and "sampling passively" in said[0]
    else:
        assert mode == "armed" and not said, r.stdout


@pytest.mark.parametrize("mode", ["armed", "full"])
def test_healthy(lab_factory, tmp_path, mode):
    lab = lab_factory(release="bullseye", workload="redis", fault="none")
    out = tmp_path / "rep.json"
    r = Runner(lab.pid, "--duration", "6", "--json", out, "--fail-on", "stall",
               *(["--full"] if mode == "full" else []))
    rc = r.finish(90)
    assert rc == 0, r.text
    rep = json.loads(out.read_text())
    assert rep["verdict"]["code"] == "HEALTHY"
    assert rep["verdict"]["remediation"] == []
    gai = [e for e in rep["events"] if e["kind"] == "gai_enter"]
    dg = [e for e in rep["events"] if e["kind"] == "send_dg_enter"]
    if mode == "armed":
        # while no thread is sticky the kernel records nothing: the writer never fires,
        # send_dg's steps and getaddrinfo's name are for sticky threads only
        assert not gai and not dg and rep["run"]["records"] == 0
    else:
        # --full: every lookup, named, with send_dg's steps (replicationCron: once a second)
        assert gai and all(e["name"] == "keydb-0.keydb" for e in gai)
        assert dg
        # a wait that cannot be doomed (a query in flight) is recorded only with its end,
        # when that end is not a quick answer: none is recorded without its return
        kinds = [e["kind"] for e in rep["events"]]
        assert kinds.count("poll_enter") == kinds.count("poll_return")


def _refused(pid, *extra, user=None):
    argv = GD + ["attach", str(pid), "--duration", "5", *extra]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all"] + argv
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    lines = r.stderr.strip().splitlines()
    return r.returncode, lines


def test_refusals_have_one_line_causes_and_no_side_effect(tmp_path):
    # missing
    rc, lines = _refused(4194300)
    assert rc == 3 and len(lines) == 1 and "no process 4194300" in lines[0]
    # zombie: a child that exited and was not reaped
    z = subprocess.Popen([sys.executable, "-c",
                          "import os,time\npid=os.fork()\nif pid==0: os._exit(0)\n"
                          "print(pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        zpid = int(z.stdout.readline())
        time.sleep(0.3)
        rc, lines = _refused(zpid)
        assert rc == 3 and len(lines) == 1 and "zombie" in lines[0]
    finally:
        z.kill()
        z.wait()
    # already traced: strace holds it
    s = subprocess.Popen(["sleep", "60"])
    st = subprocess.Popen(["strace", "-p", str(s.pid), "-o", "/dev/null"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not tracer_of(s.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        rc, lines = _refused(s.pid)
        assert rc == 3 and len(lines) == 1 and "already traced by PID" in lines[0] and "strace" in lines[0]
        assert tracer_of(s.pid) == st.pid                  # untouched
    finally:
        st.terminate()
        st.wait()
        s.kill()
        s.wait()
    # no ptrace permission: an unprivileged user against a root process
    s = subprocess.Popen(["sleep", "60"])
    try:
        rc, lines = _refused(s.pid, user=65534)
        assert rc == 3 and len(lines) == 1 and "CAP_SYS_PTRACE" in lines[0], lines
        assert tracer_of(s.pid) == 0
    finally:
        s.kill()
        s.wait()
    # not glibc: a static binary
    src = tmp_path / "static.c"
    src.write_text("#include <unistd.h>\nint main(void){ sleep(60); return 0; }\n")
    exe = tmp_path / "static"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(exe), str(src)], check=True)
    s = subprocess.Popen([str(exe)])
    try:
        time.sleep(0.2)
        rc, lines = _refused(s.pid)
        assert rc == 3 and len(lines) == 1 and "does not map glibc" in lines[0]
        assert tracer_of(s.pid) == 0
    finally:
        s.kill()
        s.wait()
    # usage errors: exit 2
    r = subprocess.run(GD + ["attach", "notapid"], capture_output=True, text=True)
    assert r.returncode == 2


@pytest.mark.parametrize("mode,release,verdict", [
    ("--lean", "bullseye", "STICKY_STALLING"),
    ("--lean", "bookworm", "STICKY_NO_STALL"),
    ("--passive --escalate", "bullseye", "STICKY_STALLING")])
def test_lean_and_passive_modes_detect_the_same(lab_factory, tmp_path, mode, release, verdict):
    lab = lab_factory(release=release, workload="redis", fault="none")
    out = tmp_path / "rep.json"
    r = Runner(lab.pid, *mode.split(), "--duration", "45",
               "--until", "stall" if verdict == "STICKY_STALLING" else "sticky", "--json", out)
    r.wait_for("passive sampling" if "passive" in mode else "gdbdiag: armed in", 60)
    if "passive" in mode:
        assert tracer_of(lab.pid) == 0          # sampling: nobody traces the target
    time.sleep(1.0)
    lab.inject()
    rc = r.finish(120)
    assert rc == 0, r.text
    rep = json.loads(out.read_text())
    assert rep["verdict"]["code"] == verdict, r.text
    eng = [e for e in rep["events"] if e["kind"] == "sticky_engaged"]
    assert eng
    if mode == "--lean":
        # lean reads the lost query at the flag write: it is named all the same
        assert "AAAA answer for keydb-0.keydb.default.svc.cluster.local. lost" in eng[0]["cause"]
    if "passive" in mode:
        assert rep["run"]["passive_first"] is True
        # one detector for the whole run: the switch as the sampler saw it, then the
        # probes' doomed poll and stall on the same thread
        main = [t for t in rep["threads"] if t["lwp"] == lab.pid][0]
        assert main["since_how"] == "passive:transition" and "between two samples" in main["cause"]
        assert eng[0]["how"] == "passive:transition" and len(eng) == 1
        assert rep["run"]["source"] == "uprobe" and rep["stalls"]
    assert diff_code(lab.pid, ("libc", "libresolv", "libnss_dns")) == []


def test_passive_alone_never_traces_or_stops_the_target(lab_factory, tmp_path):
    lab = lab_factory(release="bullseye", workload="redis", fault="drop-aaaa-once")
    out = tmp_path / "rep.json"
    r = Runner(lab.pid, "--passive", "--duration", "14", "--json", out)
    states = set()
    while r.p.poll() is None:
        states.add(Path(f"/proc/{lab.pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        assert tracer_of(lab.pid) == 0
        time.sleep(0.02)
    assert r.finish(10) == 0, r.text
    assert not states & {"t", "T"}
    rep = json.loads(out.read_text())
    assert rep["run"]["mode"] == "passive" and rep["run"]["samples"] > 100
    assert rep["verdict"]["code"] == "STICKY_STALLING"
    assert rep["stalls"] and all(4000 <= s["measured_ms"] <= 5600 for s in rep["stalls"])
