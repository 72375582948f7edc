"""Records that cannot matter yet stay bytes: each thread's send_dg call in progress is
decoded and fed to the detector only when one of its records can produce a finding.

``--full`` writes every step of every thread: on a host whose threads resolve back to
back, tens of thousands of records a second, nearly all of them healthy calls (the
entry, the sends, the two answers) that end without a finding. Decoding each into an
event cost the runner ~10 µs (live, on the bench's loop workload), competing for the
CPU with the target it watches.

What the detector keeps of a thread's healthy call is replaced as a whole at the
thread's next send_dg entry: the shadow, ``options``/``_flags`` (read at every entry),
the last query (the entry's first query, always read: the record carries its packet)
and, at its next getaddrinfo, the name being looked up. So per thread only the records
since its last getaddrinfo and the last send_dg entry are kept, as bytes; at a record
that can produce a finding -- a poll the kernel let through (possibly doomed, or not a
quick answer), the sticky-bit write, an entry with a single-request bit set, any kind
this module does not know -- the thread's kept records are fed first, in their order,
then that record. Records lost (``RECORDS_LOST``) and the end of the run feed
everything kept. The detector thus reaches, record for record, the state and findings
it reaches when fed every record (``tests/test_defer.py`` replays a real run both
ways); the report's observations and a ``--record`` stream are unchanged (a stream
file or a step log feeds every record at once: they need every event).
"""
from __future__ import annotations

import struct

from ..core.flags import sticky_bits
from .program import HDR

_HEADER = struct.Struct("<II")
_OPTIONS_FLAGS = struct.Struct("<QQ")          # send_dg's entry record: options, _flags
ENTER_OPTIONS_AT = HDR + 24
KEPT_MAX = 64          # a thread whose call keeps writing records without a new entry


class Deferral:
    """``record_kinds``: {record id: (kind, meta)} as ``program.build`` returned it;
    ``feed(rec)``: decode one record and feed its event (the run's own path)."""

    # the kinds whose events only change the thread's send_dg shadow or last query
    FOLLOW = ("S", "M", "R", "X")
    LOOKUP = ("G", "g")

    def __init__(self, record_kinds: dict, feed, first_seen=None):
        """``first_seen(tid)``: called at a thread's first record (its name is read from
        /proc then, as an undeferred run reads it, not once the thread may be gone)."""
        self.feed, self.first_seen = feed, first_seen
        kind = {rid: k for rid, (k, _meta) in record_kinds.items()}
        self.follow = {rid for rid, k in kind.items() if k in self.FOLLOW}
        self.lookup = {rid for rid, k in kind.items() if k in self.LOOKUP}
        self.enter = {rid for rid, k in kind.items() if k == "E"}
        self.kept: dict[int, list[bytes]] = {}      # tid -> its records not yet fed
        self.deferred = 0                            # records never decoded (replaced)

    def add(self, rec: bytes) -> None:
        try:
            rid, tid = _HEADER.unpack_from(rec, 0)
        except struct.error:
            self.feed(rec)           # the decoder says what is wrong with it
            return
        kept = self.kept.get(tid)
        if kept is None and self.first_seen is not None:
            self.first_seen(tid)
        if rid in self.follow:
            if kept is None:
                self.kept[tid] = [rec]
            elif len(kept) < KEPT_MAX:
                kept.append(rec)
            else:
                self.flush(tid)
                self.feed(rec)
        elif rid in self.enter and not _sticky_entry(rec):
            # the previous call ended (healthy: it produced nothing that could matter);
            # the lookup's getaddrinfo stays, its name is the thread's until the next
            lookup = kept[:1] if kept and _HEADER.unpack_from(kept[0], 0)[0] in self.lookup else []
            self._replace(tid, kept, lookup + [rec])
        elif rid in self.lookup:
            self._replace(tid, kept, [rec])
        else:
            self.flush(tid)
            self.feed(rec)

    def _replace(self, tid: int, kept: list[bytes] | None, new: list[bytes]) -> None:
        """The thread's kept records become ``new`` (its last record and what stays of
        the old ones); the others are never decoded."""
        self.deferred += (len(kept) if kept else 0) - (len(new) - 1)
        self.kept[tid] = new

    def flush(self, tid: int) -> None:
        kept = self.kept.pop(tid, None)
        if kept:
            for rec in kept:
                self.feed(rec)

    def flush_all(self) -> None:
        for tid in list(self.kept):
            self.flush(tid)


def _sticky_entry(rec: bytes) -> bool:
    """A send_dg entry whose state has a single-request bit: the detector may engage."""
    try:
        options, flags = _OPTIONS_FLAGS.unpack_from(rec, ENTER_OPTIONS_AT)
    except struct.error:
        return True                  # let the decoder say what is wrong with it
    return sticky_bits(options, flags & 0xFFFFFFFF)["single_request"]
