"""The gdb plugin with NO debug symbols at all, on real lab containers (pexpect-driven gdb).

gdb attaches with an empty debug-file-directory, no debuginfod and no libthread_db
search path: nothing is fetched, gdb has only the stripped objects' .dynsym. send_dg's
probe points then come from gdbdiag.glibc's analyzer at the load bias read from
/proc/PID/maps; thread states from /proc/PID/mem. With symbols, the analyzer's probe
points must equal what DWARF and the symbol table say (the plugin's own cross-check, and
an independent reading of gdb's `disassemble` here in the test).

Every test ends untraced, detached, with the target's code bytes equal to its files.
"""
from __future__ import annotations

import json
import re
import time

import pytest

from gdbdiag.codecheck import diff_code
from gdbdiag.gdbdrive import Gdb
from gdbdiag.symbols import gdbload, identify

from conftest import findings, release_gdb_sessions
from test_plugin import report, wait_findings

pytestmark = pytest.mark.lab

LOST = "AAAA answer for keydb-0.keydb.default.svc.cluster.local. lost"
CODE = ("libc", "libresolv", "libnss_dns")


@pytest.fixture
def gdb_nosym(tmp_path):
    """gdb attached without any debug file; always untrace + detach + quit at teardown,
    then check the target is not traced and its code is its files'."""
    sessions = []

    def attach(pid: int) -> Gdb:
        empty = tmp_path / "no-debug-files"
        empty.mkdir(exist_ok=True)
        ident = identify.identify_process(pid)
        cmds = gdbload.gdb_setup_commands(ident, str(empty), thread_db=False)
        g = Gdb(pid, cmds + ["set debuginfod enabled off"])
        sessions.append((g, pid))
        # really no symbols for send_dg (a static function: only a debug file has it)
        out = g.cmd("print send_dg")     # 'No symbol table is loaded.' / 'No symbol "send_dg" ...'
        assert "No symbol" in out and "send_dg>" not in out, out
        return g

    yield attach
    release_gdb_sessions(sessions, CODE)


def _row(status: str, lwp: int) -> str:
    return [line for line in status.splitlines() if line.split()[:1] == [str(lwp)]][0]


def _status_json(g) -> list[dict]:
    out = g.cmd("resolv status --json")
    return json.loads(out[out.index("["):])


def _untrace_clean(g, pid):
    assert re.search(r"removed \d+ probes", g.cmd("resolv untrace"))
    assert diff_code(pid, CODE) == []


