"""Answering one query, pure and socket-free: :func:`handle_query` takes the raw request,
a :class:`~.config.Config` and the mutable :class:`Faults` state and returns the reply
bytes (or ``None`` when the answer is dropped) and the log record."""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Any

from dnslib import AAAA, EDNS0, QTYPE, RCODE, RR, SOA, A, DNSError, DNSHeader, DNSRecord

from .config import Config, _norm_name

#: SOA serial/refresh/retry/expire; the minimum is the configured TTL. CoreDNS's
#: kubernetes plugin uses 7200/1800/86400 and a TTL of 30 for its zones.
SOA_TIMES = (1700000000, 7200, 1800, 86400)
#: Largest UDP answer without EDNS (RFC 1035); larger answers are truncated (TC bit).
UDP_MAX = 512
#: EDNS payload size this server advertises when the client used EDNS.
EDNS_UDP_LEN = 1232

_HEADER = struct.Struct("!HHHHHH")


# --------------------------------------------------------------------------------------
# Fault state machine


@dataclass
class Faults:
    """Mutable fault state. One instance per server run (reset by a config reload).

    Only UDP AAAA queries whose name matches ``Config.match`` are counted
    (``aaaa_seen``). For each such query, in this order, the first fault that fires
    drops the answer and is used up:

    1. ``drop-aaaa-nth``: the query is the ``drop_aaaa_nth``-th one (once);
    2. ``drop-aaaa-after``: ``drop_aaaa_after`` seconds have passed since ``started``
       (once);
    3. ``drop-aaaa-armed``: ``armed`` > 0 (SIGUSR1 adds one; each drop uses one).

    ``drop-all`` (when configured) drops everything, before any counting.
    """

    started: float = field(default_factory=time.time)
    aaaa_seen: int = 0
    nth_done: bool = False
    after_done: bool = False
    armed: int = 0
    dropped: int = 0

    def arm(self, n: int = 1) -> None:
        """Drop the next ``n`` matching AAAA answers (what SIGUSR1 does)."""
        self.armed += n

    def decide(self, config: Config, *, qtype: str | None, qname: str | None,
               proto: str, now: float) -> str | None:
        """Return the drop reason for this query, or ``None`` to answer it."""
        reason = None
        if config.drop_all:
            reason = "drop-all"
        elif proto == "udp" and qtype == "AAAA" and qname is not None and config.matches(qname):
            self.aaaa_seen += 1
            if (config.drop_aaaa_nth is not None and not self.nth_done
                    and self.aaaa_seen == config.drop_aaaa_nth):
                self.nth_done = True
                reason = "drop-aaaa-nth"
            elif (config.drop_aaaa_after is not None and not self.after_done
                    and now - self.started >= config.drop_aaaa_after):
                self.after_done = True
                reason = "drop-aaaa-after"
            elif self.armed > 0:
                self.armed -= 1
                reason = "drop-aaaa-armed"
        if reason is not None:
            self.dropped += 1
        return reason


# --------------------------------------------------------------------------------------
# Resolution (pure)


def _qtype_name(qtype: int) -> str:
    return QTYPE.forward.get(qtype) or f"TYPE{qtype}"


def _rcode_name(rcode: int) -> str:
    return RCODE.forward.get(rcode) or f"RCODE{rcode}"


def _name_exists(config: Config, qname: str) -> bool:
    """A record exists at ``qname`` or below it (an empty non-terminal): not NXDOMAIN."""
    if qname in config.records:
        return True
    return any(qname == "." or n.endswith("." + qname) for n in config.records)


def _header_only(request_id: int, opcode: int, rd: int, rcode: int) -> bytes:
    """A bare answer header: QR=1, RA=1, RD copied, qdcount = ancount = ... = 0."""
    flags = 0x8000 | (opcode & 0xF) << 11 | (rd & 1) << 8 | 0x0080 | (rcode & 0xF)
    return _HEADER.pack(request_id, flags, 0, 0, 0, 0)


def _soa(zone: str, ttl: int) -> RR:
    label = "" if zone == "." else zone
    return RR(zone, QTYPE.SOA, ttl=ttl,
              rdata=SOA(f"ns.dns.{label}", f"hostmaster.{label}", (*SOA_TIMES, ttl)))


def _udp_limit(request: DNSRecord) -> int:
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            return max(UDP_MAX, min(rr.rclass, 65535))
    return UDP_MAX


