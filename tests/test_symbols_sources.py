"""Sources end to end, with real packages: Debian's archive (real and a local copy),
Ubuntu layouts and debuginfod on a local HTTP server, local files; refusals leave the
cache unchanged."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from gdbdiag.symbols import sources as S
from gdbdiag.symbols.cache import SymbolCache
from gdbdiag.symbols.elfinfo import read_build_id
from gdbdiag.symbols.identify import identify_file, identify_root
from support.symbols import (TEST_CACHE, blackhole, build_deb, debian_mirror, extract_debug_files,
                                     real_deb, rootfs, serve_dir, tree_snapshot)

pytestmark = pytest.mark.slow
RELS = ["bullseye", "bookworm", "trixie"]
PERSISTENT = os.path.join(TEST_CACHE, "cache")


def _rootfs(rel):
    d = rootfs(rel)
    assert d is not None, f"no {rel} rootfs under $GDBDIAG_ROOTFS_BASE"
    return d


def _seeded_cache(path) -> SymbolCache:
    """A fresh cache that reuses the persistent *index* (InRelease / parsed Packages)
    so repeated runs do not download the big Packages files again."""
    src = os.path.join(PERSISTENT, "index")
    if os.path.isdir(src):
        shutil.copytree(src, os.path.join(path, "index"))
    return SymbolCache(str(path))


def _save_index(cache: SymbolCache):
    """Keep new index files for later runs (atomically: other runs may be reading)."""
    dst_root = os.path.join(PERSISTENT, "index")
    for dp, _dirs, files in os.walk(cache.index_dir):
        for fn in files:
            src = os.path.join(dp, fn)
            dst = os.path.join(dst_root, os.path.relpath(src, cache.index_dir))
            if not os.path.exists(dst) or fn == "InRelease":
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy2(src, dst + ".part")
                os.replace(dst + ".part", dst)


def _assert_clean(cache: SymbolCache):
    tmp = os.path.join(cache.root, "tmp")
    assert not os.path.isdir(tmp) or os.listdir(tmp) == [], os.listdir(tmp)
    for dp, _d, files in os.walk(cache.root):
        assert not [f for f in files if f.startswith(".tmp-") or f.endswith(".part")], (dp, files)


def _assert_verified(res, cache):
    assert res.ok, [(o.name, o.error) for o in res.objects]
    for o in res.objects:
        assert o.debug_file == cache.debug_path(o.build_id)
        assert read_build_id(o.debug_file) == o.build_id


def _debug_state(cache):
    return {k: v for k, v in tree_snapshot(cache.root).items() if k.startswith(("debug", "meta"))}


# ---------------------------------------------------------------------------------
# the real Debian archive
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", RELS)
def test_debian_archive_real_then_offline(rel, tmp_path):
    r = _rootfs(rel)
    t = identify_root(r)
    cache = _seeded_cache(tmp_path / "cache")
    res = S.fetch_symbols(t, S.Settings(sources=["debian"], timeout=60, progress=False), cache)
    _assert_verified(res, cache)
    _save_index(cache)
    for o in res.objects:
        assert o.origin.startswith(f"debian {rel}") and o.origin.endswith(t.package_version)
        assert o.verified[0].startswith("InRelease gpgv (Debian")
        assert {"Packages SHA256", ".deb SHA256", "build-id"} <= set(o.verified)
        meta = cache.meta(o.build_id)
        assert meta["origin"] == o.origin and meta["object"] == o.name
    _assert_clean(cache)
    before = _debug_state(cache)
    # second run: offline, archive unreachable on purpose -> served from the cache
    with blackhole() as url:
        s = S.Settings(sources=["debian"], offline=True, debian_mirror=url, debian_security_mirror=url, timeout=1)
        t0 = time.monotonic()
        res2 = S.fetch_symbols(t, s, cache)
    assert time.monotonic() - t0 < 5
    _assert_verified(res2, cache)
    assert all(o.origin.startswith("cache (debian ") for o in res2.objects)
    assert _debug_state(cache) == before


def test_cli_symbols_offline_json(tmp_path):
    r = _rootfs("bullseye")
    cache = tmp_path / "cache"
    out = tmp_path / "out.json"
    cli = [sys.executable, "-m", "gdbdiag.cli", "symbols", "--file", "/lib/x86_64-linux-gnu/libc.so.6",
           "--root", r, "--cache", str(cache), "--json", str(out)]
    p = subprocess.run(cli + ["--offline"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "not in the cache (--offline)" in p.stdout
    # fill the cache from a local --local package, then offline works
    t = identify_file("/lib/x86_64-linux-gnu/libc.so.6", root=r)
    deb, *_ = real_deb("libc6-dbg", t.package_version)
    p = subprocess.run(cli + ["--sources", "local", "--local", deb], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run(cli + ["--offline"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(out.read_text())
    assert d["schema"] == "gdbdiag.symbols/1" and d["ok"] is True
    assert d["debug_file_directory"] == str(cache / "debug")
    (o,) = d["objects"]
    assert o["name"] == "libc.so.6" and o["debug_file"].startswith(str(cache / "debug/.build-id/"))
    assert o["origin"].startswith("cache (local package ")
    assert d["target"]["distro"]["codename"] == "bullseye"
    assert d["target"]["package_version"] == t.package_version


# ---------------------------------------------------------------------------------
# a local copy of the Debian archive: the signed chain, tampering, no answer
# ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bullseye():
    r = rootfs("bullseye")
    assert r is not None, "no bullseye rootfs under $GDBDIAG_ROOTFS_BASE"
    t = identify_root(r)
    deb, ent, _base, suite = real_deb("libc6-dbg", t.package_version)
    # the lab's rootfs is debootstrapped from bullseye (no -security): its libc is there
    assert suite == "bullseye", (t.package_version, suite)
    return t, deb, ent


def _mirror_settings(url, **kw):
    return S.Settings(sources=["debian"], debian_mirror=url, debian_security_mirror=url,
                      debian_suites=["bullseye"], timeout=10, progress=False, **kw)


def test_debian_local_mirror_full_chain(bullseye, tmp_path):
    t, deb, ent = bullseye
    m = debian_mirror(str(tmp_path / "m"), "bullseye", {ent["Filename"]: deb})
    cache = SymbolCache(str(tmp_path / "cache"))
    with serve_dir(m) as url:
        res = S.fetch_symbols(t, _mirror_settings(url), cache)
        _assert_verified(res, cache)
        # the index is cached: a second cache-less fetch of the same suite needs no Packages download
        os.unlink(os.path.join(m, "dists/bullseye/main/binary-amd64/Packages.xz"))
        shutil.rmtree(os.path.join(m, "dists/bullseye/main/binary-amd64/by-hash"))
        shutil.rmtree(cache.debug_dir)
        res = S.fetch_symbols(t, _mirror_settings(url), cache)
        _assert_verified(res, cache)
    _assert_clean(cache)


def _refused(res, cache, before, needle):
    assert not res.ok
    reasons = [a.reason for a in res.attempts if not a.ok]
    assert reasons and needle in reasons[0], reasons
    assert all("\n" not in x for x in reasons)
    for o in res.objects:
        assert o.debug_file is None and o.error and "\n" not in o.error
    assert _debug_state(cache) == before
    _assert_clean(cache)


def test_tampered_deb_refused(bullseye, tmp_path):
    t, deb, ent = bullseye
    bad = tmp_path / "bad.deb"
    data = bytearray(open(deb, "rb").read())
    data[len(data) // 3] ^= 0xFF
    bad.write_bytes(bytes(data))
    m = debian_mirror(str(tmp_path / "m"), "bullseye", {ent["Filename"]: str(bad)})
    cache = SymbolCache(str(tmp_path / "cache"))
    before = _debug_state(cache)
    with serve_dir(m) as url:
        res = S.fetch_symbols(t, _mirror_settings(url), cache)
    _refused(res, cache, before, "SHA256 mismatch")


def test_bad_inrelease_signature_refused(bullseye, tmp_path):
    t, deb, ent = bullseye
    m = debian_mirror(str(tmp_path / "m"), "bullseye", {ent["Filename"]: deb})
    p = os.path.join(m, "dists/bullseye/InRelease")
    text = open(p).read()
    assert "\nSuite: " in text
    open(p, "w").write(text.replace("\nSuite: ", "\nSuite: x", 1))
    cache = SymbolCache(str(tmp_path / "cache"))
    with serve_dir(m) as url:
        res = S.fetch_symbols(t, _mirror_settings(url), cache)
    _refused(res, cache, {}, "signature check failed")
    assert not os.path.exists(os.path.join(cache.index_dir, "debian"))  # unverified InRelease not cached


def test_tampered_packages_refused(bullseye, tmp_path):
    t, deb, ent = bullseye
    m = debian_mirror(str(tmp_path / "m"), "bullseye", {ent["Filename"]: deb})
    bh = os.path.join(m, "dists/bullseye/main/binary-amd64/by-hash/SHA256")
    for f in os.listdir(bh) + ["../../Packages.xz"]:
        with open(os.path.join(bh, f), "r+b") as fh:
            fh.seek(1000)
            b = fh.read(1)
            fh.seek(1000)
            fh.write(bytes([b[0] ^ 0xFF]))
    cache = SymbolCache(str(tmp_path / "cache"))
    with serve_dir(m) as url:
        res = S.fetch_symbols(t, _mirror_settings(url), cache)
    _refused(res, cache, {}, "SHA256 mismatch")


def test_archive_not_answering(bullseye, tmp_path):
    t, _deb, _ent = bullseye
    cache = SymbolCache(str(tmp_path / "cache"))
    with blackhole() as url:
        s = S.Settings(sources=["debian"], debian_mirror=url, debian_security_mirror=url, timeout=1, progress=False)
        t0 = time.monotonic()
        res = S.fetch_symbols(t, s, cache)
    assert time.monotonic() - t0 < 8      # one timeout, then the host is known dead
    _refused(res, cache, {}, "no answer within 1s")


def test_version_not_in_archive(bullseye, tmp_path):
    t, deb, ent = bullseye
    m = debian_mirror(str(tmp_path / "m"), "bullseye", {ent["Filename"]: deb})
    t.package_version = "2.31-13+deb11u99"
    try:
        cache = SymbolCache(str(tmp_path / "cache"))
        with serve_dir(m) as url:
            res = S.fetch_symbols(t, _mirror_settings(url), cache)
        _refused(res, cache, {}, "libc6-dbg 2.31-13+deb11u99 (amd64) is in none of bullseye")
    finally:
        t.package_version = identify_root(rootfs("bullseye")).package_version


# ---------------------------------------------------------------------------------
# Ubuntu layouts and debuginfod on a local server, built from the real Debian package
# ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixtures(bullseye, tmp_path_factory):
    t, deb, ent = bullseye
    v = t.package_version
    ids = {o.name: o.build_id for o in t.objects}
    root = tmp_path_factory.mktemp("http")
    files = extract_debug_files(deb, set(ids.values()), str(tmp_path_factory.mktemp("dbg")))
    pool = "pool/main/g/glibc"
    # Ubuntu archive layout: the real package at an Ubuntu pool path
    os.makedirs(root / "archive" / pool)
    shutil.copyfile(deb, root / "archive" / pool / f"libc6-dbg_{v}_amd64.deb")
    # path-based layout (Ubuntu 18.04 style): usr/lib/debug/lib/x86_64-linux-gnu/libc-2.31.so
    os.makedirs(root / "pathbased" / pool)
    build_deb(str(root / "pathbased" / pool / f"libc6-dbg_{v}_amd64.deb"), {
        f"/usr/lib/debug/lib/x86_64-linux-gnu/{n.split('.so')[0]}-2.31.so": files[b] for n, b in ids.items()},
        version=v, compression="gz")
    # ddebs: libc6-dbgsym .ddeb, build-id layout, zstd
    os.makedirs(root / "ddebs" / pool)
    build_deb(str(root / "ddebs" / pool / f"libc6-dbgsym_{v}_amd64.ddeb"), {
        f"/usr/lib/debug/.build-id/{b[:2]}/{b[2:]}.debug": files[b] for b in ids.values()},
        package="libc6-dbgsym", version=v, compression="zst")
    # Launchpad +files
    lp = root / "launchpad/ubuntu/+archive/primary/+files"
    os.makedirs(lp)
    shutil.copyfile(deb, lp / f"libc6-dbg_{v}_amd64.deb")
    # debuginfod: buildid/ID/debuginfo; and a server that answers with the wrong file
    for b, p in files.items():
        os.makedirs(root / "debuginfod/buildid" / b)
        shutil.copyfile(p, root / "debuginfod/buildid" / b / "debuginfo")
        os.makedirs(root / "liar/buildid" / b)
        other = [x for x in files if x != b][0]
        shutil.copyfile(files[other], root / "liar/buildid" / b / "debuginfo")
    os.makedirs(root / "empty")
    with serve_dir(str(root)) as url:
        yield t, url, ids, files


def _ubuntu(url, archive="empty", ddebs="empty", lp="empty"):
    return S.Settings(sources=["ubuntu"], ubuntu_mirror=f"{url}/{archive}", ubuntu_ddebs=f"{url}/{ddebs}",
                      launchpad_url=f"{url}/{lp}", timeout=10, progress=False)


@pytest.mark.parametrize("layout,kw,origin", [
    ("archive", {"archive": "archive"}, "ubuntu archive libc6-dbg_"),
    ("path-based", {"archive": "pathbased"}, "ubuntu archive libc6-dbg_"),
    ("ddebs", {"ddebs": "ddebs"}, "ubuntu ddebs libc6-dbgsym_"),
    ("launchpad", {"lp": "launchpad"}, "ubuntu launchpad libc6-dbg_"),
])
def test_ubuntu_layouts(fixtures, tmp_path, layout, kw, origin):
    t, url, ids, files = fixtures
    cache = SymbolCache(str(tmp_path / "cache"))
    res = S.fetch_symbols(t, _ubuntu(url, **kw), cache)
    _assert_verified(res, cache)
    assert all(o.origin.startswith(origin) for o in res.objects), [o.origin for o in res.objects]
    assert all("no archive signature checked (Ubuntu source)" in o.verified for o in res.objects)
    _assert_clean(cache)


def test_ubuntu_not_applicable_without_mirror(fixtures, tmp_path):
    t, url, ids, files = fixtures
    res = S.fetch_symbols(t, S.Settings(sources=["ubuntu"], ubuntu_mirror=None, ubuntu_ddebs=None,
                                        launchpad_url=None), SymbolCache(str(tmp_path / "c")))
    assert not res.ok and res.attempts[0].reason.startswith("skipped: ")


def test_debuginfod(fixtures, tmp_path):
    t, url, ids, files = fixtures
    cache = SymbolCache(str(tmp_path / "cache"))
    s = S.Settings(sources=["debian", "debuginfod"], debian_mirror=f"{url}/empty",
                   debian_security_mirror=f"{url}/empty", debian_suites=["bullseye"],
                   debuginfod_urls=[f"{url}/empty", f"{url}/debuginfod"], timeout=10, progress=False)
    res = S.fetch_symbols(t, s, cache)
    _assert_verified(res, cache)
    assert [a.source for a in res.attempts] == ["debian", "debuginfod"]
    assert not res.attempts[0].ok and "no InRelease" in res.attempts[0].reason
    assert all(o.origin == f"debuginfod {url}/debuginfod" for o in res.objects)


def test_debuginfod_env(fixtures, tmp_path, monkeypatch):
    t, url, ids, files = fixtures
    monkeypatch.setenv("DEBUGINFOD_URLS", f"{url}/debuginfod")
    res = S.fetch_symbols(t, S.Settings(sources=["debuginfod"]), SymbolCache(str(tmp_path / "c")))
    assert res.ok


def test_wrong_build_id_refused(fixtures, tmp_path):
    t, url, ids, files = fixtures
    cache = SymbolCache(str(tmp_path / "cache"))
    res = S.fetch_symbols(t, S.Settings(sources=["debuginfod"], debuginfod_urls=[f"{url}/liar"], timeout=10,
                                        progress=False), cache)
    _refused(res, cache, {}, "refused: build-id mismatch")
    assert not os.path.exists(cache.debug_dir) or not any(os.scandir(os.path.join(cache.debug_dir, ".build-id")))


def test_local_sources(fixtures, bullseye, tmp_path):
    t, url, ids, files = fixtures
    _t, deb, _ent = bullseye
    # a directory in the path-based layout, and a lone wrong file
    d = tmp_path / "tree/lib/x86_64-linux-gnu"
    d.mkdir(parents=True)
    for n, b in ids.items():
        shutil.copyfile(files[b], d / n)
    res = S.fetch_symbols(t, S.Settings(sources=["local"], local=[str(tmp_path / "tree")]),
                          SymbolCache(str(tmp_path / "c1")))
    _assert_verified(res, SymbolCache(str(tmp_path / "c1")))
    assert all(o.origin == f"local dir {tmp_path / 'tree'}" for o in res.objects)
    assert all(os.path.exists(files[b]) for b in ids.values())     # a user's files are copied, not moved
    res = S.fetch_symbols(t, S.Settings(sources=["local"], local=[deb]), SymbolCache(str(tmp_path / "c2")))
    assert res.ok
    cache = SymbolCache(str(tmp_path / "c3"))
    res = S.fetch_symbols(t, S.Settings(sources=["local"], local=[files[ids["libresolv.so.2"]]]), cache)
    assert [o.name for o in res.objects if o.debug_file] == ["libresolv.so.2"]
    # a lone file that is not the target's: refused, cache unchanged
    libc_only = identify_file("/lib/x86_64-linux-gnu/libc.so.6", root=rootfs("bullseye"))
    cache = SymbolCache(str(tmp_path / "c4"))
    res = S.fetch_symbols(libc_only, S.Settings(sources=["local"], local=[files[ids["libresolv.so.2"]]]), cache)
    _refused(res, cache, {}, "refused: build-id mismatch")


def test_cli_ubuntu_and_debuginfod_end_to_end(fixtures, tmp_path):
    t, url, ids, files = fixtures
    r = rootfs("bullseye")
    for extra in (["--sources", "ubuntu", "--ubuntu-mirror", f"{url}/pathbased", "--ubuntu-ddebs", f"{url}/empty",
                   "--launchpad-url", f"{url}/empty"],
                  ["--sources", "debuginfod", "--debuginfod-url", f"{url}/debuginfod"]):
        out = tmp_path / "o.json"
        cache = tmp_path / ("c" + extra[1])
        p = subprocess.run([sys.executable, "-m", "gdbdiag.cli", "symbols", "--root", r, "--cache", str(cache),
                            "--json", str(out), "--no-progress", "--timeout", "10"] + extra,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        d = json.loads(out.read_text())
        assert d["ok"] and [o["name"] for o in d["objects"]] == ["libc.so.6", "libresolv.so.2", "libnss_dns.so.2"]
        for o in d["objects"]:
            assert read_build_id(o["debug_file"]) == o["build_id"]