def test_bullseye_no_symbols_sticky_then_doomed_polls_stall(lab_factory, gdb_nosym, tmp_path):
    lab = lab_factory(release="bullseye", workload="redis", fault="none")
    g = gdb_nosym(lab.pid)
    probes = g.cmd("resolv probes")
    assert "DWARF: no" in probes and "bug 30081: affected" in probes
    assert "libresolv-2.31.so" in probes and "DISAGREE" not in probes
    states = _status_json(g)
    assert {s["provenance"] for s in states} == {"memory"}
    assert [s for s in states if s["lwp"] == lab.pid][0]["sticky"] is False
    out = g.cmd("resolv trace")
    assert "bug 30081 in this build: affected" in out and "sticky bit in options" in out
    assert "no debug symbols" in out and "send_dg's entry and its recvfrom call/return are watched" in out
    g.cont()
    time.sleep(1.5)
    lab.inject()                                          # the next AAAA answer is lost
    got = wait_findings(g, {"sticky_engaged": 1, "stall": 1}, 45)
    g.interrupt()
    eng = [f for f in got if f["kind"] == "sticky_engaged"]
    assert len(eng) == 1 and eng[0]["lwp"] == lab.pid and LOST in eng[0]["text"]
    doomed = [f for f in got if f["kind"] == "doomed_poll"]
    assert doomed and "SERVFAIL to A in single-request mode; AAAA never sent" in doomed[0]["text"]
    assert re.search(r"predicted stall \d{4} ms", doomed[0]["text"])
    stall = [f for f in got if f["kind"] == "stall"][0]
    assert 4500 <= float(stall["text"].split(" ms")[0]) <= 5500
    rep = report(g, tmp_path)
    assert rep["verdict"]["code"] == "STICKY_STALLING"
    assert rep["glibc"]["affected_30081"] is True and rep["glibc"]["sticky_field"] == "options"
    fw = [e for e in rep["events"] if e["kind"] == "flag_write"][0]
    assert fw["provenance"]["field"] == "disassembly"
    assert fw["provenance"]["q1"] == "memory" and fw["provenance"]["recvresp1"] == "inferred"
    assert (fw["recvresp1"], fw["recvresp2"]) == (1, 0)          # the A came, the AAAA was lost
    main = [t for t in rep["threads"] if t["lwp"] == lab.pid][0]
    assert "send_dg" in main["stack"] and "replicationCron" in main["stack"]
    row = _row(g.cmd("resolv status"), lab.pid)
    assert "yes (options)" in row and "RES_SNGLKUP" in row
    _untrace_clean(g, lab.pid)


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_fixed_builds_no_symbols_sticky_without_stall(lab_factory, gdb_nosym, tmp_path, release):
    lab = lab_factory(release=release, workload="redis", fault="none")
    g = gdb_nosym(lab.pid)
    out = g.cmd("resolv trace --lean")
    assert "bug 30081 in this build: fixed" in out and "sticky bit in _flags" in out
    assert "(lean mode" in out and "send_dg's entry and its recvfrom call/return are watched" in out
    g.cont()
    time.sleep(1.5)
    lab.inject()
    got = wait_findings(g, {"sticky_engaged": 1}, 20)
    g.drain(6)                              # several serial lookups with SERVFAIL after it
    g.interrupt()
    got = findings(g.output)
    assert not [f for f in got if f["kind"] in ("doomed_poll", "stall")]
    eng = [f for f in got if f["kind"] == "sticky_engaged"]
    assert len(eng) == 1 and "statp->_flags single-request bit set" in eng[0]["text"]
    assert LOST in eng[0]["text"]
    rep = report(g, tmp_path)
    assert rep["verdict"]["code"] == "STICKY_NO_STALL"
    assert rep["glibc"]["affected_30081"] is False and rep["glibc"]["sticky_field"] == "_flags"
    row = _row(g.cmd("resolv status"), lab.pid)
    assert "yes (_flags)" in row and "RES_F_SNGLKUP" in row
    _untrace_clean(g, lab.pid)


# the resolver workload, started only after a pause: libresolv (send_dg, glibc 2.31) is
# mapped at its first lookup, after gdb attached and `resolv trace` went pending
LATE = ("exec python3 -u -c 'import runpy, sys, time; time.sleep({delay}); "
        "sys.argv = [\"resolver.py\", \"--out\", \"/gdbdiag-out/lookups.jsonl\", \"keydb-0.keydb\"]; "
        "runpy.run_path(\"/opt/gdbdiag/resolver.py\", run_name=\"__main__\")'")


def _is_python(pid: int) -> bool:
    try:
        return "python" in open(f"/proc/{pid}/comm").read()
    except OSError:
        return False


