"""Real gdb (batch mode) against a real process in a chroot of each Debian rootfs: gdb
must load the target's own glibc with our verified debug files, resolve send_dg in the
right object and read _res.  The traced process and gdb always end in teardown."""
import os
import select
import subprocess

import pytest

from gdbdiag.symbols import gdbload
from gdbdiag.symbols.cache import SymbolCache
from gdbdiag.symbols.identify import identify_process
from gdbdiag.symbols.sources import Settings, fetch_symbols
from support.symbols import TEST_CACHE, rootfs

pytestmark = [pytest.mark.slow]      # root (chroot, ptrace) and gdb: scripts/setup provides both

SEND_DG_IN = {"bullseye": "libresolv.so.2", "bookworm": "libc.so.6", "trixie": "libc.so.6"}
CACHE = os.path.join(TEST_CACHE, "cache")


def _start(root: str, load_resolver: bool = True, own_mount_ns: bool = False):
    lines = ["import ctypes, sys, time"]
    if load_resolver:
        lines += ['ctypes.CDLL("libnss_dns.so.2")', 'ctypes.CDLL("libresolv.so.2")']
    lines += ['ctypes.CDLL("libc.so.6").__res_init()', 'print("ready", flush=True)', "time.sleep(300)"]
    argv = ["chroot", root, "python3", "-c", "; ".join(lines)]
    if own_mount_ns:
        # unshare execs chroot in the same process: p.pid is the traced process
        argv = ["unshare", "--mount", "--propagation", "private"] + argv
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    r, _, _ = select.select([p.stdout], [], [], 30)
    if not r or p.stdout.readline().strip() != b"ready":
        p.kill()
        p.wait()
        raise RuntimeError("chroot python did not start")
    return p


