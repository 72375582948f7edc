"""A small CoreDNS-like DNS server for the lab, with fault injection and a query log.

It plays the part of the cluster DNS (CoreDNS with the kubernetes plugin) in the
incident of glibc bug 30081:

* names under a configured zone (``cluster.local`` by default) get an authoritative
  NXDOMAIN with the zone's SOA in the authority section, like CoreDNS's kubernetes
  plugin (unless a record is configured for the name);
* names with a configured record get it (NOERROR, empty answer for the other type);
* anything else gets the configured error rcode (SERVFAIL by default), either echoing
  the question (``echo``) or as a bare 12-byte header with qdcount 0
  (``header-only``, as some servers send; glibc bug 31890);
* faults: drop the Nth matching AAAA answer, drop the first matching AAAA answer after
  some seconds, drop the next matching AAAA answer when SIGUSR1 arrives, delay every
  answer, drop every answer.

Run it as ``python -m gdbdiag.lab.dns --listen ADDR --port PORT --log FILE ...``
(see :func:`build_parser`). It answers UDP and, on the same port, TCP (length-prefixed,
for glibc's fallback after a truncated answer) with the same logic; the AAAA loss faults
model UDP packet loss and apply to UDP only.

Signals: SIGUSR1 arms "drop the next matching AAAA answer" (once per signal); SIGHUP
re-reads the ``--config`` file (flags given on the command line still win) and resets
the fault counters; SIGTERM/SIGINT exit cleanly with status 0. Signals are applied in
arrival order with respect to queries: a query sent after ``kill()`` returned sees the
signal's effect.

Every query is logged as one JSON object per line, flushed at once (see
:func:`log_record` for the fields); :func:`read_log` reads the file back.

The decision logic is pure and socket-free: :func:`handle_query` takes the raw request,
a :class:`Config` and the mutable :class:`Faults` state and returns the reply bytes (or
``None`` when the answer is dropped) and the log record. :class:`DNSServer` is the
asyncio glue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fnmatch
import ipaddress
import json
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from dnslib import AAAA, EDNS0, QTYPE, RCODE, RR, SOA, A, DNSError, DNSHeader, DNSRecord

__all__ = [
    "ERROR_RCODES",
    "ERROR_STYLES",
    "Config",
    "ConfigError",
    "Faults",
    "DNSServer",
    "parse_record",
    "resolve",
    "handle_query",
    "log_record",
    "read_log",
    "wait_log",
    "wait_ready",
    "build_parser",
    "load_config",
    "main",
]

#: rcodes the server may answer for names it cannot resolve. SERVFAIL, REFUSED and
#: NOTIMP are the "error answers" of bug 30081; NXDOMAIN (and FORMERR) are offered as
#: controls.
ERROR_RCODES = ("SERVFAIL", "REFUSED", "NOTIMP", "NXDOMAIN", "FORMERR")
ERROR_STYLES = ("echo", "header-only")
RECORD_TYPES = ("A", "AAAA")

#: SOA serial/refresh/retry/expire; the minimum is the configured TTL. CoreDNS's
#: kubernetes plugin uses 7200/1800/86400 and a TTL of 30 for its zones.
SOA_TIMES = (1700000000, 7200, 1800, 86400)
#: Largest UDP answer without EDNS (RFC 1035); larger answers are truncated (TC bit).
UDP_MAX = 512
#: EDNS payload size this server advertises when the client used EDNS.
EDNS_UDP_LEN = 1232

_HEADER = struct.Struct("!HHHHHH")


class ConfigError(ValueError):
    """Invalid configuration (file or flags)."""


# --------------------------------------------------------------------------------------
# Configuration


def _norm_name(name: str) -> str:
    """Lower-case, absolute (trailing dot) form of a DNS name; ``.`` for the root."""
    name = name.strip().lower().rstrip(".")
    return name + "." if name else "."


def parse_record(spec: str) -> tuple[str, str, str]:
    """Parse ``NAME=A:1.2.3.4`` / ``NAME=AAAA:::1`` into ``(name., type, address)``.

    The name is normalised (lower case, trailing dot) and the address validated and
    written in its canonical form.
    """
    name, sep, rest = spec.partition("=")
    rtype, sep2, value = rest.partition(":")
    rtype = rtype.strip().upper()
    if not sep or not sep2 or not name.strip() or not value.strip():
        raise ConfigError(f"record {spec!r}: expected NAME=A:ADDRESS or NAME=AAAA:ADDRESS")
    if rtype not in RECORD_TYPES:
        raise ConfigError(f"record {spec!r}: type {rtype!r} not supported (A, AAAA)")
    try:
        addr = (ipaddress.IPv4Address if rtype == "A" else ipaddress.IPv6Address)(value.strip())
    except ValueError as exc:
        raise ConfigError(f"record {spec!r}: {exc}") from None
    return _norm_name(name), rtype, str(addr)


def _record_specs(value: Any) -> list[str]:
    """Accept a list of ``NAME=TYPE:ADDR`` strings, or ``{name: ["TYPE:ADDR", ...]}``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        specs = []
        for name, items in value.items():
            for item in [items] if isinstance(items, str) else list(items):
                specs.append(f"{name}={item}")
        return specs
    if isinstance(value, Iterable):
        return [str(v) for v in value]
    raise ConfigError(f"records: expected a list or a mapping, got {type(value).__name__}")


