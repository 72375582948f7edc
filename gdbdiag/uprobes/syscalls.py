"""The raw syscall tracepoint programs (``sys_enter``/``sys_exit``): what send_dg does
through system calls -- poll, sendto, sendmmsg, recvfrom -- for detailed threads. No
trap: the program gets the thread's user registers and reads its memory. Code generation
(:class:`~gdbdiag.uprobes.program.Gen`), record layouts and the per-thread state are
:mod:`gdbdiag.uprobes.program`'s.
"""
from __future__ import annotations

from . import bpf
from .bpf import (ADD, AND, FP, JEQ, JGT, JNE, JSLT, OR, PT_REGS, R0, R1, R2, R3, R6, R7, R8, R9,
                  SUB, XOR)
from .program import (FP_REGS, HDR, NR_POLL, NR_RECVFROM, NR_SENDMMSG, NR_SENDTO, POLLIN,
                       POLLOUT, POLL_REGS, POLL_SIZE, QUICK_POLL_NS, ST_ANS, ST_GOT, ST_HELD,
                       ST_BUF1, ST_BUF2, ST_HELD_REC, ST_PFD, ST_POLL_T, ST_RECV, ST_SEND,
                       ST_SENT, ST_STATP,
                       Gen, Plan)

# -- system calls -------------------------------------------------------------------------------
def _resolver_fd(g: Gen, plan: Plan, fd_at: int):
    """Go on only if the int at fp+fd_at is one of statp->_u._ext.nssocks, statp being the
    thread's last send_dg call's."""
    a = g.a
    g.get(ST_STATP, -64)
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


def _dispatch(g: Gen, nr_reg: int, nrs) -> None:
    a = g.a
    for nr in nrs:
        a.jmp(JEQ, nr_reg, SYSCALLS[nr], imm=nr)
    a.ja("out")


def sys_enter(g: Gen, plan: Plan, rids: dict):
    """raw_syscalls:sys_enter, for every syscall of the machine: only the target's three
    syscalls that matter go on, to a map lookup (a thread with no state has seen no
    send_dg) and the copy of their registers."""
    nrs = (NR_POLL, NR_SENDTO, NR_RECVFROM)
    g.a.ldx(8, R1, R6, 8)                                 # args[1]: the syscall number
    _dispatch(g, R1, nrs)
    for nr in nrs:
        g.a.label(SYSCALLS[nr])
        g.state()
        ENTER[nr](g, plan, rids)


def sys_exit(g: Gen, plan: Plan, rids: dict):
    a = g.a
    a.mov(R1, FP).alu(ADD, R1, -48).movi(R2, 8)
    a.mov(R3, R9).alu(ADD, R3, PT_REGS["orig_rax"]).call(bpf.PROBE_READ_KERNEL)
    a.ldx(8, R1, FP, -48)
    _dispatch(g, R1, SYSCALLS)
    for nr in SYSCALLS:
        a.label(SYSCALLS[nr])
        g.state()
        EXIT[nr](g, plan, rids)


