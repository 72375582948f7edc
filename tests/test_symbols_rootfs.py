"""SafeRoot (paths inside a foreign root) and target identification on real rootfs dirs."""
import os
import shutil
import socket

import pytest

from gdbdiag.symbols import identify as I
from gdbdiag.symbols.rootfs import EscapeError, SafeRoot
from support.symbols import rootfs

RELS = ["bullseye", "bookworm", "trixie"]
EXPECT = {  # upstream glibc, objects holding the resolver
    "bullseye": ("2.31", ["libc.so.6", "libresolv.so.2", "libnss_dns.so.2"]),
    "bookworm": ("2.36", ["libc.so.6"]),
    "trixie": ("2.41", ["libc.so.6"]),
}


def _rootfs(rel):
    d = rootfs(rel)
    assert d is not None, f"no {rel} rootfs under $GDBDIAG_ROOTFS_BASE"
    return d


@pytest.fixture
def hostile(tmp_path):
    """A rootfs with absolute, escaping and looping symlinks."""
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "usr/lib").mkdir(parents=True)
    (r / "etc/hostname").write_text('ID=inside\nPRETTY_NAME="inside the image"\n')
    os.symlink("/etc/hostname", r / "etc/os-release")                 # absolute: must stay inside
    os.symlink("../../../../../../etc/hostname", r / "usr/lib/os-release")
    os.symlink("/loop-b", r / "loop-a")
    os.symlink("/loop-a", r / "loop-b")
    os.symlink("/proc/self/root/etc/passwd", r / "escape-proc")
    os.symlink("..", r / "up")
    return r


def test_absolute_symlink_is_rerooted_never_host(hostile):
    host = open("/etc/hostname").read() if os.path.exists("/etc/hostname") else socket.gethostname()
    sr = SafeRoot(str(hostile))
    assert sr.resolve("/etc/os-release") == "/etc/hostname"
    assert sr.host_path("/etc/os-release") == str(hostile / "etc/hostname")
    text = sr.read_text("/etc/os-release")
    assert text.startswith("ID=inside") and text != host
    # the os-release reader goes through the same resolver
    assert I.read_os_release(sr)["id"] == "inside"


def test_dotdot_clamped_at_root(hostile):
    sr = SafeRoot(str(hostile))
    assert sr.resolve("/usr/lib/os-release") == "/etc/hostname"
    assert sr.resolve("/up/up/up/etc") == "/etc"
    assert sr.resolve("../../..") == "/"


def test_symlink_loop_and_proc_escape(hostile):
    sr = SafeRoot(str(hostile), max_links=10)
    with pytest.raises(EscapeError) as e:
        sr.resolve("/loop-a")
    assert "symbolic links" in str(e.value)
    with pytest.raises(OSError):
        sr.read_bytes("/escape-proc")     # re-rooted: <root>/proc/self/... does not exist
    assert not sr.exists("/escape-proc")


def test_open_refuses_final_symlink_swap(hostile):
    sr = SafeRoot(str(hostile))
    with sr.open("/etc/os-release") as f:
        assert f.read().startswith(b"ID=inside")
    with pytest.raises(ValueError):
        sr.open("/etc/hostname", "w")


def test_identify_file_through_hostile_link(tmp_path):
    """A libc.so.6 reached by an absolute link inside the image is read from the image."""
    r = _rootfs("bookworm")
    img = tmp_path / "img"
    (img / "opt/lib").mkdir(parents=True)
    (img / "etc").mkdir()
    shutil.copyfile(f"{r}/usr/lib/x86_64-linux-gnu/libc.so.6", img / "opt/lib/libc.so.6")
    os.symlink("/opt/lib/libc.so.6", img / "etc/libc-link")
    (img / "etc/hostname").write_text("ID=inside\n")
    os.symlink("/etc/hostname", img / "etc/os-release")
    t = I.identify_file("/etc/libc-link", root=str(img))
    o = t.objects[0]
    assert o.host_path == str(img / "opt/lib/libc.so.6")
    assert o.name == "libc.so.6" and o.glibc_version == "2.36"
    assert t.distro == {"id": "inside"}
    assert t.package_version.startswith("2.36-9+deb12u")   # from the banner: no dpkg status here
    assert t.package_version_from == "banner"


