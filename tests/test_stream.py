"""One event stream, one detector: passive samples decided by the core, a stream's run
record, the sink, tailing a stream that is still being written, and recorded streams of
every source replaying to the findings recorded with them."""
from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gdbdiag.core import events as E
from gdbdiag.core.detector import Detector
from gdbdiag.core.events import Event, StreamTail
from gdbdiag.core.render import since_text
from gdbdiag.core.verdict import decide
from gdbdiag.sink import EventSink

STREAMS = Path(__file__).parent / "data" / "streams"
PID = 41
OPT, STICKY_OPT = 0x2c1, 0x2002c1


class Samples:
    """What a passive sampler writes: a sample per thread, then a sampled record."""

    def __init__(self):
        self.t, self.events = 1000.0, []

    def snap(self, *threads, dt=0.05):
        self.t += dt
        for tid, options, poll in threads:
            in_poll = poll is not None
            self.events.append(Event(t=self.t, lwp=tid, kind=E.SAMPLE, data={
                "thread_name": f"t{tid}", "resp": 0x7000 + tid, "options": options, "flags": 0,
                "sticky": bool(options & 0x200000), "sticky_field": "options" if options & 0x200000 else None,
                "syscall": 7 if in_poll else None, "in_resolver_poll": in_poll,
                "poll": poll, "frame_confirmed": True if in_poll else None},
                prov={"options": "memory", "poll": "register"}))
        self.events.append(Event(t=self.t, lwp=PID, kind=E.SAMPLED,
                                 data={"tids": [tid for tid, _, _ in threads]}))
        return self


def poll(timeout_ms=5000, nvcsw=10, sp=0x7ffd0000):
    return {"nr": 7, "args": [sp, 1, timeout_ms], "nvcsw": nvcsw, "fd": 9, "events": 1,
            "timeout_ms": timeout_ms, "pfd": sp, "udp_inode": 1234, "nfds": 1, "revents": 0}


def feed_all(det, events):
    out = []
    for ev in events:
        out += det.feed(ev)
    return out


def lost_then_stall():
    """Thread 42: a 5 s wait (its AAAA answer lost), the bit set, then a doomed 5 s wait."""
    s = Samples()
    s.snap((PID, OPT, None), (42, OPT, None))
    for _ in range(100):                                     # the lost answer's wait
        s.snap((PID, OPT, None), (42, OPT, poll(nvcsw=10)))
    s.snap((PID, OPT, None), (42, STICKY_OPT, None))        # switched
    for _ in range(100):                                     # the doomed wait
        s.snap((PID, OPT, None), (42, STICKY_OPT, poll(nvcsw=20)))
    s.snap((PID, OPT, None), (42, STICKY_OPT, None))
    return s


def test_passive_samples_are_decided_by_the_core():
    s = lost_then_stall()
    det = Detector(affected=True)
    found = feed_all(det, s.events)
    kinds = [(f.kind, f.lwp) for f in found]
    assert kinds == [(E.RESOLVER_WAIT, 42), (E.STICKY_ENGAGED, 42), (E.DOOMED_POLL, 42),
                     (E.STALL, 42)]
    eng = found[1]
    assert "right after a 5.0 s resolver wait timed out" in eng.get("cause")
    assert eng.prov["options"] == "memory" and eng.get("how") == "passive:transition"
    stall = found[3]
    assert 4900 <= stall.get("measured_ms") <= 5100 and stall.prov["measured_ms"] == "measured"
    th = {t["lwp"]: t for t in det.thread_summaries()}
    assert th[42]["sticky"] and th[42]["stalls"] == 1 and th[42]["since_how"] == "passive:transition"
    assert det.stalls and det.stalls[0]["measured_ms"] == stall.get("measured_ms")
    assert decide(det.thread_summaries(), det.findings, {"affected_30081": True})["code"] == "STICKY_STALLING"


def test_unaffected_build_waits_are_not_doomed_and_exit_ends_a_wait():
    s = Samples()
    s.snap((PID, OPT, None), (42, STICKY_OPT, None))
    for _ in range(10):
        s.snap((PID, OPT, None), (42, STICKY_OPT, poll()))
    s.snap((PID, OPT, None))                                 # thread 42 exited mid-wait
    det = Detector(affected=False)
    found = feed_all(det, s.events)
    assert [f.kind for f in found] == [E.STICKY_ENGAGED, E.RESOLVER_WAIT]
    assert found[0].get("how") == "passive:status"           # set before the first sample
    th = {t["lwp"]: t for t in det.thread_summaries()}
    assert th[42]["gone"] and th[42]["resolver_waits"] == 1 and th[42]["since_how"] == "passive:status"
    assert since_text(th[42]).startswith("before ")


