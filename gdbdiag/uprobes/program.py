"""The probes for one target: small eBPF programs, and the layout of their records.

Two kinds of kernel probes, each reading what the gdb probes read at the same point:

- **uprobes** where only the code can tell: send_dg's entry (statp, buf, buf2: its
  arguments by the x86-64 ABI), the sticky-bit writer (statp is its base register), and
  getaddrinfo's entry (the name). A uprobe hit is a trap (~1-10 µs), so there are as few
  as possible: one per send_dg call.
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
attached the kernel also keeps which query each answer matched (recvresp1/2).

Per-thread state lives in one LRU hash map keyed ``slot << 32 | tid``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..glibc.codeflow import RES_STATE, SEND_DG_STACK_ARGS
from . import bpf
from .bpf import (ADD, AND, FP, JEQ, JGT, JNE, JSLT, LSH, OR, PT_REGS, R0, R1, R2, R3, R4, R6,
                  R7, R8, R9, RSH, SUB, Asm)

QLEN = 128           # bytes of a query packet kept
NAMELEN = 128        # bytes of getaddrinfo's name
HDR = 16             # u32 probe id, u32 tid, u64 CLOCK_MONOTONIC ns
STICKY_MASK = 0x600000
(SLOT_DETAIL, SLOT_BUF1, SLOT_BUF2, SLOT_PFD, SLOT_SEND, SLOT_RECV, SLOT_ANS,
 SLOT_STATP, SLOT_POLL_T) = range(9)
QUICK_POLL_NS = 100_000_000     # a poll that returned an event sooner tells the detector nothing
ENTER_SIZE = HDR + 56 + 2 * QLEN
WRITE_SIZE = HDR + 64 + 3 * QLEN
NR_POLL, NR_SENDTO, NR_RECVFROM, NR_SENDMMSG = 7, 44, 45, 307       # x86-64
POLL_REGS = ("rdi", "rdx", "rsp", "rbp", "rbx", "r12", "r13", "r14", "r15", "rip")
POLL_SIZE = HDR + 8 * len(POLL_REGS) + 8


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
    """Code generation for one program. r6 = ctx, r7 = tid, r8 = record, r9 = user
    pt_regs (tracepoints: read with probe_read_kernel; uprobes: r6 itself)."""

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
            a.ldx(4, R7, FP, -8)                          # r7 = tid in that namespace
        else:
            a.call(bpf.PID_TGID)
            a.mov(R7, R0).alu(RSH, R7, 32)
            a.jmp(JNE, R7, "out", imm=pid)                # another process: nothing
            a.mov(R7, R0).alu(LSH, R7, 32).alu(RSH, R7, 32)   # r7 = tid
        if raw_tp:
            a.ldx(8, R9, R6, 0)                           # args[0]: struct pt_regs *

    def uniq(self, stem: str) -> str:
        self.n += 1
        return f"{stem}{self.n}"

    # -- per-thread state ------------------------------------------------------------------
    def key(self, slot: int):
        self.a.movi(R1, slot).alu(LSH, R1, 32).alu(OR, R1, src=R7).stx(8, FP, -8, R1)

    def lookup(self, slot: int):
        a = self.a
        self.key(slot)
        a.ld_map(R1, self.maps["state"]).mov(R2, FP).alu(ADD, R2, -8).call(bpf.MAP_LOOKUP)

    def only_detailed(self):
        self.lookup(SLOT_DETAIL)
        self.a.jmp(JEQ, R0, "out", imm=0)

    def put(self, slot: int, at: int | None = None, value: int | None = None):
        """state[slot] = the u64 at fp+at (or a constant)."""
        a = self.a
        if value is not None:
            a.sti(8, FP, -16, value)
            at = -16
        self.key(slot)
        a.ld_map(R1, self.maps["state"]).mov(R2, FP).alu(ADD, R2, -8)
        a.mov(R3, FP).alu(ADD, R3, at).movi(R4, 0).call(bpf.MAP_UPDATE)

    def get(self, slot: int, at: int):
        """fp+at = state[slot] (0 when absent)."""
        a = self.a
        lbl = self.uniq("none")
        self.lookup(slot)
        a.movi(R1, 0).jmp(JEQ, R0, lbl, imm=0).ldx(8, R1, R0, 0)
        a.label(lbl).stx(8, FP, at, R1)

    def forget(self, slot: int):
        a = self.a
        self.key(slot)
        a.ld_map(R1, self.maps["state"]).mov(R2, FP).alu(ADD, R2, -8).call(bpf.MAP_DELETE)

    # -- reading the target ----------------------------------------------------------------
    def reg(self, name: str, at: int, rec: bool = False):
        """fp+at (or record+at) = the thread's user register ``name``."""
        a = self.a
        base = R8 if rec else FP
        if not self.raw_tp:
            a.ldx(8, R1, R6, PT_REGS[name]).stx(8, base, at, R1)
            return
        a.mov(R1, base).alu(ADD, R1, at).movi(R2, 8)
        a.mov(R3, R9).alu(ADD, R3, PT_REGS[name]).call(bpf.PROBE_READ_KERNEL)

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
    def reserve(self, size: int, rid: int):
        a = self.a
        got, = (self.uniq("got"),)
        a.ld_map(R1, self.maps["ring"]).movi(R2, size).movi(R3, 0).call(bpf.RINGBUF_RESERVE)
        a.mov(R8, R0).jmp(JNE, R8, got, imm=0)
        a.sti(4, FP, -4, 0).ld_map(R1, self.maps["lost"]).mov(R2, FP).alu(ADD, R2, -4)
        a.call(bpf.MAP_LOOKUP).jmp(JEQ, R0, "out", imm=0)
        a.movi(R1, 1).xadd(R0, 0, R1).ja("out")            # ring full: count the loss
        a.label(got)
        a.sti(4, R8, 0, rid).stx(4, R8, 4, R7)
        a.call(bpf.KTIME_NS).stx(8, R8, 8, R0)

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

    def __init__(self, plan: Plan, maps: dict, mode: str):
        if mode not in ("lean", "armed", "full"):
            raise ValueError(f"unknown mode {mode!r}")
        self.plan, self.maps, self.full, self.mode = plan, maps, mode == "full", mode
        self.probes: list[Probe] = []
        self.record_kinds: dict[int, tuple[str, dict]] = {}

    def rid(self, kind: str, **meta) -> int:
        n = len(self.record_kinds)
        self.record_kinds[n] = (kind, meta)
        return n

    def add(self, kind, file, offset, fn, late=False):
        g = Gen(self.plan.pid, self.maps, len(self.probes), raw_tp=kind != "uprobe",
                pidns=self.plan.pidns)
        fn(g)
        self.probes.append(Probe(len(self.probes), kind, file, offset, g.done(), late))

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
        self.add("sys_enter", None, None, lambda g: _sys_enter(g, p, rids), late=late)
        self.add("sys_exit", None, None, lambda g: _sys_exit(g, p, rids), late=late)
        return self.probes


