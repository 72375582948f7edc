"""bpftrace's output lines (records) -> the core's events. Pure: no process, no gdb.

One record per probe hit, fields separated by spaces, the kind letter first, then the
thread (kernel TID, as the host sees it) and the kernel's CLOCK_MONOTONIC in ns:

====  ==============================  ===================================================
G     getaddrinfo entry               name (the rest of the line)
g     getaddrinfo return              return value
E     send_dg entry                   statp options _flags buf2 q1[16 words] q2[16 words]
P     poll call in send_dg            site(c|w) fd events timeout pfd rsp rbp rbx r12..r15 rip
p     poll return                     n fd revents
S     send return                     n id (first two bytes of the packet, as a LE u16)
M     sendmmsg return                 n
R     recvfrom return                 n header[0:8] header[8:12] (LE)
W     sticky-bit write (before it)    writer statp options _flags buf2 q1[16] q2[16]
X     send_dg return                  return value
====  ==============================  ===================================================

Values read by the BPF program are kernel reads of the target at that PC: provenance
``register`` or ``memory`` exactly as for the gdb probes.
"""
from __future__ import annotations

import struct

from ..core import events as E
from ..core.events import Event
from ..core.flags import parse_dns_header, parse_question
from .program import QWORDS


class RecordError(ValueError):
    pass


def _query(words: list[str], present: bool = True) -> dict | None:
    if not present:
        return None
    raw = struct.pack(f"<{QWORDS}Q", *(int(w, 16) for w in words))
    hdr = parse_dns_header(raw)
    qname, qtype = parse_question(raw)
    if hdr is None:
        return None
    return {"id": hdr["id"], "qname": qname, "qtype": qtype}


def _queries(f: list[str], at: int, buf2: int) -> tuple[dict | None, dict | None]:
    q1 = _query(f[at:at + QWORDS])
    q2 = _query(f[at + QWORDS:at + 2 * QWORDS], present=buf2 != 0)
    return q1, q2


class Decoder:
    """Stateful only for what the records do not repeat: the writers' descriptions and
    thread names (read from /proc by the caller, passed in ``names``)."""

    def __init__(self, writers: list[dict], clock_offset: float, names=None):
        self.writers = writers
        self.clock_offset = clock_offset        # wall time - CLOCK_MONOTONIC
        self.names = names or (lambda tid: None)

    def t(self, ns: str) -> float:
        return int(ns) / 1e9 + self.clock_offset

    def decode(self, line: str) -> Event | None:
        """One record -> one Event (None for lines that are not records)."""
        f = line.split(" ", 3) if line[:1] == "G" else line.split()
        if not f or len(f[0]) != 1 or f[0] not in _HANDLERS or len(f) < 3:
            return None
        try:
            tid, t = int(f[1]), self.t(f[2])
            kind, data, prov = _HANDLERS[f[0]](self, f[3:])
        except (ValueError, IndexError, struct.error) as exc:
            raise RecordError(f"bad record {line[:80]!r}: {exc}") from exc
        name = self.names(tid)
        if name:
            data.setdefault("thread_name", name)
        return Event(t=t, lwp=tid, kind=kind, data=data, prov=prov)

    # -- one method per record kind --------------------------------------------------------
    def _gai(self, f):
        return E.GAI_ENTER, {"function": "getaddrinfo", "name": f[0] if f else None}, \
            {"function": "probe", "name": "memory"}

    def _gai_ret(self, f):
        return E.GAI_RETURN, {"function": "getaddrinfo", "ret": int(f[0])}, {"ret": "register"}

    def _enter(self, f):
        statp, options, flags, buf2 = (int(x, 16) for x in f[:4])
        q1, q2 = _queries(f, 4, buf2)
        data = {"function": "send_dg", "statp": statp, "options": options, "flags": flags,
                "q1": q1, "q2": q2}
        prov = {"statp": "register", "options": "memory", "flags": "memory",
                "q1": "memory", "q2": "memory"}
        return E.SEND_DG_ENTER, data, prov

    def _poll(self, f):
        site = "wait" if f[0] == "w" else "check"
        fd, events, timeout = int(f[1]), int(f[2]), int(f[3])
        regs = dict(zip(("pfd", "rsp", "rbp", "rbx", "r12", "r13", "r14", "r15", "rip"),
                        (int(x, 16) for x in f[4:13])))
        data = {"function": "poll", "site": site, "fd": fd, "events": events, "nfds": 1,
                "timeout_ms": timeout, "pfd": regs.pop("pfd"), "regs": regs}
        prov = {"fd": "memory", "events": "memory", "timeout_ms": "register", "pfd": "register",
                "site": "probe", "regs": "register"}
        return E.POLL_ENTER, data, prov

    def _poll_ret(self, f):
        return E.POLL_RETURN, {"function": "poll", "n": int(f[0]), "fd": int(f[1]),
                               "revents": int(f[2])}, \
            {"n": "register", "fd": "memory", "revents": "memory"}

    def _send_ret(self, f):
        raw = int(f[1]) & 0xFFFF
        qid = ((raw & 0xFF) << 8) | (raw >> 8)        # network byte order
        return E.SEND_RETURN, {"function": "send", "n": int(f[0]), "id": qid}, \
            {"n": "register", "id": "memory"}

    def _mmsg_ret(self, f):
        return E.SENDMMSG_RETURN, {"function": "sendmmsg", "n": int(f[0])}, {"n": "register"}

    def _recv_ret(self, f):
        n = int(f[0])
        data, prov = {"function": "recvfrom", "n": n}, {"n": "register"}
        if n >= 12:
            raw = struct.pack("<QI", int(f[1], 16), int(f[2], 16) & 0xFFFFFFFF)
            hdr = parse_dns_header(raw)
            for k in ("id", "rcode", "qdcount", "ancount", "tc"):
                data[k], prov[k] = hdr[k], "memory"
        return E.RECVFROM_RETURN, data, prov

    def _write(self, f):
        w = self.writers[int(f[0])]
        statp, options, flags, buf2 = (int(x, 16) for x in f[1:5])
        before = options if w["field"] == "options" else flags
        bit = 0x200000 if w["bit"].endswith("SNGLKUP") else 0x400000
        q1, q2 = _queries(f, 5, buf2)
        data = {"function": "send_dg", "field": w["field"], "bit": w["bit"], "before": before,
                "value": before | bit, "statp": statp, "options": options, "flags": flags,
                "q1": q1, "q2": q2}
        prov = {"field": "disassembly", "bit": "disassembly", "before": "memory",
                "value": "inferred", "statp": "register", "q1": "memory", "q2": "memory"}
        return E.FLAG_WRITE, data, prov

    def _dg_ret(self, f):
        return E.SEND_DG_RETURN, {"function": "send_dg", "ret": int(f[0])}, {"ret": "register"}


_HANDLERS = {"G": Decoder._gai, "g": Decoder._gai_ret, "E": Decoder._enter, "P": Decoder._poll,
             "p": Decoder._poll_ret, "S": Decoder._send_ret, "M": Decoder._mmsg_ret,
             "R": Decoder._recv_ret, "W": Decoder._write, "X": Decoder._dg_ret}
