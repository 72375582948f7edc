"""Kernel-probe records -> core events (pure), and the programs the kernel accepts.

The records are built byte for byte in the layouts program.py writes; the decoded events
run through the core's detector like any other probe source's.
"""
from __future__ import annotations

import struct

from dnslib import DNSRecord

from gdbdiag.core.detector import Detector
from gdbdiag.uprobes import program
from gdbdiag.uprobes.records import Decoder

NAME = "keydb-0.keydb"
KINDS = {0: ("E", {}), 1: ("P", {}), 2: ("p", {}), 3: ("M", {}), 4: ("R", {}),
         5: ("W", {"writer": 0}), 6: ("G", {}), 7: ("S", {})}
WRITERS = [{"addr_offset": 0x9C0E, "base_reg": "r15", "field": "options", "bit": "RES_SNGLKUP",
            "cfa_rsp": 0xD8}]
TID = 4242


def _q(qtype: str, qid: int) -> bytes:
    d = DNSRecord.question(NAME + ".", qtype)
    d.header.id = qid
    return d.pack()


def _rec(rid: int, ms: float, payload: bytes) -> bytes:
    return struct.pack("<IIQ", rid, TID, int(ms * 1e6)) + payload


def _enter(ms, options, qa, qaaaa):
    pl = struct.pack("<QQQQQqq", 0x1000, 0x2000, 0x3000, options, 0, len(qa), len(qaaaa))
    return _rec(0, ms, pl + qa.ljust(program.QLEN, b"\xee") + qaaaa.ljust(program.QLEN, b"\xee"))


def _poll(ms, events, timeout):
    regs = struct.pack("<10Q", 0x7000, timeout, 0x7FF0, 0, 0, 0, 0, 0, 0, 0x1234)
    return _rec(1, ms, regs + struct.pack("<iHH", 5, events, 0))


def _poll_ret(ms, n, revents):
    return _rec(2, ms, struct.pack("<qQ", n, 0x7000) + struct.pack("<iHH", 5, 1, revents))


def _answer(ms, qid, rcode):
    hdr = struct.pack(">HBBHHHH", qid, 0x81, 0x80 | rcode, 1, 0, 0, 0)
    return _rec(4, ms, struct.pack("<qQ", 60, 0x8000) + hdr + b"\0" * 4)


def _reply(qtype: str, qid: int, addr: str) -> bytes:
    d = DNSRecord.question(NAME + ".", qtype).reply()
    d.header.id = qid
    d.add_answer(*__import__("dnslib").RR.fromZone(f"{NAME}. 5 IN {qtype} {addr}"))
    return d.pack()[:program.QLEN]


def _writer(ms, options, qa, qaaaa, answered, reply=b"", entry=True):
    """The writer's record; ``entry``: send_dg's entry was probed (its buf/buf2 kept)."""
    bufs = (0x2000, 0x3000) if entry else (0, 0)
    pl = struct.pack("<8Q", 0x1000, *bufs, options, 0, answered, 0x7FF8 if reply else 0,
                     0x9000 if reply else 0)
    qs = (qa, qaaaa) if entry else (b"", b"")
    return _rec(5, ms, pl + b"".join(x.ljust(program.QLEN, b"\0") for x in (*qs, reply)))


def _decode_all(recs):
    d = Decoder(KINDS, WRITERS, 0.0, lambda tid: "res-keydb-0")
    return [d.decode(r) for r in recs]


def test_a_switch_then_a_doomed_poll_from_records():
    a, aaaa = _q("A", 0x1111), _q("AAAA", 0x2222)
    recs = [
        _rec(6, 0, NAME.encode() + b"\0" * (program.NAMELEN - len(NAME))),
        _writer(5005, 0x2C1, a, aaaa, answered=1),           # A came, AAAA lost
        _enter(5010, 0x2002C1, _q("A", 0x3333), _q("AAAA", 0x4444)),
        _poll(5011, 4, 0), _poll_ret(5011, 1, 4),
        _rec(7, 5012, struct.pack("<qQ", 40, 0x2000) + b"\x33\x33" + b"\0" * 6),
        _poll(5013, 1, 5000), _poll_ret(5014, 1, 1),
        _answer(5014, 0x3333, 2),                            # SERVFAIL to A
        _poll(5015, 1, 4999),                                 # AAAA was never sent
        _poll_ret(10015, 0, 0),
    ]
    evs = _decode_all(recs)
    assert [e.kind for e in evs] == ["gai_enter", "flag_write", "send_dg_enter", "poll_enter",
                                     "poll_return", "send_return", "poll_enter", "poll_return",
                                     "recvfrom_return", "poll_enter", "poll_return"]
    fw = evs[1]
    assert fw.get("q1") == {"id": 0x1111, "qname": NAME + ".", "qtype": "A"}
    assert fw.get("recvresp1") == 1 and fw.get("recvresp2") == 0
    assert fw.prov["field"] == "disassembly" and fw.prov["q1"] == "memory"
    assert evs[2].get("q2")["qtype"] == "AAAA" and evs[2].get("options") == 0x2002C1
    assert evs[6].get("timeout_ms") == 5000 and evs[6].get("site") == "wait"
    assert evs[6].get("regs")["rip"] == 0x1234 and evs[6].prov["regs"] == "register"
    assert evs[8].get("rcode") == "SERVFAIL" and evs[8].get("id") == 0x3333
    det = Detector(sticky_field="options")
    found = [f for e in evs for f in det.feed(e)]
    kinds = [f.kind for f in found]
    assert kinds == ["sticky_engaged", "doomed_poll", "stall"], kinds
    assert "AAAA answer for keydb-0.keydb. lost" in found[0].get("cause")
    assert found[1].get("predicted_ms") == 4999 and found[1].get("waiting_for") == "AAAA"
    assert abs(found[2].get("measured_ms") - 5000) < 1


