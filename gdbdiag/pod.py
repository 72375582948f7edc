"""`gdbdiag pod` — run `gdbdiag attach` against a process in a Kubernetes pod.

Two ways in, both built on `kubectl debug` with the debug image gdbdiag:<version>
(deploy/Containerfile, scripts/build-image; see docs/field.md):

* ephemeral container (default): ``kubectl debug -n NS POD -it --target=CONTAINER
  --profile=general --custom=CAPS.json --image=IMG --container=gdbdiag-… -- gdbdiag
  attach --process auto …``. The debug container joins the target container's PID
  namespace (``--target``); it does not share its mount namespace, which is why gdbdiag
  reads the target's files through /proc/PID/root.
* ``--node``: ``kubectl debug node/NODE … -- gdbdiag attach --container-id ID …``. The
  node debug pod runs in the host PID namespace; the host PID is found from the
  container ID in /proc/*/cgroup (what `crictl inspect` reports as .info.pid).

Capabilities (``--caps``): ``minimal`` (default) grants exactly CAP_SYS_PTRACE and
CAP_SYS_ADMIN and drops every other one, through a custom profile file (kubectl >= 1.30,
``--custom``); ``sysadmin`` runs the debug container privileged (any kubectl with
debug profiles); ``general`` grants CAP_SYS_PTRACE alone (no kernel probes).

The commands are built by one function, :func:`kubectl_commands`: ``--dry-run`` prints
them (``shlex.join``) and the real run executes the very same lists. ``--dry-run`` asks
the cluster nothing when the command can be built from the flags (``-c CONTAINER``,
ephemeral mode); otherwise it runs the read-only ``kubectl get pod`` it prints first.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from . import __version__
from .errors import EXIT_OK, EXIT_REFUSED, EXIT_TOOL, EXIT_USAGE, GdbdiagError

DEFAULT_IMAGE = os.environ.get("GDBDIAG_IMAGE", f"gdbdiag:{__version__}")
# the capabilities gdbdiag needs (docs/field.md): ptrace access to the target's /proc
# files, and CAP_SYS_ADMIN for uprobes (Linux >= 6.16 and its stable backports require it
# for the uprobe PMU; it also covers bpf(2) and /proc/PID/map_files)
MINIMAL_CAPS = ("SYS_PTRACE", "SYS_ADMIN")
CAPS_CHOICES = ("minimal", "sysadmin", "general")


def add_parser(sub) -> None:
    p = sub.add_parser("pod", help="diagnose a process in a Kubernetes pod (kubectl debug)",
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pod")
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument("-c", "--container", help="the target container (default: the pod's first)")
    p.add_argument("--image", default=DEFAULT_IMAGE,
                   help="the debug image, gdb + gdbdiag (default $GDBDIAG_IMAGE or %(default)s)")
    p.add_argument("--node", action="store_true",
                   help="debug from the node (host PID namespace) instead of an ephemeral container")
    p.add_argument("--caps", choices=CAPS_CHOICES, default="minimal",
                   help="minimal: exactly CAP_SYS_PTRACE + CAP_SYS_ADMIN (kubectl --custom, "
                        "kubectl >= 1.30; default); sysadmin: a privileged debug container; "
                        "general: CAP_SYS_PTRACE only (no kernel probes)")
    p.add_argument("--process", default="auto",
                   help="which process in the container: auto (its main process) or a name")
    p.add_argument("--dry-run", action="store_true",
                   help="print the kubectl commands, shell-quoted, and run nothing that "
                        "changes the cluster")
    p.epilog = "Arguments after `--` go to gdbdiag attach, e.g. `-- --duration 120 --until stall`."
    p.set_defaults(attach_args=[])
    p.set_defaults(func=run)


# -- the commands ------------------------------------------------------------------------------
def debug_container_name() -> str:
    """A name no earlier run used: ephemeral containers cannot be removed from a pod, so
    a fixed name would work once per pod. Generated once per run."""
    return f"gdbdiag-{int(time.time()):x}-{secrets.token_hex(3)}"


def custom_profile_file(caps: tuple[str, ...] = MINIMAL_CAPS) -> str:
    """The `kubectl debug --custom` file granting exactly ``caps`` (all others dropped).
    Kept in the user's cache so a printed command still works when pasted."""
    spec = {"securityContext": {"capabilities": {"drop": ["ALL"], "add": list(caps)}}}
    text = json.dumps(spec, indent=1) + "\n"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gdbdiag"
    path = base / f"kubectl-debug-{'-'.join(c.lower() for c in caps)}.json"
    try:
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text)
            tmp.rename(path)
    except OSError as exc:
        raise GdbdiagError(f"cannot write the kubectl custom profile {path}: {exc.strerror}",
                           EXIT_TOOL) from exc
    return str(path)