def _enter_poll(g: Gen, plan: Plan, rids: dict):          # poll(pfd, nfds, timeout)
    """The wait: poll(pfd, 1, ptimeout). ``poll(pfd, 1, 0)``, the can-I-send check that
    cannot wait, is left out. A wait that cannot be doomed — for POLLOUT, or while a
    query of this try is in flight (sent, unanswered) — is not recorded now: its record
    is kept in the state and written at its end, unless that is a quick answer
    (``_exit_poll``). The others (possibly doomed) are recorded now, when the detector
    must see them."""
    a = g.a
    g.only_detailed()
    g.load_regs()
    g.reg("rdx", -96)
    a.ldx(4, R1, FP, -96).jmp(JEQ, R1, "out", imm=0)
    g.reg("rdi", -88)
    g.user(-56, 8, -88)                                   # pfd[0]: fd, events, revents
    _resolver_fd(g, plan, -56)
    g.put(ST_PFD, -88)
    a.call(bpf.KTIME_NS).stx(8, R7, ST_POLL_T, R0)
    # the record's payload, on the stack: the registers (their copy), then the pollfd
    payload = [FP_REGS + PT_REGS[r] for r in POLL_REGS] + [-56]
    a.ldx(2, R1, FP, -52).alu(AND, R1, POLLIN | POLLOUT)   # pfd[0].events
    a.jmp(JNE, R1, "hold", imm=POLLIN)                    # not a wait for answers only
    a.ldx(8, R1, R7, ST_SENT).ldx(8, R2, R7, ST_GOT).alu(XOR, R2, -1).alu(AND, R1, src=R2)
    a.jmp(JEQ, R1, "live", imm=0)
    a.label("hold")
    g.put(ST_HELD, value=1)                               # cannot be doomed: keep it
    for i, at in enumerate(payload):
        a.ldx(8, R1, FP, at).stx(8, R7, ST_HELD_REC + 8 * i, R1)
    a.ja("out")
    a.label("live")
    g.put(ST_HELD, value=0)
    g.reserve(POLL_SIZE, rids["P"])
    for i, at in enumerate(payload):
        g.copy(HDR + 8 * i, at)
    g.submit(wake=True)                                   # possibly doomed: now
    a.ja("out")


def _enter_sock(g: Gen, plan: Plan, field_: int):         # (fd, buf, len, flags, ...)
    if field_ == ST_SEND:
        g.only_detailed()
    g.load_regs()
    g.reg("rdi", -56)
    _resolver_fd(g, plan, -56)
    g.reg("rsi", -88)
    g.put(field_, -88)
    g.a.ja("out")


def _exit_recv(g: Gen, plan: Plan, rids: dict):
    a = g.a
    g.get(ST_RECV, -88)
    a.ldx(8, R1, FP, -88).jmp(JEQ, R1, "out", imm=0)
    g.put(ST_RECV, value=0)
    _answered(g)
    g.only_detailed()
    _exit_record(g, rids["R"], 16)


def _exit_mmsg(g: Gen, plan: Plan, rids: dict):            # sendmmsg(fd, msgvec, n, flags)
    """A try's first send (send_dg calls sendmmsg only with nothing written yet)."""
    a = g.a
    g.only_detailed()
    g.load_regs()
    g.reg("rdi", -56)
    _resolver_fd(g, plan, -56)
    a.ldx(8, R1, R6, 8).jmp(JSLT, R1, "mmsg_rec", imm=1)
    a.movi(R2, 3).jmp(JNE, R1, "mmsg_sent", imm=1).movi(R2, 1)   # 2 sent, or "just_one"
    a.label("mmsg_sent").stx(8, R7, ST_SENT, R2)
    g.put(ST_GOT, value=0)
    a.label("mmsg_rec")
    g.reserve(HDR + 8, rids["M"])
    a.ldx(8, R1, R6, 8).stx(8, R8, HDR, R1)
    g.submit()
    a.ja("out")


ENTER = {NR_POLL: _enter_poll,
         NR_SENDTO: lambda g, plan, rids: _enter_sock(g, plan, ST_SEND),
         NR_RECVFROM: lambda g, plan, rids: _enter_sock(g, plan, ST_RECV)}
EXIT = {NR_POLL: lambda g, plan, rids: _exit_poll(g, rids),
        NR_SENDTO: lambda g, plan, rids: _exit_send(g, rids),
        NR_RECVFROM: _exit_recv, NR_SENDMMSG: _exit_mmsg}


