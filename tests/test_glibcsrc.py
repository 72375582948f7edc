"""glibc source at the target's exact Debian version (gdbdiag.symbols.glibcsrc), with the
real archive: fetch + verify + patch, DWARF names → lines, highlighting, the offline
cache, a local copy of the archive (from an empty cache, a tampered tarball, a pool
file missing).  Downloads are kept under $GDBDIAG_TEST_CACHE/source across runs; every
test also works from an empty one."""
import json
import lzma
import os
import re
import shutil
import sys
import tempfile
import time

import pytest

from gdbdiag.symbols import glibcsrc as G
from gdbdiag.symbols.cache import SymbolCache
from gdbdiag.symbols.net import http_download
from gdbdiag.symbols.archive import Context, DebianArchive, Settings
from support.symbols import TEST_CACHE, blackhole, inrelease, serve_dir

pytestmark = pytest.mark.slow

ROOT = os.path.join(TEST_CACHE, "source")
PERSIST = os.path.join(ROOT, "cache")          # a symbols cache root: CACHE/source/glibc/VERSION
BULLSEYE, BOOKWORM = "2.31-13+deb11u11", "2.36-9+deb12u14"
# where each release sets the sticky flag (searched in the text, never a line number)
STICKY = {BULLSEYE: "statp->options |= RES_SNGLKUP;", BOOKWORM: "statp->_flags |= RES_F_SNGLKUP;"}
FIX = "if (buf2 != NULL && !single_request)"


def _settings(**kw):
    return Settings(timeout=60, progress=False, **kw)


@pytest.fixture(scope="module", params=[BULLSEYE, BOOKWORM])
def tree(request):
    return G.fetch_source(request.param, _settings(), cache_dir=PERSIST)


def _find(tree, needle, after=None) -> int:
    lines = tree.text("resolv/res_send.c").split("\n")
    start = 0 if after is None else after
    return next(i for i, ln in enumerate(lines[start:], start + 1) if needle in ln)


def _error_path(tree) -> int:
    """The `if (buf2 != NULL ...)` that follows the SERVFAIL/NOTIMP/REFUSED test in send_dg."""
    servfail = _find(tree, "anhp->rcode == SERVFAIL")
    return _find(tree, "if (buf2 != NULL", after=servfail)


def _assert_clean(root):
    tmp = os.path.join(root, "tmp")
    assert not os.path.isdir(tmp) or os.listdir(tmp) == [], os.listdir(tmp)
    for dp, _d, files in os.walk(root):
        assert not [f for f in files if f.startswith((".tmp-", ".patch-")) or f.endswith(".part")], (dp, files)


# ---------------------------------------------------------------------------------
# the real archive
# ---------------------------------------------------------------------------------
def test_fetch_verified(tree):
    d = G.describe(tree)
    json.dumps(d)
    fam = {BULLSEYE: "bullseye", BOOKWORM: "bookworm"}[tree.version]
    assert d["version"] == tree.version and d["package"] == "glibc"
    assert d["origin"].startswith(f"debian {fam}") and d["origin"].endswith(f"glibc {tree.version}")
    assert d["verified"][0].startswith("InRelease gpgv (") and "Debian" in d["verified"][0]
    assert {"Sources SHA256", ".dsc SHA256"} <= set(d["verified"])
    names = [f["name"] for f in d["files"]]
    assert names[0] == f"glibc_{tree.version}.dsc"
    assert any(n.endswith(".orig.tar.xz") for n in names) and f"glibc_{tree.version}.debian.tar.xz" in names
    assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) for f in d["files"])
    assert d["patches_failed"] == []
    assert "git-updates.diff" in d["patches_applied"] and d["patches_skipped"]
    assert d["series"] == len(d["patches_applied"]) + len(d["patches_skipped"])
    assert "resolv/res_send.c" in tree.files and d["tree_files"] == len(tree.files) > 100
    assert d["patched_files"]["resolv/res_send.c"]
    assert tree.root == os.path.join(G.source_dir(tree.version, PERSIST), "tree")
    _assert_clean(PERSIST)


