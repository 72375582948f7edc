"""`gdbdiag pod`: the kubectl commands (one builder for --dry-run and the real run), the
PID mapping they rely on, and the real run end to end — through tests/fakes/kubectl, a
clearly labelled stand-in for the cluster that turns `kubectl debug` into the equivalent
`podman run` of the debug image against a lab container."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import tracer_of
from debug_image import REPO, containers, debug_image, wait_sticky  # noqa: F401 (fixtures)
from gdbdiag import pod
from gdbdiag.codecheck import diff_code
from gdbdiag.errors import GdbdiagError

GD = [sys.executable, "-m", "gdbdiag.cli"]
NAME_RE = r"gdbdiag-[0-9a-f]+-[0-9a-f]{6}"
FAKES = REPO / "tests" / "fakes"


def dry(*argv, env=None):
    r = subprocess.run(GD + ["pod", "--dry-run", *argv], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


def _args(**kw):
    base = dict(namespace=None, pod="keydb-1", container=None, image="img", node=False,
                caps="minimal", process="auto", attach_args=[], dry_run=False)
    return argparse.Namespace(**{**base, **kw})


def test_dry_run_ephemeral_container_command(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    lines = dry("-n", "prod", "keydb-1", "-c", "keydb", "--", "--duration", "120", "--until", "stall",
                env=env)
    assert len(lines) == 1                       # -c given: the cluster is not asked
    argv = shlex.split(lines[0])
    custom = tmp_path / "gdbdiag" / "kubectl-debug-sys_ptrace-sys_admin.json"
    assert argv[:8] == ["kubectl", "-n", "prod", "debug", "keydb-1", "--target=keydb", "-it",
                        "--profile=general"]
    assert argv[8] == f"--custom={custom}"
    assert argv[9] == "--image=gdbdiag:0.1.0"
    assert re.fullmatch(f"--container={NAME_RE}", argv[10])
    assert argv[11:] == ["--", "gdbdiag", "attach", "--process", "auto", "--duration", "120",
                         "--until", "stall"]
    # the custom profile grants exactly CAP_SYS_PTRACE + CAP_SYS_ADMIN, drops the rest;
    # it is left in the cache so the printed command works when pasted
    assert json.loads(custom.read_text()) == {"securityContext": {"capabilities": {
        "drop": ["ALL"], "add": ["SYS_PTRACE", "SYS_ADMIN"]}}}
    # a fresh name every run: ephemeral containers stay in the pod's spec once added
    again = shlex.split(dry("-n", "prod", "keydb-1", "-c", "keydb", env=env)[0])
    assert again[10] != argv[10]
    lines = dry("--caps", "sysadmin", "keydb-1", "-c", "keydb", env=env)
    assert "--profile=sysadmin" in shlex.split(lines[0]) and "--custom" not in lines[0]


def test_dry_run_without_container_asks_the_cluster_read_only(tmp_path):
    """Without -c (and with --node) the debug command needs the pod's facts: --dry-run
    runs the read-only `kubectl get pod`, prints it, then the exact debug command."""
    pods = tmp_path / "pods" / "default"
    pods.mkdir(parents=True)
    (pods / "keydb-1.json").write_text(json.dumps(_pod_json("0123456789abcdef0123", "containerd")))
    log = tmp_path / "kubectl.log"
    env = dict(os.environ, PATH=f"{FAKES}:{os.environ['PATH']}", FAKE_KUBECTL_PODS=str(tmp_path / "pods"),
               FAKE_KUBECTL_LOG=str(log), XDG_CACHE_HOME=str(tmp_path))
    lines = dry("--node", "--image", "reg.example/gdbdiag:1", "keydb-1", env=env)
    assert lines[0] == "kubectl get pod keydb-1 -o json"
    argv = shlex.split(lines[1])
    assert argv[:4] == ["kubectl", "debug", "node/node-3", "-it"]
    assert "--image=reg.example/gdbdiag:1" in argv
    assert argv[-4:] == ["gdbdiag", "attach", "--container-id", "0123456789abcdef0123"]
    # the cluster was asked the get and nothing else
    assert [json.loads(l) for l in log.read_text().splitlines()] == [shlex.split(lines[0])[1:]]
    lines = dry("keydb-1", env=env)
    assert shlex.split(lines[1])[2:4] == ["keydb-1", "--target=keydb"]    # the first container


def _pod_json(cid, runtime="runc", name="keydb", node="node-3"):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "keydb-1", "namespace": "default"},
            "spec": {"nodeName": node, "containers": [{"name": name, "image": "redis"},
                                                       {"name": "exporter", "image": "x"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": name, "containerID": f"{runtime}://{cid}", "ready": True},
                {"name": "exporter", "containerID": f"{runtime}://fedcba9876543210"}]}}


def test_one_builder_for_dry_run_and_real_run(monkeypatch, capsys, tmp_path):
    """run() prints (dry run) exactly the lists kubectl_commands builds, and executes
    (real run) the same last one, with the one name generated for the run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(pod, "debug_container_name", lambda: "gdbdiag-fixed-000000")
    args = _args(container="keydb", attach_args=["--until", "stall"], dry_run=True)
    assert pod.run(args) == 0
    want = pod.kubectl_commands(args, None, "gdbdiag-fixed-000000", pod.custom_profile_file())
    assert capsys.readouterr().out.splitlines() == [shlex.join(c) for c in want]
    ran = []
    monkeypatch.setattr(pod.shutil, "which", lambda n: "/usr/bin/" + n)
    monkeypatch.setattr(pod.subprocess, "call", lambda argv: ran.append(argv) or 7)
    assert pod.run(_args(container="keydb", attach_args=["--until", "stall"])) == 7
    assert ran == [want[-1]]