def _kubectl(ns) -> list[str]:
    return ["kubectl"] + (["-n", ns] if ns else [])


def needs_pod_info(args) -> bool:
    """The debug command needs the cluster's answer (node, container ID, first container)."""
    return bool(args.node or not args.container)


def kubectl_commands(args, info: dict | None, name: str, custom: str | None = None) -> list[list[str]]:
    """Every kubectl command of this run, in order — the one place these argv lists are
    built: ``kubectl get pod`` when the pod's facts are needed, then ``kubectl debug``.
    ``info`` is :func:`parse_pod`'s answer to that get (while it is None and needed, only
    the get is returned); ``name`` the debug container's name; ``custom`` the custom
    profile file of ``--caps minimal``."""
    cmds = []
    if needs_pod_info(args):
        cmds.append(_kubectl(args.namespace) + ["get", "pod", args.pod, "-o", "json"])
        if info is None:
            return cmds
    if args.caps == "minimal":
        if not custom:
            raise GdbdiagError("--caps minimal needs the custom profile file", EXIT_TOOL)
        caps = ["--profile=general", f"--custom={custom}"]
    else:
        caps = [f"--profile={args.caps}"]
    attach = ["gdbdiag", "attach"]
    if args.node:
        if not info.get("id") or not info.get("node"):
            raise GdbdiagError("the container is not running (no containerID/nodeName yet)",
                               EXIT_REFUSED)
        target = [f"node/{info['node']}"]
        attach += ["--container-id", info["id"]] + (
            ["--process", args.process] if args.process != "auto" else [])
    else:
        target = [args.pod, f"--target={args.container or info['container']}"]
        attach += ["--process", args.process]
    cmds.append(_kubectl(args.namespace) + ["debug", *target, "-it", *caps,
                                            f"--image={args.image}", f"--container={name}",
                                            "--", *attach, *args.attach_args])
    return cmds


def parse_pod(pod_json: dict, container: str | None) -> dict:
    spec, status = pod_json.get("spec", {}), pod_json.get("status", {})
    names = [c["name"] for c in spec.get("containers", [])]
    if not names:
        raise GdbdiagError("the pod has no containers", EXIT_TOOL)
    name = container or names[0]
    if name not in names:
        raise GdbdiagError(f"no container {name!r} in the pod (has: {', '.join(names)})", EXIT_USAGE)
    cid = None
    for cs in status.get("containerStatuses", []):
        if cs.get("name") == name:
            cid = cs.get("containerID")
    return {"node": spec.get("nodeName"), "container": name, "container_id": cid,
            "runtime": cid.split("://", 1)[0] if cid else None,
            "id": cid.split("://", 1)[1] if cid else None}