def test_lines_around_sticky_path(tree):
    n = _find(tree, STICKY[tree.version])
    got = tree.lines("./resolv/res_send.c", n)
    assert [k for k, _ in got] == list(range(n - 4, n + 5))
    assert STICKY[tree.version] in dict(got)[n]
    # the same lines whatever form the DWARF name takes
    for name, comp_dir in [("resolv/res_send.c", None), ("res_send.c", None),
                           ("res_send.c", "/build/glibc-AbCdEf/resolv"),
                           ("/build/glibc-AbCdEf/resolv/res_send.c", None),
                           ("../resolv/res_send.c", "/build/glibc-AbCdEf/nss")]:
        assert tree.lines(name, n, comp_dir=comp_dir) == got, (name, comp_dir)
    assert tree.lines("./resolv/res_send.c", n, context=1) == got[3:6]
    assert tree.lines("./resolv/no_such_file.c", n) == []
    assert tree.lines("/usr/include/stdio_nonexistent.h", 3) == []
    assert tree.lines("./resolv/res_send.c", 10 ** 6) == []
    assert tree.lines("./resolv/res_send.c", 1)[0] == (1, tree.text("resolv/res_send.c").split("\n")[0])

    # the error-answer path of send_dg: Debian's bookworm carries the 30081 fix, bullseye does not
    e = _error_path(tree)
    text = dict(tree.lines("./resolv/res_send.c", e))[e]
    src = tree.text("resolv/res_send.c")
    if tree.version == BOOKWORM:
        assert FIX in text and FIX in src
    else:
        assert FIX not in src and text.strip() == "if (buf2 != NULL)"


@pytest.mark.parametrize("rel", ["bullseye", "bookworm"])
def test_dwarf_line_of_sticky_write(rel):
    """End to end with the real binary: the PC of send_dg's sticky write → its DWARF
    line (gdb) → that line of our tree sets the flag. The lab's rootfs of ``rel``, its
    debug files fetched and verified, and the source of that very package version."""
    import subprocess

    from gdbdiag.glibc.analyzer import analyze_object
    from gdbdiag.symbols.identify import identify_root
    from gdbdiag.symbols.sources import fetch_symbols
    from support.symbols import rootfs

    ident = identify_root(rootfs(rel))
    tree = G.fetch_source(ident.package_version, _settings(), cache_dir=PERSIST)
    cache = SymbolCache(os.path.join(TEST_CACHE, "cache"))
    res = fetch_symbols(ident, _settings(), cache)
    assert res.ok, res.to_dict()
    sticky = {"bullseye": STICKY[BULLSEYE], "bookworm": STICKY[BOOKWORM]}[rel]
    seen = []
    for o in ident.objects:
        argv = ["gdb", "-nx", "-batch", "-ex", f"set debug-file-directory {cache.debug_dir}", "-ex", f"file {o.host_path}"]
        a = analyze_object(o.host_path)
        writes = [w for w in a["sticky_writers"] if w.get("in_send_dg") and w["bit"] == "RES_SNGLKUP"]
        if not writes:
            continue                      # this object does not hold send_dg
        addr = hex(writes[0]["addr"])
        info = subprocess.run(argv + ["-ex", f"info line *{addr}"], capture_output=True, text=True, timeout=120).stdout
        m = re.search(r'Line (\d+) of "([^"]+)"', info)
        assert m, info
        n, name = int(m.group(1)), m.group(2)
        got = dict(tree.lines(name, n))
        assert sticky in got[n], (o.name, name, n, got)
        seen.append(o.name)
    assert seen == [{"bullseye": "libresolv.so.2", "bookworm": "libc.so.6"}[rel]], seen


def test_second_call_offline(tree):
    with blackhole() as dead:     # any network use would hang or fail
        s = Settings(timeout=2, progress=False, debian_mirror=dead, debian_security_mirror=dead)
        t0 = time.monotonic()
        again = G.fetch_source(tree.version, s, cache_dir=PERSIST)
        off = G.fetch_source(tree.version, s, cache_dir=PERSIST, offline=True)
        assert time.monotonic() - t0 < 1.0
    assert again.root == off.root == tree.root and G.describe(off) == G.describe(tree)
    assert G.load_cached(tree.version, PERSIST).meta == tree.meta


def test_offline_not_cached(tmp_path):
    with pytest.raises(G.NotCached) as ei:
        G.fetch_source(BOOKWORM, cache_dir=str(tmp_path), offline=True)
    assert "\n" not in str(ei.value) and "not in the cache" in ei.value.reason
    with pytest.raises(G.NotCached):
        G.fetch_source(BOOKWORM, Settings(offline=True), cache_dir=str(tmp_path))
    with pytest.raises(G.GlibcSourceError):
        G.fetch_source("../../etc", cache_dir=str(tmp_path), offline=True)
    assert not os.path.exists(tmp_path / "source")


