"""Package extraction: dpkg-deb and pure Python, gz/xz/zst/none, build-id and path layouts."""
import os
import shutil

import pytest

from gdbdiag.symbols import extract
from gdbdiag.symbols.identify import identify_root
from support.symbols import build_deb, extract_debug_files, real_deb, rootfs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bullseye_debug(tmp_path_factory):
    """Real debug files (libnss_dns: small; libresolv) from bullseye's libc6-dbg."""
    r = rootfs("bullseye")
    assert r is not None, "no bullseye rootfs under $GDBDIAG_ROOTFS_BASE"
    t = identify_root(r)
    deb, _ent, _b, _s = real_deb("libc6-dbg", t.package_version)
    ids = {o.name: o.build_id for o in t.objects}
    files = extract_debug_files(deb, set(ids.values()), str(tmp_path_factory.mktemp("dbg")))
    return deb, ids, files


@pytest.mark.parametrize("use_dpkg", [True, False], ids=["dpkg-deb", "python"])
def test_real_deb_both_backends(bullseye_debug, tmp_path, use_dpkg):
    assert not use_dpkg or extract.have_dpkg_deb(), "dpkg-deb is part of every Debian system"
    deb, ids, _files = bullseye_debug
    want = set(ids.values())
    got = extract.scan_deb(deb, want, str(tmp_path), use_dpkg=use_dpkg)
    assert {c.build_id for c in got} == want
    assert all(c.has_debug_info and c.member.startswith("usr/lib/debug/.build-id/") for c in got)
    # nothing but the wanted files was written
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(c.path) for c in got)


@pytest.mark.parametrize("comp", ["gz", "xz", "zst", "none"])
@pytest.mark.parametrize("builder", ["dpkg-deb", "python"])
@pytest.mark.parametrize("reader", ["dpkg-deb", "python"])
def test_compressions_and_layouts(bullseye_debug, tmp_path, comp, builder, reader):
    _deb, ids, files = bullseye_debug
    nss = ids["libnss_dns.so.2"]
    res = ids["libresolv.so.2"]
    pkg = build_deb(str(tmp_path / "t.deb"), {
        f"/usr/lib/debug/.build-id/{nss[:2]}/{nss[2:]}.debug": files[nss],           # build-id layout
        "/usr/lib/debug/lib/x86_64-linux-gnu/libresolv-2.31.so": files[res],          # path-based layout
        "/usr/share/doc/x/README": files[nss],                                         # not under debug: ignored
    }, compression=comp, use_dpkg=(builder == "dpkg-deb"))
    out = tmp_path / "out"
    out.mkdir()
    got = extract.scan_deb(pkg, {nss, res}, str(out), use_dpkg=(reader == "dpkg-deb"))
    assert {c.build_id for c in got} == {nss, res}
    by = {c.build_id: c for c in got}
    assert by[res].member == "usr/lib/debug/lib/x86_64-linux-gnu/libresolv-2.31.so"
    assert open(by[nss].path, "rb").read() == open(files[nss], "rb").read()


@pytest.mark.parametrize("reader", ["dpkg-deb", "python"])
def test_corrupt_package(bullseye_debug, tmp_path, reader):
    deb, ids, _files = bullseye_debug
    bad = tmp_path / "bad.deb"
    data = bytearray(open(deb, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 4096] = b"\0" * 4096
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(extract.ExtractError) as e:
        extract.scan_deb(str(bad), set(ids.values()), str(out), use_dpkg=(reader == "dpkg-deb"))
    assert "\n" not in str(e.value)
    (tmp_path / "notadeb").write_bytes(b"hello")
    with pytest.raises(extract.ExtractError):
        extract.scan_deb(str(tmp_path / "notadeb"), set(), str(out), use_dpkg=(reader == "dpkg-deb"))


def test_scan_dir_both_layouts(bullseye_debug, tmp_path):
    _deb, ids, files = bullseye_debug
    nss, res = ids["libnss_dns.so.2"], ids["libresolv.so.2"]
    d = tmp_path / "tree"
    (d / ".build-id" / nss[:2]).mkdir(parents=True)
    shutil.copyfile(files[nss], d / ".build-id" / nss[:2] / f"{nss[2:]}.debug")
    (d / "lib/x86_64-linux-gnu").mkdir(parents=True)
    shutil.copyfile(files[res], d / "lib/x86_64-linux-gnu/libresolv-2.31.so")
    got = {c.build_id for c in extract.scan_dir(str(d), {nss, res})}
    assert got == {nss, res}
