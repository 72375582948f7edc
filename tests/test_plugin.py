"""The GDB plugin, driven interactively with pexpect, on real lab containers."""
from __future__ import annotations

import json
import re
import time

import pytest

from gdbdiag.codecheck import diff_code
from gdbdiag.core import events as E
from gdbdiag.core.detector import Detector
from gdbdiag.core.events import load_stream

from conftest import findings

pytestmark = pytest.mark.lab


def wait_findings(g, kinds: dict, timeout: float) -> list[dict]:
    """Read the running trace until each kind appears at least kinds[kind] times."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text += g.drain(1.0)
        got = findings(g.output)
        if all(sum(1 for f in got if f["kind"] == k) >= n for k, n in kinds.items()):
            return got
    raise AssertionError(f"timed out waiting for {kinds}; saw {[f['kind'] for f in findings(g.output)]}")


def report(g, tmp_path) -> dict:
    path = tmp_path / "report.json"
    g.cmd(f"resolv report --json {path}")
    return json.loads(path.read_text())


def test_bullseye_redis_loss_after_attach_engages_sticky_then_doomed_polls_stall(
        lab_factory, gdb_attach, tmp_path):
    lab = lab_factory(release="bullseye", workload="redis", fault="none")
    g = gdb_attach(lab.pid)
    assert "symbols verified" in g.cmd("resolv symbols --check")
    status = g.cmd("resolv status")
    assert "redis-server" in status and "yes (" not in status       # not sticky yet
    rec = tmp_path / "stream.jsonl"
    out = g.cmd(f"resolv trace --record {rec}")
    assert "bug 30081 in this build: affected" in out and "sticky bit in options" in out
    g.cont()
    time.sleep(1.5)
    lab.inject()                                          # the next AAAA answer is lost
    # the probe keeps GETs going: the target keeps serving throughout
    got = wait_findings(g, {"sticky_engaged": 1, "stall": 2}, 45)
    probe = lab.probe(seconds=2, interval=0.2)
    assert probe and all("error" not in r for r in probe)
    g.interrupt()
    eng = [f for f in got if f["kind"] == "sticky_engaged"]
    assert len(eng) == 1 and eng[0]["thread"] == "redis-server" and eng[0]["lwp"] == lab.pid
    assert "AAAA answer for keydb-0.keydb.default.svc.cluster.local. lost" in eng[0]["text"]
    # each doomed poll is followed by its stall of ~5 s
    seq = [f for f in got if f["kind"] in ("doomed_poll", "stall")]
    for d, s in zip(seq[::2], seq[1::2]):
        assert d["kind"] == "doomed_poll" and s["kind"] == "stall"
        ms = float(s["text"].split(" ms")[0])
        assert 4500 <= ms <= 5500, s
    rep = report(g, tmp_path)
    assert rep["schema"] == "gdbdiag.report/1"
    assert rep["verdict"]["code"] == "STICKY_STALLING"
    assert rep["glibc"]["affected_30081"] is True
    assert rep["glibc"]["affected_source"] == "code, agrees with debian-symbols"
    assert rep["glibc"]["sticky_field"] == "options"
    main = [t for t in rep["threads"] if t["lwp"] == lab.pid][0]
    assert main["sticky"] and "replicationCron" in main["stack"] and "connectWithMaster" in main["stack"]
    assert all(3000 <= s["measured_ms"] <= 5500 for s in rep["stalls"])
    # every event says where its values came from
    assert all("provenance" in e for e in rep["events"])
    polls = [e for e in rep["events"] if e["kind"] == "poll_enter"]
    assert polls and polls[0]["provenance"]["timeout_ms"] == "register"
    # the recorded stream replays through the pure core to the same verdict
    with open(rec) as fh:
        evs = [e for e in load_stream(fh) if e.kind in E.OBSERVATIONS]
    det = Detector(sticky_field="options")
    for e in evs:
        det.feed(e)
    assert {f.kind for f in det.findings} >= {E.STICKY_ENGAGED, E.DOOMED_POLL, E.STALL}
    g.cmd("resolv untrace")
    assert diff_code(lab.pid, ("libresolv",)) == []


def test_bullseye_already_sticky_before_attach_shows_at_once(lab_factory, gdb_attach):
    lab = lab_factory(release="bullseye", workload="redis", fault="drop-aaaa-once")
    deadline = time.monotonic() + 15
    while not [r for r in lab.dns_records() if r["action"] == "dropped"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(5.5)                       # the lost answer's timeout: the switch happens then
    g = gdb_attach(lab.pid)
    status = g.cmd("resolv status")
    row = [l for l in status.splitlines() if l.split()[:1] == [str(lab.pid)]][0]
    assert "RES_SNGLKUP" in row and "yes (options)" in row and "before attach" in row
    assert g.cmd("p $_res_sticky()").strip().endswith("= 1")
    assert "STICKY" in g.cmd("p *__resp")


@pytest.mark.parametrize("release,field", [("bookworm", "_flags"), ("trixie", "_flags")])
def test_fixed_builds_go_sticky_without_stalling(lab_factory, gdb_attach, tmp_path, release, field):
    lab = lab_factory(release=release, workload="redis", fault="none")
    g = gdb_attach(lab.pid)
    # gdb loaded this container's own libc and our verified debug file for it
    assert "symbols verified" in g.cmd("resolv symbols --check")
    out = g.cmd("resolv trace")
    assert "bug 30081 in this build: fixed" in out and f"sticky bit in {field}" in out
    g.cont()
    time.sleep(1.5)
    lab.inject()
    wait_findings(g, {"sticky_engaged": 1}, 20)
    g.drain(6)                              # several serial lookups with SERVFAIL after it
    g.interrupt()
    got = findings(g.output)
    assert not [f for f in got if f["kind"] in ("doomed_poll", "stall")]
    eng = [f for f in got if f["kind"] == "sticky_engaged"][0]
    assert f"statp->{field} single-request bit set" in eng["text"]
    rep = report(g, tmp_path)
    assert rep["verdict"]["code"] == "STICKY_NO_STALL"
    assert rep["glibc"]["affected_30081"] is False and rep["glibc"]["sticky_field"] == field
    status = g.cmd("resolv status")
    row = [l for l in status.splitlines() if l.split()[:1] == [str(lab.pid)]][0]
    assert f"yes ({field})" in row and "RES_F_SNGLKUP" in row


def test_resolver_workload_only_the_thread_that_lost_an_answer_is_sticky(
        lab_factory, gdb_attach, tmp_path):
    lab = lab_factory(release="bullseye", workload="resolver", fault="none", fault_match="keydb-0*")
    time.sleep(1.0)
    g = gdb_attach(lab.pid)
    g.cmd("resolv trace")
    g.cont()
    lab.inject()
    got = wait_findings(g, {"sticky_engaged": 1, "stall": 1}, 40)
    g.interrupt()
    rep = report(g, tmp_path)
    sticky = [t for t in rep["threads"] if t["sticky"]]
    assert [t["name"] for t in sticky] == ["res-keydb-0"]
    assert {f["thread"] for f in got} == {"res-keydb-0"}
    status = g.cmd("resolv status")
    k2 = [l for l in status.splitlines() if "res-keydb-2" in l][0]
    assert " no " in k2


@pytest.mark.parametrize("rcode,style", [("REFUSED", "echo"), ("NOTIMP", "echo"),
                                         ("SERVFAIL", "header-only")])
def test_other_error_answers_doom_polls_too(lab_factory, gdb_attach, tmp_path, rcode, style):
    # the loss must hit a search name's AAAA (answered NXDOMAIN with the question): only a
    # timeout with one answer in hand switches the thread to serial mode
    lab = lab_factory(release="bullseye", workload="resolver", names=("keydb-0.keydb",),
                      fault="none", rcode=rcode, error_style=style, fault_match="*.cluster.local")
    time.sleep(1.0)
    g = gdb_attach(lab.pid)
    g.cmd("resolv trace")
    g.cont()
    lab.inject()
    got = wait_findings(g, {"sticky_engaged": 1}, 40)
    n_before = len(got)
    got = wait_findings(g, {"sticky_engaged": 1, "stall": 1 + sum(
        1 for f in got if f["kind"] == "stall")}, 40)
    g.interrupt()
    after = got[n_before:]
    doomed = [f for f in after if f["kind"] == "doomed_poll"][0]
    if style == "header-only":
        assert "header-only SERVFAIL answer to A ignored by glibc (bug 31890)" in doomed["text"]
    else:
        assert f"{rcode} to A in single-request mode; AAAA never sent" in doomed["text"]
    stall = [f for f in after if f["kind"] == "stall"][0]
    assert 4500 <= float(stall["text"].split(" ms")[0]) <= 5500
    assert report(g, tmp_path)["verdict"]["code"] == "STICKY_STALLING"


def test_step_mode_stops_at_each_step_of_the_chain_with_its_dump(lab_factory, gdb_attach):
    lab = lab_factory(release="bullseye", workload="resolver", names=("keydb-0.keydb",),
                      fault="none", interval=0.5)
    time.sleep(1.0)
    g = gdb_attach(lab.pid)
    g.cmd("resolv trace --step")
    seen = []
    text = ""
    for _ in range(40):
        out = g.cmd("continue", timeout=30)
        text += out
        for line in out.splitlines():
            if line.startswith("-- "):
                seen.append(line[3:].split("  (")[0])
        if "send_dg:recvfrom returned" in seen:
            break
    order = ["getaddrinfo", "_nss_dns_gethostbyname4_r", "__res_context_search",
             "__res_context_querydomain", "__res_context_query", "__res_context_send", "send_dg",
             "send_dg:poll(check)", "send_dg:sendmmsg returned", "send_dg:poll(wait)",
             "send_dg:recvfrom", "send_dg:recvfrom returned"]
    idx = [seen.index(x) for x in order]
    assert idx == sorted(idx), seen
    # the dump: fields with their sources; optimized-out locals inferred
    assert "recvresp1" in text and "inferred" in text and "register" in text
    # and the glibc source of this very build around each probe, by DWARF line table
    assert "res_send.c:" in text and "=> " in text and "__poll (pfd, 1, ptimeout)" in text
    assert "nwritten" in text and "statp->options" in text and "POLLIN" in text
    g.cmd("resolv untrace")


def test_untrace_and_detach_leave_the_code_as_on_disk(lab_factory, gdb_attach):
    lab = lab_factory(release="bullseye", workload="redis", fault="none")
    g = gdb_attach(lab.pid)
    g.cmd("resolv trace --full")
    g.cont()
    time.sleep(3)
    g.interrupt()
    out = g.cmd("resolv untrace")
    assert int(re.search(r"removed (\d+) probes", out).group(1)) >= 15
    g.cmd("detach")
    assert diff_code(lab.pid, ("libc", "libresolv", "libnss_dns")) == []
    assert lab.probe(seconds=1, interval=0.2)