def test_parse_pod_json():
    pj = _pod_json("0123456789abcdef0123", "containerd")
    info = pod.parse_pod(pj, None)
    assert info == {"node": "node-3", "container": "keydb",
                    "container_id": "containerd://0123456789abcdef0123",
                    "runtime": "containerd", "id": "0123456789abcdef0123"}
    with pytest.raises(GdbdiagError, match="no container 'x'"):
        pod.parse_pod(pj, "x")
    args = _args(namespace="prod", node=True, caps="sysadmin", process="keydb-server",
                 attach_args=["--until", "stall"])
    get, cmd = pod.kubectl_commands(args, info, "gdbdiag-x")
    assert get == ["kubectl", "-n", "prod", "get", "pod", "keydb-1", "-o", "json"]
    assert cmd[:5] == ["kubectl", "-n", "prod", "debug", "node/node-3"]
    assert "--profile=sysadmin" in cmd and "--container=gdbdiag-x" in cmd
    assert cmd[-6:] == ["--container-id", "0123456789abcdef0123", "--process", "keydb-server",
                        "--until", "stall"]
    # not running yet: no container ID
    pj["status"]["containerStatuses"][0].pop("containerID")
    with pytest.raises(GdbdiagError, match="not running"):
        pod.kubectl_commands(args, pod.parse_pod(pj, None), "gdbdiag-x")