def test_the_writer_names_the_lost_query_from_the_one_answer():
    """Healthy until the switch (no entry probe, no syscall probe attached yet): the
    queries are reconstructed from the answer in send_dg's first buffer, as inferred."""
    evs = _decode_all([_writer(5005, 0x2C1, b"", b"", 0, _reply("A", 0x1111, "10.0.0.1"),
                               entry=False)])
    fw = evs[0]
    assert fw.get("answer") == {"id": 0x1111, "qname": NAME + ".", "qtype": "A", "rcode": "NOERROR"}
    assert fw.prov["answer"] == "memory" and fw.prov["q1"] == fw.prov["q2"] == "inferred"
    assert fw.get("q1") == {"id": 0x1111, "qname": NAME + ".", "qtype": "A"}
    assert fw.get("q2") == {"id": None, "qname": NAME + ".", "qtype": "AAAA"}
    assert (fw.get("recvresp1"), fw.get("recvresp2")) == (1, 0)
    found = Detector(sticky_field="options").feed(fw)
    assert [f.kind for f in found] == ["sticky_engaged"]
    assert "AAAA answer for keydb-0.keydb. lost" in found[0].get("cause")
    # the other way round: AAAA answered, A lost
    fw = _decode_all([_writer(1, 0x2C1, b"", b"", 0, _reply("AAAA", 7, "fd00::1"), entry=False)])[0]
    assert (fw.get("recvresp1"), fw.get("recvresp2")) == (0, 1) and fw.get("q1")["qtype"] == "A"
    # with the entry probe but no syscall bookkeeping: matched by id, as send_dg does
    a, aaaa = _q("A", 0x1111), _q("AAAA", 0x2222)
    fw = _decode_all([_writer(1, 0x2C1, a, aaaa, 0, _reply("AAAA", 0x2222, "fd00::1"))])[0]
    assert (fw.get("recvresp1"), fw.get("recvresp2")) == (0, 1) and fw.prov["q1"] == "memory"
    # what is not an answer is not used: no names claimed
    fw = _decode_all([_writer(1, 0x2C1, b"", b"", 0, _q("A", 5), entry=False)])[0]
    assert fw.get("answer") is None and fw.get("q1") is None
    assert "poll timeout with one answer missing" in Detector().feed(fw)[0].get("cause")


def test_query_names_parse_once_per_packet_shape():
    """The same names come back with new ids: decoding must not depend on the id or on
    the bytes after the packet (the record holds 128 bytes)."""
    evs = _decode_all([_enter(1, 0x2C1, _q("A", i), _q("AAAA", i + 1)) for i in range(50)])
    assert {e.get("q1")["qname"] for e in evs} == {NAME + "."}
    assert [e.get("q1")["id"] for e in evs] == list(range(50))


def test_the_kernel_accepts_every_program(tmp_path):
    """Every program of every mode passes the BPF verifier (loaded, not attached)."""
    import os

    from gdbdiag.uprobes import bpf
    maps = {"state": bpf.map_create(bpf.MAP_LRU_HASH, 8, program.STATE_SIZE, 1024),
            "ring": bpf.map_create(bpf.MAP_RINGBUF, 0, 0, 1 << 16),
            "lost": bpf.map_create(bpf.MAP_ARRAY, 4, 8, 1)}
    try:
        plan = program.Plan(pid=1, send_dg_file="/x", libc_file="/y", send_dg_entry=0x100,
                            writers=WRITERS + [dict(WRITERS[0], cfa_rsp=None)], gai_entry=0x200)
        for mode in ("lean", "armed", "full"):
            probes, kinds = program.build(plan, maps, mode)
            assert {k for k, _ in kinds.values()} >= {"E", "W", "P", "p", "S", "M", "R"}
            # healthy lean/armed: only the writers are attached at first
            early = [p for p in probes if not p.late]
            if mode == "full":
                assert early == probes
            else:
                assert [p.kind for p in early] == ["uprobe", "uprobe"]    # the two writers
            for p in probes:
                kind = bpf.PROG_KPROBE if p.kind == "uprobe" else bpf.PROG_RAW_TRACEPOINT
                os.close(bpf.prog_load(p.code, f"t{p.id}", kind))
    finally:
        for fd in maps.values():
            os.close(fd)
