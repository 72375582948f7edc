"""gdbdiag.unwind against real processes, checked frame by frame against gdb's own unwind.

Each target is a process this test starts and that blocks in a syscall (poll/select for
100 s), so its user stack cannot change.  gdb attaches once (batch mode, which stops the
test's own process briefly), prints every thread's ``info registers`` and backtrace, and
detaches; then ``unwind()`` gets the registers gdb printed (only those a uprobe capture
has: rip rsp rbp rbx r12-r15) and reads the stack itself through /proc/PID/mem.

Compared with gdb's *physical* frames (gdb also shows inline frames, and tail-call frames
it synthesises from DWARF call-site info; neither exists on the stack): same number of
frames up to the outermost one (``_start`` / ``clone3``, with ``backtrace past-main`` and
``past-entry`` on), same PCs (return addresses), and the same function names (gdb's name
or an alias at the same address; gdb's ``??`` = no symbol for us).
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from gdbdiag.passive import ProcMem
from gdbdiag.symbols.elfinfo import read_build_id
from gdbdiag.unwind import Frame, clear_cache, unwind

DEBUG_DIRS = ["/usr/lib/debug"]
ROOTFS = "/var/cache/gdbdiag/rootfs"
UPROBE_REGS = ("rip", "rsp", "rbp", "rbx", "r12", "r13", "r14", "r15")
BLOCK_PY = "import select; print('ready', flush=True); select.select([], [], [], 100)"

C_SRC = r"""
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
__attribute__((noinline)) int leaf(int x) { int r = poll(NULL, 0, 100000); return r + x; }
__attribute__((noinline)) int mid(int x) { volatile int y = x * 3; return leaf(y) + 1; }
__attribute__((noinline)) int top(int x) { volatile int y = x + 7; return mid(y) * 2; }
__attribute__((noinline)) static void *thr(void *a) { top((int)(long)a); return NULL; }
__attribute__((noinline)) static void handler(int sig) { volatile int r = leaf(sig); (void)r; }
__attribute__((noinline)) static int sig_top(void) { int r = raise(SIGUSR1); return r + 1; }
int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "thread")) {   /* the poll is in a second thread */
        pthread_t t;
        pthread_create(&t, NULL, thr, NULL);
        printf("ready\n"); fflush(stdout);
        pthread_join(t, NULL);
        return 0;
    }
    if (argc > 1 && !strcmp(argv[1], "signal")) {   /* the poll is in a signal handler */
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = handler;
        sigaction(SIGUSR1, &sa, NULL);
        printf("ready\n"); fflush(stdout);
        int r = sig_top();
        printf("%d\n", r);
        return 0;
    }
    printf("ready\n"); fflush(stdout);
    int r = top(argc);                    /* not a tail call: main keeps its frame */
    printf("%d\n", r);
    return 0;
}
"""

# main -> top (CFI only in .debug_frame) -> mid (no CFI at all, frame pointer) -> leaf -> poll
MIXED_SRC = {
    "main.c": r"""
#include <poll.h>
#include <stdio.h>
int top(int);
__attribute__((noinline)) int leaf(int x) { int r = poll(NULL, 0, 100000); return r + x; }
int main(void) { printf("ready\n"); fflush(stdout); int r = top(1); printf("%d\n", r); return 0; }
""",
    "df.c": "int mid(int);\n"
            "__attribute__((noinline)) int top(int x) { volatile int y = x + 7; return mid(y) * 2; }\n",
    "fp.c": "int leaf(int);\n"
            "__attribute__((noinline)) int mid(int x) { volatile int y = x * 3; return leaf(y) + 1; }\n",
}
MIXED_FLAGS = {
    "main.c": ["-O2", "-fomit-frame-pointer"],
    "df.c": ["-O2", "-g", "-fomit-frame-pointer", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables"],
    # -O0: a plain `push %rbp; mov %rsp,%rbp` prologue that gdb's prologue analyser (its
    # fallback for code without CFI) understands too; at -O2 gcc schedules an instruction
    # into the prologue and gdb's backtrace goes astray there, so it could not be the reference
    "fp.c": ["-O0", "-g0", "-fno-omit-frame-pointer", "-fno-asynchronous-unwind-tables",
             "-fno-unwind-tables"],
}

GDB_SCRIPT = r"""
import gdb, json
TYPES = {gdb.NORMAL_FRAME: "normal", gdb.INLINE_FRAME: "inline", gdb.TAILCALL_FRAME: "tailcall",
         gdb.SIGTRAMP_FRAME: "sigtramp"}