@pytest.mark.lab
def test_container_id_to_host_pid_on_a_lab_container(lab_factory):
    """runc puts the container ID in the cgroup path as containerd does: the node-mode
    lookup finds the container's main process, PID 1 of its own PID namespace."""
    lab = lab_factory(release="bullseye", workload="resolver", fault="none")
    assert pod.pid_for_container_id(lab.runc_id) == lab.pid
    assert pod.pid_for_container_id("runc://" + lab.runc_id, "python3") == lab.pid
    nspid = [int(x) for x in open(f"/proc/{lab.pid}/status").read().split("NSpid:")[1].split("\n")[0].split()]
    assert nspid[0] == lab.pid and nspid[-1] == 1                  # two PID namespaces
    with pytest.raises(GdbdiagError, match="no process named"):
        pod.pid_for_container_id(lab.runc_id, "nosuchprocess")
    # the ID is matched as a whole cgroup name, never as part of a longer one
    with pytest.raises(GdbdiagError, match="no process in a cgroup"):
        pod.pid_for_container_id(lab.runc_id[:-1])
    with pytest.raises(GdbdiagError, match="no process in a cgroup"):
        pod.pid_for_container_id("0123456789abcdef-not-a-container")
    # the attach CLI takes --container-id in place of a PID (refusal path: bad id)
    r = subprocess.run(GD + ["attach", "--container-id", "0123456789abcdef-nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "no process in a cgroup" in r.stderr


@pytest.mark.lab
def test_real_run_through_kubectl_debug(lab_factory, containers, tmp_path):
    """`gdbdiag pod` for real, against a lab container standing in for the pod's: the
    fake kubectl answers the get with a pod naming the lab's runc container and runs the
    debug command as a podman container of the debug image — ephemeral (sharing only the
    target's PID namespace, exactly the --caps minimal capabilities) and --node."""
    lab = lab_factory(release="bullseye", workload="redis", fault="drop-aaaa-once")
    pods = tmp_path / "pods" / "shop"
    pods.mkdir(parents=True)
    (pods / "keydb-1.json").write_text(json.dumps(_pod_json(lab.runc_id)))
    out, log = tmp_path / "out", tmp_path / "kubectl.log"
    out.mkdir()
    env = dict(os.environ, PATH=f"{FAKES}:{os.environ['PATH']}", FAKE_KUBECTL_PODS=str(tmp_path / "pods"),
               FAKE_KUBECTL_LOG=str(log), FAKE_KUBECTL_OUT=str(out), XDG_CACHE_HOME=str(tmp_path),
               GDBDIAG_IMAGE=containers.image)
    wait_sticky(lab)
    for mode in ("ephemeral", "node"):
        log.write_text("")
        report = out / f"{mode}.json"
        argv = GD + ["pod", "-n", "shop", "keydb-1", *(["--node"] if mode == "node" else []),
                     "--", "--duration", "40", "--until", "stall", "--json", f"/out/{mode}.json"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        calls = [json.loads(l) for l in log.read_text().splitlines()]
        debug = calls[-1]
        name = next(a.split("=", 1)[1] for a in debug if a.startswith("--container="))
        containers.names.append(name)          # removed at teardown if still there
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert calls[0] == ["-n", "shop", "get", "pod", "keydb-1", "-o", "json"]
        assert re.fullmatch(NAME_RE, name)
        if mode == "ephemeral":
            assert debug[:4] == ["-n", "shop", "debug", "keydb-1"] and "--target=keydb" in debug
            assert debug[debug.index("--") + 1:][:4] == ["gdbdiag", "attach", "--process", "auto"]
        else:
            assert debug[:4] == ["-n", "shop", "debug", "node/node-3"]
            assert debug[debug.index("--") + 1:][:4] == ["gdbdiag", "attach", "--container-id",
                                                         lab.runc_id]
        assert "--profile=general" in debug and any(a.startswith("--custom=") for a in debug)
        rep = json.loads(report.read_text())
        assert rep["verdict"]["code"] == "STICKY_STALLING", r.stdout[-3000:]
        assert "== verdict: STICKY_STALLING" in r.stdout
        assert rep["target"]["pid"] == (1 if mode == "ephemeral" else lab.pid)
    assert lab.alive() and tracer_of(lab.pid) == 0
    assert diff_code(lab.pid, ("libc", "libresolv", "libnss_dns")) == []


@pytest.mark.parametrize("cid,path,found", [
    ("gdbdiag-t1-1", "/gdbdiag-t1-1", "gdbdiag-t1-1"),                      # runc (the lab)
    ("gdbdiag-t1-1", "/gdbdiag-t1-10", None),                               # not a part of a name
    ("gdbdiag-t1-1", "/gdbdiag-t1-1/init.scope", "gdbdiag-t1-1"),           # a sub-cgroup
    ("4f3c0123456789abcdef", "/kubepods/burstable/pod1/4f3c0123456789abcdef", "4f3c0123456789abcdef"),
    ("4f3c0123456789ab", "/kubepods.slice/kubepods-pod1.slice/cri-containerd-4f3c0123456789abcdef.scope",
     "4f3c0123456789abcdef"),                                               # abbreviated hex ID
    ("4f3c0123456789abcdef", "/system.slice/crio-4f3c0123456789abcdef.scope", "4f3c0123456789abcdef"),
    ("4f3c0123456789abcdef", "kubepods-pod1.slice:cri-containerd:4f3c0123456789abcdef",
     "4f3c0123456789abcdef"),
    ("f3c0123456789abcdef", "/kubepods/pod1/4f3c0123456789abcdef", None),   # not a suffix either
])
def test_container_id_in_cgroup_paths(cid, path, found):
    m = pod._cgroup_matches(cid).search(path)
    assert (m.group(1) if m else None) == found
