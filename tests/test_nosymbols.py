"""No debug symbols, no network, an empty cache: the diagnosis comes from the code.

`gdbdiag attach` runs in a network namespace with no route (`unshare -n`) and an empty
cache (GDBDIAG_CACHE), so nothing can be fetched: probe points and the bug-30081
verdict come from the analyzer (gdbdiag.glibc), the probes are kernel probes.
"""
from __future__ import annotations

import json
import os

import pytest

from gdbdiag.codecheck import diff_code
from test_attach import RELEASE_VERDICTS, Runner

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("release,verdict", RELEASE_VERDICTS)
def test_diagnosis_with_no_symbols_and_no_network(lab_factory, tmp_path, release, verdict):
    lab = lab_factory(release=release, workload="redis", fault="none")
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    out = tmp_path / "rep.json"
    r = Runner(lab.pid, "--json", out, "--duration", "45", "--until",
               "stall" if release == "bullseye" else "sticky",
               prefix=["unshare", "-n"], env={"GDBDIAG_CACHE": str(cache)})
    try:
        r.wait_for("armed in", 30)
        lab.inject()
        assert r.finish(90) == 0, r.text
    finally:
        if r.p.poll() is None:
            r.p.kill()
    text = r.text
    assert "no debug symbols needed" in text
    assert "symbols: 0 from the cache" in text          # the one line saying what it did
    rep = json.loads(out.read_text())
    assert rep["verdict"]["code"] == verdict, text
    assert rep["glibc"]["affected_30081"] is (release == "bullseye")
    assert rep["glibc"]["affected_source"].startswith("code")
    assert rep["symbols"]["debug_files"] == {}
    eng = [e for e in rep["events"] if e["kind"] == "sticky_engaged"]
    assert "AAAA answer for keydb-0.keydb.default.svc.cluster.local. lost" in eng[0]["cause"]
    assert eng[0]["provenance"]["field"] == "disassembly"
    if release == "bullseye":
        doomed = [e for e in rep["events"] if e["kind"] == "doomed_poll"]
        stalls = rep["stalls"]
        assert doomed and 4000 < doomed[0]["predicted_ms"] <= 5000
        assert stalls and 4000 < stalls[0]["measured_ms"] < 5600
        main = [t for t in rep["threads"] if t["lwp"] == lab.pid][0]
        # the application stack, named from the target's own symbol tables and the
        # analyzer (send_dg is a static function: no name in the stripped library)
        assert {"send_dg", "getaddrinfo", "connectWithMaster", "replicationCron"} <= set(main["stack"])
    # nothing was fetched: the empty cache holds only the analyzer's results
    assert sorted(os.listdir(cache / "gdbdiag" if (cache / "gdbdiag").exists() else cache)) <= \
        ["analysis", "tmp"]
    assert rep["run"]["attach_to_armed_s"] is not None
    assert diff_code(lab.pid, ("libc", "libresolv", "libnss_dns")) == []