def test_version_not_in_archive(tree):
    # the family's indices are already cached by the fetch above: no big download here
    bogus = tree.version[:-2] + "99"
    with pytest.raises(G.SourceNotFound) as ei:
        G.fetch_source(bogus, _settings(), cache_dir=PERSIST)
    msg = str(ei.value)
    assert "\n" not in msg and f"glibc source {bogus} is in none of" in msg
    assert not os.path.exists(G.source_dir(bogus, PERSIST))
    _assert_clean(PERSIST)


def test_damaged_cache_entry_detected(tree, tmp_path):
    src = os.path.dirname(tree.root)
    copy = tmp_path / "source" / "glibc" / tree.version
    shutil.copytree(src, copy)
    p = copy / "tree" / "resolv" / "res_send.c"
    data = bytearray(p.read_bytes())
    data[100] ^= 1
    p.write_bytes(bytes(data))
    t = G.load_cached(tree.version, str(tmp_path))
    with pytest.raises(G.GlibcSourceError, match="does not match its manifest"):
        t.lines("./resolv/res_send.c", 10)


# ---------------------------------------------------------------------------------
# highlighting
# ---------------------------------------------------------------------------------
def test_highlight(tree, monkeypatch):
    n = _find(tree, STICKY[tree.version])
    lines = tree.lines("./resolv/res_send.c", n)
    plain = G.highlight(lines, n, color=False)
    rows = plain.splitlines()
    assert len(rows) == 9 and "\x1b[" not in plain
    marked = [r for r in rows if r.startswith("=>")]
    assert marked == [f"=> {n}\t" + dict(lines)[n].expandtabs(8)]
    assert rows[0] == f"   {n - 4}\t" + lines[0][1].expandtabs(8)

    colored = G.highlight(lines, n, color=True)
    crow = colored.splitlines()
    assert "\x1b[" in colored and len(crow) == 9
    assert [i for i, r in enumerate(crow) if r.startswith("=>")] == [4]
    assert crow[4].startswith(f"=> {n}\t")
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored) == plain

    # no pygments: plain text, even when colour is asked for
    monkeypatch.setitem(sys.modules, "pygments", None)
    assert G.highlight(lines, n, color=True) == plain
    assert G.highlight([], n, color=True) == ""
    # widths: the marker column stays aligned across a digit change
    out = G.highlight([(99, "a;"), (100, "b;")], 100, color=False).splitlines()
    assert out == ["    99\ta;", "=> 100\tb;"]


# ---------------------------------------------------------------------------------
# patches (no network)
# ---------------------------------------------------------------------------------
def test_split_patch():
    patch = ("Some description\n--- a/resolv/x.c\n+++ b/resolv/x.c\n@@ -1,3 +1,3 @@\n one\n"
             "--- two is a removed line that looks like a header\n+++ two, added\n three\n"
             "--- /dev/null\n+++ b/resolv/new.c\n@@ -0,0 +1,2 @@\n+a\n+b\n"
             "--- glibc.orig/elsewhere/y.c\t2020-01-01 00:00:00.000000000 +0000\n"
             "+++ glibc/elsewhere/y.c  2020-01-01 00:00:00.000000000 +0000\n@@ -5 +5 @@\n-x\n+y\n")
    fps = G.split_patch(patch)
    assert [(f.old, f.new) for f in fps] == [("resolv/x.c", "resolv/x.c"), (None, "resolv/new.c"),
                                            ("elsewhere/y.c", "elsewhere/y.c")]
    assert fps[0].render() == ("--- a/resolv/x.c\n+++ b/resolv/x.c\n@@ -1,3 +1,3 @@\n one\n"
                               "--- two is a removed line that looks like a header\n+++ two, added\n three\n")
    assert fps[1].render().startswith("--- /dev/null\n+++ b/resolv/new.c\n@@ -0,0 +1,2 @@")
    # binary sections change no text: left out
    assert G.split_patch("diff --git a/i.png b/i.png\nindex 1..2 100644\n"
                         "Binary files a/i.png and b/i.png differ\n") == []
    with pytest.raises(ValueError, match="unparsable"):
        G.split_patch("--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n-one\n+two\n@@ garbage\n")
    assert G.parse_series("# comment\nfirst.diff\n\nsecond.diff -p0  # why\n") == [
        ("first.diff", 1), ("second.diff", 0)]


