"""The pure core on event streams: shadow state machine, detector, verdicts."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gdbdiag.core import events as E
from gdbdiag.core.detector import Detector
from gdbdiag.core.events import Event, dump_stream, load_stream
from gdbdiag.core.flags import decode_options, decode_poll, parse_question, sticky_bits
from gdbdiag.core.verdict import STICKY_NO_STALL, STICKY_STALLING, HEALTHY, decide

STREAMS = Path(__file__).parent / "data" / "streams"
LWP = 7
NAME = "keydb-0.keydb"


class Stream:
    """Builds the observations send_dg's probes produce, in glibc's order."""

    def __init__(self, lwp=LWP):
        self.t, self.lwp, self.events = 100.0, lwp, []

    def ev(self, kind, dt=0.0001, **data):
        self.t += dt
        prov = {k: ("memory" if k in ("options", "flags", "q1", "q2", "id", "rcode", "qdcount")
                    else "register") for k in data}
        self.events.append(Event(t=self.t, lwp=self.lwp, kind=kind, data=data, prov=prov))
        return self

    def enter(self, qname, options=0x2c1, flags=0, ids=(1, 2), single=False):
        q2 = None if single else {"id": ids[1], "qname": qname, "qtype": "AAAA"}
        return self.ev(E.SEND_DG_ENTER, options=options, flags=flags,
                       q1={"id": ids[0], "qname": qname, "qtype": "A"}, q2=q2)

    def poll(self, events, timeout, n, revents=0, dt=0.0002):
        self.ev(E.POLL_ENTER, fd=7, events=events, timeout_ms=timeout)
        return self.ev(E.POLL_RETURN, dt=dt, n=n, revents=revents)

    def answer(self, aid, rcode, qdcount=1):
        return self.ev(E.RECVFROM_RETURN, n=31 if qdcount else 12, id=aid, rcode=rcode,
                       qdcount=qdcount)


def parallel_ok(s, qname, ids=(1, 2), rcode="NXDOMAIN"):
    s.enter(qname, ids=ids)
    s.poll(4, 0, 1, revents=4).ev(E.SENDMMSG_RETURN, n=2)
    s.poll(1, 5000, 1, revents=1).answer(ids[0], rcode)
    s.poll(1, 4999, 1, revents=1).answer(ids[1], rcode)
    return s.ev(E.SEND_DG_RETURN, ret=31)


def lost_aaaa(s, qname, ids=(3, 4), flag_field="options"):
    """Parallel A+AAAA, the AAAA answer lost: timeout, sticky bit set, serial retry."""
    s.enter(qname, ids=ids)
    s.poll(4, 0, 1, revents=4).ev(E.SENDMMSG_RETURN, n=2)
    s.poll(1, 5000, 1, revents=1).answer(ids[0], "NXDOMAIN")
    s.poll(1, 4999, 0, dt=5.0)
    if flag_field == "options":
        s.ev(E.FLAG_WRITE, field="options", bit="RES_SNGLKUP", value=0x2002c1)
    else:
        s.ev(E.FLAG_WRITE, field="_flags", bit="RES_F_SNGLKUP", value=0x200000)
    # retry, serially
    s.poll(4, 0, 1, revents=4).ev(E.SEND_RETURN, n=40, id=ids[0])
    s.poll(1, 5000, 1, revents=1).answer(ids[0], "NXDOMAIN")
    s.poll(4, 4999, 1, revents=4).ev(E.SEND_RETURN, n=40, id=ids[1])
    s.poll(1, 4999, 1, revents=1).answer(ids[1], "NXDOMAIN")
    return s.ev(E.SEND_DG_RETURN, ret=120)


def serial_servfail(s, qname, ids=(5, 6), stall=True):
    """The brief's live observation on bullseye: SERVFAIL to A, then a doomed POLLIN poll."""
    s.enter(qname, options=0x2002c1, ids=ids)
    s.poll(4, 0, 1, revents=4).ev(E.SEND_RETURN, n=31, id=ids[0])
    s.poll(1, 5000, 1, revents=1).answer(ids[0], "SERVFAIL")
    if stall:
        s.poll(1, 4998, 0, dt=4.999)
    return s.ev(E.SEND_DG_RETURN, ret=0)


