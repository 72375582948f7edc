"""The probes' binary records -> the core's events. Pure: no process, no kernel.

Every record starts with ``u32 probe id, u32 tid (as the host sees it), u64 ns``
(CLOCK_MONOTONIC); the probe id says which probe wrote it, hence its layout
(program.py). Values the BPF program read are kernel reads of the target at that PC:
provenance ``register`` or ``memory``, exactly as for the gdb probes.
"""
from __future__ import annotations

import functools
import struct

from ..core import events as E
from ..core.events import Event
from ..core.flags import parse_dns_header, parse_question
from ..errors import GdbdiagError
from .program import HDR, NAMELEN, POLL_REGS, QLEN


class RecordError(GdbdiagError, ValueError):
    pass


@functools.lru_cache(maxsize=4096)
def _question(packet: bytes) -> tuple[str | None, str | None]:
    """(qname, qtype) of a query packet whose id bytes are zeroed: the same few names
    are asked again and again, so dnslib parses each once."""
    return parse_question(packet)


@functools.lru_cache(maxsize=1024)
def _header(raw12: bytes) -> dict:
    """{rcode, qdcount, ancount, tc} of an answer whose id bytes are zeroed (copied into
    each event's data, never handed out)."""
    h = parse_dns_header(raw12)
    return {k: h[k] for k in HEADER_KEYS}


HEADER_KEYS = ("rcode", "qdcount", "ancount", "tc")
_HEADER_PROV = dict.fromkeys(("id",) + HEADER_KEYS, "memory")
_HEADER = struct.Struct("<IIQ")
# the poll record: the registers in POLL_REGS's order (unpacked by name in _poll), then
# the pollfd (fd, events)
_POLL = struct.Struct(f"<{len(POLL_REGS)}QiH")
# provenance of the fields every record of a kind has (each event gets its own copy)
_ENTER_PROV = {"statp": "register", "options": "memory", "flags": "memory", "q1": "memory",
               "q2": "memory"}
_POLL_PROV = {"fd": "memory", "events": "memory", "timeout_ms": "register", "pfd": "register",
              "site": "inferred", "regs": "register"}
_RET_PTR = struct.Struct("<qQ")
_ENTER = struct.Struct("<QQQQQqq")
_ID = struct.Struct(">H")


def _query(raw: bytes, length: int | None = None, present: bool = True) -> dict | None:
    if not present or len(raw) < 12:
        return None
    n = length if length and 12 <= length <= len(raw) else len(raw)
    qname, qtype = _question(b"\0\0" + raw[2:n])
    return {"id": struct.unpack_from(">H", raw)[0], "qname": qname, "qtype": qtype}


def _queries(rec: bytes, at: int, buf2: int, len1: int | None = None, len2: int | None = None):
    return (_query(rec[at:at + QLEN], len1),
            _query(rec[at + QLEN:at + 2 * QLEN], len2, present=buf2 != 0))