out = []
for th in sorted(gdb.selected_inferior().threads(), key=lambda t: t.ptid[1]):
    th.switch()
    rec = {"lwp": th.ptid[1], "regs": gdb.execute("info registers", to_string=True),
           "bt": gdb.execute("bt", to_string=True), "frames": []}
    try:
        f = gdb.newest_frame()
        while f is not None:
            rec["frames"].append({"pc": f.pc(), "name": f.name(), "type": TYPES.get(f.type(), str(f.type()))})
            f = f.older()
    except gdb.error as e:
        rec["error"] = str(e)
    out.append(rec)
print("GDBDIAG-JSON " + json.dumps(out))
"""


# ---------------------------------------------------------------------------------------
# processes (started here, killed by PID at teardown)
# ---------------------------------------------------------------------------------------
@pytest.fixture
def spawn():
    procs = []

    def start(argv, syscall=None, **kw):
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
        procs.append(p)
        r, _, _ = select.select([p.stdout], [], [], 30)
        line = p.stdout.readline() if r else b""
        assert line.strip() == b"ready", f"{argv[0]} did not start: {line!r} {p.poll()}"
        _wait_blocked(p.pid, syscall=syscall)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
        p.stdout.close()
        p.stderr.close()


def _wait_blocked(pid: int, timeout: float = 10.0, syscall: int | None = None):
    """Until every thread sleeps in a syscall (poll/select/futex; the main thread in
    ``syscall`` if given), so the stacks are still."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        with open(f"/proc/{pid}/syscall") as f:
            nr = f.read().split()[0]
        if states and all(s == "S" for s in states) and (syscall is None or nr == str(syscall)):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not block")


@pytest.fixture(scope="module")
def cprog(tmp_path_factory):
    d = tmp_path_factory.mktemp("unwind")
    (d / "nest.c").write_text(C_SRC)
    exe = d / "nest"
    subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-pthread", "-o", str(exe), str(d / "nest.c")],
                   check=True)
    return str(exe)


