"""The probes for one target: small eBPF programs, and the layout of their records.

Two kinds of kernel probes, each reading what the gdb probes read at the same point:

- **uprobes** where only the code can tell: send_dg's entry (statp, buf, buf2: its
  arguments by the x86-64 ABI), the sticky-bit writer (statp is its base register), and
  getaddrinfo's entry (the name). A uprobe hit is a trap (~0.8 µs where the kernel
  emulates the instruction, as the entries' ``push``; ~11 µs where it single-steps it,
  on the VM this was measured on), so there are as few as possible: one per send_dg call.
- **raw syscall tracepoints** (``sys_enter``/``sys_exit``) for what send_dg does through
  system calls: poll, sendto (``send``), sendmmsg, recvfrom. No trap; the BPF program
  gets the thread's user registers (pt_regs) and reads its memory. Every syscall of the
  machine runs the first few instructions (is it the target?) while a run lasts. A syscall is send_dg's
  when its socket is one of ``statp->_u._ext.nssocks`` of the thread's last send_dg call.

Each program writes binary records into one ring buffer (decoded by :mod:`.records`).
Nothing is ever written to the target.

Modes (what produces records):

- ``lean``: the sticky-bit writers, always; send_dg's steps for *detailed* threads only.
- ``armed`` (default): lean, plus getaddrinfo's entry (the name) for detailed threads.
- ``full``: everything for every thread from the start.

In lean and armed mode a healthy process meets only the writer uprobes, which never fire
while no thread switches: no trap per lookup, no tracepoint on any syscall. Everything
else is loaded at arming and attached once a thread is detailed (the run does it on the
writer's record, which wakes it, or at arming when a thread is already sticky).

A thread is *detailed* once the kernel has seen its resolver state in single-request
mode: at send_dg's entry (``(options | _flags) & (SNGLKUP|SNGLKUPREOP)``) or at a
sticky-bit write. The writer probe names the lost query from the one answer send_dg got
(its first answer buffer, through the ``anscp`` argument); while the syscall probes are
attached the kernel also keeps which query each answer matched (recvresp1/2), and which
of a try's queries are in flight: a poll wait that cannot be doomed is written only
when it ends, and only if that end is not a quick answer (``_enter_poll``).

Per-thread state lives in one LRU hash map keyed by tid: one value per thread (the
``ST_*`` fields), created by the uprobes and read and written in place through the
pointer one lookup returns (an update of an LRU hash costs several times a lookup).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..glibc.codeflow import RES_STATE, SEND_DG_STACK_ARGS
from . import bpf
from .bpf import (ADD, AND, FP, JEQ, JNE, LSH, OR, PT_REGS, R0, R1, R2, R3, R4, R6, R7, R8, R9,
                  RSH, Asm)

MAP_NOEXIST = 1      # BPF_NOEXIST

QLEN = 128           # bytes of a query packet kept
NAMELEN = 128        # bytes of getaddrinfo's name
HDR = 16             # u32 probe id, u32 tid, u64 CLOCK_MONOTONIC ns
STICKY_MASK = 0x600000
# the per-thread state: u64 fields of one map value. SENT/GOT: which of this try's
# queries went out / were answered (bits 1, 2), reset at each try's first send; HELD: a
# poll_enter record kept back (its payload at ST_HELD_REC): a wait that cannot be doomed
(ST_DETAIL, ST_BUF1, ST_BUF2, ST_PFD, ST_SEND, ST_RECV, ST_ANS, ST_STATP,
 ST_POLL_T, ST_SENT, ST_GOT, ST_HELD) = range(0, 96, 8)
ST_HELD_REC = 96
# the programs' stack: the tid (the map key) at fp-8, scratch slots down to fp-104, a
# copy of the syscall's user registers (raw tracepoints), a zeroed state to create a
# thread's entry (uprobes)
REGS_LEN = PT_REGS["rsp"] + 8
FP_TID, FP_REGS = -8, -120 - REGS_LEN
QUICK_POLL_NS = 100_000_000     # a poll that returned an event sooner tells the detector nothing
ENTER_SIZE = HDR + 56 + 2 * QLEN
WRITE_SIZE = HDR + 64 + 3 * QLEN
NR_POLL, NR_SENDTO, NR_RECVFROM, NR_SENDMMSG = 7, 44, 45, 307       # x86-64
POLLIN, POLLOUT = 0x1, 0x4
POLL_REGS = ("rdi", "rdx", "rsp", "rbp", "rbx", "r12", "r13", "r14", "r15", "rip")
POLL_SIZE = HDR + 8 * len(POLL_REGS) + 8
STATE_SIZE = ST_HELD_REC + POLL_SIZE - HDR
FP_NEW = FP_REGS - 8 - STATE_SIZE


@dataclass
class Plan:
    """Where the uprobes go: file offsets in the objects (host paths into the target's
    root), as the analyzer found them."""
    pid: int
    send_dg_file: str
    libc_file: str
    send_dg_entry: int
    writers: list[dict] = field(default_factory=list)    # {addr_offset, base_reg, field, bit}
    gai_entry: int | None = None
    options_off: int = RES_STATE["options"][0]
    flags_off: int = RES_STATE["_flags"][0]
    nssocks_off: int = RES_STATE["_u._ext.nssocks"][0]
    anscp_cfa_off: int = SEND_DG_STACK_ARGS["anscp"]
    # (st_dev, st_ino) of the PID namespace gdbdiag and the target share, when they do
    # (a debug container sharing the target's PID namespace): the programs then match
    # `pid` and report TIDs as that namespace numbers them, not the host's
    pidns: tuple[int, int] | None = None


@dataclass
class Probe:
    """One program: where it attaches, and what its records hold."""
    id: int
    kind: str                 # "uprobe" | "sys_enter" | "sys_exit"
    file: str | None
    offset: int | None
    code: bytes
    late: bool = False        # attached only once a thread is detailed (lean, armed)


class Gen:
    """Code generation for one program. r6 = ctx, r7 = the thread's state (after
    ``state()``), r8 = record, r9 = user pt_regs (tracepoints: copied to the stack by
    ``load_regs()``; uprobes: r6 itself); the tid is at fp-8 (the state's key)."""

    def __init__(self, pid: int, maps: dict, probe_id: int, raw_tp: bool = False,
                 pidns: tuple[int, int] | None = None):
        self.a, self.maps, self.id, self.raw_tp = Asm(), maps, probe_id, raw_tp
        self.n = 0
        a = self.a
        a.mov(R6, R1)
        if pidns:                                         # struct bpf_pidns_info at fp-8
            a.ld64(R1, pidns[0]).ld64(R2, pidns[1]).mov(R3, FP).alu(ADD, R3, -8).movi(R4, 8)
            a.call(bpf.NS_PID_TGID)
            a.jmp(JNE, R0, "out", imm=0)                  # current is in another PID namespace
            a.ldx(4, R7, FP, -4)                          # tgid in that namespace
            a.jmp(JNE, R7, "out", imm=pid)                # another process: nothing
            a.ldx(4, R7, FP, -8)                          # tid in that namespace
        else:
            a.call(bpf.PID_TGID)
            a.mov(R7, R0).alu(RSH, R7, 32)
            a.jmp(JNE, R7, "out", imm=pid)                # another process: nothing
            a.mov(R7, R0).alu(LSH, R7, 32).alu(RSH, R7, 32)   # tid
        a.stx(8, FP, FP_TID, R7)
        if raw_tp:
            a.ldx(8, R9, R6, 0)                           # args[0]: struct pt_regs *

    def uniq(self, stem: str) -> str:
        self.n += 1
        return f"{stem}{self.n}"

    # -- per-thread state ------------------------------------------------------------------
    def state(self, create: bool = False):
        """r7 = this thread's state; none yet: out (or, ``create``, a zeroed one)."""
        a = self.a
        a.ld_map(R1, self.maps["state"]).mov(R2, FP).alu(ADD, R2, FP_TID).call(bpf.MAP_LOOKUP)
        if create:
            got = self.uniq("st")
            a.jmp(JNE, R0, got, imm=0)
            for off in range(0, STATE_SIZE, 8):
                a.sti(8, FP, FP_NEW + off, 0)
            a.ld_map(R1, self.maps["state"]).mov(R2, FP).alu(ADD, R2, FP_TID)
            a.mov(R3, FP).alu(ADD, R3, FP_NEW).movi(R4, MAP_NOEXIST).call(bpf.MAP_UPDATE)
            a.ld_map(R1, self.maps["state"]).mov(R2, FP).alu(ADD, R2, FP_TID).call(bpf.MAP_LOOKUP)
            a.label(got)
        a.jmp(JEQ, R0, "out", imm=0).mov(R7, R0)

    def only_detailed(self):
        self.a.ldx(8, R1, R7, ST_DETAIL).jmp(JEQ, R1, "out", imm=0)

    def put(self, field_: int, at: int | None = None, value: int | None = None):
        """state.field = the u64 at fp+at (or a constant)."""
        if value is not None:
            self.a.sti(8, R7, field_, value)
        else:
            self.a.ldx(8, R1, FP, at).stx(8, R7, field_, R1)

    def get(self, field_: int, at: int):
        """fp+at = state.field."""
        self.a.ldx(8, R1, R7, field_).stx(8, FP, at, R1)

    # -- reading the target ----------------------------------------------------------------
    def reg(self, name: str, at: int, rec: bool = False):
        """fp+at (or record+at) = the thread's user register ``name`` (tracepoints: from
        the copy ``load_regs`` made on this path)."""
        src, off = (FP, FP_REGS + PT_REGS[name]) if self.raw_tp else (R6, PT_REGS[name])
        self.a.ldx(8, R1, src, off).stx(8, R8 if rec else FP, at, R1)

    def load_regs(self):
        """Tracepoints: the thread's user registers, copied once to the stack (one helper
        call for all that ``reg`` reads on this path)."""
        a = self.a
        a.mov(R1, FP).alu(ADD, R1, FP_REGS).movi(R2, REGS_LEN)
        a.mov(R3, R9).call(bpf.PROBE_READ_KERNEL)

    def user(self, at: int, n: int, ptr_at: int, disp: int = 0, rec: bool = False,
             ptr_in_rec: bool = False, string: bool = False):
        """(record or fp)+at = n bytes of target memory at (the u64 at ptr_at) + disp."""
        a = self.a
        base = R8 if rec else FP
        if n < 8 and not string:
            a.sti(8, base, at, 0)                         # the rest of the slot stays 0
        a.ldx(8, R3, R8 if ptr_in_rec else FP, ptr_at)
        if disp:
            a.alu(ADD, R3, disp)
        a.mov(R1, base).alu(ADD, R1, at).movi(R2, n)
        a.call(bpf.PROBE_READ_USER_STR if string else bpf.PROBE_READ_USER)

    def copy(self, at_rec: int, at_fp: int):
        self.a.ldx(8, R1, FP, at_fp).stx(8, R8, at_rec, R1)

    # -- records ---------------------------------------------------------------------------
    def reserve(self, size: int, rid: int, stamp: int | None = None):
        """r8 = a new record; its time is now, or the state's field ``stamp``."""
        a = self.a
        got, = (self.uniq("got"),)
        a.ld_map(R1, self.maps["ring"]).movi(R2, size).movi(R3, 0).call(bpf.RINGBUF_RESERVE)
        a.mov(R8, R0).jmp(JNE, R8, got, imm=0)
        a.sti(4, FP, -4, 0).ld_map(R1, self.maps["lost"]).mov(R2, FP).alu(ADD, R2, -4)
        a.call(bpf.MAP_LOOKUP).jmp(JEQ, R0, "out", imm=0)
        a.movi(R1, 1).xadd(R0, 0, R1).ja("out")            # ring full: count the loss
        a.label(got)
        a.sti(4, R8, 0, rid).ldx(4, R1, FP, FP_TID).stx(4, R8, 4, R1)
        if stamp is None:
            a.call(bpf.KTIME_NS).stx(8, R8, 8, R0)
        else:
            a.ldx(8, R1, R7, stamp).stx(8, R8, 8, R1)

    def submit(self, wake: bool = False):
        """Hand the record over; ``wake``: now (the reader sleeps until a rare record
        like the switch, which may ask it to attach more probes)."""
        flag = bpf.RB_FORCE_WAKEUP if wake else bpf.RB_NO_WAKEUP
        self.a.mov(R1, R8).movi(R2, flag).call(bpf.RINGBUF_SUBMIT)

    def done(self) -> bytes:
        self.a.label("out").movi(R0, 0).exit()
        return self.a.bytes()


class Builder:
    """All programs of a plan; record ids are global (one table for the decoder)."""

    def __init__(self, plan: Plan, maps: dict, mode: str, empty: bool = False):
        """``empty``: every program returns at once (the same probes, no work, no record):
        what the mechanism alone costs (``gdbdiag bench --modes uprobe-floor``)."""
        if mode not in ("lean", "armed", "full"):
            raise ValueError(f"unknown mode {mode!r}")
        self.plan, self.maps, self.full, self.mode = plan, maps, mode == "full", mode
        self.empty = empty
        self.probes: list[Probe] = []
        self.record_kinds: dict[int, tuple[str, dict]] = {}

    def rid(self, kind: str, **meta) -> int:
        n = len(self.record_kinds)
        self.record_kinds[n] = (kind, meta)
        return n

    def add(self, kind, file, offset, fn, late=False):
        if self.empty:
            code = Asm().movi(R0, 0).exit().bytes()
        else:
            g = Gen(self.plan.pid, self.maps, len(self.probes), raw_tp=kind != "uprobe",
                    pidns=self.plan.pidns)
            fn(g)
            code = g.done()
        self.probes.append(Probe(len(self.probes), kind, file, offset, code, late))

    def build(self) -> list[Probe]:
        """The writers are attached from the start; the rest traps every lookup (uprobes)
        or taxes every syscall of the machine (tracepoints), so in lean and armed mode it
        is attached only once a thread is detailed (sticky, or a switch seen)."""
        p, late = self.plan, not self.full
        if p.gai_entry is not None and self.mode != "lean":
            rid = self.rid("G")
            self.add("uprobe", p.libc_file, p.gai_entry, lambda g: _gai(g, rid, not self.full),
                     late=late)
        rid = self.rid("E")
        self.add("uprobe", p.send_dg_file, p.send_dg_entry, lambda g: _enter(g, p, rid, self.full),
                 late=late)
        for i, w in enumerate(p.writers):
            rid = self.rid("W", writer=i)
            self.add("uprobe", p.send_dg_file, w["addr_offset"],
                     lambda g, w=w, rid=rid: _writer(g, p, w, rid))
        rids = {k: self.rid(k) for k in ("P", "p", "S", "M", "R")}
        from .syscalls import sys_enter, sys_exit
        self.add("sys_enter", None, None, lambda g: sys_enter(g, p, rids), late=late)
        self.add("sys_exit", None, None, lambda g: sys_exit(g, p, rids), late=late)
        return self.probes


def build(plan: Plan, maps: dict, mode: str = "armed",
          empty: bool = False) -> tuple[list[Probe], dict]:
    b = Builder(plan, maps, mode, empty)
    return b.build(), b.record_kinds


# -- uprobes ------------------------------------------------------------------------------
def _gai(g: Gen, rid: int, detailed_only: bool):
    if detailed_only:
        g.state()
        g.only_detailed()
    g.a.ldx(8, R1, R6, PT_REGS["rdi"]).stx(8, FP, -24, R1)
    g.reserve(HDR + NAMELEN, rid)
    g.user(HDR, NAMELEN, -24, rec=True, string=True)
    g.submit()


def _enter(g: Gen, plan: Plan, rid: int, full: bool):
    """send_dg(statp, buf, buflen, buf2, buflen2, ...): statp/buf/buf2 for the syscall
    probes and the writer; is this thread detailed? if so, the record."""
    a = g.a
    g.state(create=True)
    for field_, reg, at in ((ST_STATP, "rdi", -40), (ST_BUF1, "rsi", -48), (ST_BUF2, "rcx", -56)):
        g.reg(reg, at)
        g.put(field_, at)
    for field_ in (ST_ANS, ST_SENT, ST_GOT, ST_HELD):
        g.put(field_, value=0)
    g.user(-24, 8, -40, disp=plan.options_off)
    g.user(-32, 4, -40, disp=plan.flags_off)
    if not full:
        a.ldx(8, R1, FP, -24).ldx(8, R2, FP, -32).alu(OR, R1, src=R2)
        a.alu(AND, R1, STICKY_MASK).jmp(JNE, R1, "keep", imm=0)
        g.put(ST_DETAIL, value=0)
        a.ja("out")
        a.label("keep")
    g.put(ST_DETAIL, value=1)
    g.reserve(ENTER_SIZE, rid)
    for i, at in enumerate((-40, -48, -56, -24, -32)):
        g.copy(HDR + 8 * i, at)
    g.reg("rdx", HDR + 40, rec=True)                      # buflen
    g.reg("r8", HDR + 48, rec=True)                       # buflen2
    g.user(HDR + 56, QLEN, -48, rec=True)
    g.user(HDR + 56 + QLEN, QLEN, -56, rec=True)
    g.submit()


def _writer(g: Gen, plan: Plan, w: dict, rid: int):
    """The instruction that sets the sticky bit, before it runs: statp is its base
    register; buf/buf2 and recvresp1/2 as send_dg's entry and the syscall probes kept
    them (when attached by then); the first answer, read through send_dg's ``anscp``
    argument (a stack slot at the CFA the .eh_frame gives for this instruction)."""
    a = g.a
    g.state(create=True)
    g.put(ST_DETAIL, value=1)
    g.reg(w["base_reg"], -40)
    g.put(ST_STATP, -40)                    # the syscall probes' socket test from here on
    g.get(ST_BUF1, -48)
    g.get(ST_BUF2, -56)
    g.get(ST_ANS, -64)
    a.sti(8, FP, -80, 0).sti(8, FP, -88, 0)
    if w.get("cfa_rsp") is not None:
        g.reg("rsp", -72)
        a.ldx(8, R1, FP, -72).alu(ADD, R1, w["cfa_rsp"] + plan.anscp_cfa_off).stx(8, FP, -72, R1)
        g.user(-80, 8, -72)                               # anscp
        a.ldx(8, R1, FP, -80).jmp(JEQ, R1, "noans", imm=0)
        g.user(-88, 8, -80)                               # *anscp: the first answer
        a.label("noans")
    g.reserve(WRITE_SIZE, rid)
    for i, at in enumerate((-40, -48, -56)):
        g.copy(HDR + 8 * i, at)
    g.user(HDR + 24, 8, -40, disp=plan.options_off, rec=True)
    g.user(HDR + 32, 4, -40, disp=plan.flags_off, rec=True)
    g.copy(HDR + 40, -64)
    g.copy(HDR + 48, -80)
    g.copy(HDR + 56, -88)
    g.user(HDR + 64, QLEN, -48, rec=True)
    g.user(HDR + 64 + QLEN, QLEN, -56, rec=True)
    g.user(HDR + 64 + 2 * QLEN, QLEN, -88, rec=True)
    g.submit(wake=True)