def test_patcher_gnu_patch(tmp_path):
    """The series applied with GNU patch: exact context found at an offset, form feeds
    (not line ends), a created file; skipped when no extracted file is touched; a patch
    that does not apply whole is applied file by file, the rest reported."""
    root = tmp_path / "entry" / "tree"
    (root / "resolv").mkdir(parents=True)
    (root / "resolv/x.c").write_text("zero\none\n-- two\nthree\n")
    (root / "resolv/ff.c").write_text("a\n\x0c\nb\n")
    (root / "resolv/z.c").write_text("keep\n")
    pt = G.Patcher(str(root))
    pt.series("offset.diff", "--- a/resolv/x.c\n+++ b/resolv/x.c\n@@ -1,3 +1,3 @@\n one\n--- two\n+++ two\n three\n", 1)
    pt.series("ff.diff", "--- a/resolv/ff.c\n+++ b/resolv/ff.c\n@@ -2,2 +2,2 @@\n \x0c\n-b\n+c\n", 1)
    pt.series("new.diff", "--- /dev/null\n+++ b/resolv/new.c\n@@ -0,0 +1,2 @@\n+a\n+b\n", 1)
    pt.series("elsewhere.diff", "--- a/elsewhere/y.c\n+++ b/elsewhere/y.c\n@@ -5 +5 @@\n-x\n+y\n", 1)
    half = ("--- a/resolv/z.c\n+++ b/resolv/z.c\n@@ -1 +1 @@\n-keep\n+kept\n"
            "--- a/resolv/x.c\n+++ b/resolv/x.c\n@@ -1 +1 @@\n-no such line\n+x\n")
    pt.series("half.diff", half, 1)
    pt.missing("gone.diff")
    assert (root / "resolv/x.c").read_text() == "zero\none\n++ two\nthree\n"
    assert (root / "resolv/ff.c").read_text() == "a\n\x0c\nc\n"
    assert (root / "resolv/new.c").read_text() == "a\nb\n"
    assert (root / "resolv/z.c").read_text() == "kept\n"
    assert pt.applied == ["offset.diff", "ff.diff", "new.diff"] and pt.skipped == ["elsewhere.diff"]
    assert [f["patch"] for f in pt.failed] == ["half.diff", "gone.diff"]
    assert pt.failed[0]["files"] == ["resolv/x.c"] and pt.failed[0]["applied_files"] == ["resolv/z.c"]
    assert "\n" not in pt.failed[0]["reason"] and pt.failed[0]["reason"]
    assert pt.touched == {"resolv/x.c": ["offset.diff"], "resolv/ff.c": ["ff.diff"],
                          "resolv/new.c": ["new.diff"], "resolv/z.c": ["half.diff"]}
    assert sorted(os.listdir(tmp_path / "entry")) == ["tree"]          # no patch file left behind
    assert not [f for f in os.listdir(root / "resolv") if f.endswith((".orig", ".rej"))]


# ---------------------------------------------------------------------------------
# a local copy of the archive: from an empty cache, tampered, pool file missing
# ---------------------------------------------------------------------------------
def _atomic_copy_url(url, dest, sha=None):
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = f"{dest}.{os.getpid()}.part"
    if os.path.exists(part):
        os.unlink(part)
    http_download(url, part, timeout=60, expect_sha256=sha, progress=False)
    os.replace(part, dest)
    return dest


