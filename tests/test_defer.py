"""Deferred records (gdbdiag.uprobes.defer): a thread's healthy send_dg call stays bytes
unless one of its records can matter, and the detector ends exactly where it ends when
fed every record.

The records are real: tests/data/records/ holds every record of a ``--full`` run on a
bullseye lab (four threads resolving, one made sticky by a lost AAAA, its doomed poll
and 5 s stall); the lab test captures a new run live and replays it.
"""
from __future__ import annotations

import struct

import pytest

from gdbdiag.uprobes import defer
from tests.support import raw_records as RR


def _state(det, sink) -> dict:
    return {"findings": RR.findings_of(det), "threads": det.thread_summaries(),
            "stalls": det.stalls, "lost": det.records_lost,
            "observations": [(e.t, e.lwp, e.kind, e.data) for e in
                             (sink.decode(o) for o in sink.observations) if e is not None]}


@pytest.fixture(scope="module")
def recorded():
    return RR.load("bullseye-resolver-full")


def test_a_real_run_gives_the_same_findings_and_threads_deferred(recorded):
    eager_det, eager_sink, _ = RR.replay(recorded, deferred=False)
    det, sink, d = RR.replay(recorded, deferred=True)
    assert _state(det, sink) == _state(eager_det, eager_sink)
    kinds = [f["kind"] for f in RR.findings_of(det)]
    # the run this was recorded from: the switch, its lost AAAA, the doomed poll, the stall
    assert {"lost_answer", "sticky_engaged", "doomed_poll", "stall"} <= set(kinds)
    assert recorded["verdict"] == "STICKY_STALLING"
    # nearly every record was a healthy call's: never decoded
    assert d.deferred > 0.9 * len(recorded["records"]), (d.deferred, len(recorded["records"]))
    assert not d.kept


def _kinds(recorded):
    return {k: rid for rid, (k, _m) in recorded["kinds"].items()}


def test_what_can_matter_is_fed_at_once_after_the_threads_kept_records(recorded):
    """A poll record, the writer, a sticky entry or an unknown kind: the thread's kept
    records first, in order, then it; another thread's stay kept."""
    rid = _kinds(recorded)
    fed: list[bytes] = []
    d = defer.Deferral(recorded["kinds"], fed.append)

    def rec(kind_rid, tid, payload=b""):
        return struct.pack("<IIQ", kind_rid, tid, 1) + payload.ljust(64, b"\0")

    entry = [r for r in recorded["records"] if struct.unpack_from("<I", r)[0] == rid["E"]][0]
    healthy_entry = struct.pack("<I", rid["E"]) + struct.pack("<I", 7) + entry[8:]
    assert not defer._sticky_entry(healthy_entry)
    g, m, r1 = rec(rid["G"], 7), rec(rid["M"], 7), rec(rid["R"], 7)
    other = rec(rid["R"], 8)
    for x in (g, healthy_entry, m, r1, other):
        d.add(x)
    assert fed == []
    poll = rec(rid["P"], 7)
    d.add(poll)
    assert fed == [g, healthy_entry, m, r1, poll]
    assert d.kept == {8: [other]}
    # a new entry replaces the healthy call, keeps the lookup's getaddrinfo
    d.add(g)
    d.add(healthy_entry)
    d.add(m)
    d.add(healthy_entry)
    assert d.kept[7] == [g, healthy_entry] and d.deferred == 2
    sticky = bytearray(healthy_entry)
    struct.pack_into("<Q", sticky, defer.ENTER_OPTIONS_AT, 0x200000)      # RES_SNGLKUP
    fed.clear()
    d.add(bytes(sticky))
    assert fed == [g, healthy_entry, bytes(sticky)]
    unknown = rec(999, 8)
    fed.clear()
    d.add(unknown)
    assert fed == [other, unknown]


def test_a_call_that_never_ends_is_fed_once_it_keeps_too_much(recorded):
    rid = _kinds(recorded)
    fed: list[bytes] = []
    d = defer.Deferral(recorded["kinds"], fed.append)
    recs = [struct.pack("<IIQ", rid["R"], 5, i) + b"\0" * 32 for i in range(defer.KEPT_MAX + 1)]
    for r in recs:
        d.add(r)
    assert fed == recs and not d.kept


@pytest.mark.lab
def test_a_live_full_run_defers_and_finds_what_every_record_fed_finds(lab_factory):
    """A live ``--full`` run (its records deferred) on a bullseye lab: the same findings
    and threads as its own records fed one by one to a fresh detector."""
    lab = lab_factory(**RR.lab_spec("bullseye"))
    cap = RR.capture(lab)
    assert cap["deferred"] > 0.5 * len(cap["records"]), (cap["deferred"], len(cap["records"]))
    det, _sink, _ = RR.replay(cap, deferred=False)
    live = [(f["t"], f["lwp"], f["kind"]) for f in cap["findings"]]
    assert live == [(f["t"], f["lwp"], f["kind"]) for f in RR.findings_of(det)]
    assert {"sticky_engaged", "doomed_poll", "stall"} <= {k for _t, _l, k in live}
    assert cap["report"]["verdict"]["code"] == "STICKY_STALLING"
    replayed = {t["lwp"]: t for t in det.thread_summaries()}
    for t in cap["threads"]:
        if t["lwp"] in replayed and t["lwp"] != lab.pid:     # the main thread resolves nothing
            mine = dict(replayed[t["lwp"]], stack=t["stack"])
            assert {k: t[k] for k in mine} == mine


def test_a_record_too_short_for_its_header_goes_to_the_decoder(recorded):
    fed: list[bytes] = []
    d = defer.Deferral(recorded["kinds"], fed.append)
    d.add(b"\1\0")
    assert fed == [b"\1\0"]
