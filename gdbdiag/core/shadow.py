"""A shadow state machine of glibc's send_dg (resolv/res_send.c), one per thread.

send_dg keeps its bookkeeping in locals that Debian's optimized builds mostly keep in
registers (``recvresp1``, ``recvresp2``, ``nwritten``, ``single_request`` are
``<optimized out>`` at most PCs). The shadow replays send_dg's own rules on the calls it
makes, which the probes do see:

- entry: ``single_request_reopen = options & RES_SNGLKUPREOP`` (or ``_flags``),
  ``single_request = (options & RES_SNGLKUP) | single_request_reopen``;
- ``retry``: ``nwritten = 0``, ``recvresp1 = 0``, ``recvresp2 = (buf2 == NULL)``;
- ``sendmmsg`` returning 2: ``nwritten += 2``; ``send``: ``++nwritten``;
- an answer whose id matches: ``recvresp1`` if it is the first query's and recvresp1 is
  still 0, else ``recvresp2`` (send_dg's test, literally); an error rcode on the
  ``next_ns`` path marks the same flags;
- a poll timing out with one answer received and single_request still false sets the
  sticky bit and goes back to ``retry`` (the lost answer).

A poll for POLLIN while no query sent is still unanswered can only time out: that is the
doomed poll of bug 30081 (the AAAA was never sent after the A's error answer).
"""
from __future__ import annotations

from dataclasses import dataclass

from .flags import ERROR_RCODES, POLLIN, POLLOUT, sticky_bits


@dataclass
class Query:
    id: int | None
    qname: str | None
    qtype: str | None
    sent: bool = False
    answered: bool = False
    rcode: str | None = None
    ignored: bool = False      # its answer came but glibc threw it away (header-only)


@dataclass
class SendDgShadow:
    """send_dg's locals for one call, reconstructed."""
    queries: list[Query]
    single_request: bool
    single_request_reopen: bool
    buf2: bool
    accepts_header_only: bool = False     # bug 31890 fixed in this build
    nwritten: int = 0
    recvresp1: int = 0
    recvresp2: int = 0
    error_answer: Query | None = None     # the last answer that took the next_ns path
    ignored_answers: int = 0

    @classmethod
    def enter(cls, options, flags, q1: Query, q2: Query | None, accepts_header_only=False):
        bits = sticky_bits(options, flags)
        sh = cls(queries=[q for q in (q1, q2) if q is not None],
                 single_request=bits["single_request"],
                 single_request_reopen=bits["single_request_reopen"],
                 buf2=q2 is not None, accepts_header_only=accepts_header_only)
        sh.retry()
        return sh

    def retry(self) -> None:
        self.nwritten = 0
        self.recvresp1 = 0
        self.recvresp2 = 0 if self.buf2 else 1
        self.error_answer = None
        for q in self.queries:
            q.sent = q.answered = q.ignored = False
            q.rcode = None

    # -- what the probes see ----------------------------------------------------------
    def sent_mmsg(self, n: int) -> None:
        if n == 2:
            for q in self.queries:
                q.sent = True
            self.nwritten += 2
        elif n == 1:             # "just_one": only the first went out
            self.queries[0].sent = True
            self.nwritten += 1

    def sent_one(self, qid: int | None = None) -> Query | None:
        # send(buf) when nwritten == 0, send(buf2) otherwise; the id confirms it when read
        idx = 0 if self.nwritten == 0 else 1
        if qid is not None:
            for i, q in enumerate(self.queries):
                if q.id == qid:
                    idx = i
        if idx < len(self.queries):
            self.queries[idx].sent = True
        self.nwritten += 1
        return self.queries[idx] if idx < len(self.queries) else None

    def received(self, aid: int | None, rcode: str | None, qdcount: int | None) -> Query | None:
        """An answer came back (recvfrom); returns the query it answers, if glibc takes it."""
        match = [q for q in self.queries if q.id == aid and q.sent]
        if not match:
            self.ignored_answers += 1
            return None
        if qdcount == 0 and not self.accepts_header_only:
            # res_queriesmatch() fails on a header-only answer before bug 31890's fix:
            # glibc drops it and keeps waiting as if nothing came; the server will not
            # answer that query again, so nothing but the timeout ends the wait.
            self.ignored_answers += 1
            match[0].ignored = True
            match[0].rcode = rcode
            return None
        q1 = self.queries[0]
        if self.recvresp1 == 0 and q1.id == aid:
            self.recvresp1 = 1
            q = q1
        else:
            self.recvresp2 = 1
            q = self.queries[1] if len(self.queries) > 1 and self.queries[1].id == aid else q1
        q.answered, q.rcode = True, rcode
        if rcode in ERROR_RCODES:
            self.error_answer = q
        return q

    def outstanding(self) -> list[Query]:
        return [q for q in self.queries if q.sent and not q.answered]

    def never_sent(self) -> list[Query]:
        return [q for q in self.queries if not q.sent]

    def poll_is_doomed(self, events: int | None, timeout_ms: int | None) -> bool:
        """POLLIN-only, a real timeout, and nothing in flight: only a timeout can end it."""
        return (events is not None and events & POLLIN and not events & POLLOUT
                and (timeout_ms or 0) > 0
                and not [q for q in self.outstanding() if not q.ignored])

    def lost(self) -> Query | None:
        """On a poll timeout: the query whose answer was lost, if exactly one is missing."""
        out = self.outstanding()
        got = [q for q in self.queries if q.answered]
        if got and out:
            return out[0]
        return None

    def locals(self) -> dict:
        return {"nwritten": self.nwritten, "recvresp1": self.recvresp1,
                "recvresp2": self.recvresp2, "single_request": int(self.single_request),
                "single_request_reopen": int(self.single_request_reopen)}