def build(plan: Plan, maps: dict, mode: str = "armed") -> tuple[list[Probe], dict]:
    b = Builder(plan, maps, mode)
    return b.build(), b.record_kinds


# -- uprobes ------------------------------------------------------------------------------
def _gai(g: Gen, rid: int, detailed_only: bool):
    if detailed_only:
        g.only_detailed()
    g.a.ldx(8, R1, R6, PT_REGS["rdi"]).stx(8, FP, -24, R1)
    g.reserve(HDR + NAMELEN, rid)
    g.user(HDR, NAMELEN, -24, rec=True, string=True)
    g.submit()


def _enter(g: Gen, plan: Plan, rid: int, full: bool):
    """send_dg(statp, buf, buflen, buf2, buflen2, ...): statp/buf/buf2 for the syscall
    probes and the writer; is this thread detailed? if so, the record."""
    a = g.a
    for slot, reg, at in ((SLOT_STATP, "rdi", -40), (SLOT_BUF1, "rsi", -48), (SLOT_BUF2, "rcx", -56)):
        g.reg(reg, at)
        g.put(slot, at)
    g.put(SLOT_ANS, value=0)
    g.user(-24, 8, -40, disp=plan.options_off)
    g.user(-32, 4, -40, disp=plan.flags_off)
    if not full:
        a.ldx(8, R1, FP, -24).ldx(8, R2, FP, -32).alu(OR, R1, src=R2)
        a.alu(AND, R1, STICKY_MASK).jmp(JNE, R1, "keep", imm=0)
        g.forget(SLOT_DETAIL)
        a.ja("out")
        a.label("keep")
    g.put(SLOT_DETAIL, value=1)
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
    g.put(SLOT_DETAIL, value=1)
    g.reg(w["base_reg"], -40)
    g.put(SLOT_STATP, -40)                  # the syscall probes' socket test from here on
    g.get(SLOT_BUF1, -48)
    g.get(SLOT_BUF2, -56)
    g.get(SLOT_ANS, -64)
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