@pytest.fixture
def chroot_proc(request):
    procs = []

    def start(rel, **kw):  # noqa: D401
        root = rootfs(rel)
        assert root is not None, f"no {rel} rootfs under $GDBDIAG_ROOTFS_BASE"
        p = _start(root, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:   # always end the traced process (by its own pid)
        if p.poll() is None:
            p.kill()
        p.wait(10)
        p.stdout.close()


def _gdb(argv, timeout=180):
    # subprocess.run kills gdb if it overruns; gdb sets no breakpoints here, so the
    # target survives that, and the fixture ends it anyway
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return p.stdout + p.stderr


@pytest.mark.parametrize("rel", ["bullseye", "bookworm", "trixie"])
def test_gdb_loads_target_glibc_with_verified_symbols(rel, chroot_proc):
    p = chroot_proc(rel)
    t = identify_process(p.pid)
    assert t.mode == "chroot" and t.root_dir == rootfs(rel)
    assert all(o.loaded for o in t.objects)
    res = fetch_symbols(t, Settings(sources=["debian"], timeout=60, progress=False), SymbolCache(CACHE))
    assert res.ok, [(o.name, o.error) for o in res.objects]
    cmds = ["info symbol send_dg", "print &_res", "print/x _res.options", "print/x _res._flags",
            "info sharedlibrary", gdbload.objfiles_probe_command()]
    out = _gdb(gdbload.batch_argv(t, res.debug_dir, cmds))
    sym = [ln for ln in out.splitlines() if ln.startswith("send_dg in section .text of ")]
    assert sym and sym[0].endswith("/" + SEND_DG_IN[rel]), out[-3000:]
    assert "(struct __res_state *) 0x" in out and "<_res>" in out
    opts = [ln for ln in out.splitlines() if ln.startswith("$2 = 0x")]
    assert opts and int(opts[0].split("=")[1], 16) & 0x1, out[-2000:]     # RES_INIT after res_init()
    problems = gdbload.check_loaded(t, gdbload.parse_objfiles_probe(out), res.debug_dir)
    assert problems == [], problems
    rows = gdbload.parse_info_sharedlibrary(out)
    libc_rows = [r for r in rows if r["path"].endswith("/libc.so.6")]
    assert libc_rows and libc_rows[0]["debug_info"]
    assert any(r["path"].endswith("/ld-linux-x86-64.so.2") and r["syms_read"] for r in rows)
    assert p.poll() is None     # gdb detached, the process lives on


def test_chroot_inside_own_mount_namespace(chroot_proc):
    """chroot in a private mount namespace: gdb's target: would read the namespace's '/'
    (the host's files); identified as chroot, loaded through /proc/PID/root instead."""
    p = chroot_proc("bullseye", own_mount_ns=True)
    t = identify_process(p.pid)
    assert (t.mode, t.mount_ns, t.root_dir) == ("chroot", "own", None)
    assert t.exe.startswith("/usr/bin/python3") and t.exe_host.startswith(f"/proc/{p.pid}/root/")
    assert t.objects[0].path == "/usr/lib/x86_64-linux-gnu/libc-2.31.so"
    res = fetch_symbols(t, Settings(sources=["debian"], timeout=60, progress=False), SymbolCache(CACHE))
    out = _gdb(gdbload.batch_argv(t, res.debug_dir, ["info symbol send_dg", "print/x _res.options",
                                                     gdbload.objfiles_probe_command()]))
    assert "send_dg in section .text of " in out and "/libresolv.so.2" in out
    assert gdbload.check_loaded(t, gdbload.parse_objfiles_probe(out), res.debug_dir) == []


def test_plain_gdb_on_chroot_is_caught(chroot_proc):
    """Without our setup gdb loads the host's libc for a chroot target: check_loaded says so."""
    p = chroot_proc("bullseye")
    t = identify_process(p.pid)
    res = fetch_symbols(t, Settings(sources=["debian"], timeout=60, progress=False), SymbolCache(CACHE))
    out = _gdb(["gdb", "-nx", "-batch", "-ex", f"attach {p.pid}", "-ex", gdbload.objfiles_probe_command(),
                "-ex", "detach"])
    problems = gdbload.check_loaded(t, gdbload.parse_objfiles_probe(out), res.debug_dir)
    assert problems and any("libc.so.6" in x for x in problems), problems


def test_resolver_not_loaded_yet(chroot_proc):
    p = chroot_proc("bullseye", load_resolver=False)
    t = identify_process(p.pid)
    st = {o.name: o.status for o in t.objects}
    assert st == {"libc.so.6": "loaded", "libresolv.so.2": "not loaded yet", "libnss_dns.so.2": "not loaded yet"}
    res = fetch_symbols(t, Settings(sources=["debian"], timeout=60, progress=False), SymbolCache(CACHE))
    assert res.ok      # debug files ready before the first lookup loads them
    out = _gdb(gdbload.batch_argv(t, res.debug_dir, ["info symbol send_dg", gdbload.objfiles_probe_command()]))
    assert 'No symbol "send_dg" in current context.' in out
    assert gdbload.check_loaded(t, gdbload.parse_objfiles_probe(out), res.debug_dir) == []


def test_setup_commands_per_mode(chroot_proc):
    p = chroot_proc("bookworm")
    t = identify_process(p.pid)
    cmds = gdbload.gdb_setup_commands(t, "/c/debug", sysroot_base=str(os.path.join(TEST_CACHE, "sysroot-test")))
    assert cmds[0].startswith("set sysroot ") and cmds[1] == "set debug-file-directory /c/debug"
    shadow = cmds[0].split(" ", 2)[2]
    ld = os.path.join(shadow, "lib64/ld-linux-x86-64.so.2")
    # the image's absolute link is resolved inside the root, not on the host
    assert os.readlink(ld).startswith(rootfs("bookworm") + "/")
    assert cmds[-1] == f"file {t.exe_host}"
    assert f"set libthread-db-search-path {t.thread_db_dir_host}" in cmds
    # other modes, same function
    t.mode = "mntns"
    assert gdbload.gdb_setup_commands(t, "/c/debug")[:2] == ["set sysroot target:", "set debug-file-directory /c/debug"]
    t.mode = "host"
    assert gdbload.gdb_setup_commands(t, "/c/debug") == ["set debug-file-directory /c/debug:/usr/lib/debug"]
    assert gdbload.gdb_setup_commands(t, "/c/debug", attached=True)[-2:] == ["nosharedlibrary", "sharedlibrary"]
