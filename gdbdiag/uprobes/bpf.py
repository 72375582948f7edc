"""The kernel interface: eBPF maps and programs, uprobe perf events, the ring buffer.

Only what gdbdiag's probes need, through the bpf(2) and perf_event_open(2) system calls
(ctypes; no compiler, no LLVM, nothing to install): an instruction encoder, map creation,
program load (the verifier's log is kept for errors), a uprobe perf event per probe point
(owned by this process: closing it — or dying — removes the probe), and a reader of a
BPF ring buffer through its mmap'ed pages.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct

from ..errors import GdbdiagError, one_line

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
NR_BPF, NR_PERF_EVENT_OPEN = 321, 298            # x86-64

# -- instruction encoding -----------------------------------------------------------------
ALU64, JMP, LDX, STX, ST, LD = 0x07, 0x05, 0x01, 0x03, 0x02, 0x00
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
MEM, IMM, ATOMIC = 0x60, 0x00, 0xC0
K, X = 0x00, 0x08
ADD, SUB, OR, AND, LSH, RSH, XOR, MOV = 0x00, 0x10, 0x40, 0x50, 0x60, 0x70, 0xA0, 0xB0
JA, JEQ, JGT, JNE, JSET, CALL, EXIT, JSLT = 0x00, 0x10, 0x20, 0x50, 0x40, 0x80, 0x90, 0xC0
PSEUDO_MAP_FD = 1
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, FP = range(11)
SIZE_CODE = {1: B, 2: H, 4: W, 8: DW}

# helpers (include/uapi/linux/bpf.h)
MAP_LOOKUP, MAP_UPDATE, MAP_DELETE, KTIME_NS, PID_TGID = 1, 2, 3, 5, 14
NS_PID_TGID = 120            # bpf_get_ns_current_pid_tgid: pid/tgid in a given PID namespace
PROBE_READ_USER, PROBE_READ_KERNEL, PROBE_READ_USER_STR = 112, 113, 114
RINGBUF_RESERVE, RINGBUF_SUBMIT, RINGBUF_DISCARD = 131, 132, 133
RB_NO_WAKEUP = 1
RB_FORCE_WAKEUP = 2

# struct pt_regs (x86-64) offsets
PT_REGS = {"r15": 0, "r14": 8, "r13": 16, "r12": 24, "rbp": 32, "rbx": 40, "r11": 48,
           "r10": 56, "r9": 64, "r8": 72, "rax": 80, "rcx": 88, "rdx": 96, "rsi": 104,
           "rdi": 112, "orig_rax": 120, "rip": 128, "rsp": 152}


class BpfError(GdbdiagError, OSError):
    """A bpf(2)/perf_event_open(2) failure: ``(errno, message)`` like OSError."""

    def __init__(self, err: int, message: str):
        OSError.__init__(self, err, message)

    @property
    def line(self) -> str:
        return one_line(self.strerror or str(self))


class Asm:
    """A tiny eBPF assembler with forward labels."""

    def __init__(self):
        self.insns: list[list] = []          # [code, dst, src, off, imm] (off may be a label)
        self.labels: dict[str, int] = {}

    def _i(self, code, dst=0, src=0, off=0, imm=0):
        self.insns.append([code, dst, src, off, imm])
        return self

    def label(self, name):
        self.labels[name] = len(self.insns)
        return self

    def mov(self, dst, src):
        return self._i(ALU64 | MOV | X, dst, src)

    def movi(self, dst, imm):
        return self._i(ALU64 | MOV | K, dst, imm=imm)

    def alu(self, op, dst, imm=None, src=None):
        return self._i(ALU64 | op | (K if src is None else X), dst, src or 0, imm=imm or 0)

    def ldx(self, size, dst, src, off):
        return self._i(LDX | MEM | SIZE_CODE[size], dst, src, off)

    def stx(self, size, dst, off, src):
        return self._i(STX | MEM | SIZE_CODE[size], dst, src, off)

    def sti(self, size, dst, off, imm):
        return self._i(ST | MEM | SIZE_CODE[size], dst, 0, off, imm)

    def xadd(self, dst, off, src):
        return self._i(STX | ATOMIC | DW, dst, src, off, ADD)

    def ld64(self, dst, imm):
        """dst = a 64-bit constant (two-slot lddw)."""
        self._i(LD | DW | IMM, dst, 0, 0, struct.unpack("<i", struct.pack("<I", imm & 0xFFFFFFFF))[0])
        return self._i(0, 0, 0, 0, struct.unpack("<i", struct.pack("<I", imm >> 32 & 0xFFFFFFFF))[0])

    def ld_map(self, dst, fd):
        self._i(LD | DW | IMM, dst, PSEUDO_MAP_FD, 0, fd)
        return self._i(0, 0, 0, 0, 0)

    def jmp(self, op, dst, label, imm=0, src=None):
        return self._i(JMP | op | (K if src is None else X), dst, src or 0, label, imm)

    def ja(self, label):
        return self._i(JMP | JA, 0, 0, label)

    def call(self, helper):
        return self._i(JMP | CALL, imm=helper)

    def exit(self):
        return self._i(JMP | EXIT)

    def bytes(self) -> bytes:
        out = bytearray()
        for n, (code, dst, src, off, imm) in enumerate(self.insns):
            if isinstance(off, str):
                off = self.labels[off] - n - 1
            out += struct.pack("<BBhi", code, (src << 4) | dst, off, imm)
        return bytes(out)


# -- bpf(2) ---------------------------------------------------------------------------------
def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    fd = _libc.syscall(NR_BPF, cmd, buf, 128)
    if fd < 0:
        e = ctypes.get_errno()
        raise BpfError(e, f"bpf({cmd}): {os.strerror(e)}")
    return fd


MAP_HASH, MAP_ARRAY, MAP_LRU_HASH, MAP_RINGBUF = 1, 2, 9, 27


def map_create(kind: int, key_size: int, value_size: int, max_entries: int) -> int:
    return _bpf(0, struct.pack("<IIIII", kind, key_size, value_size, max_entries, 0))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key)
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(1, struct.pack("<IIQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v)))
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key)
    v = ctypes.create_string_buffer(value)
    _bpf(2, struct.pack("<IIQQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))


PROG_KPROBE, PROG_RAW_TRACEPOINT = 2, 17
LICENSE = b"Dual MIT/GPL\0"


def prog_load(insns: bytes, name: str = "", kind: int = PROG_KPROBE) -> int:
    lic = ctypes.create_string_buffer(LICENSE)
    code = ctypes.create_string_buffer(insns)
    log = ctypes.create_string_buffer(1 << 20)
    attr = struct.pack("<IIQQIIQII16s", kind, len(insns) // 8, ctypes.addressof(code),
                       ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0,
                       name.encode()[:15])
    try:
        return _bpf(5, attr)
    except BpfError as exc:
        text = log.value.decode(errors="replace").strip().splitlines()
        raise BpfError(exc.errno, f"BPF program {name!r} rejected: {exc.strerror}: "
                       + " | ".join(text[-4:])) from None


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """Attach a raw tracepoint program (e.g. to ``sys_enter``); the fd owns the link."""
    cname = ctypes.create_string_buffer(name.encode())
    return _bpf(17, struct.pack("<QI", ctypes.addressof(cname), prog_fd))


# -- uprobe perf events -------------------------------------------------------------------
PERF_FLAG_FD_CLOEXEC = 8
IOC_ENABLE, IOC_SET_BPF = 0x2400, 0x40042408


def uprobe_pmu_type() -> int:
    with open("/sys/bus/event_source/devices/uprobe/type") as fh:
        return int(fh.read())


def uprobe_open(path: str, file_offset: int, pid: int, prog_fd: int, pmu: int) -> int:
    """A uprobe at ``file_offset`` of ``path`` for process ``pid`` (every thread of its
    address space), running ``prog_fd``; the returned descriptor owns it."""
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    # struct perf_event_attr (PERF_ATTR_SIZE_VER5 = 112 bytes)
    attr = struct.pack("<IIQQQQQIIQQIIQQ", pmu, 112, 0, 1, 0, 0, 0, 1, 0,
                       ctypes.addressof(cpath), file_offset, 0, 0, 0, 0)
    attr = attr.ljust(112, b"\0")
    buf = ctypes.create_string_buffer(attr, 112)
    fd = _libc.syscall(NR_PERF_EVENT_OPEN, buf, pid, -1, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise BpfError(e, f"uprobe {path}:{file_offset:#x}: {os.strerror(e)}")
    try:
        _ioctl(fd, IOC_SET_BPF, prog_fd)
        _ioctl(fd, IOC_ENABLE, 0)
    except BpfError:
        os.close(fd)
        raise
    return fd


def _ioctl(fd: int, req: int, arg: int) -> None:
    if _libc.ioctl(fd, ctypes.c_ulong(req), ctypes.c_long(arg)) < 0:
        e = ctypes.get_errno()
        raise BpfError(e, f"ioctl {req:#x}: {os.strerror(e)}")


# -- the ring buffer --------------------------------------------------------------------------
BUSY, DISCARD = 1 << 31, 1 << 30
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class RingReader:
    """Consumer side of a BPF_MAP_TYPE_RINGBUF map (the kernel is the producer)."""

    def __init__(self, fd: int, size: int):
        page = mmap.PAGESIZE
        self.size, self.mask = size, size - 1
        self.cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self.prod = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self.page = page

    def read(self, limit: int = 1 << 16) -> list[bytes]:
        cons = _U64.unpack_from(self.cons, 0)[0]
        prod = _U64.unpack_from(self.prod, 0)[0]
        out = []
        data, page, mask, u32 = self.prod, self.page, self.mask, _U32.unpack_from
        while cons < prod and len(out) < limit:
            at = page + (cons & mask)
            hdr = u32(data, at)[0]
            if hdr & BUSY:
                break
            n = hdr & ~(BUSY | DISCARD)
            if not hdr & DISCARD:
                out.append(data[at + 8:at + 8 + n])
            cons += (n + 8 + 7) & ~7
        _U64.pack_into(self.cons, 0, cons)
        return out

    def close(self):
        self.cons.close()
        self.prod.close()
