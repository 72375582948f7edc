"""`gdbdiag pod` — run `gdbdiag attach` against a process in a Kubernetes pod.

Two ways in, both built on `kubectl debug` (no cluster is reachable from the machines
this was developed on: the commands are checked by construction, and the PID mapping
they rely on — container ID to host PID, PID namespaces — against lab containers):

* ephemeral container (default): ``kubectl debug -n NS POD --target=CONTAINER
  --profile=sysadmin --image=IMG -- gdbdiag attach --container-process auto …``. The
  debug container joins the target container's PID namespace (``--target``) and gets
  CAP_SYS_PTRACE (``--profile=sysadmin``); it does not share its mount namespace, which
  is why gdbdiag reads the target's files through /proc/PID/root.
* ``--node``: ``kubectl debug node/NODE --profile=sysadmin --image=IMG -- gdbdiag attach
  --container-id ID …``. The node debug pod runs in the host PID namespace; the host PID
  is found from the container ID in /proc/*/cgroup (what crictl inspect .info.pid says).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from .errors import EXIT_OK, EXIT_REFUSED, EXIT_TOOL, GdbdiagError

DEFAULT_IMAGE = os.environ.get("GDBDIAG_IMAGE", "gdbdiag:0.1.0")


def add_parser(sub) -> None:
    p = sub.add_parser("pod", help="diagnose a process in a Kubernetes pod (kubectl debug)",
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("pod")
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument("-c", "--container", help="the target container (default: the pod's first)")
    p.add_argument("--image", default=DEFAULT_IMAGE,
                   help="an image with gdb and gdbdiag (default $GDBDIAG_IMAGE or %(default)s)")
    p.add_argument("--node", action="store_true",
                   help="debug from the node (host PID namespace) instead of an ephemeral container")
    p.add_argument("--profile", default="sysadmin", choices=("sysadmin", "general"),
                   help="kubectl debug profile; sysadmin grants CAP_SYS_PTRACE (default)")
    p.add_argument("--process", default="auto",
                   help="which process in the container: auto (its main process) or a name")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.epilog = "Arguments after `--` go to gdbdiag attach, e.g. `-- --duration 120 --until stall`."
    p.set_defaults(attach_args=[])
    p.set_defaults(func=run)


def _kubectl(ns):
    return ["kubectl"] + (["-n", ns] if ns else [])


def pod_info_cmd(args) -> list[str]:
    return _kubectl(args.namespace) + ["get", "pod", args.pod, "-o", "json"]


def parse_pod(pod_json: dict, container: str | None) -> dict:
    spec, status = pod_json.get("spec", {}), pod_json.get("status", {})
    names = [c["name"] for c in spec.get("containers", [])]
    if not names:
        raise GdbdiagError("the pod has no containers", EXIT_TOOL)
    name = container or names[0]
    if name not in names:
        raise GdbdiagError(f"no container {name!r} in the pod (has: {', '.join(names)})", 2)
    cid = None
    for cs in status.get("containerStatuses", []):
        if cs.get("name") == name:
            cid = cs.get("containerID")
    return {"node": spec.get("nodeName"), "container": name, "container_id": cid,
            "runtime": cid.split("://", 1)[0] if cid else None,
            "id": cid.split("://", 1)[1] if cid else None}


def debug_commands(args, info: dict) -> list[list[str]]:
    attach = ["gdbdiag", "attach"]
    passthru = list(args.attach_args)
    if args.node:
        if not info.get("id") or not info.get("node"):
            raise GdbdiagError("the container is not running (no containerID/nodeName yet)", EXIT_REFUSED)
        inner = attach + ["--container-id", info["id"]] + (
            ["--process", args.process] if args.process != "auto" else []) + passthru
        return [_kubectl(args.namespace) + [
            "debug", f"node/{info['node']}", "-it", f"--profile={args.profile}",
            f"--image={args.image}", "--"] + inner]
    inner = attach + ["--process", args.process] + passthru
    return [_kubectl(args.namespace) + [
        "debug", args.pod, "-it", f"--target={info['container']}", f"--profile={args.profile}",
        f"--image={args.image}", f"--container=gdbdiag-{int(time.time()) % 100000}", "--"] + inner]


def dry_run_script(args) -> list[str]:
    """The exact commands, as a shell script a person can paste: the cluster is asked
    only when it runs (node name, container ID, first container's name)."""
    k = shlex.join(_kubectl(args.namespace))
    pod = shlex.quote(args.pod)
    lines = []
    if args.container:
        cname = shlex.quote(args.container)
    else:
        lines.append(f"C=$({k} get pod {pod} -o jsonpath='{{.spec.containers[0].name}}')")
        cname = '"$C"'
    tail = shlex.join(list(args.attach_args))
    if args.node:
        lines.append(f"NODE=$({k} get pod {pod} -o jsonpath='{{.spec.nodeName}}')")
        lines.append(f"CID=$({k} get pod {pod} -o jsonpath='{{.status.containerStatuses"
                     f"[?(@.name==\"{args.container}\")].containerID}}')" if args.container else
                     f"CID=$({k} get pod {pod} -o jsonpath=\"{{.status.containerStatuses"
                     f"[?(@.name==\\\"$C\\\")].containerID}}\")")
        proc = [] if args.process == "auto" else ["--process", args.process]
        lines.append(f'{k} debug "node/$NODE" -it --profile={args.profile} '
                     f'--image={shlex.quote(args.image)} -- gdbdiag attach --container-id "$CID"'
                     + (" " + shlex.join(proc) if proc else "") + (" " + tail if tail else ""))
    else:
        lines.append(f"{k} debug {pod} -it --target={cname} --profile={args.profile} "
                     f"--image={shlex.quote(args.image)} --container=gdbdiag-debug -- "
                     f"gdbdiag attach --process {shlex.quote(args.process)}"
                     + (" " + tail if tail else ""))
    return lines


def run(args) -> int:
    if args.dry_run:
        for line in dry_run_script(args):
            print(line)
        return EXIT_OK
    if not shutil.which("kubectl"):
        raise GdbdiagError("kubectl is not installed or not on PATH", EXIT_TOOL)
    r = subprocess.run(pod_info_cmd(args), capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise GdbdiagError("kubectl get pod failed: " + (r.stderr.strip().splitlines() or ["?"])[-1],
                           EXIT_TOOL)
    info = parse_pod(json.loads(r.stdout), args.container)
    rc = EXIT_OK
    for c in debug_commands(args, info):
        rc = subprocess.call(c)
    return rc


# -- inside the debug container / node pod: which PID? ---------------------------------------
def _nspid(pid: str) -> list[int]:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


INITS = {"tini", "dumb-init", "catatonit", "pause", "sh", "bash", "s6-svscan", "runsvdir"}


def pid_for_container_id(cid: str, process: str = "auto") -> int:
    """Host PID of a container's main process from its ID (as in /proc/PID/cgroup)."""
    cid = cid.split("://", 1)[-1]
    if len(cid) < 12:
        raise GdbdiagError(f"container ID {cid!r} is too short to be unique", 2)
    members = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cgroup") as fh:
                cg = fh.read()
        except OSError:
            continue
        if cid in cg:
            members.append(pid)
    if not members:
        raise GdbdiagError(f"no process in a cgroup of container {cid[:12]}", EXIT_REFUSED)
    return int(pick(members, process))


def pick(pids: list[str], process: str = "auto") -> str:
    """The container's main process: by name, or its PID-namespace init unless that is
    only an init wrapper (tini, pause, sh…), then the init's first child."""
    if process != "auto":
        named = [p for p in pids if _comm(p) == process]
        if not named:
            raise GdbdiagError(f"no process named {process!r} in the container", EXIT_REFUSED)
        return min(named, key=int)
    inits = [p for p in pids if _nspid(p)[-1:] == [1]]
    init = inits[0] if inits else min(pids, key=int)
    if _comm(init) in INITS:
        try:
            kids = open(f"/proc/{init}/task/{init}/children").read().split()
        except OSError:
            kids = []
        kids = [k for k in kids if k in pids]
        if kids:
            return kids[0]
    return init


def pid_in_own_namespace(process: str = "auto") -> int:
    """In an ephemeral container sharing the target's PID namespace (kubectl debug
    --target): the target's main process among those not in our own container."""
    me = os.getpid()
    my_root = os.stat(f"/proc/{me}/root")
    others = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            st = os.stat(f"/proc/{pid}/root")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) != (my_root.st_dev, my_root.st_ino):
            others.append(pid)
    if not others:
        raise GdbdiagError("no process of another container is visible: was kubectl debug run "
                           "with --target=CONTAINER?", EXIT_REFUSED)
    return int(pick(others, process))