class Decoder:
    """``record_kinds``: {record id: (kind, meta)} from program.build; ``writers``: the
    plan's writer descriptions; ``clock_offset``: wall time - CLOCK_MONOTONIC;
    ``names(tid)``: the thread's name (read from /proc by the caller)."""

    def __init__(self, record_kinds: dict, writers: list[dict], clock_offset: float, names=None):
        self.table = record_kinds
        self.writers = writers
        self.clock_offset = clock_offset
        self.names = names or (lambda tid: None)
        # per record id: its handler, bound, and the kind's meta (``--full`` decodes tens
        # of thousands of records a second: no lookup that can be done once is repeated)
        self._dispatch = {rid: (_HANDLERS[kind].__get__(self), meta)
                          for rid, (kind, meta) in record_kinds.items() if kind in _HANDLERS}
        self._thread_names: dict[int, str | None] = {}

    def decode(self, rec: bytes) -> Event | None:
        try:
            rid, tid, ns = _HEADER.unpack_from(rec, 0)
            entry = self._dispatch.get(rid)
            if entry is None:
                if rid not in self.table:
                    raise KeyError(rid)
                return None                  # a known kind with nothing to decode
            kind, data, prov = entry[0](entry[1], rec)
        except (KeyError, struct.error, IndexError) as exc:
            raise RecordError(f"bad record ({len(rec)} bytes): {exc}") from exc
        names = self._thread_names
        name = names[tid] if tid in names else self.thread_name(tid)
        if name:
            data.setdefault("thread_name", name)
        return Event(ns / 1e9 + self.clock_offset, tid, kind, data, prov)

    def thread_name(self, tid: int) -> str | None:
        """The thread's name, read once (the first time one of its records is seen)."""
        names = self._thread_names
        return names[tid] if tid in names else names.setdefault(tid, self.names(tid))

    # -- one method per record kind ------------------------------------------------------
    def _gai(self, meta, rec):
        raw = rec[HDR:HDR + NAMELEN]
        name = raw.split(b"\0", 1)[0].decode(errors="replace")
        return E.GAI_ENTER, {"function": "getaddrinfo", "name": name}, \
            {"function": "probe", "name": "memory"}

    def _value(self, rec):
        return struct.unpack_from("<q", rec, HDR)[0]

    def _gai_ret(self, meta, rec):
        return E.GAI_RETURN, {"function": "getaddrinfo", "ret": _s32(self._value(rec))}, \
            {"ret": "register"}

    def _enter(self, meta, rec):
        statp, buf, buf2, options, flags, len1, len2 = _ENTER.unpack_from(rec, HDR)
        q1, q2 = _queries(rec, HDR + 56, buf2, _s32(len1), _s32(len2))
        data = {"function": "send_dg", "statp": statp, "options": options,
                "flags": flags & 0xFFFFFFFF, "q1": q1, "q2": q2}
        return E.SEND_DG_ENTER, data, _ENTER_PROV.copy()

    def _poll(self, meta, rec):
        pfd, rdx, rsp, rbp, rbx, r12, r13, r14, r15, rip, fd, events = _POLL.unpack_from(rec, HDR)
        timeout = _s32(rdx)
        regs = {"rsp": rsp, "rbp": rbp, "rbx": rbx, "r12": r12, "r13": r13, "r14": r14,
                "r15": r15, "rip": rip}
        data = {"function": "poll", "site": "check" if timeout == 0 else "wait", "fd": fd,
                "events": events, "nfds": 1, "timeout_ms": timeout, "pfd": pfd, "regs": regs}
        return E.POLL_ENTER, data, _POLL_PROV.copy()

    def _poll_ret(self, meta, rec):
        n, pfd = struct.unpack_from("<qQ", rec, HDR)
        fd, _events, revents = struct.unpack_from("<iHH", rec, HDR + 16)
        data, prov = {"function": "poll", "n": _s32(n)}, {"n": "register"}
        if pfd:
            data.update(fd=fd, revents=revents)
            prov.update(fd="memory", revents="memory")
        return E.POLL_RETURN, data, prov

    def _send_ret(self, meta, rec):
        n, buf = struct.unpack_from("<qQ", rec, HDR)
        data, prov = {"function": "send", "n": n}, {"n": "register"}
        if buf:
            data["id"], prov["id"] = struct.unpack_from(">H", rec, HDR + 16)[0], "memory"
        return E.SEND_RETURN, data, prov

    def _mmsg_ret(self, meta, rec):
        return E.SENDMMSG_RETURN, {"function": "sendmmsg", "n": _s32(self._value(rec))}, \
            {"n": "register"}

    def _recv_ret(self, meta, rec):
        n, buf = _RET_PTR.unpack_from(rec, HDR)
        data, prov = {"function": "recvfrom", "n": n}, {"n": "register"}
        if buf and n >= 12:
            data["id"] = _ID.unpack_from(rec, HDR + 16)[0]
            data.update(_header(b"\0\0" + rec[HDR + 18:HDR + 28]))
            prov.update(_HEADER_PROV)
        return E.RECVFROM_RETURN, data, prov

    def _write(self, meta, rec):
        w = self.writers[meta["writer"]]
        statp, buf, buf2, options, flags, answered, _anscp, ans = struct.unpack_from("<8Q", rec, HDR)
        flags &= 0xFFFFFFFF
        before = options if w["field"] == "options" else flags
        bit = 0x200000 if w["bit"].endswith("SNGLKUP") else 0x400000
        reply = _answer(rec[HDR + 64 + 2 * QLEN:HDR + 64 + 3 * QLEN]) if ans else None
        data = {"function": "send_dg", "field": w["field"], "bit": w["bit"], "before": before,
                "value": before | bit, "statp": statp, "options": options, "flags": flags}
        prov = {"field": "disassembly", "bit": "disassembly", "before": "memory",
                "value": "inferred", "statp": "register"}
        if reply:
            data["answer"], prov["answer"] = reply, "memory"
        if buf:
            # send_dg's entry was probed: its queries as read there; which one the answer
            # matched as the kernel kept it at each recvfrom (send_dg's recvresp1/2 are
            # <optimized out>), else by the answer's id, as send_dg tests it
            q1, q2 = _queries(rec, HDR + 64, buf2)
            data.update(q1=q1, q2=q2)
            prov.update(q1="memory", q2="memory")
            if not answered and reply:
                answered = (1 if q1 and q1["id"] == reply["id"] else 0) | \
                           (2 if q2 and q2["id"] == reply["id"] else 0)
        else:
            # no entry probe yet (healthy until now): the queries are reconstructed from
            # the one answer — getaddrinfo's pair is A then AAAA, same name
            q1, q2, answered = _pair_from(reply)
            data.update(q1=q1, q2=q2)
            prov.update(q1="inferred", q2="inferred")
        data.update(recvresp1=int(bool(answered & 1)), recvresp2=int(bool(answered & 2)))
        prov.update(recvresp1="inferred", recvresp2="inferred")
        return E.FLAG_WRITE, data, prov

    def _dg_ret(self, meta, rec):
        return E.SEND_DG_RETURN, {"function": "send_dg", "ret": _s32(self._value(rec))}, \
            {"ret": "register"}


def _answer(raw: bytes) -> dict | None:
    """The answer in send_dg's first buffer, when it is one: a response (QR) with a
    question."""
    h = parse_dns_header(raw)
    if not h or not h["qr"] or not h["qdcount"]:
        return None
    qname, qtype = _question(b"\0\0" + raw[2:])
    if not qname:
        return None
    return {"id": h["id"], "qname": qname, "qtype": qtype, "rcode": h["rcode"]}


PAIR = ("A", "AAAA")


def _pair_from(reply: dict | None) -> tuple[dict | None, dict | None, int]:
    """(q1, q2, recvresp bits) of an A+AAAA pair, one of whose answers is ``reply``."""
    if not reply or reply["qtype"] not in PAIR:
        return None, None, 0
    mine = {"id": reply["id"], "qname": reply["qname"], "qtype": reply["qtype"]}
    other = {"id": None, "qname": reply["qname"], "qtype": PAIR[1 - PAIR.index(reply["qtype"])]}
    return (mine, other, 1) if reply["qtype"] == "A" else (other, mine, 2)


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


_HANDLERS = {"G": Decoder._gai, "g": Decoder._gai_ret, "E": Decoder._enter, "P": Decoder._poll,
             "p": Decoder._poll_ret, "S": Decoder._send_ret, "M": Decoder._mmsg_ret,
             "R": Decoder._recv_ret, "W": Decoder._write, "X": Decoder._dg_ret}