def _pod_info(get_argv: list[str], container: str | None) -> dict:
    try:
        r = subprocess.run(get_argv, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise GdbdiagError("kubectl get pod did not answer in 60 s", EXIT_TOOL) from None
    if r.returncode != 0:
        raise GdbdiagError("kubectl get pod failed: " + (r.stderr.strip().splitlines() or ["?"])[-1],
                           EXIT_TOOL)
    try:
        pod_json = json.loads(r.stdout)
    except ValueError:
        raise GdbdiagError("kubectl get pod -o json printed no JSON", EXIT_TOOL) from None
    return parse_pod(pod_json, container)


def run(args) -> int:
    name = debug_container_name()                   # once: printed and run alike
    custom = custom_profile_file() if args.caps == "minimal" else None
    cmds = kubectl_commands(args, None, name, custom)
    if (needs_pod_info(args) or not args.dry_run) and not shutil.which("kubectl"):
        raise GdbdiagError("kubectl is not installed or not on PATH" + (
            " (--dry-run asks the cluster for the pod's node, container ID or first "
            "container; give -c CONTAINER for an ephemeral container)" if args.dry_run else ""),
            EXIT_TOOL)
    if needs_pod_info(args):
        # the get is read-only: --dry-run runs it too, to print the exact debug command
        info = _pod_info(cmds[0], args.container)
        cmds = kubectl_commands(args, info, name, custom)
    if args.dry_run:
        for c in cmds:
            print(shlex.join(c))
        return EXIT_OK
    return subprocess.call(cmds[-1])


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
_HEX = re.compile(r"[0-9a-f]+")


def _cgroup_matches(cid: str) -> re.Pattern:
    """The container ID as a whole name in a cgroup path: `/ID`, `docker-ID.scope`,
    `cri-containerd-ID.scope`, `crio-ID.scope`, `…:cri-containerd:ID` — never as part of
    a longer name (lab `x-1` is not lab `x-10`). A hex ID may be a prefix (docker's
    12-character short IDs)."""
    tail = r"[0-9a-f]*" if _HEX.fullmatch(cid) else ""
    return re.compile(rf"(?:^|[/:-])({re.escape(cid)}{tail})(?:\.scope)?(?:$|/)")


def container_processes(cid: str) -> dict[str, list[str]]:
    """{full container ID: [PIDs]} over /proc/*/cgroup (more than one key: ``cid`` is
    an abbreviation of several IDs)."""
    pat = _cgroup_matches(cid)
    found: dict[str, list[str]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cgroup") as fh:
                lines = fh.read().splitlines()
        except OSError:
            continue
        ids = sorted({m.group(1) for ln in lines if ln.count(":") >= 2
                      for m in [pat.search(ln.split(":", 2)[2])] if m})
        if ids:
            found.setdefault(ids[0], []).append(pid)
    return found


def pid_for_container_id(cid: str, process: str = "auto") -> int:
    """Host PID of a container's main process from its ID (as in /proc/PID/cgroup)."""
    cid = cid.split("://", 1)[-1].strip()
    if len(cid) < 12:
        raise GdbdiagError(f"container ID {cid!r} is too short to be unique", EXIT_USAGE)
    groups = container_processes(cid)
    if not groups:
        raise GdbdiagError(f"no process in a cgroup of container {cid[:12]} (is this a node "
                           "debug pod in the host PID namespace?)", EXIT_REFUSED)
    if len(groups) > 1:
        raise GdbdiagError(f"container ID {cid[:12]} matches {len(groups)} containers "
                           f"({', '.join(sorted(g[:16] for g in groups)[:3])}…): give more of it",
                           EXIT_USAGE)
    members = [p for ps in groups.values() for p in ps]
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
    others, denied = [], []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            st = os.stat(f"/proc/{pid}/root")
        except PermissionError:
            denied.append(pid)
            continue
        except OSError:
            continue
        if (st.st_dev, st.st_ino) != (my_root.st_dev, my_root.st_ino):
            others.append(pid)
    if not others and denied:
        raise GdbdiagError(
            f"cannot inspect the other processes in this PID namespace (/proc/{min(denied, key=int)}"
            "/root: permission denied): gdbdiag lacks CAP_SYS_PTRACE (grant SYS_PTRACE and "
            "SYS_ADMIN: `gdbdiag pod --caps minimal`, see docs/field.md)", EXIT_REFUSED)
    if not others:
        raise GdbdiagError("no process of another container is visible: was kubectl debug run "
                           "with --target=CONTAINER?", EXIT_REFUSED)
    return int(pick(others, process))