def _exit_poll(g: Gen, rids: dict):
    """The wait's end; one that got an answer within QUICK_POLL_NS is not recorded (no
    timeout, no stall, no lost answer: nothing for the detector), nor, then, its kept
    start. Otherwise the kept start first (with its own time), then the end."""
    a = g.a
    g.get(ST_PFD, -88)
    a.ldx(8, R1, FP, -88).jmp(JEQ, R1, "out", imm=0)
    g.put(ST_PFD, value=0)
    a.ldx(8, R1, R6, 8).jmp(JSLT, R1, "record", imm=1)   # timeout (0) or error: record
    a.call(bpf.KTIME_NS).ldx(8, R1, R7, ST_POLL_T).alu(SUB, R0, src=R1)
    a.jmp(JGT, R0, "record", imm=QUICK_POLL_NS)
    g.put(ST_HELD, value=0)
    a.ja("out")
    a.label("record")
    a.ldx(8, R1, R7, ST_HELD).jmp(JEQ, R1, "held_done", imm=0)
    g.put(ST_HELD, value=0)
    g.reserve(POLL_SIZE, rids["P"], stamp=ST_POLL_T)
    for i in range((POLL_SIZE - HDR) // 8):
        a.ldx(8, R1, R7, ST_HELD_REC + 8 * i).stx(8, R8, HDR + 8 * i, R1)
    g.submit()
    a.label("held_done")
    _exit_record(g, rids["p"], 8, wake=True)             # a timeout, a stall's end: now


def _exit_send(g: Gen, rids: dict):
    """send(buf) starts a try (nothing written yet), send(buf2) is the second query."""
    a = g.a
    g.get(ST_SEND, -88)
    a.ldx(8, R1, FP, -88).jmp(JEQ, R1, "out", imm=0)
    g.put(ST_SEND, value=0)
    a.ldx(8, R2, R6, 8).jmp(JSLT, R2, "send_rec", imm=1)
    a.ldx(8, R2, R7, ST_BUF1).jmp(JNE, R1, "send2", src=R2)
    g.put(ST_SENT, value=1)
    g.put(ST_GOT, value=0)
    a.ja("send_rec")
    a.label("send2").ldx(8, R2, R7, ST_BUF2).jmp(JNE, R1, "send_rec", src=R2)
    a.ldx(8, R2, R7, ST_SENT).alu(OR, R2, 2).stx(8, R7, ST_SENT, R2)
    a.label("send_rec")
    _exit_record(g, rids["S"], 8)


def _exit_record(g: Gen, rid: int, n: int, wake: bool = False):
    a = g.a
    g.reserve(HDR + 16 + n, rid)
    a.ldx(8, R1, R6, 8).stx(8, R8, HDR, R1)               # args[1]: the return value
    g.copy(HDR + 8, -88)
    g.user(HDR + 16, n, -88, rec=True)
    g.submit(wake)
    a.ja("out")


def _answered(g: Gen):
    """Which of this send_dg call's queries the answer matched (send_dg's recvresp1/2,
    bits 0/1 of the state's ans; and of this try's, got), for every thread."""
    a = g.a
    a.ldx(8, R1, R6, 8).jmp(JSLT, R1, "ansdone", imm=12)
    g.user(-64, 2, -88)
    a.ldx(8, R1, R7, ST_BUF1).stx(8, FP, -48, R1)
    g.user(-72, 2, -48)
    a.ldx(8, R1, R7, ST_BUF2).stx(8, FP, -56, R1)
    a.sti(8, FP, -96, 0).jmp(JEQ, R1, "ans1", imm=0)
    g.user(-96, 2, -56)
    a.label("ans1")
    a.ldx(8, R1, FP, -64).ldx(8, R2, FP, -72).movi(R3, 0)
    a.jmp(JNE, R1, "ans2", src=R2).alu(OR, R3, 1)
    a.label("ans2").ldx(8, R2, FP, -56).jmp(JEQ, R2, "ansput", imm=0)
    a.ldx(8, R2, FP, -96).jmp(JNE, R1, "ansput", src=R2).alu(OR, R3, 2)
    a.label("ansput")
    for field_ in (ST_ANS, ST_GOT):
        a.ldx(8, R2, R7, field_).alu(OR, R2, src=R3).stx(8, R7, field_, R2)
    a.label("ansdone")