@pytest.fixture(scope="module")
def mixed_prog(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    objs = []
    for name, src in MIXED_SRC.items():
        (d / name).write_text(src)
        obj = str(d / (name[:-2] + ".o"))
        subprocess.run(["gcc", "-c", *MIXED_FLAGS[name], "-o", obj, str(d / name)], check=True)
        objs.append(obj)
    exe = str(d / "mixed")
    subprocess.run(["gcc", "-o", exe, *objs], check=True)
    with open(exe, "rb") as f:
        assert ELFFile(f).get_section_by_name(".debug_frame") is not None
    return exe


# ---------------------------------------------------------------------------------------
# gdb: registers + physical frames of every thread
# ---------------------------------------------------------------------------------------
def gdb_threads(pid: int, tmp_path, exe: str | None = None) -> dict[int, dict]:
    script = tmp_path / "bt.py"
    script.write_text(GDB_SCRIPT)
    cmd = ["gdb", "-nx", "-batch", "-p", str(pid), "-ex", "set debuginfod enabled off",
           "-ex", "set pagination off", "-ex", "set backtrace past-main on",
           "-ex", "set backtrace past-entry on"]
    if exe:       # started through ld.so: gdb would take ld.so for the program
        cmd += ["-ex", f"file {exe}"]
    cmd += ["-x", str(script)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    m = re.search(r"^GDBDIAG-JSON (.*)$", r.stdout, re.M)
    assert m, f"gdb printed no result:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out = {}
    for t in json.loads(m.group(1)):
        regs = {k: int(v, 16) for k, v in re.findall(r"^(\w+)\s+0x([0-9a-f]+)", t["regs"], re.M)}
        t["uprobe_regs"] = {k: regs[k] for k in UPROBE_REGS}
        t["physical"] = [f for f in t["frames"] if f["type"] in ("normal", "sigtramp")]
        out[t["lwp"]] = t
    return out


@functools.lru_cache(maxsize=None)
def _names_at(path: str, debug: str | None) -> dict[int, set[str]]:
    """address -> every function symbol name there (module .symtab/.dynsym + debug file)."""
    out: dict[int, set[str]] = {}
    for p in (path, debug):
        if not p:
            continue
        with open(p, "rb") as f:
            for sec in ELFFile(f).iter_sections():
                if isinstance(sec, SymbolTableSection):
                    for s in sec.iter_symbols():
                        if s["st_value"] and s.name:
                            out.setdefault(s["st_value"], set()).add(s.name.split("@")[0])
    return out


def _module_files(pid: int, pc: int) -> tuple[str, str | None]:
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            a, b = (int(x, 16) for x in line.split()[0].split("-"))
            if a <= pc < b:
                host = f"/proc/{pid}/map_files/{a:x}-{b:x}"
                bid = read_build_id(host)
                dbg = bid and os.path.join(DEBUG_DIRS[0], ".build-id", bid[:2], bid[2:] + ".debug")
                return host, (dbg if dbg and os.path.exists(dbg) else None)
    raise AssertionError(f"pc {pc:#x} not mapped")


def _same_function(pid: int, ours: Frame, gdb_name: str | None) -> bool:
    if gdb_name is None:
        return ours.symbol is None
    if ours.symbol is None:
        return False
    if ours.symbol.split("@")[0] == gdb_name:
        return True
    path, dbg = _module_files(pid, ours.pc)
    return gdb_name in _names_at(path, dbg).get(ours.module_offset - ours.symbol_offset, set())


def table(frames: list[Frame], gdb_frames: list[dict]) -> str:
    rows = []
    for i in range(max(len(frames), len(gdb_frames))):
        o = frames[i] if i < len(frames) else None
        g = gdb_frames[i] if i < len(gdb_frames) else None
        rows.append(f"  #{i:<2} ours {o.pc if o else 0:#016x} {(o.label() + ' [' + o.how + ']') if o else '-':44}"
                    f" gdb {g['pc'] if g else 0:#016x} {(g['name'] or '??') if g else '-'}")
    return "\n".join(rows)


def assert_matches_gdb(pid: int, thread: dict, frames: list[Frame], fp_frames=()):
    phys = thread["physical"]
    print(f"\nLWP {thread['lwp']}:\n" + table(frames, phys))
    assert "error" not in thread, thread
    assert len(frames) == len(phys), f"frame count differs\n{table(frames, phys)}\n{thread['bt']}"
    for i, (o, g) in enumerate(zip(frames, phys)):
        assert o.pc == g["pc"], f"frame #{i} pc differs\n{table(frames, phys)}"
        if g["type"] == "sigtramp":       # gdb: <signal handler called>; ours: glibc's __restore_rt
            assert o.symbol in ("__restore_rt", None), o
            continue
        assert _same_function(pid, o, g["name"]), f"frame #{i} name differs\n{table(frames, phys)}"
    assert frames[-1].stop_reason is None, frames[-1].stop_reason
    assert frames[0].how == "first"
    assert [i for i, f in enumerate(frames) if f.how == "fp"] == list(fp_frames), table(frames, phys)
    assert all(f.provenance == "memory" for f in frames)


def labels(frames):
    return [f.label() for f in frames]


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------
def test_c_program_main_thread(spawn, cprog, tmp_path):
    p = spawn([cprog])
    (t,) = gdb_threads(p.pid, tmp_path).values()
    frames = unwind(p.pid, t["uprobe_regs"], debug_dirs=DEBUG_DIRS)
    assert_matches_gdb(p.pid, t, frames)
    names = labels(frames)
    assert names[1:5] == ["leaf", "mid", "top", "main"], names
    assert names[-1] == "_start"
    assert frames[1].module == "nest" and frames[0].module == "libc.so.6"
    assert frames[0].symbol in ("__poll", "poll", "__GI___poll")
    # without the debug file: still every frame, named from libc's .dynsym where it can be
    plain = unwind(p.pid, t["uprobe_regs"])
    assert [f.pc for f in plain] == [f.pc for f in frames]


def test_c_program_other_thread(spawn, cprog, tmp_path):
    p = spawn([cprog, "thread"])
    threads = gdb_threads(p.pid, tmp_path)
    assert len(threads) == 2
    worker = threads[max(threads)]          # not the main thread: blocked in poll
    main = threads[p.pid]                   # in pthread_join (gdb adds a tail-call frame there)
    for t in (worker, main):
        assert_matches_gdb(p.pid, t, unwind(p.pid, t["uprobe_regs"], debug_dirs=DEBUG_DIRS))
    names = labels(unwind(p.pid, worker["uprobe_regs"], debug_dirs=DEBUG_DIRS))
    assert names[1:5] == ["leaf", "mid", "top", "thr"] and names[-2:] == ["start_thread", "clone3"], names


def test_signal_handler_frame(spawn, cprog, tmp_path):
    """Through the signal trampoline: CFA and registers from DWARF expressions over the
    ucontext, and the interrupted pc used as is (no pc-1) for the frame below it."""
    p = spawn([cprog, "signal"])
    (t,) = gdb_threads(p.pid, tmp_path).values()
    frames = unwind(p.pid, t["uprobe_regs"], debug_dirs=DEBUG_DIRS)
    assert_matches_gdb(p.pid, t, frames)
    names = labels(frames)
    assert names[1:4] == ["leaf", "handler", "__restore_rt"], names
    assert "sig_top" in names and "main" in names and names[-1] == "_start"


def test_debug_frame_and_frame_pointer_fallback(spawn, mixed_prog, tmp_path):
    """top's CFI is only in .debug_frame; mid has no CFI at all (one frame-pointer step)."""
    p = spawn([mixed_prog])
    (t,) = gdb_threads(p.pid, tmp_path).values()
    frames = unwind(p.pid, t["uprobe_regs"], debug_dirs=DEBUG_DIRS)
    assert_matches_gdb(p.pid, t, frames, fp_frames=[3])
    assert labels(frames)[1:5] == ["leaf", "mid", "top", "main"]
    assert frames[3].how == "fp" and frames[4].how == "cfi"


def _plt_entry(exe: str, func: str) -> int:
    out = subprocess.run(["objdump", "-d", exe], capture_output=True, text=True, check=True).stdout
    m = re.search(rf"call\s+([0-9a-f]+) <{func}@plt>", out)
    assert m, f"no call to {func}@plt in {exe}"
    return int(m.group(1), 16)


def _bias(module: str, frames: list[Frame]) -> int:
    f = next(f for f in frames if f.module == module)
    return f.pc - f.module_offset


def test_plt_cfa_expression(spawn, cprog, tmp_path):
    """A thread caught in a PLT stub: the CFA is .plt's DW_CFA_def_cfa_expression.  The
    registers are those of the real thread as it was entering poll@plt from leaf."""
    p = spawn([cprog])
    (t,) = gdb_threads(p.pid, tmp_path).values()
    real = unwind(p.pid, t["uprobe_regs"])
    plt = _bias("nest", real) + _plt_entry(cprog, "poll")
    ra_slot = real[1].sp - 8                         # where `call poll@plt` left leaf's RA
    for off, rsp in ((0, ra_slot), (6, ra_slot), (11, ra_slot - 8)):   # jmp *GOT; push; jmp PLT0
        frames = unwind(p.pid, {"rip": plt + off, "rsp": rsp})
        assert frames[0].how == "first" and frames[0].module == "nest"
        assert [f.pc for f in frames[1:]] == [f.pc for f in real[1:]], (off, frames)
        assert frames[-1].stop_reason is None


def test_vdso_object(spawn, cprog, tmp_path):
    """The vDSO has no file: its ELF image (CFI, symbols) is read from the target's memory."""
    p = spawn([cprog])
    (t,) = gdb_threads(p.pid, tmp_path).values()
    real = unwind(p.pid, t["uprobe_regs"])
    with open(f"/proc/{p.pid}/maps") as f:
        line = next(ln for ln in f if ln.rstrip().endswith("[vdso]"))
    start, end = (int(x, 16) for x in line.split()[0].split("-"))
    mem = ProcMem(p.pid)
    try:
        elf = ELFFile(io.BytesIO(mem.read(start, end - start)))
    finally:
        mem.close()
    syms = {s.name: s["st_value"] for s in elf.get_section_by_name(".dynsym").iter_symbols()}
    name = next(n for n in ("__vdso_clock_gettime", "__vdso_gettimeofday") if n in syms)
    load = next(s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD")
    entry = start + syms[name] - load["p_vaddr"] + load["p_offset"]
    frames = unwind(p.pid, {"rip": entry, "rsp": real[1].sp - 8})   # as if leaf had called it
    assert frames[0].module == "[vdso]" and frames[0].symbol_offset == 0
    assert frames[0].symbol in (name, name.replace("__vdso_", ""))
    assert [f.pc for f in frames[1:]] == [f.pc for f in real[1:]]


def test_only_rip_rsp_known(spawn, cprog, tmp_path):
    """Missing callee-saved registers are 'unknown': the CFA here is rsp-based throughout."""
    p = spawn([cprog])
    (t,) = gdb_threads(p.pid, tmp_path).values()
    full = unwind(p.pid, t["uprobe_regs"], debug_dirs=DEBUG_DIRS)
    part = unwind(p.pid, {k: t["uprobe_regs"][k] for k in ("rip", "rsp")}, debug_dirs=DEBUG_DIRS)
    assert [f.pc for f in part] == [f.pc for f in full]


def test_stops_with_reason(spawn, cprog, tmp_path):
    p = spawn([cprog])
    (t,) = gdb_threads(p.pid, tmp_path).values()
    regs = t["uprobe_regs"]
    short = unwind(p.pid, regs, max_frames=3)
    assert len(short) == 3 and "max_frames" in short[-1].stop_reason

    class NoStack:                    # a real reader that refuses the stack pages
        def __init__(self):
            self.real = ProcMem(p.pid)

        def read(self, addr, n):
            return None if abs(addr - regs["rsp"]) < (1 << 20) else self.real.read(addr, n)

    frames = unwind(p.pid, regs, mem=NoStack())
    assert len(frames) == 1 and "return address" in frames[0].stop_reason, frames[0]

    bad = unwind(p.pid, dict(regs, rip=0x10))
    assert len(bad) == 1 and "not in an executable mapping" in bad[0].stop_reason
    assert bad[0].label() == "0x0000000000000010"


def test_deleted_binary_read_through_map_files(spawn, cprog, tmp_path):
    """The object is opened as the target sees it (map_files), not by its path."""
    exe = tmp_path / "gone"
    shutil.copy(cprog, exe)
    p = spawn([str(exe)])
    (t,) = gdb_threads(p.pid, tmp_path).values()
    exe.unlink()
    frames = unwind(p.pid, t["uprobe_regs"], debug_dirs=DEBUG_DIRS)
    assert_matches_gdb(p.pid, t, frames)
    assert frames[1].module == "gone" and labels(frames)[1:5] == ["leaf", "mid", "top", "main"]


def _func_addr(path: str, name: str) -> int:
    with open(path, "rb") as f:
        return next(s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols()
                    if s.name == name)


def test_mount_namespace_file_differs_from_host(spawn, cprog, tmp_path):
    """A 'container' whose file at a path differs from the host's file at that path: in
    the target's mount namespace /…/app is another build (leaf 0x30 bytes further on).
    The unwinder must read the target's file (map_files), never the host's."""
    host_view = tmp_path / "app"
    shutil.copy(cprog, host_view)
    src = C_SRC.replace("__attribute__((noinline)) int leaf(",
                        "__attribute__((noinline)) int pad(int x) { volatile int a[64]; "
                        "for (int i = 0; i < 64; i++) a[i] = x * i; return a[x & 63]; }\n"
                        "__attribute__((noinline)) int leaf(")
    src = src.replace("return r + x; }", "return r + x + pad(r); }", 1)
    (tmp_path / "b.c").write_text(src)
    inner = str(tmp_path / "app-b")
    subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-pthread", "-o", inner, str(tmp_path / "b.c")],
                   check=True)
    assert _func_addr(inner, "leaf") != _func_addr(str(host_view), "leaf")
    p = spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f"mount --bind {inner} {host_view} && exec {host_view}"])
    (t,) = gdb_threads(p.pid, tmp_path).values()     # gdb reads the program via /proc/PID/exe
    frames = unwind(p.pid, t["uprobe_regs"], debug_dirs=DEBUG_DIRS)
    assert_matches_gdb(p.pid, t, frames)
    assert labels(frames)[1:5] == ["leaf", "mid", "top", "main"] and frames[1].module == "app"
    assert frames[1].module_offset - frames[1].symbol_offset == _func_addr(inner, "leaf")


