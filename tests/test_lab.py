"""The replay lab on real parts: debootstrap'ed Debian roots, runc, netns, the DNS server.

These use the project's own pytest plugin (``lab_factory`` from gdbdiag.lab.pytest_plugin).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gdbdiag.lab import leftovers, procs
from gdbdiag.lab.rootfs import ensure_release

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parents[1]


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def dropped(lab):
    return [r for r in lab.dns_records() if r["action"] == "dropped"]


def exchanges(records):
    """Group a lab DNS log into (client, qname) -> {qtype: first query of that type}."""
    out = {}
    for r in records:
        if r["action"] in ("answered", "dropped"):
            out.setdefault((r["client"], r["qname"]), {}).setdefault(r["qtype"], r)
    return out


def _pairs(records):
    return [(k, v) for k, v in exchanges(records).items()
            if "A" in v and "AAAA" in v and v["A"]["tx"] is not None]


def serial_pairs(records):
    """(client, qname) pairs whose AAAA query reached the server after the A answer left it."""
    return [k for k, v in _pairs(records) if v["AAAA"]["rx"] > v["A"]["tx"]]


def parallel_pairs(records):
    """Pairs whose AAAA was already on the wire before the A answer left (sendmmsg)."""
    return [k for k, v in _pairs(records) if v["AAAA"]["rx"] < v["A"]["tx"]]


def test_bullseye_redis_stalls_after_one_lost_aaaa(lab_factory):
    # the next AAAA is dropped once Redis's first lookup (3 search suffixes and the bare
    # name, 4 pairs) went out whole: pairs to show the parallel sends. One pair alone is
    # not enough on a loaded VM: a datagram sent by the same sendmmsg can reach the
    # server's socket after the server answered the first (seen once, steal at 26 %)
    lab = lab_factory(release="bullseye", workload="redis", fault="none")
    wait_for(lambda: len([r for r in lab.dns_records() if r["qtype"] == "AAAA"]) >= 4, 10,
             "Redis's first lookup")
    lab.inject()
    drop = wait_for(lambda: dropped(lab), 10, "the lost AAAA")[0]
    assert drop["qtype"] == "AAAA"
    recs = lab.probe(seconds=30, interval=0.1)
    slow = [i for i, r in enumerate(recs) if r["ms"] >= 4500]
    assert len(slow) >= 3, [r["ms"] for r in recs]
    # interleaved: fast requests between consecutive slow ones
    for a, b in zip(slow, slow[1:]):
        assert any(recs[i]["ms"] < 50 for i in range(a + 1, b)), (a, b)
    assert all("error" not in r for r in recs)
    dns = lab.dns_records()
    after = [r for r in dns if r["t"] > drop["t"] + 0.5]
    # A and AAAA for the search names go out as separate exchanges after the drop
    search = [k for k in serial_pairs(after) if k[1].endswith(".cluster.local.")]
    assert len(search) >= 3, exchanges(after)
    assert not parallel_pairs(after)
    # up to the drop, they were sent in parallel (sendmmsg)
    assert parallel_pairs([r for r in dns if r["t"] <= drop["t"]])
    # the bare name's A query, repeated 5 s apart, answered SERVFAIL
    bare = [r for r in after if r["qname"] == "keydb-0.keydb." and r["qtype"] == "A"]
    assert all(r["rcode"] == "SERVFAIL" for r in bare)
    gaps = [b["t"] - a["t"] for a, b in zip(bare, bare[1:]) if b["client"] == a["client"]]
    assert gaps and all(4.8 <= g <= 5.3 for g in gaps), gaps
    assert not [r for r in after if r["qname"] == "keydb-0.keydb." and r["qtype"] == "AAAA"]
    # redis logs the incident's 10 s gap between "Connecting" and "Unable to connect"
    log = Path(lab.workload_log).read_text()
    assert "Connecting to MASTER keydb-0.keydb:6379" in log
    assert "Unable to connect to MASTER" in log


def test_bookworm_goes_serial_but_does_not_stall(lab_factory):
    lab = lab_factory(release="bookworm", workload="redis", fault="drop-aaaa-once")
    drop = wait_for(lambda: dropped(lab), 10, "the lost AAAA")[0]
    # the lost answer itself costs one resolver timeout; wait it out, then probe
    time.sleep(max(0.0, drop["t"] + 6.0 - time.time()))
    recs = lab.probe(seconds=12, interval=0.1)
    assert recs and max(r["ms"] for r in recs) < 1000, max(r["ms"] for r in recs)
    after = [r for r in lab.dns_records() if r["t"] > drop["t"] + 0.5]
    assert len(serial_pairs(after)) >= 3
    assert not parallel_pairs(after)
    bare = [r for r in after if r["qname"] == "keydb-0.keydb."]
    assert bare and all(r["rcode"] == "SERVFAIL" for r in bare)


def test_resolver_workload_only_the_thread_that_lost_an_answer_stalls(lab_factory):
    lab = lab_factory(release="bullseye", workload="resolver", fault="drop-aaaa-once",
                      fault_match="keydb-0*")
    wait_for(lambda: dropped(lab), 10, "the lost AAAA")
    # keydb-0: 5 s for the lost AAAA then 2 x 5 s stalled; its next lookups stall 10 s each
    wait_for(lambda: len([r for r in lab.workload_records() if r["name"] == "keydb-0.keydb"]) >= 2,
             45, "two keydb-0 lookups")
    recs = lab.workload_records()
    k0 = [r for r in recs if r["name"] == "keydb-0.keydb"]
    k2 = [r for r in recs if r["name"] == "keydb-2.keydb"]
    assert len(k2) >= 15 and all(r["seconds"] < 1.0 for r in k2), [r["seconds"] for r in k2]
    assert all(r["seconds"] >= 9.0 for r in k0), [r["seconds"] for r in k0]
    assert len({r["tid"] for r in k0}) == 1 and len({r["tid"] for r in k2}) == 1
    assert k0[0]["tid"] != k2[0]["tid"]
    assert all(d["qname"].startswith("keydb-0") for d in dropped(lab))


@pytest.mark.parametrize("rcode", ["REFUSED", "NOTIMP"])
def test_other_error_rcodes_stall_like_servfail(lab_factory, rcode):
    lab = lab_factory(release="bullseye", workload="resolver", names=("keydb-0.keydb",),
                      fault="drop-aaaa-once", rcode=rcode)
    wait_for(lambda: dropped(lab), 10, "the lost AAAA")
    # first lookup: 5 s for the lost AAAA + 10 s stalled; the second stalls 10 s
    recs = wait_for(lambda: [r for r in lab.workload_records()][:2]
                    if len(lab.workload_records()) >= 2 else None, 40, "two lookups")
    assert recs[1]["seconds"] >= 9.0, recs
    bare = [r for r in lab.dns_records() if r["qname"] == "keydb-0.keydb."]
    assert bare and all(r["rcode"] == rcode for r in bare)


def test_user_rootfs_tarball_runs_its_own_command(lab_factory, tmp_path):
    root = ensure_release("bullseye")
    tarball = tmp_path / "image.tar"
    # an export as `docker export` writes it: the whole tree, relative paths
    subprocess.run(["tar", "-C", str(root), "-cf", str(tarball), "--exclude=./usr/share/doc",
                    "--exclude=./usr/share/man", "--exclude=./usr/share/locale",
                    "--exclude=./var/cache", "--exclude=./var/lib/apt", "."], check=True)
    cmd = ("echo my-image-started; "
           "while true; do getent ahosts keydb-0.keydb.default.svc.cluster.local. "
           "> /gdbdiag-out/getent.txt 2>&1; echo rc=$? >> /gdbdiag-out/getent.txt; sleep 1; done")
    lab = lab_factory(rootfs=str(tarball), cmd=cmd, fault="none")
    assert lab.workload == "custom" and lab.release is None
    wait_for(lambda: "my-image-started" in Path(lab.workload_log).read_text(), 10, "the command")
    wait_for(lambda: [r for r in lab.dns_records()
                      if r["qname"] == "keydb-0.keydb.default.svc.cluster.local."],
             10, "the command's DNS query")
    # the image is its own root: PID namespace, mount namespace, hostname
    assert os.readlink(f"/proc/{lab.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert os.readlink(f"/proc/{lab.pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    assert Path(f"/proc/{lab.pid}/root/etc/debian_version").read_text().startswith("11")


def test_lab_cli_up_json_and_down_leave_nothing(tmp_path):
    name = f"cli{os.getpid() % 10000}"
    out = tmp_path / "lab.json"
    gd = [sys.executable, "-m", "gdbdiag.cli"]
    try:
        r = subprocess.run(gd + ["lab", "up", "--name", name, "--release", "trixie",
                                 "--workload", "resolver", "--fault", "none", "--json", str(out)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        desc = json.loads(out.read_text())
        assert {"name", "pid", "release", "rootfs", "dns_log"} <= set(desc)
        assert desc["release"] == "trixie" and Path(f"/proc/{desc['pid']}").exists()
        # a second lab under the same name is refused with a one-line cause
        r2 = subprocess.run(gd + ["lab", "up", "--name", name], capture_output=True, text=True)
        assert r2.returncode == 4 and "already up" in r2.stderr
        assert len(r2.stderr.strip().splitlines()) == 1
        conf = Path(f"/proc/{desc['pid']}/root/etc/resolv.conf").read_text()
        assert "search default.svc.cluster.local svc.cluster.local cluster.local" in conf
        assert "options ndots:5" in conf and "nameserver 10.96.0.10" in conf
        assert leftovers(name)
    finally:
        r = subprocess.run(gd + ["lab", "down", "--name", name], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert leftovers(name) == []
    # the workload is gone (at most a zombie until the host's init reaps it)
    assert not procs.pid_alive(desc["pid"])


def test_bad_inputs_get_one_line_causes():
    gd = [sys.executable, "-m", "gdbdiag.cli", "lab"]
    for argv, needle in ((["up", "--name", "Bad_Name"], "bad lab name"),
                         (["up", "--name", "x1", "--fault", "explode"], "unknown fault"),
                         (["up", "--name", "x2", "--rootfs", "/nonexistent"], "needs --cmd"),
                         (["up", "--name", "x3", "--rootfs", "/nonexistent", "--cmd", "true"],
                          "no such directory or tarball"),
                         (["down", "--name", "nosuchlab"], "no lab named")):
        r = subprocess.run(gd + argv, capture_output=True, text=True)
        assert r.returncode == 4, (argv, r.stderr)
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for name in ("x1", "x2", "x3"):
        assert leftovers(name) == []


def test_fixture_cleans_up_after_a_failing_test(pytester):
    pytester.makepyfile("""
        def test_fails_midway(lab_factory):
            lab = lab_factory(name="failing-lab", release="bullseye", workload="resolver",
                              fault="none")
            assert lab.alive()
            raise RuntimeError("boom")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert leftovers("failing-lab") == []


def test_several_labs_at_once(lab_factory):
    a = lab_factory(release="bullseye", workload="resolver", names=("keydb-0.keydb",), fault="none")
    b = lab_factory(release="bookworm", workload="resolver", names=("keydb-2.keydb",), fault="none")
    wait_for(lambda: a.dns_records() and b.dns_records(), 10, "both labs' lookups")
    assert {r["qname"] for r in a.dns_records()} & {"keydb-0.keydb."}
    assert not [r for r in a.dns_records() if "keydb-2" in r["qname"]]
    assert not [r for r in b.dns_records() if "keydb-0" in r["qname"]]
