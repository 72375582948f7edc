"""debian-symbols data, `gdbdiag check`, and the code analysis behind them."""
import copy
import json
import os
import subprocess
import sys

import pytest

from gdbdiag.symbols import analyze, debdata
from gdbdiag.symbols.cache import SymbolCache
from gdbdiag.symbols.identify import identify_root
from support.symbols import TEST_CACHE, rootfs

EXPECT = {"bullseye": (True, "options", "libresolv.so.2"),
          "bookworm": (False, "_flags", "libc.so.6"),
          "trixie": (False, "_flags", "libc.so.6")}


def _ident(rel):
    r = rootfs(rel)
    assert r is not None, f"no {rel} rootfs under $GDBDIAG_ROOTFS_BASE"
    return identify_root(r)


def test_data_file_schema():
    d = debdata.load_data()
    assert d["schema"] == debdata.SCHEMA and d["builds"]
    for b in d["builds"]:
        assert b["distro"] == "debian" and b["package"] == "libc6" and b["arch"] == "amd64"
        assert len(b["objects"]["libc.so.6"]["build_id"]) == 40
        assert b["send_dg_object"] in ("libc.so.6", "libresolv.so.2")
        assert b["sticky_flag"]["field"] in ("options", "_flags")
        assert b["bug30081"]["fixed_by"] in ("code", "version-table")
        assert isinstance(b["bug30081"]["affected"], bool)
        if b["glibc"] < "2.34":
            assert "libresolv.so.2" in b["objects"] and b["send_dg_object"] == "libresolv.so.2"


@pytest.mark.parametrize("rel", ["bullseye", "bookworm", "trixie"])
def test_check_by_build_id(rel):
    t = _ident(rel)
    v = debdata.check_target(t)
    affected, field, obj = EXPECT[rel]
    assert v["matched_by"] == "build-id"
    assert (v["affected"], v["sticky_field"], v["send_dg_object"]) == (affected, field, obj)


def test_check_by_package_version_then_version_table():
    t = _ident("bookworm")
    data = copy.deepcopy(debdata.load_data())
    for b in data["builds"]:
        for o in b["objects"].values():
            o["build_id"] = "0" * 40
    v = debdata.check_target(t, data)
    assert v["matched_by"] == "package-version" and v["affected"] is False and "note" in v
    v = debdata.check_target(t, {"schema": debdata.SCHEMA, "builds": []})
    assert v["matched_by"] is None and v["fixed_by"] == "version-table" and v["affected"] is False


def test_version_table():
    vt = analyze.version_table
    assert vt("debian", "2.31-13+deb11u11", "2.31")["affected"] is True
    assert vt("debian", "2.36-9+deb12u8", "2.36") == {"affected": True, "sticky_field": "options",
                                                      "reason": "Debian bookworm before 2.36-9+deb12u9"}
    assert vt("debian", "2.36-9+deb12u9", "2.36")["affected"] is False
    assert vt("ubuntu", "2.27-3ubuntu1", "2.27")["affected"] is True
    assert vt("fedora", "2.39-1", "2.39")["affected"] is None
    assert vt("debian", "2.41-12", "2.41")["sticky_field"] == "_flags"


def test_fix_regex_on_real_hunks():
    assert analyze.FIX_RE.search("+\t\t\tif (buf2 != NULL && !single_request)")
    assert not analyze.FIX_RE.search("\t\t\tif (buf2 != NULL)")
    assert analyze.UNFIXED_RE.search("\t\t\tif (buf2 != NULL)")


@pytest.mark.parametrize("rel", ["bullseye", "bookworm"])
def test_cli_check_exit_codes(rel, tmp_path):
    t = _ident(rel)
    out = tmp_path / "c.json"
    p = subprocess.run([sys.executable, "-m", "gdbdiag.cli", "check", "--file",
                        "/lib/x86_64-linux-gnu/libc.so.6", "--root", t.root, "--json", str(out)],
                       capture_output=True, text=True, timeout=60)
    affected = EXPECT[rel][0]
    assert p.returncode == (1 if affected else 0), p.stdout + p.stderr
    assert ("AFFECTED" in p.stdout) == affected
    d = json.loads(out.read_text())
    assert d["affected"] is affected and d["matched_by"] == "build-id"


@pytest.mark.slow
def test_refresh_build_entry_from_code():
    """The refresher's analysis of one build, from the real archive: send_dg's object and the
    sticky field from gdb on the verified debug files, 30081 from the source Debian built."""
    from gdbdiag.symbols import refresh
    from gdbdiag.symbols.archive import Context, DebianArchive, Settings

    t = _ident("bookworm")
    s = Settings(timeout=60, progress=False)
    cache = SymbolCache(os.path.join(TEST_CACHE, "cache"))
    archive = DebianArchive(Context(s, cache))
    where = archive.suites_for(t.package_version)
    e = refresh.build_entry(archive, Context(s, cache), t.package_version, where, "amd64", s, cache, {},
                            lambda m: None)
    assert e["objects"]["libc.so.6"]["build_id"] == t.objects[0].build_id
    assert e["send_dg_object"] == "libc.so.6"
    assert e["sticky_flag"] == {"field": "_flags", "by": "code", "evidence": e["sticky_flag"]["evidence"]}
    assert "orl $0x200000, 0x1f8(" in e["sticky_flag"]["evidence"]
    assert e["bug30081"]["affected"] is False and e["bug30081"]["fixed_by"] == "code"
    assert "git-updates.diff adds `if (buf2 != NULL && !single_request)`" in e["bug30081"]["evidence"]