def _timed_unwinds(pid, regs, **kw):
    clear_cache()
    t0 = time.perf_counter()
    first = unwind(pid, regs, **kw)
    t1 = time.perf_counter()
    again = unwind(pid, regs, **kw)
    t2 = time.perf_counter()
    assert [f.pc for f in again] == [f.pc for f in first]
    return first, t1 - t0, t2 - t1


def test_debian_python_blocked_in_select(spawn, tmp_path):
    p = spawn(["/usr/bin/python3", "-c", BLOCK_PY])
    (t,) = gdb_threads(p.pid, tmp_path).values()
    frames, first, cached = _timed_unwinds(p.pid, t["uprobe_regs"], debug_dirs=DEBUG_DIRS)
    print(f"\n/usr/bin/python3: {len(frames)} frames; first unwind {first * 1000:.1f} ms, "
          f"cached {cached * 1000:.1f} ms")
    assert_matches_gdb(p.pid, t, frames)
    names = labels(frames)
    assert "_PyEval_EvalFrameDefault" in names and "Py_BytesMain" in names and names[-1] == "_start"
    assert cached < 0.5


@pytest.fixture
def dns_blackhole():
    """A UDP socket on some 127.x.y.z:53 that reads queries and never answers."""
    import random
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(20):
        addr = f"127.{random.randint(1, 254)}.{random.randint(0, 254)}.{random.randint(1, 254)}"
        try:
            s.bind((addr, 53))
            break
        except OSError:
            continue
    else:
        s.close()
        raise AssertionError("no free 127.x.y.z:53 for the DNS blackhole")
    yield addr
    s.close()


