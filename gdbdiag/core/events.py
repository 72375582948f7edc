"""The event model: what the gdb glue observes, and what the detector concludes.

An :class:`Event` is one observation at one probe (``kind`` is the probe's meaning), one
sample of a thread read from /proc (passive), or one finding of the detector. Every source
(gdb breakpoints, kernel probes, passive samples) writes the same stream: a ``run`` record
first (the source, the build's facts, the detector's settings), then observations, with
the findings interleaved (``"finding": true`` in the JSON); feeding the observations to a
fresh :class:`~gdbdiag.core.detector.Detector` reproduces the findings.

Every value carries its provenance in ``prov``:

- ``register`` / ``memory`` / ``dwarf`` — read from the target at that PC;
- ``inferred`` — reconstructed by the send_dg shadow state machine from earlier events.

Streams are JSON lines (``dump_stream`` / ``load_stream``), so recorded lab runs replay
through the same core in unit tests.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

READ = ("register", "memory", "dwarf")
INFERRED = "inferred"

# Observations (from probes)
GAI_ENTER = "gai_enter"            # getaddrinfo(name, ...) with the application stack
GAI_RETURN = "gai_return"
CHAIN = "chain"                    # a function of the chain was entered (name, args)
SEND_DG_ENTER = "send_dg_enter"    # statp->options/_flags, the queries in buf/buf2
POLL_ENTER = "poll_enter"          # __poll(pfd, 1, timeout) about to be called
POLL_RETURN = "poll_return"        # ... and what it returned
SENDMMSG_RETURN = "sendmmsg_return"
SEND_RETURN = "send_return"
RECVFROM_RETURN = "recvfrom_return"
FLAG_WRITE = "flag_write"          # statp->options |= RES_SNGLKUP (or _flags) just ran
SEND_DG_RETURN = "send_dg_return"
STATUS = "status"                  # a thread's _res read at attach time
SAMPLE = "sample"                  # passive: one thread's _res and syscall in one snapshot
SAMPLED = "sampled"                # passive: a snapshot is complete (data: tids seen)
RECORDS_LOST = "records_lost"      # the kernel could not reserve room for some probe records
RUN = "run"                        # a stream's first record: the source, the build's facts and
                                   # the detector's settings (so any stream replays alone)
OBSERVATIONS = (GAI_ENTER, GAI_RETURN, CHAIN, SEND_DG_ENTER, POLL_ENTER, POLL_RETURN,
                SENDMMSG_RETURN, SEND_RETURN, RECVFROM_RETURN, FLAG_WRITE, SEND_DG_RETURN,
                STATUS, SAMPLE, SAMPLED, RECORDS_LOST, RUN)

# Findings (from the detector)
LOST_ANSWER = "lost_answer"        # a poll timed out with one of two answers missing
STICKY_ENGAGED = "sticky_engaged"  # the thread's single-request flag went 0 -> 1
DOOMED_POLL = "doomed_poll"        # POLLIN poll with no query outstanding: can only time out
STALL = "stall"                    # the measured end of a doomed poll
RESOLVER_WAIT = "resolver_wait"    # passive mode: a resolver poll not (known to be) doomed
FINDINGS = (LOST_ANSWER, STICKY_ENGAGED, DOOMED_POLL, STALL, RESOLVER_WAIT)


@dataclass
class Event:
    t: float
    lwp: int
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    prov: dict[str, str] = field(default_factory=dict)
    pc: int | None = None

    def get(self, key, default=None):
        return self.data.get(key, default)

    def read(self, key) -> bool:
        """True if ``key`` was read from the target (not inferred)."""
        return key in self.data and self.prov.get(key) in READ

    def to_json(self) -> dict:
        d = asdict(self)
        if d["pc"] is None:
            del d["pc"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Event":
        return cls(t=d["t"], lwp=d["lwp"], kind=d["kind"], data=d.get("data", {}),
                   prov=d.get("prov", {}), pc=d.get("pc"))


def to_line(ev: Event, finding: bool = False) -> str:
    """One JSON line of a stream (findings carry ``"finding": true``)."""
    d = ev.to_json()
    if finding:
        d["finding"] = True
    return json.dumps(d, sort_keys=True) + "\n"


def dump_stream(events: Iterable[Event], fh) -> None:
    for ev in events:
        fh.write(to_line(ev, ev.kind in FINDINGS))


def load_stream(fh) -> Iterator[Event]:
    for line in fh:
        line = line.strip()
        if line:
            yield Event.from_json(json.loads(line))


class LineTail:
    """The complete lines appended to a growing file since the last :meth:`lines`: the file
    is read once, from where the last read ended (a line still being written waits for its
    end), so following a day-long file costs neither time nor memory that grows with it."""

    def __init__(self, path):
        self.path, self.pos, self.partial = str(path), 0, b""

    def raw(self, limit: int | None = 1 << 22) -> list[bytes]:
        """At most ``limit`` more bytes (None: all there is), as whole lines."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                chunk = fh.read(-1 if limit is None else limit)
        except FileNotFoundError:
            return []
        self.pos += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        return [line for line in lines if line.strip()]

    def lines(self) -> list[str]:
        return [line.decode(errors="replace") for line in self.raw(None)]


class StreamTail(LineTail):
    """The records appended to a stream file since the last :meth:`read`, as
    ``(event, is_finding)``; a line that is not a record is counted and skipped."""

    def __init__(self, path):
        super().__init__(path)
        self.bad = 0

    def read(self, limit: int = 1 << 22) -> list[tuple[Event, bool]]:
        out = []
        for raw in self.raw(limit):
            try:
                d = json.loads(raw)
                out.append((Event.from_json(d), bool(d.get("finding"))))
            except (ValueError, KeyError, TypeError):
                self.bad += 1
        return out
