"""The debug image gdbdiag:<version> (deploy/Containerfile, scripts/build-image), run the
way a cluster runs it: as a debug container sharing ONLY the target container's PID
namespace (kubectl debug --target), or in the host PID namespace (a node debug pod),
with exactly the capabilities docs/field.md says to grant — CAP_SYS_PTRACE and
CAP_SYS_ADMIN — no network and one host directory, for the JSON report.

The target is a bullseye Redis lab container (runc, not podman: hence `--pid
ns:/proc/<its init>/ns/pid`) whose DNS server loses one AAAA answer, so its
replicationCron thread goes sticky and stalls 5 s per attempt on a doomed poll.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import tracer_of
from debug_image import (CAP_SYS_ADMIN, CAP_SYS_PTRACE, PODMAN, REPO, build_image, caps_of,
                         containers, debug_image, wait_sticky)  # noqa: F401 (fixtures)
from gdbdiag import __version__
from gdbdiag.codecheck import diff_code
from gdbdiag.pod import MINIMAL_CAPS

pytestmark = pytest.mark.lab
GRANTED = (1 << CAP_SYS_PTRACE) | (1 << CAP_SYS_ADMIN)
SHOW_CAPS = "grep ^Cap /proc/self/status >&2; exec \"$@\""


def _untouched(lab):
    """Nothing traces the target and its code is as on disk (kernel probes are gone
    with the debug container)."""
    assert lab.alive()
    assert tracer_of(lab.pid) == 0
    assert diff_code(lab.pid, ("libc", "libresolv", "libnss_dns")) == []


def _attach(containers, lab, tmp_path, pid_mode, *target_args):
    out = tmp_path / "out"
    out.mkdir()
    r = containers.run(pid=pid_mode, caps=MINIMAL_CAPS, out=out, timeout=90,
                       command=["sh", "-c", SHOW_CAPS, "sh", "gdbdiag", "attach", *target_args,
                                "--duration", "40", "--until", "stall", "--json", "/out/report.json"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    caps = caps_of(r.stderr)
    # exactly the documented capabilities, nothing more (not privileged)
    assert MINIMAL_CAPS == ("SYS_PTRACE", "SYS_ADMIN")
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == GRANTED, caps
    assert caps["CapInh"] == caps["CapAmb"] == 0
    rep = json.loads((out / "report.json").read_text())
    return r, rep


def test_build_image_reuses_the_image_and_the_image_works(debug_image):
    """scripts/build-image again: nothing to do; the image has gdbdiag from its wheel and
    gdb loads the plugin with `gdbdiag gdbinit`."""
    assert debug_image["tag"] == f"gdbdiag:{__version__}"
    fmt = '{{index .Config.Labels "io.gdbdiag.inputs"}} {{index .Config.Labels "org.opencontainers.image.version"}}'

    def labels():
        return subprocess.run(PODMAN + ["image", "inspect", "--format", fmt, debug_image["tag"]],
                              capture_output=True, text=True, check=True).stdout.split()
    before = labels()
    assert len(before) == 2 and len(before[0]) == 32 and before[1] == __version__
    for _ in range(3):
        again = build_image()
        after = labels()
        if after[0] == before[0]:
            # same inputs: nothing rebuilt
            assert "is up to date" in again["stderr"], again["stderr"][-2000:]
            assert again["seconds"] < 60
            break
        # the sources changed between the two runs (someone edited the tree): it rebuilt,
        # as it must; the next run has the same inputs
        assert "built gdbdiag" in again["stderr"]
        before = after
    else:
        raise AssertionError("the image's inputs changed at every run")
    probe = ("set -e; gdbdiag --version; "
             "python3 -c 'import gdbdiag, importlib.metadata as m; print(gdbdiag.__file__); "
             "d = m.distribution(\"gdbdiag\"); print(d.read_text(\"direct_url.json\") or \"no-direct-url\")'; "
             "gdb -nx -batch -ex \"$(gdbdiag gdbinit)\" -ex 'help resolv'")
    r = subprocess.run(PODMAN + ["run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024",
                                 "--ulimit", "nproc=4096:4096", debug_image["tag"], "sh", "-c", probe],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"gdbdiag {__version__}"
    # installed from the wheel into the image's venv: not an editable install of a checkout
    assert lines[1] == "/opt/gdbdiag/lib/python3.11/site-packages/gdbdiag/__init__.py"
    assert "editable" not in lines[2]
    assert "resolv trace" in r.stdout and "gdbdiag loaded" in r.stdout


def test_ephemeral_debug_container_sharing_only_the_pid_namespace(lab_factory, containers, tmp_path):
    """kubectl debug --target, reproduced: `gdbdiag attach --process auto` finds Redis as
    PID 1 of the shared namespace and reports STICKY_STALLING, JSON on the mounted dir."""
    lab = lab_factory(release="bullseye", workload="redis", fault="drop-aaaa-once")
    wait_sticky(lab)
    t0 = time.monotonic()
    r, rep = _attach(containers, lab, tmp_path, f"ns:/proc/{lab.pid}/ns/pid", "--process", "auto")
    assert time.monotonic() - t0 < 60
    assert rep["verdict"]["code"] == "STICKY_STALLING", r.stdout[-3000:]
    assert rep["run"]["backend"] == "uprobe" and rep["run"]["records"] > 0
    # the target as the shared namespace numbers it: PID 1, its threads by their own TIDs
    assert rep["target"]["pid"] == 1 and rep["target"]["nspid"] == [1]
    main = [t for t in rep["threads"] if t["lwp"] == 1][0]
    assert main["sticky"] and main["name"] == "redis-server"
    assert {"send_dg", "getaddrinfo", "connectWithMaster"} <= set(main["stack"])
    assert rep["stalls"] and all(4000 <= s["measured_ms"] <= 5600 for s in rep["stalls"])
    assert "[gdbdiag]" in r.stdout and "doomed_poll" in r.stdout
    _untouched(lab)


def test_node_mode_host_pid_namespace_container_id(lab_factory, containers, tmp_path):
    """A node debug pod, reproduced: host PID namespace, `--container-id` of the runc
    container (its ID in /proc/*/cgroup) -> the host PID of Redis -> STICKY_STALLING."""
    lab = lab_factory(release="bullseye", workload="redis", fault="drop-aaaa-once")
    wait_sticky(lab)
    r, rep = _attach(containers, lab, tmp_path, "host", "--container-id", lab.runc_id)
    assert rep["verdict"]["code"] == "STICKY_STALLING", r.stdout[-3000:]
    assert rep["target"]["pid"] == lab.pid and rep["target"]["nspid"] == [lab.pid, 1]
    assert [t for t in rep["threads"] if t["lwp"] == lab.pid][0]["sticky"]
    assert rep["run"]["records"] > 0
    _untouched(lab)


def test_without_ptrace_one_line_refusal_exit_3(lab_factory, containers):
    """No capability at all (--cap-drop ALL: neither CAP_SYS_PTRACE nor the probes'):
    refused in one line naming CAP_SYS_PTRACE, exit 3, the target untouched — whether the
    target is found by --process auto, given as a PID, or by --container-id."""
    lab = lab_factory(release="bullseye", workload="redis", fault="none")
    cases = [(f"ns:/proc/{lab.pid}/ns/pid", ["--process", "auto"]),
             (f"ns:/proc/{lab.pid}/ns/pid", ["1"]),
             ("host", ["--container-id", lab.runc_id])]
    for pid_mode, target in cases:
        r = containers.run(pid=pid_mode, caps=(), out=None, timeout=60,
                           command=["sh", "-c", SHOW_CAPS, "sh", "gdbdiag", "attach", *target,
                                    "--duration", "5"])
        errs = [l for l in r.stderr.splitlines() if not l.startswith("Cap")]
        assert caps_of(r.stderr)["CapEff"] == 0
        assert r.returncode == 3, (target, r.stdout, r.stderr)
        assert len(errs) == 1 and "CAP_SYS_PTRACE" in errs[0], (target, errs)
        assert r.stdout == ""
    _untouched(lab)
