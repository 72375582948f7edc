"""`gdbdiag pod`: the kubectl commands, and the PID mapping they rely on, on lab containers."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from gdbdiag import pod
from gdbdiag.errors import GdbdiagError

GD = [sys.executable, "-m", "gdbdiag.cli"]


def dry(*argv):
    r = subprocess.run(GD + ["pod", "--dry-run", *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


def test_dry_run_ephemeral_container_command():
    lines = dry("-n", "prod", "keydb-1", "-c", "keydb", "--", "--duration", "120", "--until", "stall")
    assert lines == ["kubectl -n prod debug keydb-1 -it --target=keydb --profile=sysadmin "
                     "--image=gdbdiag:0.1.0 --container=gdbdiag-debug -- gdbdiag attach "
                     "--process auto --duration 120 --until stall"]


def test_dry_run_node_commands_find_node_and_container_id():
    lines = dry("--node", "-c", "keydb", "--image", "reg.example/gdbdiag:1", "keydb-1")
    assert lines[0] == "NODE=$(kubectl get pod keydb-1 -o jsonpath='{.spec.nodeName}')"
    assert "containerStatuses[?(@.name==\"keydb\")].containerID" in lines[1]
    assert lines[2] == ('kubectl debug "node/$NODE" -it --profile=sysadmin '
                        '--image=reg.example/gdbdiag:1 -- gdbdiag attach --container-id "$CID"')
    # without -c, the first container's name is looked up first
    lines = dry("--node", "keydb-1")
    assert lines[0].startswith("C=$(kubectl get pod keydb-1 -o jsonpath='{.spec.containers[0].name}')")


def test_parse_pod_json():
    pj = {"spec": {"nodeName": "node-3", "containers": [{"name": "keydb"}, {"name": "exporter"}]},
          "status": {"containerStatuses": [
              {"name": "keydb", "containerID": "containerd://0123456789abcdef0123"},
              {"name": "exporter", "containerID": "containerd://fedcba9876543210"}]}}
    info = pod.parse_pod(pj, None)
    assert info == {"node": "node-3", "container": "keydb",
                    "container_id": "containerd://0123456789abcdef0123",
                    "runtime": "containerd", "id": "0123456789abcdef0123"}
    with pytest.raises(GdbdiagError, match="no container 'x'"):
        pod.parse_pod(pj, "x")
    args = argparse.Namespace(namespace="prod", pod="keydb-1", node=True, profile="sysadmin",
                              image="img", process="keydb-server", attach_args=["--until", "stall"])
    cmd = pod.debug_commands(args, info)[0]
    assert cmd[:4] == ["kubectl", "-n", "prod", "debug"] and "node/node-3" in cmd
    assert cmd[-6:] == ["--container-id", "0123456789abcdef0123", "--process", "keydb-server",
                        "--until", "stall"]


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
    with pytest.raises(GdbdiagError, match="no process in a cgroup"):
        pod.pid_for_container_id("0123456789abcdef-not-a-container")
    # the attach CLI takes --container-id in place of a PID (refusal path: bad id)
    r = subprocess.run(GD + ["attach", "--container-id", "0123456789abcdef-nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "no process in a cgroup" in r.stderr