@dataclass(frozen=True)
class Config:
    """What the server answers and which faults it injects. Immutable; see :meth:`from_dict`.

    ``records`` maps a normalised name (lower case, trailing dot) to a mapping of record
    type (``A``/``AAAA``) to a tuple of addresses. ``match`` restricts the AAAA loss
    faults (nth, after, SIGUSR1) to names matching that fnmatch glob (case-insensitive,
    compared without the trailing dot); ``None`` matches every name. ``delay_ms`` and
    ``drop_all`` apply to every query.
    """

    zones: tuple[str, ...] = ("cluster.local.",)
    rcode: str = "SERVFAIL"
    error_style: str = "echo"
    records: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    drop_aaaa_nth: int | None = None
    drop_aaaa_after: float | None = None
    match: str | None = None
    delay_ms: float = 0.0
    drop_all: bool = False
    ttl: int = 30

    KEYS = (
        "zones", "rcode", "error_style", "records", "drop_aaaa_nth", "drop_aaaa_after",
        "match", "delay_ms", "drop_all", "ttl",
    )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        """Build a validated config from JSON-like data (the ``--config`` file format).

        Keys (``-`` and ``_`` are interchangeable): ``zones`` (list or string),
        ``rcode``, ``error_style``, ``records`` (list of ``NAME=TYPE:ADDR`` or
        ``{name: ["TYPE:ADDR"]}``), ``drop_aaaa_nth``, ``drop_aaaa_after``, ``match``,
        ``delay_ms``, ``drop_all``, ``ttl``. Missing keys take the defaults; unknown
        keys are an error.
        """
        d = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(d) - set(cls.KEYS))
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        kw: dict[str, Any] = {}
        if d.get("zones") is not None:
            zones = [d["zones"]] if isinstance(d["zones"], str) else list(d["zones"])
            kw["zones"] = tuple(dict.fromkeys(_norm_name(z) for z in zones))
        if d.get("rcode") is not None:
            rcode = str(d["rcode"]).upper()
            if rcode not in ERROR_RCODES:
                raise ConfigError(f"rcode {d['rcode']!r}: expected one of {', '.join(ERROR_RCODES)}")
            kw["rcode"] = rcode
        if d.get("error_style") is not None:
            style = str(d["error_style"]).lower()
            if style not in ERROR_STYLES:
                raise ConfigError(f"error_style {d['error_style']!r}: expected echo or header-only")
            kw["error_style"] = style
        records: dict[str, dict[str, list[str]]] = {}
        for spec in _record_specs(d.get("records")):
            name, rtype, addr = parse_record(spec)
            addrs = records.setdefault(name, {}).setdefault(rtype, [])
            if addr not in addrs:
                addrs.append(addr)
        kw["records"] = {n: {t: tuple(a) for t, a in m.items()} for n, m in records.items()}
        if d.get("drop_aaaa_nth") is not None:
            nth = d["drop_aaaa_nth"]
            if isinstance(nth, bool) or not isinstance(nth, int) or nth < 1:
                raise ConfigError(f"drop_aaaa_nth {nth!r}: expected an integer >= 1")
            kw["drop_aaaa_nth"] = nth
        if d.get("drop_aaaa_after") is not None:
            after = d["drop_aaaa_after"]
            if isinstance(after, bool) or not isinstance(after, (int, float)) or after < 0:
                raise ConfigError(f"drop_aaaa_after {after!r}: expected seconds >= 0")
            kw["drop_aaaa_after"] = float(after)
        if d.get("match") is not None:
            kw["match"] = None if str(d["match"]) in ("", "*") else str(d["match"])
        if d.get("delay_ms") is not None:
            delay = d["delay_ms"]
            if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
                raise ConfigError(f"delay_ms {delay!r}: expected milliseconds >= 0")
            kw["delay_ms"] = float(delay)
        if d.get("drop_all") is not None:
            if not isinstance(d["drop_all"], bool):
                raise ConfigError(f"drop_all {d['drop_all']!r}: expected true or false")
            kw["drop_all"] = d["drop_all"]
        if d.get("ttl") is not None:
            ttl = d["ttl"]
            if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl < 2**31:
                raise ConfigError(f"ttl {ttl!r}: expected an integer >= 0")
            kw["ttl"] = ttl
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, accepted back by :meth:`from_dict` (a ``--config`` file)."""
        return {
            "zones": [z.rstrip(".") for z in self.zones],
            "rcode": self.rcode,
            "error_style": self.error_style,
            "records": [
                f"{name.rstrip('.')}={rtype}:{addr}"
                for name, types in self.records.items()
                for rtype, addrs in types.items()
                for addr in addrs
            ],
            "drop_aaaa_nth": self.drop_aaaa_nth,
            "drop_aaaa_after": self.drop_aaaa_after,
            "match": self.match,
            "delay_ms": self.delay_ms,
            "drop_all": self.drop_all,
            "ttl": self.ttl,
        }

    def matches(self, qname: str) -> bool:
        """Does ``qname`` fall under the faults' ``match`` glob?"""
        if self.match is None:
            return True
        return fnmatch.fnmatchcase(qname.rstrip(".").lower(), self.match.rstrip(".").lower())

    def zone_of(self, qname: str) -> str | None:
        """The longest configured zone containing ``qname``, or ``None``."""
        name = _norm_name(qname)
        best = None
        for zone in self.zones:
            if zone == "." or name == zone or name.endswith("." + zone):
                if best is None or len(zone) > len(best):
                    best = zone
        return best


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