def run(stream, **kw):
    det = Detector(**kw)
    found = []
    for ev in stream.events:
        found += det.feed(ev)
    return det, found


def test_flags_decode():
    assert decode_options(0x2002c1) == "RES_INIT|RES_RECURSE|RES_DEFNAMES|RES_DNSRCH|RES_SNGLKUP"
    assert decode_poll(0x5) == "POLLIN|POLLOUT"
    assert sticky_bits(0x2c1, 0x200000)["field"] == "_flags"
    assert sticky_bits(0x2002c1, 0)["field"] == "options"
    assert not sticky_bits(0x2c1, 0)["single_request"]
    from dnslib import DNSRecord
    assert parse_question(DNSRecord.question("a.b", "AAAA").pack()) == ("a.b.", "AAAA")
    assert parse_question(b"\x00\x01\x81\x82" + b"\x00" * 8) == (None, None)   # header-only


def test_healthy_parallel_lookups():
    s = Stream()
    for i in range(3):
        parallel_ok(s, f"n{i}.cluster.local.", ids=(10 * i + 1, 10 * i + 2))
    det, found = run(s)
    assert found == []
    assert decide(det.thread_summaries(), det.findings)["code"] == HEALTHY


def test_lost_aaaa_engages_sticky_naming_the_lost_query_then_doomed_polls_stall():
    s = Stream()
    parallel_ok(s, "keydb-0.keydb.default.svc.cluster.local.")
    lost_aaaa(s, "keydb-0.keydb.default.svc.cluster.local.")
    serial_servfail(s, "keydb-0.keydb.")
    serial_servfail(s, "keydb-0.keydb.", ids=(7, 8))
    det, found = run(s)
    kinds = [f.kind for f in found]
    assert kinds == [E.LOST_ANSWER, E.STICKY_ENGAGED, E.DOOMED_POLL, E.STALL, E.DOOMED_POLL, E.STALL]
    eng = found[1]
    assert eng.get("lost_qtype") == "AAAA"
    assert eng.get("lost_qname") == "keydb-0.keydb.default.svc.cluster.local."
    assert eng.get("field") == "options"
    doomed = found[2]
    assert doomed.get("predicted_ms") == 4998 and doomed.prov["predicted_ms"] == "register"
    assert doomed.get("waiting_for") == "AAAA" and doomed.get("error_rcode") == "SERVFAIL"
    assert 4900 <= found[3].get("measured_ms") <= 5100
    th = det.threads[LWP]
    assert th.sticky and th.stalls == 2
    v = decide(det.thread_summaries(), det.findings, {"affected_30081": True})
    assert v["code"] == STICKY_STALLING
    assert any("trailing dot" in r for r in v["remediation"])


def test_fixed_build_sticky_without_stall():
    """bookworm/trixie: after SERVFAIL in serial mode send_dg returns; no POLLIN poll."""
    s = Stream()
    lost_aaaa(s, "keydb-0.keydb.default.svc.cluster.local.", flag_field="_flags")
    serial_servfail(s, "keydb-0.keydb.", stall=False)
    det, found = run(s)
    assert [f.kind for f in found] == [E.LOST_ANSWER, E.STICKY_ENGAGED]
    assert found[1].get("field") == "_flags"
    v = decide(det.thread_summaries(), det.findings, {"affected_30081": False})
    assert v["code"] == STICKY_NO_STALL and "fixed" in v["summary"]


def test_lean_mode_infers_engagement_from_the_timeout():
    s = Stream()
    lost_aaaa(s, "x.default.svc.cluster.local.")
    s.events = [e for e in s.events if e.kind != E.FLAG_WRITE]
    det, found = run(s, flag_probe=False, sticky_field="options")
    eng = [f for f in found if f.kind == E.STICKY_ENGAGED]
    assert len(eng) == 1 and eng[0].get("how") == "timeout" and eng[0].prov["field"] == "inferred"