def test_ld_so_cache_parse():
    r = _rootfs("bullseye")
    entries = I.parse_ld_so_cache(SafeRoot(r).read_bytes("/etc/ld.so.cache"))
    names = {k for k, _v, _f in entries}
    assert "libc.so.6" in names and "libresolv.so.2" in names
    assert all(v.startswith("/") for _k, v, _f in entries)


@pytest.mark.parametrize("rel", RELS)
def test_identify_root(rel):
    r = _rootfs(rel)
    t = I.identify_root(r)
    glibc, objs = EXPECT[rel]
    assert t.glibc_version == glibc
    assert [o.name for o in t.objects] == objs
    assert t.distro["codename"] == rel and t.distro["id"] == "debian"
    assert t.package == "libc6" and t.package_version_from == "dpkg"
    assert t.glibc_banner == f"Debian GLIBC {t.package_version}"
    for o in t.objects:
        assert len(o.build_id) == 40 and o.host_path.startswith(r + "/")
        assert o.package_version == t.package_version
    assert t.thread_db and t.thread_db_dir_host.startswith(r)


def test_identify_file_libresolv_alone():
    r = _rootfs("bullseye")
    t = I.identify_file("/lib/x86_64-linux-gnu/libresolv.so.2", root=r)
    assert [o.name for o in t.objects] == ["libresolv.so.2"]
    assert t.objects[0].path == "/usr/lib/x86_64-linux-gnu/libresolv-2.31.so"
    assert t.package_version.startswith("2.31-13+deb11u") and t.glibc_version == "2.31"


def test_identify_file_host_path_under_root():
    r = _rootfs("trixie")
    t = I.identify_file(f"{r}/lib/x86_64-linux-gnu/libc.so.6", root=r)
    assert t.objects[0].path == "/usr/lib/x86_64-linux-gnu/libc.so.6"
    assert t.glibc_version == "2.41"


def test_identify_errors(tmp_path):
    with pytest.raises(I.IdentifyError):
        I.identify_file(str(tmp_path / "nope"))
    (tmp_path / "x").write_text("not elf")
    with pytest.raises(I.IdentifyError):
        I.identify_file(str(tmp_path / "x"))
    with pytest.raises(I.IdentifyError):
        I.identify_process(2 ** 22 + 12345)


@pytest.mark.parametrize("content", [b"not an ELF file\n", b"\x7fELF" + b"\0" * 12])
@pytest.mark.parametrize("command", ["symbols", "check"])
def test_cli_root_whose_libc_is_not_elf(tmp_path, content, command):
    """`gdbdiag symbols|check --root DIR` on a root whose libc.so.6 is no ELF object: one
    line naming the file, exit status 2, nothing written (no cache, the root unchanged)."""
    import subprocess
    import sys

    from support.symbols import tree_snapshot

    r = tmp_path / "root"
    (r / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (r / "etc").mkdir()
    (r / "etc/os-release").write_text("ID=debian\nVERSION_CODENAME=bullseye\n")
    (r / "lib/x86_64-linux-gnu/libc.so.6").write_bytes(content)
    os.symlink("x86_64-linux-gnu/libc.so.6", r / "lib/libc.so.6")
    before = tree_snapshot(str(r))
    cache = tmp_path / "cache"
    with pytest.raises(I.IdentifyError, match="libc.so.6 at /lib/x86_64-linux-gnu/libc.so.6"):
        I.identify_root(str(r))
    argv = [sys.executable, "-m", "gdbdiag.cli", command, "--root", str(r)]
    if command == "symbols":
        argv += ["--cache", str(cache), "--offline"]
    env = {k: v for k, v in os.environ.items() if k != "GDBDIAG_TRACEBACK"}
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"gdbdiag {command}: libc.so.6 at /lib/x86_64-linux-gnu/libc.so.6 in {r}")
    assert "not an ELF file" in lines[0] and p.stdout == ""
    assert not cache.exists() and tree_snapshot(str(r)) == before
    # the switch shows the whole traceback instead
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=dict(env, GDBDIAG_TRACEBACK="1"))
    assert p.returncode == 2 and "Traceback (most recent call last)" in p.stderr
    assert "IdentifyError: libc.so.6 at" in p.stderr
