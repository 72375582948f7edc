"""The event model: what the gdb glue observes, and what the detector concludes.

An :class:`Event` is one observation at one probe (``kind`` is the probe's meaning), or
one finding of the detector. Every value carries its provenance in ``prov``:

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
OBSERVATIONS = (GAI_ENTER, GAI_RETURN, CHAIN, SEND_DG_ENTER, POLL_ENTER, POLL_RETURN,
                SENDMMSG_RETURN, SEND_RETURN, RECVFROM_RETURN, FLAG_WRITE, SEND_DG_RETURN,
                STATUS)

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


def dump_stream(events: Iterable[Event], fh) -> None:
    for ev in events:
        fh.write(json.dumps(ev.to_json(), sort_keys=True) + "\n")


def load_stream(fh) -> Iterator[Event]:
    for line in fh:
        line = line.strip()
        if line:
            yield Event.from_json(json.loads(line))