# -- system calls -------------------------------------------------------------------------------
def _resolver_fd(g: Gen, plan: Plan, fd_at: int):
    """Go on only if the int at fp+fd_at is one of statp->_u._ext.nssocks, statp being the
    thread's last send_dg call's."""
    a = g.a
    g.get(SLOT_STATP, -64)
    a.ldx(8, R1, FP, -64).jmp(JEQ, R1, "out", imm=0)
    a.sti(8, FP, -80, 0).sti(8, FP, -72, 0)
    g.user(-80, 12, -64, disp=plan.nssocks_off)
    ok = g.uniq("fd")
    a.ldx(4, R1, FP, fd_at)
    for i in range(3):
        a.ldx(4, R2, FP, -80 + 4 * i).jmp(JEQ, R1, ok, src=R2)
    a.ja("out")
    a.label(ok)


SYSCALLS = {NR_POLL: "poll", NR_SENDTO: "sendto", NR_RECVFROM: "recvfrom", NR_SENDMMSG: "sendmmsg"}


def _sys_enter(g: Gen, plan: Plan, rids: dict):
    """raw_syscalls:sys_enter, for every syscall of the machine: dispatch on the number."""
    a = g.a
    a.ldx(8, R1, R6, 8)                                   # args[1]: the syscall number
    for nr in (NR_POLL, NR_SENDTO, NR_RECVFROM):
        a.jmp(JEQ, R1, SYSCALLS[nr], imm=nr)
    a.ja("out")
    for nr in (NR_POLL, NR_SENDTO, NR_RECVFROM):
        a.label(SYSCALLS[nr])
        ENTER[nr](g, plan, rids)


def _sys_exit(g: Gen, plan: Plan, rids: dict):
    a = g.a
    g.reg("orig_rax", -48)
    a.ldx(8, R1, FP, -48)
    for nr in SYSCALLS:
        a.jmp(JEQ, R1, SYSCALLS[nr], imm=nr)
    a.ja("out")
    for nr in SYSCALLS:
        a.label(SYSCALLS[nr])
        EXIT[nr](g, plan, rids)


def _enter_poll(g: Gen, plan: Plan, rids: dict):          # poll(pfd, nfds, timeout)
    """The wait: poll(pfd, 1, ptimeout). ``poll(pfd, 1, 0)``, the can-I-send check that
    cannot wait, is left out."""
    g.only_detailed()
    g.reg("rdx", -96)
    g.a.ldx(4, R1, FP, -96).jmp(JEQ, R1, "out", imm=0)
    g.reg("rdi", -88)
    g.user(-56, 4, -88)                                   # pfd[0].fd
    _resolver_fd(g, plan, -56)
    g.put(SLOT_PFD, -88)
    g.a.call(bpf.KTIME_NS).stx(8, FP, -104, R0)
    g.put(SLOT_POLL_T, -104)
    g.reserve(POLL_SIZE, rids["P"])
    for i, r in enumerate(POLL_REGS):
        g.reg(r, HDR + 8 * i, rec=True)
    g.user(HDR + 8 * len(POLL_REGS), 8, HDR, rec=True, ptr_in_rec=True)
    g.submit()
    g.a.ja("out")


def _enter_sock(g: Gen, plan: Plan, slot: int):           # (fd, buf, len, flags, ...)
    if slot == SLOT_SEND:
        g.only_detailed()
    g.reg("rdi", -56)
    _resolver_fd(g, plan, -56)
    g.reg("rsi", -88)
    g.put(slot, -88)
    g.a.ja("out")