def test_bullseye_no_symbols_arms_when_libresolv_loads(lab_factory, gdb_nosym, tmp_path):
    lab = lab_factory(release="bullseye", cmd=LATE.format(delay=8), fault="none")
    deadline = time.monotonic() + 10
    while not _is_python(lab.pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    maps = open(f"/proc/{lab.pid}/maps").read()
    assert "libresolv" not in maps
    g = gdb_nosym(lab.pid)
    assert "send_dg is not loaded yet" in g.cmd("resolv probes")
    out = g.cmd("resolv trace")
    assert "send_dg is not loaded yet" in out and not re.search(r"armed \d+ probes", out)
    g.cont()
    g.read_until(r"armed \d+ probes \(armed mode[^\n]*libresolv-2\.31\.so[^\n]*no debug symbols", 30)
    time.sleep(1.5)
    lab.inject()
    got = wait_findings(g, {"sticky_engaged": 1, "stall": 1}, 45)
    g.interrupt()
    eng = [f for f in got if f["kind"] == "sticky_engaged"]
    assert len(eng) == 1 and eng[0]["thread"] == "res-keydb-0" and LOST in eng[0]["text"]
    assert any(f["kind"] == "doomed_poll" for f in got)
    assert report(g, tmp_path)["verdict"]["code"] == "STICKY_STALLING"
    _untrace_clean(g, lab.pid)


# -- with symbols: the analyzer's probe points are DWARF's and the symbol table's -----------
_LINE_RE = re.compile(r"^\s*(?:=>\s*)?(0x[0-9a-f]+) <\+\d+>:\s+(\S+)\s*(.*)$")


def _gdb_view(text: str) -> dict:
    """send_dg's call sites (kind -> call pcs), sticky-bit writers and rets as gdb's own
    `disassemble 'send_dg'` (DWARF ranges + symbol names) shows them."""
    from gdbdiag.glibc.codeflow import norm_callee
    calls, writes, rets = {}, [], []
    for m in map(_LINE_RE.match, text.splitlines()):
        if not m:
            continue
        pc, mnem, ops = int(m.group(1), 16), m.group(2), m.group(3)
        callee = re.search(r"<([^<>]+)>\s*$", ops)
        kind = norm_callee(callee.group(1)) if callee and mnem.startswith("call") else None
        if kind in ("poll", "send", "sendmmsg", "recvfrom"):
            calls.setdefault(kind, []).append(pc)
        if mnem.startswith("or") and re.match(r"\$0x[24]00000,.*\(", ops):
            writes.append(pc)
        if mnem.startswith("ret"):
            rets.append(pc)
    return {"calls": {k: sorted(v) for k, v in calls.items()}, "writes": sorted(writes),
            "rets": sorted(rets)}


@pytest.mark.parametrize("release", ["bullseye", "bookworm", "trixie"])
def test_with_symbols_analyzer_probe_points_equal_dwarf_and_symtab(lab_factory, gdb_attach, release):
    lab = lab_factory(release=release, workload="redis", fault="none")
    g = gdb_attach(lab.pid)
    assert "symbols verified" in g.cmd("resolv symbols --check")
    out = g.cmd("resolv probes --json")
    r = json.loads(out[out.index("{"):])
    assert r["dwarf"]["available"] and r["provenance"] == "disassembly"
    checks = r["cross_check"]
    assert checks and all(c["agrees"] is True for c in checks), [c for c in checks if not c["agrees"]]
    what = " | ".join(c["what"] for c in checks)
    for c in r["calls"]:
        assert f"{c['kind']} call {c['pc']:#x} is in send_dg" in what
        assert f"callee of the {c['kind']} call at {c['pc']:#x}" in what
    assert "send_dg entry" in what and "send_dg bounds" in what
    assert "single_request's home (bug-30081 decision)" in what
    # independently: gdb's own disassembly of send_dg (DWARF ranges, symbol names)
    sym = g.cmd("info address send_dg")
    assert f"{r['entry']:#x}" in sym
    view = _gdb_view(g.cmd("disassemble 'send_dg'"))
    ours: dict = {}
    for c in r["calls"]:
        ours.setdefault(c["kind"], []).append(c["pc"])
    assert {k: sorted(v) for k, v in ours.items()} == view["calls"]
    assert sorted(w["pc"] for w in r["flag_writes"]) == view["writes"]
    assert sorted(r["returns"]) == view["rets"]
    out = g.cmd("resolv trace")
    assert "DWARF for enrichment" in out and "DISAGREE" not in out
    _untrace_clean(g, lab.pid)


# -- the plugin's commands: preconditions, live settings, tracebacks, completion -----------
VERBOSE_RE = re.compile(r"LWP \d+ \(res-keydb-0\) getaddrinfo \{'function': 'getaddrinfo'")


def _completions(g, line: str) -> list[str]:
    return [ln.strip() for ln in g.cmd(f"complete {line}").splitlines()
            if ln.strip().startswith(line.split()[0]) and not ln.startswith("complete ")]


def test_commands_guards_live_settings_tracebacks_and_completion(lab_factory, gdb_nosym, tmp_path):
    lab = lab_factory(release="bullseye", workload="resolver", names=("keydb-0.keydb",),
                      fault="none", interval=0.3)
    time.sleep(1.0)
    g = gdb_nosym(lab.pid)

    # file names complete after the options that take a file; option names after "-"
    d = tmp_path / "files"
    d.mkdir()
    for n in ("rec-one.jsonl", "rec-two.jsonl", "other.json"):
        (d / n).write_text("")
    assert sorted(_completions(g, f"resolv trace --record {d}/rec-")) == [
        f"resolv trace --record {d}/rec-one.jsonl", f"resolv trace --record {d}/rec-two.jsonl"]
    assert _completions(g, f"resolv report --timeline x --json {d}/oth") == [
        f"resolv report --timeline x --json {d}/other.json"]
    assert _completions(g, f"resolv trace --step-log {d}/oth") == [f"resolv trace --step-log {d}/other.json"]
    assert _completions(g, "resolv trace --rec") == ["resolv trace --record"]
    assert _completions(g, "resolv status --js") == ["resolv status --json"]
    assert _completions(g, f"resolv status --json {d}/oth") == []       # a flag: no file follows

    # preconditions, checked before anything is done
    out = g.cmd("resolv trace")
    assert re.search(r"armed \d+ probes \(armed mode", out), out
    assert "already tracing: `resolv untrace` first" in g.cmd("resolv trace --lean")
    assert "tracing: `resolv untrace` before reloading symbols" in g.cmd("resolv symbols --offline")

    # `set resolv verbose` takes effect while the trace runs, both ways
    g.cont()
    assert not VERBOSE_RE.search(g.drain(2.0))
    loud = g.cmd("set resolv verbose on") + g.drain(2.0)
    assert VERBOSE_RE.search(loud), loud[-2000:]
    g.cmd("set resolv verbose off")
    g.drain(0.5)                                # a line already on its way
    assert not VERBOSE_RE.search(g.drain(2.0))

    # a probe that fails: one line, the target continues; `set resolv traceback on`
    # (while running) adds the full traceback
    g.interrupt()
    g.cmd("python import gdbdiag.gdb.session as S; [setattr(p, 'reader', lambda probe: 1 // 0) "
          "for p in S.TraceSession.current.probes if p.label == 'getaddrinfo']")
    g.cont()
    short = g.drain(2.0)
    assert re.search(r"probe error \(target continues\): getaddrinfo at 0x[0-9a-f]+: ZeroDivisionError: "
                     r"integer division or modulo by zero", short), short[-2000:]
    assert "Traceback" not in short
    full = g.cmd("set resolv traceback on") + g.drain(2.0)
    assert "Traceback (most recent call last):" in full and "in <lambda>" in full, full[-2000:]
    assert "ZeroDivisionError: integer division or modulo by zero" in full
    g.interrupt()
    assert lab.workload_records()[-1]["t"] > time.time() - 5       # the target kept going
    _untrace_clean(g, lab.pid)

    # not attached: every command that needs a process says so, in one line
    g.cmd("detach")
    for c in ("resolv status", "resolv trace", "resolv probes", "resolv report", "resolv symbols"):
        out = [ln.strip() for ln in g.cmd(c).splitlines() if ln.strip() and ln.strip() != c]   # less the echo
        assert out == ["no process: attach to one first (attach PID)"], (c, out)
