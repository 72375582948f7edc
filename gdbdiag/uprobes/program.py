"""The bpftrace program for one target: uprobes at the analyzer's probe points.

Every probe reads what the gdb probes read at the same PC — registers by the x86-64 ABI
at call sites of exported functions, memory through the pointers they hold — and prints
one line (a *record*, decoded by :mod:`.records`). Nothing is ever written to the target.

Modes (what produces records; the probes themselves cost ~1 µs per hit in the kernel):

- ``lean``: the sticky-bit writers, always; send_dg's probes for *detailed* threads only.
- ``armed`` (default): lean plus getaddrinfo's entry and returns for every thread.
- ``full``: every probe for every thread.

A thread is *detailed* once the kernel has seen its resolver state in single-request
mode: at send_dg's entry (``(options | _flags) & (SNGLKUP|SNGLKUPREOP)``) or at a
sticky-bit write. The filter runs in the BPF program, so a healthy thread costs no
output at all in lean mode.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

QWORDS = 16          # a query packet is read as 16 little-endian u64 words (128 bytes)
STICKY_MASK = 0x600000


@dataclass
class Plan:
    """Where the probes go, as virtual addresses of the objects (bpftrace converts a
    ``uprobe:FILE:0xADDR`` address to a file offset itself)."""
    pid: int
    send_dg_file: str                   # host path to the object holding send_dg
    libc_file: str                      # host path to libc (getaddrinfo)
    send_dg_entry: int
    send_dg_returns: list[int] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)      # {kind, site, call, ret}
    writers: list[dict] = field(default_factory=list)    # {addr, base_reg, field, bit}
    gai_entry: int | None = None
    gai_returns: list[int] = field(default_factory=list)
    options_off: int = 8
    flags_off: int = 0x1F8


def bpf_reg(name: str) -> str:
    """x86-64 register name as bpftrace's reg() wants it: rdi -> di, r15 -> r15."""
    name = name.lstrip("%")
    if name.startswith("r") and not name[1:].isdigit() and not name[1:2].isdigit():
        return name[1:]
    return name


def _qwords(ptr: str) -> tuple[str, str]:
    fmt = " %lx" * QWORDS
    args = "".join(f", *(uint64*)({ptr} + {8 * i})" for i in range(QWORDS))
    return fmt, args


def _probe(path: str, addr: int, pred: str, body: str) -> str:
    return f"uprobe:{path}:{addr:#x} /{pred}/ {{\n{body}\n}}\n"


def build(plan: Plan, mode: str = "armed") -> str:
    if mode not in ("lean", "armed", "full"):
        raise ValueError(f"unknown mode {mode!r}")
    full = mode == "full"
    me = f"pid == {plan.pid}"
    det = me if full else f"{me} && @d[tid]"
    lib = plan.send_dg_file
    # BEGIN runs once every probe is attached: records before it may come from a
    # half-attached set, and are dropped (as are those after the owner is told to stop)
    out = ["BEGIN { printf(\"READY %lu\\n\", nsecs); }\n"]
    out += _gai(plan, me if mode != "lean" else det)
    out += _send_dg_entry(plan, me, full)
    for c in plan.calls:
        out += _call(lib, c, det)
    for ret in plan.send_dg_returns:
        out.append(_probe(lib, ret, det, 'printf("X %d %lu %d\\n", tid, nsecs, (int32)reg("ax"));'))
    for i, w in enumerate(plan.writers):
        out.append(_writer(plan, i, w, me))
    text = "".join(out)
    maps = sorted(set(re.findall(r"@(\w+)\[", text)))
    # at exit bpftrace would print every map: clear them (per-thread scratch state)
    return text + "END {%s }\n" % "".join(f" clear(@{m});" for m in maps)


def _gai(plan: Plan, pred: str) -> list[str]:
    if plan.gai_entry is None:
        return []
    out = [_probe(plan.libc_file, plan.gai_entry, pred,
                  'printf("G %d %lu %s\\n", tid, nsecs, str(reg("di")));')]
    for ret in plan.gai_returns:
        out.append(_probe(plan.libc_file, ret, pred,
                          'printf("g %d %lu %d\\n", tid, nsecs, (int32)reg("ax"));'))
    return out


def _send_dg_entry(plan: Plan, me: str, full: bool) -> list[str]:
    f1, a1 = _qwords("$b1")
    f2, a2 = _qwords("$b2")
    keep = "1" if full else f"($o | $f) & {STICKY_MASK:#x}"
    body = f"""  $st = reg("di"); $b1 = reg("si"); $b2 = reg("cx");
  @b1[tid] = $b1; @b2[tid] = $b2;
  $o = *(uint64*)($st + {plan.options_off}); $f = *(uint32*)($st + {plan.flags_off});
  if ({keep}) {{
    @d[tid] = 1;
    printf("E %d %lu %lx %lx %lx %lx{f1}{f2}\\n", tid, nsecs, $st, $o, $f, $b2{a1}{a2});
  }} else {{
    delete(@d[tid]);
  }}"""
    return [_probe(plan.send_dg_file, plan.send_dg_entry, me, body)]


def _call(lib: str, c: dict, det: str) -> list[str]:
    kind, call, ret = c["kind"], c["call"], c["ret"]
    if kind == "poll":
        site = "w" if c.get("site") == "wait" else "c"
        regs = "".join(f', reg("{r}")' for r in ("sp", "bp", "bx", "r12", "r13", "r14", "r15"))
        enter = (f'  $p = reg("di"); @pfd[tid] = $p;\n'
                 f'  printf("P %d %lu {site} %d %d %d %lx %lx %lx %lx %lx %lx %lx %lx %lx\\n", '
                 f'tid, nsecs, *(int32*)$p, *(uint16*)($p + 4), (int32)reg("dx"), $p{regs}, '
                 f'reg("ip"));')
        leave = ('  $p = @pfd[tid];\n'
                 '  printf("p %d %lu %d %d %d\\n", tid, nsecs, (int32)reg("ax"), '
                 '*(int32*)$p, *(uint16*)($p + 6));')
        return [_probe(lib, call, det, enter), _probe(lib, ret, det, leave)]
    if kind == "send":
        return [_probe(lib, call, det, '  @sb[tid] = reg("si");'),
                _probe(lib, ret, det, '  $b = @sb[tid];\n'
                       '  printf("S %d %lu %ld %d\\n", tid, nsecs, reg("ax"), *(uint16*)$b);')]
    if kind == "sendmmsg":
        return [_probe(lib, ret, det, '  printf("M %d %lu %d\\n", tid, nsecs, (int32)reg("ax"));')]
    if kind == "recvfrom":
        return [_probe(lib, call, det, '  @rb[tid] = reg("si");'),
                _probe(lib, ret, det, '  $b = @rb[tid];\n'
                       '  printf("R %d %lu %ld %lx %x\\n", tid, nsecs, reg("ax"), '
                       '*(uint64*)$b, *(uint32*)($b + 8));')]
    return []


def _writer(plan: Plan, idx: int, w: dict, me: str) -> str:
    f1, a1 = _qwords("$b1")
    f2, a2 = _qwords("$b2")
    base = bpf_reg(w["base_reg"])
    body = f"""  $st = reg("{base}"); $b1 = @b1[tid]; $b2 = @b2[tid];
  @d[tid] = 1;
  printf("W %d %lu {idx} %lx %lx %lx %lx{f1}{f2}\\n", tid, nsecs, $st,
         *(uint64*)($st + {plan.options_off}), *(uint32*)($st + {plan.flags_off}), $b2{a1}{a2});"""
    return _probe(plan.send_dg_file, w["addr"], me, body)