def resolve(request: DNSRecord, config: Config, *, proto: str = "udp") -> tuple[bytes, str]:
    """Answer a parsed query per ``config``; return ``(reply bytes, rcode name)``.

    No faults here: this is what the server answers when nothing is dropped. UDP
    answers that do not fit (512 bytes, or the client's EDNS size) are truncated to
    header + question with the TC bit set.
    """
    h = request.header
    edns = any(rr.rtype == QTYPE.OPT for rr in request.ar)

    def reply(rcode: int, *, aa: bool) -> DNSRecord:
        r = DNSRecord(DNSHeader(id=h.id, qr=1, opcode=h.opcode, aa=int(aa), rd=h.rd, ra=1,
                                cd=h.cd, rcode=rcode), q=request.q)
        if edns:
            r.add_ar(EDNS0(udp_len=EDNS_UDP_LEN))
        return r

    if h.opcode != 0:  # only QUERY
        return _header_only(h.id, h.opcode, h.rd, RCODE.NOTIMP), "NOTIMP"
    if len(request.questions) != 1:
        return _header_only(h.id, h.opcode, h.rd, RCODE.FORMERR), "FORMERR"

    q = request.q
    qname = _norm_name(str(q.qname))
    qtype = _qtype_name(q.qtype)
    zone = config.zone_of(qname)
    records = config.records.get(qname)

    if _name_exists(config, qname):
        r = reply(RCODE.NOERROR, aa=True)
        for rtype, addrs in (records or {}).items():
            if qtype in (rtype, "ANY"):
                for addr in addrs:
                    rdata = A(addr) if rtype == "A" else AAAA(addr)
                    r.add_answer(RR(q.qname, getattr(QTYPE, rtype), ttl=config.ttl, rdata=rdata))
        if not r.rr and zone is not None:
            r.add_auth(_soa(zone, config.ttl))
    elif zone is not None:
        r = reply(RCODE.NXDOMAIN, aa=True)
        r.add_auth(_soa(zone, config.ttl))
    else:
        rcode = getattr(RCODE, config.rcode)
        if config.error_style == "header-only":
            return _header_only(h.id, h.opcode, h.rd, rcode), config.rcode
        r = reply(rcode, aa=False)

    data = r.pack()
    if proto == "udp" and len(data) > _udp_limit(request):
        r.header.tc = 1
        r.rr, r.auth, r.ar = [], [], []
        data = r.pack()
    return data, _rcode_name(r.header.rcode)


def log_record(*, t: float, client: str, proto: str, id: int | None, qtype: str | None,
               qname: str | None, rcode: str | None, action: str, reason: str | None,
               size: int, delay_ms: float = 0.0, tx: float | None = None,
               rx: float | None = None) -> dict[str, Any]:
    """One query-log entry (one JSON line in the log).

    ``t`` unix time the query arrived; ``client`` ``ip:port``; ``proto`` ``udp``/``tcp``;
    ``id`` DNS id; ``qtype``/``qname`` as asked (qname with its trailing dot); ``rcode``
    the answer's rcode (for a dropped query, the rcode it would have had); ``action``
    ``answered`` or ``dropped`` (or ``ignored``: too short to answer, or a response);
    ``reason`` why it was dropped (``drop-aaaa-nth``, ``drop-aaaa-after``,
    ``drop-aaaa-armed``, ``drop-all``), or ``malformed``/``response``, else ``None``; ``size`` bytes
    sent (0 when nothing was sent); ``delay_ms`` how long the answer was held back;
    ``rx`` kernel arrival time of the query datagram (SO_TIMESTAMPNS; for TCP, when it
    was read; ``t`` is when the server handled it); ``tx`` unix time the answer was handed to the kernel
    (``None`` when nothing was sent). ``rx``/``tx`` tell serial lookups (the AAAA query
    arrives after the A answer left) from parallel ones.
    """
    return {
        "t": t, "client": client, "proto": proto, "id": id, "qtype": qtype, "qname": qname,
        "rcode": rcode, "action": action, "reason": reason, "size": size, "delay_ms": delay_ms,
        "rx": t if rx is None else rx, "tx": tx,
    }


def handle_query(data: bytes, *, client: str, proto: str, config: Config, faults: Faults,
                 now: float | None = None,
                 rx: float | None = None) -> tuple[bytes | None, dict[str, Any]]:
    """Decide what to do with one raw request: ``(reply bytes or None, log record)``.

    ``faults`` is updated (counters, used-up faults); the record's ``tx`` is the planned
    send time (the server overwrites it with the real one). ``None`` means send nothing (a
    dropped answer, a datagram too short to carry a DNS header, or a DNS response). The caller applies
    ``record["delay_ms"]`` before sending.
    """
    now = time.time() if now is None else now
    rec = dict(t=now, client=client, proto=proto, id=None, qtype=None, qname=None,
               rcode=None, action="answered", reason=None, size=0,
               rx=now if rx is None else rx)
    try:
        request = DNSRecord.parse(data)
    except (DNSError, struct.error, ValueError, IndexError, UnicodeError):
        request = None
    if request is not None and request.header.qr:
        # A response sent to us: never answer it (no reflection loops).
        return None, log_record(**rec | dict(id=request.header.id, action="ignored",
                                             reason="response"))
    if request is None:
        # Unparseable: FORMERR if we can read an id, else nothing.
        if len(data) < _HEADER.size:
            if config.drop_all:
                return None, log_record(**rec | dict(action="dropped", reason="drop-all"))
            return None, log_record(**rec | dict(action="ignored", reason="malformed"))
        rid, flags = struct.unpack_from("!HH", data)
        reply = _header_only(rid, (flags >> 11) & 0xF, (flags >> 8) & 1, RCODE.FORMERR)
        rec |= dict(id=rid, rcode="FORMERR", reason="malformed")
        if faults.decide(config, qtype=None, qname=None, proto=proto, now=now):
            return None, log_record(**rec | dict(action="dropped", reason="drop-all"))
        return reply, log_record(**rec | dict(size=len(reply), delay_ms=config.delay_ms,
                                              tx=now + config.delay_ms / 1000.0))

    rec["id"] = request.header.id
    if request.questions:
        rec["qname"] = str(request.q.qname)
        rec["qtype"] = _qtype_name(request.q.qtype)
    reply, rcode = resolve(request, config, proto=proto)
    rec["rcode"] = rcode
    reason = faults.decide(config, qtype=rec["qtype"], qname=rec["qname"], proto=proto, now=now)
    if reason is not None:
        return None, log_record(**rec | dict(action="dropped", reason=reason))
    return reply, log_record(**rec | dict(size=len(reply), delay_ms=config.delay_ms,
                                          tx=now + config.delay_ms / 1000.0))