def test_resolver_wait_in_send_dg(spawn, tmp_path, dns_blackhole):
    """The stack gdbdiag is about: getaddrinfo blocked in send_dg's poll on a nameserver
    that never answers.  The target runs in its own mount namespace (resolv.conf bind-
    mounted there), Debian's python3 calling glibc 2.36's getaddrinfo."""
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"nameserver {dns_blackhole}\noptions timeout:60 attempts:1\n")
    code = "import socket; print('ready', flush=True); socket.getaddrinfo('gdbdiag-unwind.invalid', 80)"
    script = f"mount --bind {conf} /etc/resolv.conf && exec /usr/bin/python3 -c \"{code}\""
    # unshare and sh exec: p.pid ends up being the python process itself
    p = spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], syscall=7)
    (t,) = gdb_threads(p.pid, tmp_path).values()
    frames = unwind(p.pid, t["uprobe_regs"], debug_dirs=DEBUG_DIRS)
    assert_matches_gdb(p.pid, t, frames)
    names = labels(frames)
    assert names[1:4] == ["send_dg", "__res_context_send", "__res_context_query"], names
    assert "getaddrinfo" in names and names[-1] == "_start"
    plain = unwind(p.pid, t["uprobe_regs"])          # send_dg is LOCAL: named only by the debug file
    assert [f.pc for f in plain] == [f.pc for f in frames]
    assert plain[1].symbol is None and plain[1].label() == f"0x{plain[1].pc:016x}"
    # what the uprobe on send_dg's `call __poll` captures: rip at the call, rsp before it
    call = frames[1].pc - 5
    mem = ProcMem(p.pid)
    try:
        assert mem.read(call, 1) == b"\xe8"                # call rel32
    finally:
        mem.close()
    at_call = unwind(p.pid, {"rip": call, "rsp": frames[1].sp}, debug_dirs=DEBUG_DIRS)
    assert at_call[0].symbol == "send_dg" and at_call[0].how == "first"
    assert [f.pc for f in at_call[1:]] == [f.pc for f in frames[2:]]
    print("\nat the probe:", " <- ".join(labels(at_call)))


