"""The probes for one target: a small eBPF program per probe point, and its record layout.

Every probe reads what the gdb probes read at the same PC — registers by the x86-64 ABI
at call sites of exported functions, memory through the pointers they hold — and writes
one binary record into a ring buffer (decoded by :mod:`.records`). Nothing is ever
written to the target.

Modes (what produces records; a probe hit costs ~1-2 µs in the kernel either way):

- ``lean``: the sticky-bit writers, always; send_dg's probes for *detailed* threads only.
- ``armed`` (default): lean plus getaddrinfo's entry and returns for every thread.
- ``full``: every probe for every thread.

A thread is *detailed* once the kernel has seen its resolver state in single-request
mode: at send_dg's entry (``(options | _flags) & (SNGLKUP|SNGLKUPREOP)``) or at a
sticky-bit write. The filter runs in the BPF program, so a healthy thread costs no
record at all in lean mode.

Per-thread scratch state lives in one LRU hash map keyed ``slot << 32 | tid``: slot 0 is
"detailed", the others hold pointers a call probe saw for its return probe.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import bpf
from .bpf import (ADD, AND, FP, JEQ, JNE, JSLT, LSH, OR, PT_REGS, R0, R1, R2, R3, R4, R6, R7, R8,
                  RSH, Asm)

QLEN = 128           # bytes of a query packet kept
NAMELEN = 128        # bytes of getaddrinfo's name
HDR = 16             # u32 probe id, u32 tid, u64 CLOCK_MONOTONIC ns
STICKY_MASK = 0x600000
SLOT_DETAIL, SLOT_BUF1, SLOT_BUF2, SLOT_PFD, SLOT_SEND, SLOT_RECV, SLOT_ANS = range(7)
WRITE_SIZE = HDR + 48 + 2 * QLEN
PROBE_READ_USER_STR = 114


@dataclass
class Plan:
    """Where the probes go: file offsets in the objects (host paths into the target's
    root), as the analyzer found them."""
    pid: int
    send_dg_file: str
    libc_file: str
    send_dg_entry: int
    send_dg_returns: list[int] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)      # {kind, site, call, ret}
    writers: list[dict] = field(default_factory=list)    # {addr, base_reg, field, bit}
    gai_entry: int | None = None
    gai_returns: list[int] = field(default_factory=list)
    options_off: int = 8
    flags_off: int = 0x1F8


@dataclass
class Probe:
    """One probe point: its program, and what its record holds."""
    id: int
    kind: str                 # record kind, see records.py
    file: str
    offset: int
    code: bytes
    size: int                 # record size (0: the probe writes no record)
    meta: dict = field(default_factory=dict)


class Gen:
    """Code generation for one probe program."""

    def __init__(self, pid: int, maps: dict, probe_id: int, detail_only: bool):
        self.a, self.maps, self.id = Asm(), maps, probe_id
        a = self.a
        a.mov(R6, R1)                                     # r6 = struct pt_regs *
        a.call(bpf.PID_TGID)
        a.mov(R7, R0).alu(RSH, R7, 32)
        a.jmp(JNE, R7, "out", imm=pid)                    # another process: nothing
        a.mov(R7, R0).alu(LSH, R7, 32).alu(RSH, R7, 32)   # r7 = tid
        if detail_only:
            self.only_detailed()

    def only_detailed(self):
        self.lookup(SLOT_DETAIL)
        self.a.jmp(JEQ, R0, "out", imm=0)

    def key(self, slot: int, at: int = -8):
        a = self.a
        a.movi(R1, slot).alu(LSH, R1, 32).alu(OR, R1, src=R7).stx(8, FP, at, R1)

    def lookup(self, slot: int):
        a = self.a
        self.key(slot)
        a.ld_map(R1, self.maps["state"]).mov(R2, FP).alu(ADD, R2, -8).call(bpf.MAP_LOOKUP)

    def save(self, slot: int, reg: str | None = None, value: int | None = None):
        """state[slot, tid] = register (or a constant)."""
        a = self.a
        self.key(slot)
        if reg is not None:
            a.ldx(8, R1, R6, PT_REGS[reg])
        else:
            a.movi(R1, value)
        a.stx(8, FP, -16, R1)
        a.ld_map(R1, self.maps["state"]).mov(R2, FP).alu(ADD, R2, -8)
        a.mov(R3, FP).alu(ADD, R3, -16).movi(R4, 0).call(bpf.MAP_UPDATE)

    def save_stack(self, slot: int, at: int):
        """state[slot, tid] = the u64 at fp+at."""
        a = self.a
        self.key(slot)
        a.ld_map(R1, self.maps["state"]).mov(R2, FP).alu(ADD, R2, -8)
        a.mov(R3, FP).alu(ADD, R3, at).movi(R4, 0).call(bpf.MAP_UPDATE)

    def load_saved(self, slot: int, at: int):
        """fp+at = state[slot, tid] (0 when absent)."""
        a = self.a
        self.lookup(slot)
        a.movi(R1, 0).jmp(JEQ, R0, f"nos{at}", imm=0).ldx(8, R1, R0, 0)
        a.label(f"nos{at}").stx(8, FP, at, R1)

    def read_stack(self, at: int, n: int, ptr_at: int):
        """fp+at = n bytes of target memory at the pointer stored at fp+ptr_at."""
        a = self.a
        a.sti(8, FP, at, 0).ldx(8, R3, FP, ptr_at)
        a.mov(R1, FP).alu(ADD, R1, at).movi(R2, n).call(bpf.PROBE_READ_USER)

    def forget(self, slot: int):
        a = self.a
        self.key(slot)
        a.ld_map(R1, self.maps["state"]).mov(R2, FP).alu(ADD, R2, -8).call(bpf.MAP_DELETE)

    def reserve(self, size: int):
        a = self.a
        a.ld_map(R1, self.maps["ring"]).movi(R2, size).movi(R3, 0).call(bpf.RINGBUF_RESERVE)
        a.mov(R8, R0).jmp(JNE, R8, "got", imm=0)
        # ring full: count the lost record
        a.sti(4, FP, -4, 0).ld_map(R1, self.maps["lost"]).mov(R2, FP).alu(ADD, R2, -4)
        a.call(bpf.MAP_LOOKUP).jmp(JEQ, R0, "out", imm=0)
        a.movi(R1, 1).xadd(R0, 0, R1).ja("out")
        a.label("got")
        a.sti(4, R8, 0, self.id).stx(4, R8, 4, R7)
        a.call(bpf.KTIME_NS).stx(8, R8, 8, R0)

    def reg(self, name: str, off: int):
        self.a.ldx(8, R1, R6, PT_REGS[name]).stx(8, R8, off, R1)

    def saved(self, slot: int, off: int):
        """record[off] = state[slot, tid] (0 when absent)."""
        a = self.a
        self.lookup(slot)
        a.movi(R1, 0).jmp(JEQ, R0, f"none{off}", imm=0).ldx(8, R1, R0, 0)
        a.label(f"none{off}").stx(8, R8, off, R1)

    def read(self, off: int, n: int, src_off: int | None = None, reg: str | None = None,
             disp: int = 0, string: bool = False):
        """record[off:off+n] = target memory at (record[src_off] or register) + disp."""
        a = self.a
        if reg is not None:
            a.ldx(8, R3, R6, PT_REGS[reg])
        else:
            a.ldx(8, R3, R8, src_off)
        if disp:
            a.alu(ADD, R3, disp)
        if n < 8 and not string:
            a.sti(8, R8, off, 0)                          # the rest of the slot stays 0
        a.mov(R1, R8).alu(ADD, R1, off).movi(R2, n)
        a.call(PROBE_READ_USER_STR if string else bpf.PROBE_READ_USER)

    def submit(self):
        a = self.a
        a.mov(R1, R8).movi(R2, bpf.RB_NO_WAKEUP).call(bpf.RINGBUF_SUBMIT)

    def done(self) -> bytes:
        self.a.label("out").movi(R0, 0).exit()
        return self.a.bytes()


# -- the probes --------------------------------------------------------------------------------
def build(plan: Plan, maps: dict, mode: str = "armed") -> list[Probe]:
    if mode not in ("lean", "armed", "full"):
        raise ValueError(f"unknown mode {mode!r}")
    full = mode == "full"
    out: list[Probe] = []

    def add(kind, file, offset, fn, size, detail_only, **meta):
        g = Gen(plan.pid, maps, len(out), detail_only)
        fn(g)
        out.append(Probe(len(out), kind, file, offset, g.done(), size, meta))

    lib, gai_detail = plan.send_dg_file, mode == "lean"
    if plan.gai_entry is not None:
        add("G", plan.libc_file, plan.gai_entry, _gai, HDR + NAMELEN, gai_detail)
        for r in plan.gai_returns:
            add("g", plan.libc_file, r, _ret, HDR + 8, gai_detail)
    add("E", lib, plan.send_dg_entry, lambda g: _enter(g, plan, full), HDR + 40 + 2 * QLEN, False)
    for c in plan.calls:
        _call_probes(add, lib, c, not full)
    for r in plan.send_dg_returns:
        add("X", lib, r, _ret, HDR + 8, not full)
    for i, w in enumerate(plan.writers):
        add("W", lib, w["addr_offset"], lambda g, w=w: _writer(g, plan, w), WRITE_SIZE, False,
            writer=i)
    return out


def _gai(g: Gen):
    g.reserve(HDR + NAMELEN)
    g.read(HDR, NAMELEN, reg="rdi", string=True)
    g.submit()


def _ret(g: Gen):
    g.reserve(HDR + 8)
    g.reg("rax", HDR)
    g.submit()


def _enter(g: Gen, plan: Plan, full: bool):
    """send_dg(statp, buf, buflen, buf2, buflen2, ...): keep buf/buf2 for the writer
    probe; decide whether this thread is detailed; if so, the record."""
    a = g.a
    g.save(SLOT_BUF1, "rsi")
    g.save(SLOT_BUF2, "rcx")
    g.save(SLOT_ANS, value=0)
    a.sti(8, FP, -24, 0).sti(8, FP, -32, 0)
    for at, off, n in ((-24, plan.options_off, 8), (-32, plan.flags_off, 4)):
        a.mov(R1, FP).alu(ADD, R1, at).movi(R2, n)
        a.ldx(8, R3, R6, PT_REGS["rdi"]).alu(ADD, R3, off).call(bpf.PROBE_READ_USER)
    if not full:
        a.ldx(8, R1, FP, -24).ldx(8, R2, FP, -32).alu(OR, R1, src=R2)
        a.alu(AND, R1, STICKY_MASK).jmp(JNE, R1, "keep", imm=0)
        g.forget(SLOT_DETAIL)
        a.ja("out")
        a.label("keep")
    g.save(SLOT_DETAIL, value=1)
    g.reserve(HDR + 40 + 2 * QLEN)
    for i, r in enumerate(("rdi", "rsi", "rcx")):
        g.reg(r, HDR + 8 * i)
    a.ldx(8, R1, FP, -24).stx(8, R8, HDR + 24, R1)
    a.ldx(8, R1, FP, -32).stx(8, R8, HDR + 32, R1)
    g.read(HDR + 40, QLEN, src_off=HDR + 8)
    g.read(HDR + 40 + QLEN, QLEN, src_off=HDR + 16)
    g.submit()


POLL_REGS = ("rdi", "rdx", "rsp", "rbp", "rbx", "r12", "r13", "r14", "r15", "rip")


def _call_probes(add, lib: str, c: dict, detail_only: bool):
    kind, call, ret = c["kind"], c["call_offset"], c["ret_offset"]
    if kind == "poll":
        def poll_call(g):
            g.save(SLOT_PFD, "rdi")
            g.reserve(HDR + 8 * len(POLL_REGS) + 8)
            for i, r in enumerate(POLL_REGS):
                g.reg(r, HDR + 8 * i)
            g.read(HDR + 8 * len(POLL_REGS), 8, src_off=HDR)
            g.submit()

        def poll_ret(g):
            g.reserve(HDR + 24)
            g.reg("rax", HDR)
            g.saved(SLOT_PFD, HDR + 8)
            g.read(HDR + 16, 8, src_off=HDR + 8)
            g.submit()
        add("P", lib, call, poll_call, HDR + 8 * len(POLL_REGS) + 8, detail_only,
            site=c.get("site"))
        add("p", lib, ret, poll_ret, HDR + 24, detail_only)
    elif kind in ("send", "recvfrom"):
        slot, n = (SLOT_SEND, 8) if kind == "send" else (SLOT_RECV, 16)

        def saver(g, slot=slot):
            g.save(slot, "rsi")

        def reader(g, slot=slot, n=n):
            if slot == SLOT_RECV:
                _answered(g)
                g.only_detailed()
            g.reserve(HDR + 16 + n)
            g.reg("rax", HDR)
            g.saved(slot, HDR + 8)
            g.read(HDR + 16, n, src_off=HDR + 8)
            g.submit()
        # recvfrom's pair runs for every thread: it keeps recvresp1/2 for the writer probe
        add(None, lib, call, saver, 0, detail_only and kind == "send")
        add("S" if kind == "send" else "R", lib, ret, reader, HDR + 16 + n,
            detail_only and kind == "send")
    elif kind == "sendmmsg":
        add("M", lib, ret, _ret, HDR + 8, detail_only)


def _answered(g: Gen):
    """For every thread: which of this send_dg call's queries an answer matched, as
    send_dg's recvresp1/recvresp2 (bits 0/1 of state[SLOT_ANS]); the writer probe reports
    it, so the lost query is named even when the thread was not detailed."""
    a = g.a
    a.ldx(8, R1, R6, PT_REGS["rax"]).jmp(JSLT, R1, "ansdone", imm=12)
    g.load_saved(SLOT_RECV, -40)
    g.load_saved(SLOT_BUF1, -48)
    g.load_saved(SLOT_BUF2, -56)
    g.load_saved(SLOT_ANS, -88)
    g.read_stack(-64, 2, -40)
    g.read_stack(-72, 2, -48)
    g.read_stack(-80, 2, -56)
    a.ldx(8, R1, FP, -64).ldx(8, R2, FP, -72).ldx(8, R3, FP, -88)
    a.jmp(JNE, R1, "ans2", src=R2).alu(OR, R3, 1)
    a.label("ans2").ldx(8, R2, FP, -56).jmp(JEQ, R2, "ansput", imm=0)
    a.ldx(8, R2, FP, -80).jmp(JNE, R1, "ansput", src=R2).alu(OR, R3, 2)
    a.label("ansput").stx(8, FP, -88, R3)
    g.save_stack(SLOT_ANS, -88)
    a.label("ansdone")


def _writer(g: Gen, plan: Plan, w: dict):
    """The instruction that sets the sticky bit, before it runs: statp is its base
    register; buf/buf2 as send_dg's entry saw them."""
    g.save(SLOT_DETAIL, value=1)
    g.reserve(WRITE_SIZE)
    g.reg(w["base_reg"], HDR)
    g.saved(SLOT_BUF1, HDR + 8)
    g.saved(SLOT_BUF2, HDR + 16)
    g.read(HDR + 24, 8, src_off=HDR, disp=plan.options_off)
    g.read(HDR + 32, 4, src_off=HDR, disp=plan.flags_off)
    g.saved(SLOT_ANS, HDR + 40)
    g.read(HDR + 48, QLEN, src_off=HDR + 8)
    g.read(HDR + 48 + QLEN, QLEN, src_off=HDR + 16)
    g.submit()
