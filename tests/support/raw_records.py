"""Raw kernel-probe records of a real ``--full`` run, and their replay with and without
deferral (gdbdiag.uprobes.defer).

``capture(lab)`` runs a ``--full`` UprobeRun on a lab (its healthy threads resolving,
one of them made sticky by a lost AAAA) and keeps every record the ring gave, as the
run itself consumed them. ``replay(capture, deferred)`` feeds the same records to a new
sink and detector, every one decoded (the eager path) or through the deferral.

Recorded for tests/data/records/ by hand, when the record layouts change:

    .venv/bin/python -m tests.support.raw_records
"""
from __future__ import annotations

import gzip
import json
import os
import struct
import sys
import time
from pathlib import Path

from gdbdiag.core import events as E
from gdbdiag.sink import EventSink
from gdbdiag.uprobes.defer import Deferral
from gdbdiag.uprobes.records import Decoder, RecordError

OUT = Path(__file__).resolve().parents[1] / "data" / "records"
NAMES = tuple(f"raw-{i}.keydb" for i in range(4))
STICKY = NAMES[1]
# STICKY has no record, as the incident's dead peer: its search candidates get NXDOMAIN,
# the bare name SERVFAIL (the doomed poll of bug 30081 once it is sticky); the others resolve
RECORDS = tuple(r for i, n in enumerate(NAMES) if n != STICKY
                for r in (f"{n}=A:10.244.3.{10 + i}", f"{n}=AAAA:fd00::3:{10 + i}"))


def lab_spec(release: str = "bullseye", interval: float = 0.05) -> dict:
    """The workload: one thread per name, each resolving every ``interval`` s; only
    STICKY's AAAA answer can be dropped."""
    return dict(release=release, workload="resolver", names=NAMES, interval=interval,
                fault="none", fault_match=f"{STICKY}*", records=RECORDS)


def capture(lab, before: float = 2.0, limit: float = 30.0, until: str = "stall") -> dict:
    """A live ``--full`` run: ``before`` s healthy, then the drop of STICKY's next AAAA
    answer, until the detector finds ``until`` (or ``limit`` s). Returns the run's
    report, findings and thread summaries with every record it consumed."""
    from gdbdiag.uprobes.run import UprobeRun
    run = UprobeRun(lab.pid, "full", quiet=True)
    recs: list[bytes] = []
    run.arm()
    owner_records = run.owner.records

    def tee():
        got = owner_records()
        recs.extend(got)
        return got
    run.owner.records = tee
    run.release()
    try:
        t0 = time.monotonic()
        injected = False
        while time.monotonic() - t0 < limit:
            run.pump(0.05)
            if not injected and time.monotonic() - t0 >= before:
                lab.inject()
                injected = True
            if injected and run.sink.until_hit(until):
                break
        clock = run.decoder.clock_offset
        kinds = run.owner.record_kinds
        writers = run.decoder.writers
        names = dict(run.decoder._thread_names)
        lost = run.owner.lost
    finally:
        run.close()
    rep = run.report("until", 0.0)
    return {"records": recs, "kinds": kinds, "writers": writers, "clock_offset": clock,
            "names": names, "lost": lost, "settings": run.det.run, "report": rep,
            "findings": findings_of(run.det), "threads": run.det.thread_summaries(),
            "deferred": run.defer.deferred if run.defer else None}


def replay(cap: dict, deferred: bool) -> tuple:
    """(detector, sink, deferral) after feeding ``cap``'s records the eager way or through
    a Deferral -- as UprobeRun does, without the target."""
    names = cap["names"]
    dec = Decoder(cap["kinds"], cap["writers"], cap["clock_offset"], names.get)
    sink = EventSink(quiet=True)
    sink.decode = dec.decode
    run = cap["settings"]
    sink.feed(E.Event(t=0.0, lwp=0, kind=E.RUN, data=dict(run)))

    def feed(rec, kept=True):
        try:
            ev = dec.decode(rec)
        except RecordError:
            return
        if ev is not None:
            sink.feed(ev, rec, kept)
    if not deferred:
        for rec in cap["records"]:
            feed(rec, kept=False)
        return sink.det, sink, None
    d = Deferral(cap["kinds"], feed, dec.thread_name)
    sink.keep(cap["records"])
    for rec in cap["records"]:
        d.add(rec)
    d.flush_all()
    return sink.det, sink, d


def findings_of(det) -> list[dict]:
    return [{"t": f.t, "lwp": f.lwp, "kind": f.kind, **{k: v for k, v in f.data.items()}}
            for f in det.findings + det.refuted]


# -- the files in tests/data/records/ ------------------------------------------------------
def save(cap: dict, name: str, meta: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with gzip.open(OUT / f"{name}.bin.gz", "wb") as fh:
        for rec in cap["records"]:
            fh.write(struct.pack("<I", len(rec)) + rec)
    head = {"kinds": {str(k): v for k, v in cap["kinds"].items()}, "writers": cap["writers"],
            "clock_offset": cap["clock_offset"], "names": {str(k): v for k, v in cap["names"].items()},
            "settings": cap["settings"], "lost": cap["lost"], "verdict": cap["report"]["verdict"]["code"],
            "records": len(cap["records"]), **meta}
    (OUT / f"{name}.meta.json").write_text(json.dumps(head, indent=1, default=str) + "\n")


def load(name: str) -> dict:
    head = json.loads((OUT / f"{name}.meta.json").read_text())
    recs = []
    with gzip.open(OUT / f"{name}.bin.gz", "rb") as fh:
        data = fh.read()
    at = 0
    while at < len(data):
        n, = struct.unpack_from("<I", data, at)
        recs.append(data[at + 4:at + 4 + n])
        at += 4 + n
    return dict(head, records=recs, kinds={int(k): tuple(v) for k, v in head["kinds"].items()},
                names={int(k): v for k, v in head["names"].items()})


def main(argv: list[str]) -> int:
    from gdbdiag.lab import container
    release = argv[0] if argv else "bullseye"
    name = f"raw-{os.getpid() % 10000}"
    lab = container.up(container.LabSpec(name=name, **lab_spec(release)))
    try:
        time.sleep(1.0)
        cap = capture(lab)
    finally:
        container.down(name)
    save(cap, f"{release}-resolver-full", {
        "release": release, "workload": f"resolver, {len(NAMES)} threads every 0.05 s",
        "fault": f"{STICKY}'s AAAA answer dropped once, 2 s after arming",
        "recorded": time.strftime("%Y-%m-%d")})
    print(f"{len(cap['records'])} records, {cap['deferred']} deferred, verdict "
          f"{cap['report']['verdict']['code']}, findings {[f['kind'] for f in cap['findings']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