def test_a_run_record_makes_any_stream_replay_alone():
    """The settings travel in the stream: a fresh Detector() decides like the original."""
    s = lost_then_stall()
    sink = EventSink(say=lambda line: None)
    sink.start("passive", "passive", PID, {"affected_30081": None}, {"affected": True})
    original = feed_all(sink.det, s.events)
    buf = io.StringIO()
    for ev in [sink.det.run and Event(t=0, lwp=PID, kind=E.RUN, data=sink.det.run)] + s.events:
        buf.write(E.to_line(ev))
    fresh = Detector()                                      # affected unknown by default
    replayed = feed_all(fresh, E.load_stream(io.StringIO(buf.getvalue())))
    assert [(f.kind, f.lwp, f.t) for f in replayed] == [(f.kind, f.lwp, f.t) for f in original]
    assert fresh.run["source"] == "passive" and fresh.sampling.affected is True


def test_sink_records_holds_and_bounds(tmp_path):
    lines = []
    rec = tmp_path / "stream.jsonl"
    sink = EventSink(record=str(rec), say=lines.append, keep=50)
    sink.start("passive", "passive", PID, {}, {"affected": True})
    feed_all(sink, lost_then_stall().events)
    assert lines == []                                      # held until the run is armed
    sink.release()
    assert [l.split(": ", 1)[0].rsplit(" ", 1)[-1] for l in lines] == [
        "resolver_wait", "sticky_engaged", "doomed_poll", "stall"]
    assert sink.until_hit("stall") and sink.until_hit("sticky") and not sink.until_hit(None)
    assert len(sink.observations) == 0                      # samples are not kept for the report
    sink.close()
    recs = [json.loads(l) for l in rec.read_text().splitlines()]
    assert recs[0]["kind"] == E.RUN and recs[0]["data"]["detector"]["affected"] is True
    assert [r["kind"] for r in recs if r.get("finding")] == ["resolver_wait", "sticky_engaged",
                                                            "doomed_poll", "stall"]


def test_tail_reads_each_byte_once_and_waits_for_whole_lines(tmp_path):
    path = tmp_path / "s.jsonl"
    tail = StreamTail(path)
    assert tail.read() == []                                # not created yet
    a = E.to_line(Event(t=1.0, lwp=1, kind=E.STATUS, data={"options": OPT}))
    b = E.to_line(Event(t=2.0, lwp=1, kind=E.STICKY_ENGAGED, data={}), finding=True)
    with open(path, "w") as fh:
        fh.write(a + b[:10])
        fh.flush()
        got = tail.read()
        assert [(e.kind, f) for e, f in got] == [(E.STATUS, False)]
        fh.write(b[10:] + "not json\n")
        fh.flush()
        got = tail.read()
    assert [(e.kind, f) for e, f in got] == [(E.STICKY_ENGAGED, True)]
    assert tail.bad == 1 and tail.pos == path.stat().st_size and tail.partial == b""
    assert tail.read() == []


def _sourced_streams():
    return sorted(p for p in STREAMS.glob("*.jsonl.gz")) if STREAMS.exists() else []


def _load(path):
    with gzip.open(path, "rt") as fh:
        return [json.loads(l) for l in fh if l.strip()]


@pytest.mark.parametrize("path", _sourced_streams(), ids=lambda p: p.name)
def test_recorded_streams_of_every_source_replay_to_their_findings(path):
    """`gdbdiag attach --record` streams (kernel probes, gdb, passive samples), recorded on
    lab containers: a fresh detector, fed the observations only, finds what the run found."""
    recs = _load(path)
    assert recs[0]["kind"] == E.RUN
    recorded = [(r["kind"], r["lwp"], r["t"]) for r in recs if r.get("finding")]
    det = Detector()
    replayed = []
    for r in recs:
        if not r.get("finding"):
            replayed += det.feed(Event.from_json(r))
    assert [(f.kind, f.lwp, f.t) for f in replayed] == recorded
    assert recorded, "a stream with no finding proves little"
    meta = json.loads(Path(str(path).replace(".jsonl.gz", ".meta.json")).read_text())
    assert det.run["source"] == meta["source"]
    v = decide(det.thread_summaries(), det.findings, det.run.get("build") or {"affected_30081": det.sampling.affected})
    assert v["code"] == meta["verdict"]


def test_python_m_gdbdiag_passive_still_runs():
    out = subprocess.run([sys.executable, "-m", "gdbdiag.passive", str(os.getpid()), "--once"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert any(s["tid"] == os.getpid() for s in json.loads(out.stdout))