# --------------------------------------------------------------------------------------
# Log and ready file helpers


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete entries of a query log, oldest first; ``[]`` if it does not exist yet.

    A last line still being written (no newline yet) is skipped.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def wait_log(path: str | os.PathLike[str], predicate=lambda entries: bool(entries), *,
             timeout: float = 10.0, interval: float = 0.02) -> list[dict[str, Any]]:
    """Poll :func:`read_log` until ``predicate(entries)`` is true; return the entries.

    Raises ``TimeoutError`` (with the last entries) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        entries = read_log(path)
        if predicate(entries):
            return entries
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{path}: condition not met after {timeout}s; entries: {entries}")
        time.sleep(interval)


def wait_ready(path: str | os.PathLike[str], *, timeout: float = 10.0, proc=None,
               interval: float = 0.02) -> dict[str, Any]:
    """Wait for a server's ``--ready-file`` and return it: ``{pid, listen, port, tcp, started}``

    (``started``: the unix time ``--drop-aaaa-after`` counts from).

    ``proc`` (a ``subprocess.Popen``) makes it fail fast if the server exits first.
    """
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return json.loads(Path(path).read_text(encoding="utf-8"))
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"DNS server exited with status {proc.returncode} before {path}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"DNS server not ready after {timeout}s ({path})")
        time.sleep(interval)


# --------------------------------------------------------------------------------------
# asyncio server


def _client(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _UDP:
    """The UDP side, read with recvmsg() so each query carries its kernel arrival time.

    SO_TIMESTAMPNS stamps a datagram when it reaches the socket, not when the loop gets
    round to it: a parallel A+AAAA pair (sendmmsg) arrives before the A answer leaves,
    a serial pair after it, and the log's ``rx``/``tx`` tell the two apart.
    """

    def __init__(self, server: "DNSServer", sock: socket.socket, loop):
        self.server, self.sock, self.loop = server, sock, loop
        self._closing = False
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self):
        for _ in range(64):
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65535, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP errors queued on the socket: nothing to do
                continue
            rx = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(payload) >= 16:
                    sec, nsec = struct.unpack("qq", payload[:16])
                    rx = sec + nsec / 1e9
            self.server._on_udp(self, data, addr, rx)

    def sendto(self, data: bytes, addr) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            pass  # a full send buffer loses the answer, as UDP may

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


class DNSServer:
    """The asyncio server: UDP (and TCP) sockets, the log file, signals, config reloads.

    ``overrides`` are the config keys given on the command line; they win over the
    config file on every (re)load.
    """

    def __init__(self, config: Config, *, listen: str, port: int, log_path: str,
                 config_path: str | None = None, overrides: Mapping[str, Any] | None = None,
                 ready_file: str | None = None, tcp: bool = True):
        self.config = config
        self.faults = Faults()
        self.listen = listen
        self.port = port
        self.log_path = log_path
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.ready_file = ready_file
        self.tcp = tcp
        self._log = None
        self._udp: _UDP | None = None
        self._tcp_server: asyncio.base_events.Server | None = None
        self._tcp_tasks: set[asyncio.Task] = set()
        self._pending: set[asyncio.TimerHandle] = set()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Written only by the signal handlers / only by the loop: no lost updates.
        self._usr1_received = self._usr1_applied = 0
        self._hup_received = self._hup_applied = 0

    # -- set-up ------------------------------------------------------------------------

    def _bind(self) -> tuple[socket.socket, socket.socket | None]:
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(self.listen).version == 6 else socket.AF_INET
        except ValueError:
            raise ConfigError(f"--listen {self.listen!r}: expected an IP address") from None
        for _ in range(50):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.listen, self.port))
            port = udp.getsockname()[1]
            if not self.tcp:
                return udp, None
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.listen, port))
            except OSError as exc:
                tcp.close()
                udp.close()
                if exc.errno == errno.EADDRINUSE and self.port == 0:
                    continue  # ephemeral UDP port taken for TCP: pick another
                raise
            tcp.listen(64)
            return udp, tcp
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")

    async def start(self) -> int:
        """Bind, install signal handlers, open the log, write the ready file; return the port."""
        loop = self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ready_file)
        # Python-level handlers run in the main thread as soon as the signal arrives
        # (before the loop reads the next datagram), so signals and queries are seen in
        # arrival order; the handlers only bump counters, applied by the loop.
        signal.signal(signal.SIGUSR1, self._sig_usr1)
        signal.signal(signal.SIGHUP, self._sig_hup)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        udp_sock, tcp_sock = self._bind()
        self.port = udp_sock.getsockname()[1]
        if self.log_path == "-":
            self._log = sys.stdout
        else:
            self._log = open(self.log_path, "a", encoding="utf-8")
        self._udp = _UDP(self, udp_sock, loop)
        if tcp_sock is not None:
            self._tcp_server = await asyncio.start_server(self._on_tcp, sock=tcp_sock)
        self.faults = Faults(started=time.time())
        if self.ready_file:
            info = {"pid": os.getpid(), "listen": self.listen, "port": self.port,
                    "tcp": tcp_sock is not None, "started": self.faults.started}
            tmp = f"{self.ready_file}.{os.getpid()}.tmp"
            Path(tmp).write_text(json.dumps(info) + "\n", encoding="utf-8")
            os.replace(tmp, self.ready_file)
        self._note(f"listening on {self.listen} port {self.port} "
                   f"(udp{'+tcp' if tcp_sock else ''}); config {json.dumps(self.config.to_dict())}")
        return self.port

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`), then close everything."""
        if self._loop is None:
            await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.close()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def close(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        if self._udp is not None:
            self._udp.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        for task in list(self._tcp_tasks):
            task.cancel()
        if self._tcp_tasks:
            await asyncio.gather(*self._tcp_tasks, return_exceptions=True)
        if self._tcp_server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp_server.wait_closed(), 1)
        if self._log is not None and self._log is not sys.stdout:
            self._log.close()
        self._log = None
        if self.ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ready_file)
        self._note("stopped")

    # -- signals and reloads -----------------------------------------------------------

    def _sig_usr1(self, signum, frame):
        self._usr1_received += 1
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._apply_signals)

    def _sig_hup(self, signum, frame):
        self._hup_received += 1
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._apply_signals)

    def _apply_signals(self) -> None:
        """Apply signals received so far; called before each query and after each signal."""
        if self._hup_received != self._hup_applied:
            self._hup_applied = self._hup_received
            self.reload()
        n = self._usr1_received - self._usr1_applied
        if n:
            self._usr1_applied += n
            self.faults.arm(n)
            self._note(f"SIGUSR1: armed, next {self.faults.armed} matching AAAA answer(s) will be dropped")

    def reload(self) -> bool:
        """Re-read the config file (flags still win); reset the fault counters, keep arms."""
        if not self.config_path:
            self._note("SIGHUP: no --config file; nothing to reload")
            return False
        try:
            self.config = load_config(self.config_path, self.overrides)
        except (OSError, ValueError) as exc:
            self._note(f"SIGHUP: reload failed, keeping the old config: {exc}")
            return False
        self.faults = Faults(started=time.time(), armed=self.faults.armed)
        self._note(f"SIGHUP: reloaded {self.config_path}: {json.dumps(self.config.to_dict())}")
        return True

    # -- queries -----------------------------------------------------------------------

    def _note(self, msg: str) -> None:
        print(f"gdbdiag.lab.dns[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)

    def _write_log(self, record: dict[str, Any]) -> None:
        if self._log is not None:
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()

    def _handle(self, data: bytes, client: str, proto: str,
                rx: float | None = None) -> tuple[bytes | None, dict]:
        self._apply_signals()
        return handle_query(data, client=client, proto=proto, config=self.config,
                            faults=self.faults, rx=rx)

    def _on_udp(self, transport, data: bytes, addr, rx: float | None = None) -> None:
        reply, record = self._handle(data, _client(addr), "udp", rx)
        if reply is None:
            self._write_log(record)
        elif record["delay_ms"] > 0:
            handle = self._loop.call_later(record["delay_ms"] / 1000.0, self._send_delayed,
                                           transport, reply, addr, record)
            self._pending.add(handle)
        else:
            self._send_udp(transport, reply, addr, record)

    def _send_udp(self, transport, reply: bytes, addr, record: dict[str, Any]) -> None:
        if not transport.is_closing():
            # stamped just before the send: on a veth the client may answer before
            # sendto() even returns, and a serial AAAA must never look earlier than this
            record["tx"] = time.time()
            transport.sendto(reply, addr)
            self._write_log(record)

    def _send_delayed(self, transport, reply: bytes, addr, record: dict[str, Any]) -> None:
        self._pending = {h for h in self._pending if not h.cancelled() and h.when() > self._loop.time()}
        self._send_udp(transport, reply, addr, record)

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        self._tcp_tasks.add(task)
        client = _client(writer.get_extra_info("peername"))
        try:
            while True:
                try:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                reply, record = self._handle(data, client, "tcp")
                if reply is None:
                    self._write_log(record)
                    continue
                if record["delay_ms"] > 0:
                    await asyncio.sleep(record["delay_ms"] / 1000.0)
                record["tx"] = time.time()
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
                self._write_log(record)
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            self._tcp_tasks.discard(task)
            writer.close()


# --------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gdbdiag.lab.dns",
        description="CoreDNS-like lab DNS server with fault injection and a JSON query log. "
                    "Flags override the --config file's keys of the same name. "
                    "SIGUSR1 arms one AAAA drop; SIGHUP reloads --config; SIGTERM exits.",
    )
    p.add_argument("--listen", default="127.0.0.1", help="IP address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=53, help="UDP and TCP port (0: any free port; default 53)")
    p.add_argument("--log", required=True, help="query log: one JSON object per line ('-': stdout)")
    p.add_argument("--config", help="JSON file with the config keys (reloaded on SIGHUP)")
    p.add_argument("--ready-file", help="written (JSON: pid, listen, port, tcp, started) once the sockets are bound; "
                        "removed on exit")
    p.add_argument("--no-tcp", dest="tcp", action="store_false", help="answer UDP only")
    g = p.add_argument_group("config (keys of the --config file)")
    g.add_argument("--zone", dest="zones", action="append", metavar="ZONE",
                   help="authoritative zone answered NXDOMAIN+SOA (repeatable; default cluster.local)")
    g.add_argument("--rcode", type=str.upper, choices=ERROR_RCODES,
                   help="rcode for names outside the zones without records (default SERVFAIL)")
    g.add_argument("--error-style", dest="error_style", choices=ERROR_STYLES,
                   help="echo: error answer echoes the question; header-only: 12-byte header, "
                        "qdcount 0 (glibc bug 31890) (default echo)")
    g.add_argument("--record", dest="records", action="append", metavar="NAME=TYPE:ADDR",
                   help="record, e.g. keydb-0.keydb=A:10.0.0.5 or x=AAAA:::1 (repeatable)")
    g.add_argument("--drop-aaaa-nth", dest="drop_aaaa_nth", type=int, metavar="N",
                   help="drop the answer to the Nth matching AAAA query (from 1), once")
    g.add_argument("--drop-aaaa-after", dest="drop_aaaa_after", type=float, metavar="SECONDS",
                   help="drop the first matching AAAA answer after SECONDS since start, once")
    g.add_argument("--match", metavar="GLOB",
                   help="AAAA drops apply only to names matching this fnmatch glob "
                        "(case-insensitive, no trailing dot; default all)")
    g.add_argument("--delay-ms", dest="delay_ms", type=float, metavar="MS", help="delay every answer")
    g.add_argument("--drop-all", dest="drop_all", action="store_const", const=True,
                   help="answer nothing")
    g.add_argument("--ttl", type=int, help="TTL of records and SOA (default 30)")
    return p


def load_config(path: str | os.PathLike[str] | None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Config from a JSON file (if any) with ``overrides`` (non-``None`` keys) on top."""
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        data.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Config.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in Config.KEYS}
    try:
        config = load_config(args.config, overrides)
    except (OSError, ValueError) as exc:
        print(f"gdbdiag.lab.dns: {exc}", file=sys.stderr)
        return 2
    server = DNSServer(config, listen=args.listen, port=args.port, log_path=args.log,
                       config_path=args.config, overrides=overrides,
                       ready_file=args.ready_file, tcp=args.tcp)
    try:
        asyncio.run(server.run())
    except (OSError, ConfigError) as exc:
        print(f"gdbdiag.lab.dns: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