def _exit_recv(g: Gen, plan: Plan, rids: dict):
    a = g.a
    g.get(SLOT_RECV, -88)
    a.ldx(8, R1, FP, -88).jmp(JEQ, R1, "out", imm=0)
    g.forget(SLOT_RECV)
    _answered(g)
    g.only_detailed()
    _exit_record(g, rids["R"], 16)


def _exit_mmsg(g: Gen, plan: Plan, rids: dict):            # sendmmsg(fd, msgvec, n, flags)
    a = g.a
    g.only_detailed()
    g.reg("rdi", -56)
    _resolver_fd(g, plan, -56)
    g.reserve(HDR + 8, rids["M"])
    a.ldx(8, R1, R6, 8).stx(8, R8, HDR, R1)
    g.submit()
    a.ja("out")


ENTER = {NR_POLL: _enter_poll,
         NR_SENDTO: lambda g, plan, rids: _enter_sock(g, plan, SLOT_SEND),
         NR_RECVFROM: lambda g, plan, rids: _enter_sock(g, plan, SLOT_RECV)}
EXIT = {NR_POLL: lambda g, plan, rids: _exit_poll(g, rids),
        NR_SENDTO: lambda g, plan, rids: _exit_with(g, SLOT_SEND, rids["S"], 8),
        NR_RECVFROM: _exit_recv, NR_SENDMMSG: _exit_mmsg}


def _exit_poll(g: Gen, rids: dict):
    """The wait's end; one that got an answer within QUICK_POLL_NS is not recorded (no
    timeout, no stall, no lost answer: nothing for the detector)."""
    a = g.a
    g.get(SLOT_PFD, -88)
    a.ldx(8, R1, FP, -88).jmp(JEQ, R1, "out", imm=0)
    g.forget(SLOT_PFD)
    g.get(SLOT_POLL_T, -104)
    a.ldx(8, R1, R6, 8).jmp(JSLT, R1, "record", imm=1)   # timeout (0) or error: record
    a.call(bpf.KTIME_NS).ldx(8, R1, FP, -104).alu(SUB, R0, src=R1)
    a.jmp(JGT, R0, "record", imm=QUICK_POLL_NS).ja("out")
    a.label("record")
    _exit_record(g, rids["p"], 8)


def _exit_with(g: Gen, slot: int, rid: int, n: int):
    """A syscall whose enter probe saved a pointer in ``slot`` (so: send_dg's, and the
    thread detailed): the record with its return value and n bytes there."""
    g.get(slot, -88)
    g.a.ldx(8, R1, FP, -88).jmp(JEQ, R1, "out", imm=0)
    g.forget(slot)
    _exit_record(g, rid, n)


def _exit_record(g: Gen, rid: int, n: int):
    a = g.a
    g.reserve(HDR + 16 + n, rid)
    a.ldx(8, R1, R6, 8).stx(8, R8, HDR, R1)               # args[1]: the return value
    g.copy(HDR + 8, -88)
    g.user(HDR + 16, n, -88, rec=True)
    g.submit()
    a.ja("out")


def _answered(g: Gen):
    """Which of this send_dg call's queries the answer matched (send_dg's recvresp1/2,
    bits 0/1 of state[SLOT_ANS]), for every thread."""
    a = g.a
    a.ldx(8, R1, R6, 8).jmp(JSLT, R1, "ansdone", imm=12)
    g.get(SLOT_BUF1, -48)
    g.get(SLOT_BUF2, -56)
    g.get(SLOT_ANS, -104)
    g.user(-64, 2, -88)
    g.user(-72, 2, -48)
    g.user(-96, 2, -56)
    a.ldx(8, R1, FP, -64).ldx(8, R2, FP, -72).ldx(8, R3, FP, -104)
    a.jmp(JNE, R1, "ans2", src=R2).alu(OR, R3, 1)
    a.label("ans2").ldx(8, R2, FP, -56).jmp(JEQ, R2, "ansput", imm=0)
    a.ldx(8, R2, FP, -96).jmp(JNE, R1, "ansput", src=R2).alu(OR, R3, 2)
    a.label("ansput").stx(8, FP, -104, R3)
    g.put(SLOT_ANS, -104)
    a.label("ansdone")