def _suite_snapshot(base, suite):
    """A consistent (InRelease, Sources.xz) pair of ``suite``, kept in ROOT/mirror-src."""
    ref = os.path.join(ROOT, "mirror-src", suite)
    for attempt in range(2):
        inrel, rel = inrelease(base, suite, ref, refresh=bool(attempt))
        e = next(x for x in rel["SHA256"] if x["name"] == "main/source/Sources.xz")
        try:
            src = _atomic_copy_url(f"{base}/dists/{suite}/main/source/by-hash/SHA256/{e['sha256']}",
                                   os.path.join(ref, e["sha256"]), e["sha256"])
            return inrel, src, e["sha256"]
        except Exception:
            if attempt:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def local_archive(tmp_path_factory):
    """A local archive layout holding glibc BULLSEYE: real signed InRelease, real
    Sources.xz, real .dsc and tarballs (downloaded once through the verified chain)."""
    arch = DebianArchive(Context(_settings(), SymbolCache(PERSIST)))
    for base, suite in [("http://deb.debian.org/debian-security", "bullseye-security"),
                        ("http://deb.debian.org/debian", "bullseye")]:
        inrel, sources, _sha = _suite_snapshot(base, suite)
        with lzma.open(sources, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
        if f"\nVersion: {BULLSEYE}\n" in text and "Package: glibc\n" in text:
            break
    else:
        raise AssertionError(f"glibc {BULLSEYE} is in neither bullseye nor bullseye-security")
    ent = arch.find_source("glibc", BULLSEYE, [(base, suite)])
    assert ent, (suite, BULLSEYE)
    pool = os.path.join(ROOT, "pool")
    os.makedirs(pool, exist_ok=True)
    local = {}
    for f in ent["files"]:
        dest = os.path.join(pool, f["name"])
        if not (os.path.isfile(dest) and os.path.getsize(dest) == f["size"]):
            tmp = tempfile.mkdtemp(dir=pool)
            try:
                os.replace(arch.download_source_file(ent, f["name"], tmp), dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        local[f["name"]] = dest
    m = tmp_path_factory.mktemp("archive")
    dd = m / "dists" / suite
    (dd / "main/source/by-hash/SHA256").mkdir(parents=True)
    shutil.copyfile(inrel, dd / "InRelease")
    shutil.copyfile(sources, dd / "main/source/Sources.xz")
    shutil.copyfile(sources, dd / "main/source/by-hash/SHA256" / os.path.basename(sources))
    pooldir = m / ent["Directory"]
    pooldir.mkdir(parents=True)
    for name, p in local.items():
        shutil.copyfile(p, pooldir / name)
    with serve_dir(str(m)) as url:
        yield {"url": url, "dir": m, "suite": suite, "pooldir": pooldir, "ent": ent}


def _local_settings(la, **kw):
    return Settings(debian_mirror=la["url"], debian_security_mirror=la["url"], debian_suites=[la["suite"]],
                    timeout=10, progress=False, **kw)


def _seeded(path, frm):
    shutil.copytree(os.path.join(frm, "index"), os.path.join(path, "index"))
    return str(path)


@pytest.fixture(scope="module")
def local_cache(local_archive, tmp_path_factory):
    """BULLSEYE fetched from the local archive into an EMPTY cache."""
    c = str(tmp_path_factory.mktemp("cache"))
    t = G.fetch_source(BULLSEYE, _local_settings(local_archive), cache_dir=c)
    return c, t


def test_local_archive_from_empty_cache(local_archive, local_cache):
    c, t = local_cache
    ref = G.fetch_source(BULLSEYE, _settings(), cache_dir=PERSIST)
    d = G.describe(t)
    assert d["origin"] == f"debian {local_archive['suite']}/main glibc {BULLSEYE}"
    assert d["patch_tool"] == "GNU patch -F0" and d["patches_failed"] == []
    # the same tree, byte for byte, whichever mirror
    assert t.meta["manifest"] == ref.meta["manifest"]
    assert d["patches_applied"] == G.describe(ref)["patches_applied"]
    assert os.listdir(os.path.join(c, "source", "glibc")) == [BULLSEYE]
    _assert_clean(c)


def test_tampered_tarball_refused(local_archive, local_cache, tmp_path):
    c = _seeded(tmp_path / "cache", local_cache[0])     # index cached: only the package files are fetched
    orig = next(f["name"] for f in local_archive["ent"]["files"] if ".orig.tar." in f["name"])
    p = local_archive["pooldir"] / orig
    good = p.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x40
    p.write_bytes(bytes(bad))
    try:
        with pytest.raises(G.GlibcSourceError) as ei:
            G.fetch_source(BULLSEYE, _local_settings(local_archive), cache_dir=c)
    finally:
        p.write_bytes(good)
    msg = str(ei.value)
    assert "\n" not in msg and "SHA256 mismatch" in msg and orig in msg and "refused" in msg
    assert not isinstance(ei.value, G.SourceNotFound)
    assert not os.path.exists(os.path.join(c, "source"))
    _assert_clean(c)


def test_pool_file_missing(local_archive, local_cache, tmp_path):
    c = _seeded(tmp_path / "cache", local_cache[0])
    dsc = local_archive["pooldir"] / f"glibc_{BULLSEYE}.dsc"
    keep = tmp_path / "keep.dsc"
    os.replace(dsc, keep)
    try:
        with pytest.raises(G.SourceNotFound) as ei:
            G.fetch_source(BULLSEYE, _local_settings(local_archive), cache_dir=c)
    finally:
        os.replace(keep, dsc)
    msg = str(ei.value)
    assert "\n" not in msg and "missing from the pool" in msg and "not trying another version" in msg
    assert not os.path.exists(os.path.join(c, "source"))
    _assert_clean(c)