def test_parallel_servfail_is_not_doomed():
    """SERVFAIL to A while the AAAA is in flight: waiting is legitimate."""
    s = Stream()
    s.enter("keydb-0.keydb.")
    s.poll(4, 0, 1, revents=4).ev(E.SENDMMSG_RETURN, n=2)
    s.poll(1, 5000, 1, revents=1).answer(1, "SERVFAIL")
    s.poll(1, 4999, 1, revents=1).answer(2, "SERVFAIL")
    s.ev(E.SEND_DG_RETURN, ret=0)
    det, found = run(s)
    assert found == []


@pytest.mark.parametrize("rcode", ["REFUSED", "NOTIMP"])
def test_other_error_rcodes_doom_like_servfail(rcode):
    s = Stream()
    s.enter("keydb-0.keydb.", options=0x2002c1)
    s.poll(4, 0, 1, revents=4).ev(E.SEND_RETURN, n=31, id=1)
    s.poll(1, 5000, 1, revents=1).answer(1, rcode)
    s.poll(1, 4999, 0, dt=5.0)
    det, found = run(s)
    assert [f.kind for f in found] == [E.STICKY_ENGAGED, E.DOOMED_POLL, E.STALL]
    assert found[1].get("error_rcode") == rcode


def test_header_only_error_answer_is_ignored_by_an_unfixed_glibc():
    """Bug 31890: a 12-byte answer with qdcount 0 fails res_queriesmatch before the fix,
    so the thread waits for the query it already asked: that wait cannot end well either."""
    s = Stream()
    s.enter("keydb-0.keydb.", options=0x2002c1)
    s.poll(4, 0, 1, revents=4).ev(E.SEND_RETURN, n=31, id=1)
    s.poll(1, 5000, 1, revents=1).answer(1, "SERVFAIL", qdcount=0)
    s.poll(1, 4999, 0, dt=5.0)
    det, found = run(s)
    # glibc still waits for that query; the server will not answer it twice: doomed too
    assert [f.kind for f in found] == [E.STICKY_ENGAGED, E.DOOMED_POLL, E.STALL]
    assert "31890" in found[1].get("reason")
    assert det.threads[LWP].shadow.ignored_answers == 1
    _det2, found2 = run(s, accepts_header_only=True)
    assert [f.kind for f in found2] == [E.STICKY_ENGAGED, E.DOOMED_POLL, E.STALL]
    assert "never sent" in found2[1].get("reason")


def test_status_at_attach_reports_already_sticky_threads_and_resolv_conf_cause():
    ev = Event(t=1.0, lwp=9, kind=E.STATUS, data={"options": 0x2002c1, "flags": 0},
               prov={"options": "memory", "flags": "memory"})
    det = Detector()
    assert [f.kind for f in det.feed(ev)] == [E.STICKY_ENGAGED]
    assert "attached" in det.threads[9].cause
    det = Detector(resolv_conf_single_request=True)
    det.feed(ev)
    assert det.threads[9].cause == "resolv.conf options single-request"


def test_per_thread_isolation():
    a, b = Stream(lwp=11), Stream(lwp=12)
    lost_aaaa(a, "keydb-0.keydb.default.svc.cluster.local.")
    serial_servfail(a, "keydb-0.keydb.")
    parallel_ok(b, "keydb-2.keydb.default.svc.cluster.local.", ids=(50, 51))
    merged = sorted(a.events + b.events, key=lambda e: e.t)
    det = Detector()
    for ev in merged:
        det.feed(ev)
    assert det.threads[11].sticky and not det.threads[12].sticky
    assert {s["lwp"] for s in det.stalls} == {11}


