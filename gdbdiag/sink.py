"""The host side of one event stream: every source of a batch run ends here.

Whatever observes the target -- kernel probes (records decoded by
:mod:`gdbdiag.uprobes.records`), the gdb plugin (its JSON-lines stream, tailed), passive
samples (:mod:`gdbdiag.passive`) -- hands each observation to :meth:`EventSink.feed`,
which

* writes it to the ``--record`` file (JSON lines, a ``run`` record first),
* gives it to the one core :class:`~gdbdiag.core.detector.Detector` of the run,
* prints the findings as they happen (held until the run says it is armed),
* keeps the last observations for the report (bounded), and the kinds found (``--until``).

:func:`build_report` turns the sink's state into the JSON report, whatever the source and
however the run ended (a gdb killed mid-run included): the build's facts come from the
stream's ``run`` record, not from printed text.
"""
from __future__ import annotations

import collections
import time

from .core import events as E
from .core import render
from .core import report as R
from .core.detector import Detector
from .core.events import Event
from .procfs import exe_name, read_text, task_ids

KEEP_OBSERVATIONS = 20000       # in the report; the stream file (--record) has them all
NOT_KEPT = (E.SAMPLE, E.SAMPLED, E.RUN)     # too many / not for the report's event list


class EventSink:
    def __init__(self, det: Detector | None = None, record: str | None = None, say=print,
                 quiet: bool = False, keep: int = KEEP_OBSERVATIONS):
        self.det = det or Detector()
        self.record = open(record, "a") if record else None
        self.say, self.quiet = say, quiet
        self.observations: collections.deque = collections.deque(maxlen=keep)
        self.kinds: set[str] = set()
        self.t0 = time.time()
        self.held: list[str] | None = []       # finding lines before the armed line
        self.on_finding = None                 # hook(finding, observation) before it is shown
        self.decode = None                     # a kept record (bytes) -> its event again
        self.fed = 0

    # -- the stream ------------------------------------------------------------------------
    def start(self, source: str, mode: str, pid: int, build: dict | None = None,
              settings: dict | None = None) -> Event:
        """The stream's ``run`` record: who observes, the build's facts, the detector's
        settings (a replay of the stream decides the same way)."""
        self.det.configure(settings or {})
        if self.held is None:              # a new source arms: hold its findings again
            self.held = []
        ev = Event(t=time.time(), lwp=pid, kind=E.RUN,
                   data={"source": source, "mode": mode, "pid": pid, "build": dict(build or {}),
                         "detector": self.det.settings()})
        self.feed(ev)
        return ev

    def keep(self, raws: list[bytes]) -> None:
        """Keep records for the report as they come, before they are decoded and fed
        (deferred records: :mod:`gdbdiag.uprobes.defer`)."""
        self.observations.extend(raws)

    def feed(self, ev: Event, raw: bytes | None = None, kept: bool = False) -> list[Event]:
        """``raw``: the record ``ev`` was decoded from, kept instead of ``ev`` (bytes:
        nothing for the garbage collector to scan, at tens of thousands a second in
        ``--full``) and decoded again by ``decode`` for the report. ``kept``: already
        kept (``keep``) when it came."""
        self.fed += 1
        if not kept and ev.kind not in NOT_KEPT:
            self.observations.append(ev if raw is None else raw)
        if self.record:
            self.record.write(E.to_line(ev))
        out = self.det.feed(ev)
        for f in out:
            if self.on_finding is not None:
                self.on_finding(f, ev)
            self.kinds.add(f.kind)
            if self.record:
                self.record.write(E.to_line(f, finding=True))
            line = render.finding_line(f, self.t0, self.det.thread(f.lwp).name)
            if self.held is not None:
                self.held.append(line)
            elif not self.quiet:
                self.say(line)
        return out

    def release(self) -> None:
        """Print the findings held while arming (e.g. threads already sticky)."""
        held, self.held = self.held or [], None
        if not self.quiet:
            for line in held:
                self.say(line)

    def until_hit(self, until: str | None) -> bool:
        return (until == "sticky" and E.STICKY_ENGAGED in self.kinds) or \
            (until == "stall" and E.STALL in self.kinds)

    def flush(self) -> None:
        if self.record:
            self.record.flush()

    def close(self) -> None:
        if self.record:
            self.record.close()
        self.record = None


def build_report(sink: EventSink, pid: int, symbols: dict, run: dict) -> dict:
    """The JSON report from the sink's detector; glibc's facts from the ``run`` record's
    build (what the source found in the code) completed by the files (version, package)."""
    from .symbols.facts import glibc_facts
    build = dict(sink.det.run.get("build") or {})
    glibc = glibc_facts(pid, build)
    if build.get("affected_how") is not None:
        glibc["affected_how"] = build["affected_how"]
    comm = read_text(f"/proc/{pid}/comm")
    target = {"pid": pid, "exe": exe_name(pid), "name": comm.strip() if comm else None,
              "threads": len(task_ids(pid)) or None}
    observations = _observations(sink)
    rep = R.build(sink.det, target, glibc, symbols, observations, started=sink.t0)
    rep["run"] = dict(run, source=sink.det.run.get("source"))
    return rep


def _observations(sink: EventSink) -> list[Event]:
    """The kept observations as events; a kept record that does not decode (counted by
    the run as bad) is left out."""
    out = []
    for o in sink.observations:
        if isinstance(o, bytes):
            try:
                o = sink.decode(o)
            except ValueError:
                continue
        if o is not None:
            out.append(o)
    return out