@pytest.mark.parametrize("release,python", [("bullseye", "python3.9"), ("trixie", "python3.13")])
def test_rootfs_python_other_glibc(spawn, tmp_path, release, python):
    """The rootfs's own ld.so, glibc and python (glibc 2.31 for bullseye), so the unwinder
    reads those files' CFI and symbols; gdb is told the real program (ld.so started it)."""
    from gdbdiag.symbols.rootfs import SafeRoot

    root = os.path.join(ROOTFS, release)
    exe = os.path.join(root, "usr/bin", python)
    assert os.path.exists(exe), f"no {exe}: scripts/test builds the lab root filesystems first"
    sr = SafeRoot(root)
    ld = sr.host_path("/lib64/ld-linux-x86-64.so.2")
    libs = ":".join(sr.host_path(d) for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"))
    p = spawn([ld, "--library-path", libs, exe, "-c", BLOCK_PY], env={"PATH": "/usr/bin:/bin"})
    (t,) = gdb_threads(p.pid, tmp_path, exe=exe).values()
    frames, first, cached = _timed_unwinds(p.pid, t["uprobe_regs"], debug_dirs=DEBUG_DIRS)
    print(f"\n{release} {python}: first unwind {first * 1000:.1f} ms, cached {cached * 1000:.1f} ms")
    assert_matches_gdb(p.pid, t, frames)
    libc = [f for f in frames if f.module and f.module.startswith("libc")]
    assert libc and all(os.path.realpath(_module_files(p.pid, f.pc)[0]).startswith(root) for f in libc)
    assert labels(frames)[-1] == "_start"


if __name__ == "__main__":   # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))