def test_dump_marks_read_and_inferred_and_checks_agreement():
    s = Stream()
    serial_servfail(s, "keydb-0.keydb.")
    det = Detector()
    for ev in s.events[:-2]:
        det.feed(ev)
    poll = Event(t=200.0, lwp=LWP, kind=E.POLL_ENTER,
                 data={"fd": 7, "events": 1, "timeout_ms": 4998, "nwritten": 1, "recvresp1": 1},
                 prov={"fd": "memory", "events": "memory", "timeout_ms": "register",
                       "nwritten": "dwarf", "recvresp1": "dwarf"})
    det.feed(poll)
    rows = {r[0]: r for r in det.dump(poll)}
    assert rows["nwritten"] == ("nwritten", 1, "dwarf")
    assert rows["recvresp2"][2] == "inferred" and rows["recvresp2"][1] == 0
    assert rows["single_request"] == ("single_request", 1, "inferred")
    assert rows["events"][1].startswith("POLLIN")
    assert det.threads[LWP].mismatches == []
    bad = Event(t=201.0, lwp=LWP, kind=E.POLL_ENTER, data={"nwritten": 2},
                prov={"nwritten": "dwarf"})
    det.dump(bad)
    assert det.threads[LWP].mismatches


def test_stream_roundtrip():
    s = Stream()
    lost_aaaa(s, "x.")
    buf = io.StringIO()
    dump_stream(s.events, buf)
    back = list(load_stream(io.StringIO(buf.getvalue())))
    assert [e.to_json() for e in back] == [e.to_json() for e in s.events]


def _recorded():
    return sorted(STREAMS.glob("*.jsonl")) if STREAMS.exists() else []


@pytest.mark.parametrize("path", _recorded(), ids=lambda p: p.name)
def test_recorded_lab_streams(path):
    """Streams recorded from lab containers replay to the verdict recorded with them."""
    meta = json.loads(path.with_suffix(".json").read_text())
    with open(path) as fh:
        evs = list(load_stream(fh))
    det = Detector(**meta.get("detector", {}))
    for ev in evs:
        det.feed(ev)
    v = decide(det.thread_summaries(), det.findings, meta.get("build"))
    assert v["code"] == meta["verdict"]
    assert sorted({f.kind for f in det.findings}) == sorted(meta["finding_kinds"])
    for th in det.threads.values():
        assert th.mismatches == [], th.mismatches


def test_lost_probe_records_stop_predictions_until_the_next_send_dg():
    """A record the kernel could not write (which thread's, unknown) could be a send or an
    answer: without it the shadow would see 'nothing in flight' and call a poll doomed."""
    s = Stream()
    s.enter(NAME, options=0x2002c1, ids=(5, 6))             # sticky, serial: A first
    s.poll(4, 0, 1, revents=4).ev(E.SEND_RETURN, n=31, id=5)
    s.poll(1, 5000, 1, revents=1).answer(5, "NXDOMAIN")
    # the AAAA's send_return record was lost: the shadow thinks nothing is in flight
    lost_at = len(s.events)
    s.poll(1, 4999, 1, revents=1).answer(6, "NXDOMAIN")
    s.ev(E.SEND_DG_RETURN, ret=62)
    det, found = run(s)
    # unguarded: a false prediction -- withdrawn when the poll is answered after all
    assert [f.kind for f in found] == [E.STICKY_ENGAGED, E.DOOMED_POLL]
    assert [f.kind for f in det.findings] == [E.STICKY_ENGAGED] and not det.stalls
    assert det.refuted and det.refuted[0].get("refuted").startswith("poll returned 1")
    s.events.insert(lost_at, Event(t=s.events[lost_at].t, lwp=0, kind=E.RECORDS_LOST,
                                   data={"lost": 1, "lost_total": 1}))
    det, found = run(s)
    assert [f.kind for f in found] == [E.STICKY_ENGAGED] and det.records_lost == 1
    assert 0 not in det.threads                            # a stream-level record, no thread
    parallel_ok(s, NAME, ids=(7, 8))                        # the next send_dg is followed again
    det, found = run(s)
    assert [f.kind for f in found] == [E.STICKY_ENGAGED]
    assert decide(det.thread_summaries(), det.findings, {})["code"] == STICKY_NO_STALL
